"""Fused (residual add +) LayerNorm in Triton, forward and backward.

    out = shortcut + scale_row * LayerNorm(y)            (scale_row, shortcut optional)

This is SwinV2's res-post-norm `x + drop_path(norm(f(x)))` in one pass over memory: the
eager version reads `y`, writes the normed tensor, reads it again for the drop-path
multiply, writes again, then reads both operands of the add. The fused forward reads
`y` and `shortcut` once and writes `out` once, keeping per-row mean/rstd (fp32) for
the backward.

Backward (per row, xhat = (y - mean) * rstd, dn = scale_row * dout):
    dy     = rstd * (dn*w - mean(dn*w) - xhat * mean(dn*w * xhat))
    dw, db = sum over rows of dn*xhat, dn   -- two-stage: each program keeps a partial
             sum in registers over the row tiles it visits, writes one fp32 row to a
             (programs, 2N) buffer, and a second kernel sums that buffer's rows. This
             avoids atomics (non-deterministic, slow on bf16) and a (M, N) temporary.
    dscale = sum over the row of dout * (xhat*w + b)      (only when asked for)

All arithmetic is fp32 whatever the io dtype (fp32/fp16/bf16). Rows are processed
as (BLOCK_M, BLOCK_N) tiles; BLOCK_N is the next power of two >= N with the tail
masked, so SwinV2 widths like 96, 192, 352, 1408 work.

Importing this module imports triton and JIT-decorates the kernels; whether they run
on the GPU or in the CPU interpreter is fixed by TRITON_INTERPRET at that moment.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Widest row the single-tile kernels keep in registers without spilling (SwinV2-G's
# widest LayerNorm is 4096); wider rows go to the torch path.
MAX_N = 8192
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Stage-two tile (partial rows x columns): 16 values a thread at 4 warps.
SUM_BLOCK_P, SUM_BLOCK_K = 16, 128


@triton.jit
def _ln_fwd_kernel(
    Y, R, W, B, S, OUT, MEAN, RSTD,
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    # int64 offsets: M * N passes 2**31 for large batches of early-stage SwinV2 maps.
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / N
    yc = tl.where(mask, y - mean[:, None], 0.0)
    var = tl.sum(yc * yc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    out = yc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        out = out * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        out = out + b[None, :]
    if HAS_S:
        s = tl.load(S + rows, mask=rmask, other=0.0).to(tl.float32)
        out = out * s[:, None]
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        out = out + r
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(
    DO, Y, W, B, S, MEAN, RSTD, DY, DS, PARTIAL,
    M, N,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, NEED_DS: tl.constexpr,
    NEED_DWB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    n_tiles = tl.cdiv(M, BLOCK_M)
    # Grid-stride over row tiles: a fixed number of programs (about a few per SM) keeps
    # the partial-gradient buffer small however many rows there are.
    for tile in range(pid, n_tiles, nprog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

        g = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)

        if HAS_S:
            s = tl.load(S + rows, mask=rmask, other=0.0).to(tl.float32)
            dn = g * s[:, None]
        else:
            dn = g
        if NEED_DS:
            normed = xhat
            if HAS_W:
                normed = normed * w[None, :]
            if HAS_B:
                normed = tl.where(mask, normed + b[None, :], 0.0)
            tl.store(DS + rows, tl.sum(g * normed, axis=1), mask=rmask)
        if NEED_DWB:
            dw_acc += tl.sum(dn * xhat, axis=0)
            db_acc += tl.sum(dn, axis=0)

        if HAS_W:
            dxhat = dn * w[None, :]
        else:
            dxhat = dn
        c1 = tl.sum(dxhat * xhat, axis=1) / N
        c2 = tl.sum(dxhat, axis=1) / N
        dy = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=mask)

    if NEED_DWB:
        # Row `pid` of the (programs, 2N) buffer: [dweight partial | dbias partial].
        base = PARTIAL + pid.to(tl.int64) * 2 * N
        tl.store(base + cols, dw_acc, mask=cmask)
        tl.store(base + N + cols, db_acc, mask=cmask)


@triton.jit
def _sum_rows_kernel(P, OUT, P_ROWS, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stage two: OUT[k] = sum_p P[p, k] over a (P_ROWS, K) fp32 buffer."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for start in range(0, P_ROWS, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P_ROWS)[:, None] & cmask[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0), mask=cmask)


def tile_shape(n: int, elements: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about `elements` values a tile, `per_thread` per thread.

    Sized from ptxas register counts for sm_90 (compiled ahead of time, no GPU needed):
    at 32 values a thread the backward reached ~240 registers; at 16 (forward) and 8
    (backward) both stay at <= ~160 with no spills up to N = 4096 (N = 8192: 40 bytes
    of backward spill).
    """
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, elements // block_n))
    num_warps = min(16, max(4, (block_m * block_n) // (32 * per_thread)))
    return block_m, block_n, num_warps


def _num_programs(n_tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, 4 * sms))
    # CPU interpreter: programs run one after another, so a few are plenty.
    return max(1, min(n_tiles, 4))


def device_guard(t: torch.Tensor):
    """Triton launches on the *current* CUDA device; make that the tensor's device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def supports(y: torch.Tensor, weight, bias) -> bool:
    """Whether these kernels take the input; otherwise the caller uses the torch path."""
    n = y.shape[-1] if y.dim() else 0
    return (
        y.dtype in SUPPORTED_DTYPES
        and 0 < n <= MAX_N
        and y.numel() > 0
        and all(t is None or (t.dim() == 1 and t.shape[0] == n and t.dtype in SUPPORTED_DTYPES)
                for t in (weight, bias))
    )


class FusedResidualLayerNorm(torch.autograd.Function):
    """autograd wrapper; `shortcut` and `scale_rows` may be None.

    `scale_rows` is one multiplier per row (the drop-path scale broadcast to
    `y.shape[:-1]` and flattened by the caller, so autograd folds its gradient back).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward runs under the forward's autocast state
    def forward(ctx, shortcut, y, weight, bias, scale_rows, eps):
        n = y.shape[-1]
        y2 = y.reshape(-1, n).contiguous()
        m = y2.shape[0]
        out_dtype = y.dtype if shortcut is None else torch.promote_types(shortcut.dtype, y.dtype)
        out = torch.empty((m, n), dtype=out_dtype, device=y.device)
        mean = torch.empty(m, dtype=torch.float32, device=y.device)
        rstd = torch.empty(m, dtype=torch.float32, device=y.device)
        r2 = None if shortcut is None else shortcut.reshape(-1, n).contiguous()
        s = None if scale_rows is None else scale_rows.contiguous()
        block_m, block_n, warps = tile_shape(n, 4096, 16)
        with device_guard(y2):
            _ln_fwd_kernel[(triton.cdiv(m, block_m),)](
                y2, r2, weight, bias, s, out, mean, rstd, m, n, float(eps),
                HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_S=s is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
        ctx.save_for_backward(y2, weight, bias, s, mean, rstd)
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.y_shape = y.shape
        return out.view(y.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        y2, weight, bias, s, mean, rstd = ctx.saved_tensors
        m, n = y2.shape
        need_short, need_y, need_w, need_b, need_s, _ = ctx.needs_input_grad
        g2 = grad_out.reshape(-1, n).contiguous()
        dy = torch.empty_like(y2)
        need_dwb = need_w or need_b
        need_ds = bool(need_s)
        block_m, block_n, warps = tile_shape(n, 2048, 8)
        n_tiles = triton.cdiv(m, block_m)
        progs = _num_programs(n_tiles, y2.device)
        partial = torch.empty((progs, 2 * n) if need_dwb else (1,), dtype=torch.float32, device=y2.device)
        ds = torch.empty(m, dtype=torch.float32, device=y2.device) if need_ds else None
        with device_guard(y2):
            _ln_bwd_kernel[(progs,)](
                g2, y2, weight, bias, s, mean, rstd, dy, ds, partial, m, n,
                HAS_W=weight is not None, HAS_B=bias is not None, HAS_S=s is not None,
                NEED_DS=need_ds, NEED_DWB=need_dwb, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
            dweight = dbias = None
            if need_dwb:
                sums = torch.empty(2 * n, dtype=torch.float32, device=y2.device)
                block_k = min(triton.next_power_of_2(2 * n), SUM_BLOCK_K)
                _sum_rows_kernel[(triton.cdiv(2 * n, block_k),)](
                    partial, sums, progs, 2 * n, BLOCK_P=SUM_BLOCK_P, BLOCK_K=block_k, num_warps=4,
                )
                if need_w:
                    dweight = sums[:n].to(weight.dtype)
                if need_b:
                    dbias = sums[n:].to(bias.dtype)
        dshortcut = None
        if need_short:
            dshortcut = grad_out.to(ctx.shortcut_dtype)
        dscale = ds.to(s.dtype) if need_ds else None
        return dshortcut, dy.view(ctx.y_shape) if need_y else None, dweight, dbias, dscale, None
