"""Model registry: ``register_model`` / ``create_model`` / ``list_models``.

A variant is a factory plus its default arguments; ``create_model(name, **overrides)``
merges overrides over the defaults and rejects names and arguments it does not know, so a
typo in a config fails at start-up with the list of valid choices.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List

_REGISTRY: Dict[str, Callable] = {}
_DEFAULTS: Dict[str, dict] = {}
_CLASSES: Dict[str, Any] = {}
_FAMILIES: Dict[str, Any] = {}


def register_model(name: str, factory: Callable, defaults: dict | None = None, model_class: type | None = None,
                   family: Any = None) -> Callable:
    """``model_class``: the class the factory builds; its ``__init__`` arguments (and those of
    its bases, e.g. timm's) are the valid overrides (default: the factory's own arguments).
    ``family``: the variant's `models.family.FamilySpec` (`models.family.register_variants`
    registers a whole family through here)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory
    _DEFAULTS[name] = dict(defaults or {})
    _CLASSES[name] = model_class if model_class is not None else factory
    _FAMILIES[name] = family
    return factory


def model_class(name: str) -> type:
    """The class variant ``name`` builds (its factory, when registered without one)."""
    _check_name(name)
    return _CLASSES[name]


def registered_family(name: str):
    """The family spec variant ``name`` was registered with (None: registered without one)."""
    _check_name(name)
    return _FAMILIES[name]


def _allowed_arguments(cls: type) -> set:
    """Named ``__init__`` arguments of ``cls`` and of the bases it passes ``**kwargs`` on to."""
    if not isinstance(cls, type):  # a factory registered without its class: its own arguments
        params = inspect.signature(cls).parameters
        return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    allowed = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith("torch."):
            continue
        params = inspect.signature(init).parameters
        allowed |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return allowed - {"weight_init"}


def list_models(pattern: str | None = None) -> List[str]:
    """Registered model names, by family, smallest first (registration order); ``pattern``
    (fnmatch, e.g. ``"swinv2_*"``) keeps the matching ones."""
    import fnmatch

    return [n for n in _REGISTRY if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_defaults(name: str) -> dict:
    """A copy of the default arguments of variant ``name``."""
    _check_name(name)
    return dict(_DEFAULTS[name])


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")


def model_arguments(name: str) -> set:
    """The override names variant ``name`` accepts."""
    return _allowed_arguments(model_class(name))


def create_model(name: str, **overrides):
    """Build variant ``name`` with ``overrides`` (img_size, window_size, pretrained_window_sizes,
    drop_path_rate, num_classes, attn_impl, sequential_stages, attn_chunk, grad_checkpointing,
    checkpoint_offload, ...). Unknown names/arguments raise ValueError listing the valid ones."""
    allowed = _allowed_arguments(model_class(name))  # the signature is the list of valid overrides
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown argument(s) {unknown}; valid: {sorted(allowed)}")
    return _REGISTRY[name](**overrides)
