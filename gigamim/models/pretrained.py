"""`gigamim.models.from_pretrained(path)`: the module a gigamim safetensors file describes.

The file's metadata (written by `gigamim import`, `gigamim export` and the trainers) names the
model and its settings (``gigamim_config``: the run's ``model`` section). A file that holds a
decoder (``encoder.*`` + ``decoder.*``: SimMIM pretraining) builds ``SimMIM(encoder)``; any
other builds the encoder, with a classifier of the file's size when it holds ``head.*``.
Weights are loaded strictly: a key the module lacks or leaves unfilled is an error naming it.
"""

from __future__ import annotations

from typing import Any

import torch


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def from_pretrained(path: str, **overrides: Any) -> torch.nn.Module:
    """Build and load the module of safetensors file ``path``; ``overrides`` go to the encoder
    (e.g. ``img_size``, ``window_size`` for another resolution; ``drop_path_rate``)."""
    import yaml

    from gigamim.models.registry import create_model
    from gigamim.models.simmim import SimMIM

    state, meta = _read(path)
    try:
        model_cfg = (yaml.safe_load(meta.get("gigamim_config") or "") or {}).get("model") or {}
    except (yaml.YAMLError, AttributeError):
        model_cfg = {}
    name = model_cfg.get("name")
    if not name:
        raise ValueError(f"{path}: its metadata names no model (gigamim_config.model.name); build the model with "
                         "create_model(...) and load the weights yourself")
    kwargs = {k: model_cfg[k] for k in ("img_size", "window_size", "pretrained_window_sizes")
              if model_cfg.get(k) is not None}
    if "pretrained_window_sizes" in kwargs:
        kwargs["pretrained_window_sizes"] = tuple(kwargs["pretrained_window_sizes"])
    kwargs.update(overrides)
    simmim = any(k.startswith("decoder.") for k in state)
    head = state.get("head.fc.weight", state.get("head.weight"))
    num_classes = 0 if simmim or head is None else int(head.shape[0])
    encoder = create_model(str(name), num_classes=num_classes, **kwargs)
    module = SimMIM(encoder) if simmim else encoder
    # in the file's floating dtype (an fp64 file stays exact; bf16 files load as bf16)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        module = module.to(dtypes.pop())
    if hasattr(encoder, "remap_pretrained_state") and not simmim:
        state = encoder.remap_pretrained_state(state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {name}{' (SimMIM)' if simmim else ''}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return module
