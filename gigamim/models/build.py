"""SimMIM models from the `model:` section of a run config, as a plain mapping.

The trainer, the tools and the tests build models the same way through here, so the
mapping from config keys to model arguments exists once. It takes a mapping (e.g.
`dataclasses.asdict(cfg.model)`), never a config object: models stay independent of the
config module.
"""

from __future__ import annotations

from typing import Any, Mapping

from gigamim.models.family import Geometry, ModelConfigError, encoder_stride, family_of
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


def position_bias_windows(name: str, **geometry) -> tuple[int, ...] | None:
    """Per stage, the window a model of variant ``name`` built with ``geometry`` (img_size,
    window_size, pretrained_window_sizes; None = the variant's default) scales its continuous
    position bias by: SwinV2's pretrained window where one is set, else the stage's own window
    after the shrink rule (192 px, window 12: 12, 12, 12, 6). Fine-tuning at another window
    keeps these as ``pretrained_window_sizes`` (the official recipe's [12, 12, 12, 6]). None for
    families without such a scale (Swin V1's tables and ViT's embeddings are resized instead).
    Built on the meta device: no memory, no weights."""
    import torch

    if "pretrained_window_sizes" not in model_arguments(name):
        return None
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in geometry.items() if v is not None}
    with torch.device("meta"):
        encoder = create_model(name, **kwargs)
    out = []
    for layer in encoder.layers:
        attn = layer.blocks[0].attn if len(layer.blocks) else None
        if attn is None:
            return None
        pretrained, window = int(attn.pretrained_window_size[0]), int(attn.window_size[0])
        out.append(pretrained if pretrained > 0 else window)
    return tuple(out)


def check_model_section(model: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                        mask_patch_size: int | None = None) -> Geometry:
    """The model-shape rules of a model section, before anything is built or any process group
    exists: the variant is registered, its family takes every key set, and the family's rules
    hold (`FamilySpec.validate`: image size, patch, window tiling, the mask grid). Raises
    ModelConfigError whose ``key`` is the section's key (``name``, ``img_size``, ...) or
    ``mask_patch_size``; returns the geometry."""
    name = model["name"]
    try:
        spec = family_of(str(name))
    except ValueError as e:
        raise ModelConfigError("name", str(e)) from None
    kwargs = encoder_kwargs(model, defaults)
    accepted = model_arguments(name)
    for key in sorted(set(kwargs) - accepted):
        raise ModelConfigError(key, f"{key}={kwargs[key]!r}: {name} ({spec.name}) takes no {key!r}; leave it unset "
                               f"(its arguments: {', '.join(sorted(accepted))})")
    return spec.validate(spec.resolve(name, kwargs), mask_patch_size)


def build_simmim(model: Mapping[str, Any], num_classes: int = 0, *, defaults: Mapping[str, Any] | None = None,
                 norm_target: bool = False, norm_target_patch: int = 47) -> SimMIM:
    """SimMIM(encoder) as the model section says. Pure PyTorch: the caller decides on zero.Init."""
    encoder = create_model(model["name"], num_classes=num_classes, **encoder_kwargs(model, defaults))
    return SimMIM(encoder, encoder_stride=encoder_stride(encoder), norm_target=norm_target,
                  norm_target_patch=norm_target_patch)
