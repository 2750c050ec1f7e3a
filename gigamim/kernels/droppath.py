"""The drop-path (stochastic depth) multiplier as a tensor, for the fused residual kernels.

timm's `DropPath` multiplies its input by a per-sample keep mask / keep_prob; a fused
`shortcut + scale * norm(y)` needs that multiplier itself. This draws it exactly as
timm.layers.drop_path does (same shape, dtype, device and RNG calls), so swapping
`x + drop_path(norm(y))` for the fused call leaves seeded runs unchanged.
"""

from __future__ import annotations

import torch


def drop_path_scale(x: torch.Tensor, drop_prob: float, training: bool, scale_by_keep: bool = True):
    """(B, 1, ..., 1) multiplier shaped for `x`, or None when drop path is a no-op (eval, p == 0)."""
    if drop_prob == 0.0 or not training:
        return None
    if not 0.0 < drop_prob <= 1.0:
        raise ValueError(f"drop_prob={drop_prob} must lie in [0, 1]")
    keep_prob = 1.0 - drop_prob
    scale = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        scale.div_(keep_prob)
    return scale
