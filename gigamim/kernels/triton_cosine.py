"""Fused row L2-normalisation with an optional per-row scale, in Triton.

    out = x / max(||x||, eps) * scale_row

For SwinV2 cosine attention, q gets scale_row = exp(clamp(logit_scale, max=log 100))
of its head and k gets no scale. Eager PyTorch does norm, clamp, divide and multiply as
separate passes over q (L x d per window and head); this is one read and one write.

Backward (n = ||x||, r = 1/max(n, eps), xhat = x * r, dn = scale_row * dout):
    n > eps:   dx = r * (dn - xhat * sum(dn * xhat))
    n <= eps:  dx = r * dn                      (the clamp makes r a constant)
    dscale_row = sum(dout * xhat)               (only when asked for)
The row norm is recomputed in the backward rather than saved: rows are short (head dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_layernorm import device_guard, tile_shape

MAX_N = 4096
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _l2norm_fwd_kernel(X, S, OUT, M, N, eps, HAS_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    if HAS_S:
        r = r * tl.load(S + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x * r[:, None]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _l2norm_bwd_kernel(DO, X, S, DX, DS, M, N, eps, HAS_S: tl.constexpr, NEED_DS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    r = 1.0 / tl.maximum(norm, eps)
    xhat = x * r[:, None]
    if NEED_DS:
        tl.store(DS + rows, tl.sum(g * xhat, axis=1), mask=rmask)
    if HAS_S:
        dn = g * tl.load(S + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    else:
        dn = g
    # Below eps the divisor is the constant eps, so the projection term drops out.
    proj = tl.where(norm > eps, tl.sum(dn * xhat, axis=1), 0.0)
    dx = (dn - xhat * proj[:, None]) * r[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _tile(n: int) -> tuple[int, int, int]:
    # 8 values a thread: at 32 (4 warps on 4096-value tiles) the backward hit 255 registers
    # and spilled for head dim 64 (ptxas, sm_90).
    return tile_shape(n, 2048, 8)


def supports(x: torch.Tensor) -> bool:
    return x.dtype in SUPPORTED_DTYPES and x.dim() > 0 and 0 < x.shape[-1] <= MAX_N and x.numel() > 0


class FusedL2Normalize(torch.autograd.Function):
    """x / max(||x||, eps) * scale_rows over the last dim; scale_rows is (rows,) or None."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward runs under the forward's autocast state
    def forward(ctx, x, scale_rows, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        m = x2.shape[0]
        s = None if scale_rows is None else scale_rows.contiguous()
        out = torch.empty_like(x2)
        block_m, block_n, warps = _tile(n)
        with device_guard(x2):
            _l2norm_fwd_kernel[(triton.cdiv(m, block_m),)](
                x2, s, out, m, n, float(eps), HAS_S=s is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
        ctx.save_for_backward(x2, s)
        ctx.eps = float(eps)
        ctx.x_shape = x.shape
        return out.view(x.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x2, s = ctx.saved_tensors
        m, n = x2.shape
        need_ds = bool(ctx.needs_input_grad[1])
        g2 = grad_out.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        ds = torch.empty(m, dtype=torch.float32, device=x2.device) if need_ds else None
        block_m, block_n, warps = _tile(n)
        with device_guard(x2):
            _l2norm_bwd_kernel[(triton.cdiv(m, block_m),)](
                g2, x2, s, dx, ds, m, n, ctx.eps, HAS_S=s is not None, NEED_DS=need_ds,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
        return dx.view(ctx.x_shape), (ds.to(s.dtype) if need_ds else None), None
