"""Model registry: ``register_model`` / ``create_model`` / ``list_models``.

A variant is a factory plus its default arguments; ``create_model(name, **overrides)``
merges overrides over the defaults and rejects names and arguments it does not know, so a
typo in a config fails at start-up with the list of valid choices.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List

_REGISTRY: Dict[str, Callable] = {}
_DEFAULTS: Dict[str, dict] = {}


def register_model(name: str, factory: Callable, defaults: dict | None = None) -> Callable:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory
    _DEFAULTS[name] = dict(defaults or {})
    return factory


def list_models() -> List[str]:
    """Registered model names, smallest first (registration order)."""
    return list(_REGISTRY)


def model_defaults(name: str) -> dict:
    """A copy of the default arguments of variant ``name``."""
    _check_name(name)
    return dict(_DEFAULTS[name])


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")


def create_model(name: str, **overrides):
    """Build variant ``name`` with ``overrides`` (img_size, window_size, pretrained_window_sizes,
    drop_path_rate, num_classes, attn_impl, sequential_stages, attn_chunk, grad_checkpointing,
    checkpoint_offload, ...). Unknown names/arguments raise ValueError listing the valid ones."""
    _check_name(name)
    from gigamim.models.swinv2 import SwinTransformerV2  # the signature is the list of valid overrides

    allowed = set(inspect.signature(SwinTransformerV2.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown argument(s) {unknown}; valid: {sorted(allowed)}")
    return _REGISTRY[name](**overrides)
