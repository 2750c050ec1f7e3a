"""Fused kernels behind one dispatch, each with a PyTorch fallback.

    from gigamim.kernels import residual_post_norm, layer_norm, backend, available_backends

    # SwinV2 res-post-norm block: x + drop_path(norm1(attn(x)))
    scale = drop_path_scale(x, self.drop_path1.drop_prob, self.training)   # None in eval / p == 0
    x = residual_post_norm(x, attn_out, norm1.weight, norm1.bias, norm1.eps, scale)
    # or, under ZeRO-3 (see modules.py), the module form with the same state_dict as nn.LayerNorm:
    x = norm1(attn_out, shortcut=x, drop_path_scale=scale)   # norm1 = ResPostLayerNorm(C)

Backends ("triton" | "apex" | "torch") are picked per call from the tensor's device and
the env var GIGAMIM_KERNELS (auto|torch|triton|apex); see `dispatch.py`. Every entry
point is differentiable on every backend. This package imports nothing of gigamim.
"""

from gigamim.kernels import torch_impl  # noqa: F401  (the reference implementations, for tests and benches)
from gigamim.kernels.dispatch import available_backends, backend
from gigamim.kernels.droppath import drop_path_scale
from gigamim.kernels.ops import MAX_LOGIT_SCALE, cosine_normalize, implementation_for, layer_norm, residual_post_norm
from gigamim.kernels.modules import ResPostLayerNorm

__all__ = [
    "MAX_LOGIT_SCALE",
    "residual_post_norm",
    "layer_norm",
    "cosine_normalize",
    "backend",
    "available_backends",
    "implementation_for",
    "drop_path_scale",
    "ResPostLayerNorm",
]
