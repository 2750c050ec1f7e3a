"""Re-initialise a model built on the meta device, once its storage exists (plain PyTorch).

An engine that never lets one rank hold the whole model (FSDP2) builds it under
``torch.device("meta")``, shards it, and allocates only each rank's shards (``to_empty``):
the values are then garbage, parameters and non-persistent buffers alike. Every module of
gigamim's models (and of timm >= 1.0.31, which they build on) re-initialises what it owns in
``reset_parameters()``; a parent may override its children there (timm's ViT / Swin V1 apply
their Linear init model-wide), so the walk is post-order, the order of construction.

`meta_init_problem` says, from a model built on the meta device, why it could NOT be
re-initialised this way (a module holding parameters or buffers of its own without a
``reset_parameters``), or None; an engine refuses such a model before it builds anything.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn

MASK_TOKEN_STD = 0.02


def init_mask_token_(token: torch.Tensor) -> torch.Tensor:
    """SimMIM's mask token init (trunc normal, std .02, as the official code); in place."""
    from timm.layers import trunc_normal_

    with torch.no_grad():
        return trunc_normal_(token, std=MASK_TOKEN_STD)


class MaskTokenMixin:
    """SimMIM's mask token, declared by the encoder (key ``mask_token``, shape (1, 1, 1, C)).

    An encoder calls ``_declare_mask_token()`` in its ``__init__``: the token is then a
    parameter slot holding None (no state-dict key, so a bare encoder loads strictly into timm)
    until the SimMIM wrapper calls ``add_mask_token()``. ``mask_token_reset()`` belongs in the
    encoder's ``reset_parameters`` (a meta-device build)."""

    def _declare_mask_token(self) -> None:
        self.register_parameter("mask_token", None)

    def add_mask_token(self) -> nn.Parameter:
        """Create the token (trunc normal, std .02, as the official code) and return it."""
        self.mask_token = nn.Parameter(init_mask_token_(torch.zeros(1, 1, 1, self.embed_dim)))
        return self.mask_token

    def mask_token_reset(self) -> None:
        if self.mask_token is not None:
            init_mask_token_(self.mask_token)

    def masked(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings ``x`` (B, ..., C) with the masked ones (``mask``: B, ..., one entry
        per patch) replaced by the token; ``x`` itself without a mask."""
        if mask is None:
            return x
        if self.mask_token is None:
            raise ValueError("a mask was given but this encoder has no mask_token (wrap it in SimMIM)")
        w = mask.reshape(*x.shape[:-1], 1).to(x.dtype)
        return x * (1.0 - w) + self.mask_token.reshape(*([1] * (x.ndim - 1)), -1).to(x.dtype) * w


def _owns_state(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values()) or any(
        b is not None for b in module._buffers.values())


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


def meta_init_problem(model: nn.Module) -> Optional[str]:
    """Why `reset_after_meta(model)` would leave something uninitialised, or None."""
    for name, module in _post_order(model):
        if _owns_state(module) and not callable(getattr(module, "reset_parameters", None)):
            own = [n for n, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
            return (f"module {name or '<root>'} ({type(module).__name__}) holds {', '.join(own)} but has no "
                    "reset_parameters() to re-initialise them after a meta-device build")
    return None


def reset_after_meta(model: nn.Module) -> None:
    """Re-initialise every parameter and buffer of `model` in place (after ``to_empty``), each
    module resetting what it owns, children before parents. Parameters may be sharded DTensors:
    the inits are element-wise (fills, uniform / normal draws) and act on each rank's shard,
    drawing from this process's RNG (the caller seeds it)."""
    problem = meta_init_problem(model)
    if problem:
        raise ValueError(f"cannot re-initialise {type(model).__name__}: {problem}")
    with torch.no_grad():
        for _, module in _post_order(model):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
