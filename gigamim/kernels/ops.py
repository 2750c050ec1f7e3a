"""The fused ops: each picks a backend per call (`dispatch.py`) and falls back to PyTorch."""

from __future__ import annotations

import math

import torch

from . import torch_impl
from .dispatch import backend



def _check_affine(name: str, t, n: int) -> None:
    if t is not None and tuple(t.shape) != (n,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n},) to match the last dim of the input")


def _row_scale(scale, y):
    """`scale` as one value per row of y (flattened y.shape[:-1]), or None if it is not per-row."""
    lead = y.shape[:-1]
    if scale.dim() > y.dim() or (scale.dim() and scale.shape[-1] != 1):
        return None
    try:
        return scale.expand(*lead, 1).reshape(-1)
    except RuntimeError:
        return None


def implementation_for(x: torch.Tensor, weight=None, bias=None) -> str:
    """The backend that will run for this input (device, dtype, width and affine shapes checked).

    residual_post_norm / cosine_normalize additionally drop to torch for a scale that is
    not one value per row (e.g. a full-shape tensor); this does not see that argument.
    """
    name = backend(x)
    if name == "triton":
        from . import triton_layernorm

        return name if triton_layernorm.supports(x, weight, bias) else "torch"
    if name == "apex":
        from . import apex_impl

        return name if apex_impl.supports(x, weight, bias) else "torch"
    return name


def layer_norm(x: torch.Tensor, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim (weight/bias may be None)."""
    n = x.shape[-1]
    _check_affine("weight", weight, n)
    _check_affine("bias", bias, n)
    if torch.compiler.is_compiling():
        return torch_impl.layer_norm(x, weight, bias, eps)
    impl = implementation_for(x, weight, bias)
    if impl == "triton":
        from .triton_layernorm import FusedResidualLayerNorm

        return FusedResidualLayerNorm.apply(None, x, weight, bias, None, eps)
    if impl == "apex":
        from . import apex_impl

        return apex_impl.layer_norm(x, weight, bias, eps)
    return torch_impl.layer_norm(x, weight, bias, eps)


def residual_post_norm(
    shortcut: torch.Tensor, y: torch.Tensor, weight, bias, eps: float = 1e-5, drop_path_scale=None
) -> torch.Tensor:
    """`shortcut + drop_path_scale * LayerNorm(y)` -- SwinV2's `x + drop_path(norm(f(x)))`.

    drop_path_scale: None, or a per-sample multiplier broadcastable as (B, 1, ..., 1)
    (timm's drop-path keep mask divided by the keep probability). Gradients flow to
    shortcut, y, weight, bias and (if it requires grad) drop_path_scale.
    """
    n = y.shape[-1]
    if shortcut.shape != y.shape:
        raise ValueError(f"shortcut has shape {tuple(shortcut.shape)} but the branch output y has {tuple(y.shape)}")
    _check_affine("weight", weight, n)
    _check_affine("bias", bias, n)
    if drop_path_scale is not None and not isinstance(drop_path_scale, torch.Tensor):
        drop_path_scale = torch.as_tensor(drop_path_scale, dtype=y.dtype, device=y.device)
    if torch.compiler.is_compiling():
        # Inductor generates its own fused add + LayerNorm (and nothing here breaks the graph).
        return torch_impl.residual_post_norm(shortcut, y, weight, bias, eps, drop_path_scale)
    impl = implementation_for(y, weight, bias)
    if impl == "triton":
        rows = None if drop_path_scale is None else _row_scale(drop_path_scale, y)
        if drop_path_scale is None or rows is not None:
            from .triton_layernorm import FusedResidualLayerNorm

            return FusedResidualLayerNorm.apply(shortcut, y, weight, bias, rows, eps)
    elif impl == "apex":
        from . import apex_impl

        return apex_impl.residual_post_norm(shortcut, y, weight, bias, eps, drop_path_scale)
    return torch_impl.residual_post_norm(shortcut, y, weight, bias, eps, drop_path_scale)


# SwinV2 clamps the per-head logit scale at log(1/0.01) = log(100).
MAX_LOGIT_SCALE = math.log(100.0)


def cosine_normalize(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor, max_logit_scale: float = MAX_LOGIT_SCALE):
    """SwinV2 cosine-attention operands: (normalize(q) * exp(clamp(logit_scale, max)), normalize(k)).

    `q_out @ k_out.transpose(-2, -1)` equals timm's
    `(normalize(q) @ normalize(k).T) * clamp(logit_scale, max).exp()`; scaling q (L x d)
    instead of the scores (L x L) is cheaper. logit_scale is (heads, 1, 1) against q of
    shape (..., heads, L, d).
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q has head dim {q.shape[-1]} but k has {k.shape[-1]}")
    if torch.compiler.is_compiling():
        # Inductor fuses the eager version itself; a hand-launched kernel would break the graph.
        return torch_impl.cosine_normalize(q, k, logit_scale, max_logit_scale)
    scale = torch.clamp(logit_scale, max=max_logit_scale).exp()
    if backend(q) == "triton":
        from . import triton_cosine

        rows = _row_scale(scale, q)
        if rows is not None and triton_cosine.supports(q) and triton_cosine.supports(k):
            # F.normalize's default eps; the clamp/exp above stay in autograd, the kernel
            # returns the per-row scale gradient and autograd folds it back to (heads, 1, 1).
            return (
                triton_cosine.FusedL2Normalize.apply(q, rows, 1e-12),
                triton_cosine.FusedL2Normalize.apply(k, None, 1e-12),
            )
    # apex has no such kernel: apex and torch both run the eager version.
    return torch_impl.cosine_normalize(q, k, logit_scale, max_logit_scale)
