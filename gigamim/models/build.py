"""SimMIM models from the `model:` section of a run config, as a plain mapping.

The trainer, the tools and the tests build models the same way through here, so the
mapping from config keys to model arguments exists once. It takes a mapping (e.g.
`dataclasses.asdict(cfg.model)`), never a config object: models stay independent of the
config module.
"""

from __future__ import annotations

from typing import Any, Mapping

from gigamim.models.registry import create_model, model_arguments
from gigamim.models.simmim import SimMIM

# model.* keys that are not encoder arguments (handled by the trainer).
_NOT_ENCODER_ARGS = ("name", "compile", "compile_mode", "init_from")
# Values that mean "not used": a key the family has no use for (a ViT has no windows or
# sequential attention) may keep them; any other value there is an error naming the key.
_UNUSED = (None, False, [], (), 0)


def encoder_kwargs(model: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Encoder arguments from the model section: None means "the variant's default". Keys the
    encoder family does not take are dropped when they hold a `defaults` value (or an
    unused-value such as False / []), so one config schema serves SwinV2, Swin V1 and ViT."""
    accepted = model_arguments(model["name"])
    defaults = defaults or {}
    kwargs = {}
    for k, v in model.items():
        if k in _NOT_ENCODER_ARGS or v is None:
            continue
        if k not in accepted and (v in _UNUSED or (k in defaults and defaults[k] == v)):
            continue
        kwargs[k] = v
    for key in ("sequential_stages", "pretrained_window_sizes"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def encoder_stride(encoder) -> int:
    """Total reduction from pixels to the encoder's output map (32 for Swin, 16 for ViT/16)."""
    stride = getattr(encoder, "encoder_stride", None)
    return int(stride) if stride else int(encoder.patch_size * 2 ** (len(encoder.depths) - 1))


def build_simmim(model: Mapping[str, Any], num_classes: int = 0, *, defaults: Mapping[str, Any] | None = None,
                 norm_target: bool = False, norm_target_patch: int = 47) -> SimMIM:
    """SimMIM(encoder) as the model section says. Pure PyTorch: the caller decides on zero.Init."""
    encoder = create_model(model["name"], num_classes=num_classes, **encoder_kwargs(model, defaults))
    return SimMIM(encoder, encoder_stride=encoder_stride(encoder), norm_target=norm_target,
                  norm_target_patch=norm_target_patch)
