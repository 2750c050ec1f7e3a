"""nn.Module form of the fused res-post-norm, for models sharded with ZeRO-3.

ZeRO-3 gathers a module's parameters when *that module's* forward runs. A block that
calls `residual_post_norm(x, y, self.norm1.weight, ...)` reads norm1's parameters from
outside norm1's forward: DeepSpeed (0.19) then registers them as "external" to the block
on the first step and all-gathers them synchronously, without prefetch. Calling the norm
module itself keeps the usual per-module gather and prefetch, so models should prefer

    self.norm1 = ResPostLayerNorm(dim)                 # drop-in for nn.LayerNorm(dim)
    x = self.norm1(attn_out, shortcut=x, drop_path_scale=scale)

It subclasses nn.LayerNorm, so the state_dict keys (`norm1.weight`, `norm1.bias`) and
`isinstance(m, nn.LayerNorm)` checks (weight-decay grouping, init) are unchanged.
"""

from __future__ import annotations

from torch import nn

from gigamim.kernels.ops import layer_norm, residual_post_norm


class ResPostLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim; with `shortcut`, returns `shortcut + drop_path_scale * LN(y)` fused."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"ResPostLayerNorm normalises the last dim only, got normalized_shape={self.normalized_shape}")

    def forward(self, y, shortcut=None, drop_path_scale=None):
        if shortcut is None:
            if drop_path_scale is not None:
                raise ValueError("drop_path_scale needs a shortcut: it scales the normed branch before the add")
            return layer_norm(y, self.weight, self.bias, self.eps)
        return residual_post_norm(shortcut, y, self.weight, self.bias, self.eps, drop_path_scale)
