"""SwinV2 window attention: cosine scores, log-spaced continuous position bias (CPB).

Three ways to compute the same thing, chosen per model / per stage:

* ``impl="explicit"``: matmul + softmax, the reference (same op order as the official code).
* ``impl="sdpa"``: ``F.scaled_dot_product_attention`` with the per-head logit scale folded
  into q (``scale=1``) and CPB bias + shift mask passed as one float ``attn_mask``.
* ``sequential=True`` (either impl): the windows are processed ``chunk`` at a time and each
  chunk runs under a non-reentrant checkpoint, so the quadratic (windows, heads, N, N)
  tensors of forward *and* backward exist for one chunk only. This is SwinV2's
  "sequential self-attention" for high resolutions.

Both impls get their operands from ``gigamim.kernels.cosine_normalize`` (normalised q times
the clamped per-head temperature, normalised k; a fused Triton kernel on GPUs), so the scores
are ``q_out @ k_out^T + bias (+ mask)``. The shift mask is never gathered per window: the
windows of a block are viewed as (images, windows per image) and the (nW, N, N) mask is
broadcast over the images, as in the official code. For SDPA the windows are folded into the
head dim, ``(B, nW*heads, N, d)`` with an ``attn_mask`` of shape ``(1, nW*heads, N, N)``:
fused SDPA kernels take 4-d inputs only, and a leading 1 is a broadcast they accept, so the
mask SDPA keeps for backward is one image's worth, not the batch's.

* ``impl="flex"``: ``torch.nn.attention.flex_attention`` with the CPB table (fp32) added in a
  ``score_mod`` and the shift regions applied as a mask inside the same ``score_mod``; the
  fused kernel never materialises the (windows, heads, N, N) scores. On a GPU it runs
  compiled (Triton forward and backward). PyTorch has no flex backward on CPU: a CPU call that
  needs gradients runs the explicit core instead (same maths), a CPU forward runs flex.

Geometry lives in non-persistent *integer* buffers (the relative offsets and the relative
index): ``zero.Init`` casts only floating tensors and ``module.bfloat16()`` only floating
buffers, so neither can touch them, they follow ``.to(device)``, and a compiled forward reads
them as plain inputs (no cache filled during tracing, no graph break, none inside a
checkpointed region). The fp32 coordinate table is recomputed from the offsets in every
forward: ((2W-1)^2, 2) elements, nothing next to the attention itself.

Precision under autocast bf16: the q/v bias goes into ``F.linear`` (an fp32 bias added to the
bf16 GEMM output would promote q, k, v and everything after them to fp32); the per-head
temperature is cast to q's dtype; the CPB ``16*sigmoid`` runs in fp32 (at least) on the small
((2W-1)^2, heads) table before the gather, and the gathered bias is cast to the scores' dtype
(flex keeps it fp32: its scores are fp32 inside the kernel).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint

from gigamim.kernels import MAX_LOGIT_SCALE, cosine_normalize
from gigamim.models.linear import compiling_for_cpu, linear

ATTN_IMPLS = ("explicit", "sdpa", "flex")

# "auto" per device, from measurements (benchmarks/results): on CPU the explicit path is the
# fastest trainable one (SDPA with a learned float mask runs its unfused math path there, and
# flex has no CPU backward). On CUDA SDPA until the GPU script has measured flex against it.
DEFAULT_ATTN_IMPL = {"cpu": "explicit", "cuda": "sdpa"}


def resolve_attn_impl(impl: str, device_type: str) -> str:
    """``impl`` itself, or for "auto" the measured default of ``device_type`` ("cpu", "cuda")."""
    if impl == "auto":
        return DEFAULT_ATTN_IMPL.get(device_type, "explicit")
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={impl!r} is not one of {ATTN_IMPLS + ('auto',)}")
    return impl


class TruncNormalLinear(nn.Linear):
    """nn.Linear with the official SwinV2 init (trunc normal std .02, zero bias).

    The init lives in ``reset_parameters`` (called by nn.Linear.__init__) rather than in a
    model-wide ``apply`` afterwards: under ``deepspeed.zero.Init`` every module is partitioned
    right after its own ``__init__``, so the init must happen there, on the full tensor.
    """

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QKVLinear(TruncNormalLinear):
    """The bias-free qkv projection that takes its bias (q, 0 for k, v) as an argument.

    The bias goes into ``F.linear`` like timm does, so under autocast it is cast with the GEMM
    and the output stays bf16. It is still this module that is called: under ZeRO-3 (without
    leaf blocks) a submodule's weight is gathered only when that submodule itself runs."""

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear(x, self.weight, bias)


def relative_offsets(window: Tuple[int, int], device=None) -> torch.Tensor:
    """((2Wh-1)*(2Ww-1), 2) int64: every (dh, dw) offset of a window, row-major (the CPB rows)."""
    axes = [torch.arange(-(w - 1), w, device=device, dtype=torch.int64) for w in window]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)


def coords_table(offsets: torch.Tensor, window: Tuple[int, int], pretrained_window: Tuple[int, int]) -> torch.Tensor:
    """fp32 CPB inputs from integer offsets: scaled to [-8, 8] by (pretrained) window - 1, then
    sign*log2(1+|x|)/log2(8). Pure tensor maths, so it is traced into a compiled graph."""
    # max(.., 1): a window of 1 only has offset 0; avoid 0/0.
    denom = [float(max((pw if pw > 0 else w) - 1, 1)) for w, pw in zip(window, pretrained_window)]
    # Python scalars, not a tensor made from the list: that tensor is built on the CPU and
    # copied to the GPU in every forward of every block (a synchronous host-to-device copy).
    table = offsets.to(torch.float32)
    table = torch.stack([table[:, i] / denom[i] * 8 for i in range(2)], dim=-1)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_coords_table(window: Tuple[int, int], pretrained_window: Tuple[int, int], device=None) -> torch.Tensor:
    """((2Wh-1)*(2Ww-1), 2) fp32 CPB inputs: offsets scaled to [-8, 8], then sign*log2(1+|x|)/log2(8)."""
    return coords_table(relative_offsets(window, device), window, pretrained_window)


def relative_position_index(window: Tuple[int, int], device=None) -> torch.Tensor:
    """(N*N,) int64 index into the coordinate table for every (query, key) pair of a window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window[0], device=device), torch.arange(window[1], device=device), indexing="ij")
    ).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return ((rel[0] + window[0] - 1) * (2 * window[1] - 1) + rel[1] + window[1] - 1).reshape(-1)


_compiled_flex = None


def _flex_attention(device_type: str):
    """flex_attention; on a GPU called eagerly, compiled once on first use (the eager version
    is a reference implementation that materialises the scores). Inside a compiled graph, and
    on CPU (forward only there: inference), as is."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or device_type == "cpu":
        return flex_attention
    if _compiled_flex is None:
        # One compiled kernel per (stage shape, masked or not): more than dynamo's default 8.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex(q, k, v, bias, mask) -> torch.Tensor:
    """FlexAttention core. bias: (heads, N, N) CPB bias in fp32 (added to the kernel's fp32
    scores in the ``score_mod``); mask: (nW, N, N) additive shift mask or None, applied as a
    boolean region mask in the same ``score_mod`` (window b of the batch uses mask b % nW).
    A window holds <= a few hundred tokens, one or two of flex's 128-blocks, so a BlockMask
    would skip no block: an in-kernel select is the whole cost of the mask."""
    if mask is None:
        def score_mod(score, b, h, qi, ki):
            return score + bias[h, qi, ki]
    else:
        allowed = mask == 0
        nw = mask.shape[0]

        def score_mod(score, b, h, qi, ki):
            return torch.where(allowed[b % nw, qi, ki], score + bias[h, qi, ki], -float("inf"))
    return _flex_attention(q.device.type)(q, k, v, score_mod=score_mod, scale=1.0)


class _AddWindowBias(torch.autograd.Function):
    """``scores + bias`` for scores (Bw, heads, N, N) and one bias (heads, N, N) shared by every
    window; the bias gradient (the windows' sum of the score gradient) is one GEMM
    ``ones(1, Bw) @ grad`` instead of a sum over the window dim.

    Same sum; the shape is for the compiler: a reduction over the leading dim of a gradient
    that is itself elementwise (softmax backward) is fused by inductor into a second loop that
    recomputes that gradient from its inputs, reading two (Bw, heads, N, N) tensors with a stride
    of one window; as a GEMM it reads the gradient that the score GEMMs' backward reads anyway,
    once and in order."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.bias_shape = bias.shape
        return scores + bias.unsqueeze(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            flat = grad.reshape(grad.shape[0], -1)
            grad_bias = torch.mm(flat.new_ones(1, flat.shape[0]), flat).view(ctx.bias_shape)
        return grad, grad_bias


def _attend(q, k, v, logit_scale, bias, mask, impl: str, dropout_p: float) -> torch.Tensor:
    """Cosine attention core for a group of windows; no parameters are touched in here.

    q, k, v: (Bw, heads, N, d) raw projections; logit_scale: (heads, 1, 1) unclamped log
    temperature (a non-parameter tensor); bias: (heads, N, N) CPB bias (fp32 or wider); mask:
    (nW, N, N) shift mask or None, where the Bw windows are Bw // nW whole groups of nW
    consecutive windows that each use the nW masks in order (an image's windows, or a run of
    them inside one image). Keeping parameters out makes this safe to recompute in backward
    under ZeRO-3 (parameters may be released then).

    Returns (Bw, N, heads * d), the heads merged. Never ``.view`` an attention kernel's output:
    CUDA's memory-efficient SDPA kernel (the fused one that takes a float mask) returns
    (B, H, N, D) as a transposed view of a (B, N, H, D) buffer, flex may return its own
    strides, CPU's math kernel a contiguous tensor. ``reshape`` after the permute makes exactly
    one copy for every one of those layouts (and none where the layout already fits).
    """
    bw, heads, n, d = q.shape
    q, k = cosine_normalize(q, k, logit_scale, MAX_LOGIT_SCALE)
    nw = 1 if mask is None else mask.shape[0]
    if impl == "flex" and dropout_p == 0.0:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
        if q.device.type != "cpu" or not needs_grad:
            return _merge_heads(_flex(q, k, v, bias, mask))
        # No flex backward on CPU (torch raises): the explicit core below is the same maths.
    bias = bias.to(q.dtype)
    if mask is not None:
        mask = mask.to(q.dtype)
    if impl == "sdpa":
        # (nW, heads, N, N) once, broadcast over the Bw // nW groups: fold the windows into the
        # head dim so the inputs stay 4-d (fused kernels reject other ranks).
        add = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
        shape = (bw // nw, nw * heads, n, d)
        out = F.scaled_dot_product_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=add.reshape(1, nw * heads, n, n),
            dropout_p=dropout_p, scale=1.0,
        )
        # (B', nW*heads, N, d) -> (B', nW, N, heads, d) -> (Bw, N, heads*d), any strides.
        return out.unflatten(1, (nw, heads)).transpose(2, 3).reshape(bw, n, heads * d)
    attn = _AddWindowBias.apply(q @ k.transpose(-2, -1), bias)
    if mask is not None:
        attn = (attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(bw, heads, n, n)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return _merge_heads(attn @ v)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(Bw, heads, N, d) of any strides -> (Bw, N, heads * d): one copy at most (see _attend)."""
    bw, heads, n, d = out.shape
    return out.transpose(1, 2).reshape(bw, n, heads * d)


def _chunks(bw: int, nw: int, chunk: int):
    """[start, stop) window ranges of at most ``chunk`` windows that never split the mask's
    period unevenly: with a shift mask (nw > 1) a chunk is whole images (chunk rounded down to
    a multiple of nw) or, when chunk < nw, a run inside one image. Yields (start, stop, offset)
    with offset the index of the chunk's first window within its image."""
    if nw <= 1 or chunk >= nw:
        step = chunk if nw <= 1 else chunk - chunk % nw
        for s in range(0, bw, step):
            yield s, min(s + step, bw), 0
        return
    for img in range(0, bw, nw):
        for j in range(0, nw, chunk):
            yield img + j, img + min(j + chunk, nw), j


class WindowAttention(nn.Module):
    """Multi-head self attention inside (shifted) windows, SwinV2 flavour.

    State dict keys match timm: qkv.weight, q_bias, v_bias, logit_scale, cpb_mlp.{0,2}.*, proj.*.
    """

    def __init__(
        self,
        dim: int,
        window_size: Tuple[int, int],
        num_heads: int,
        pretrained_window_size: Tuple[int, int] = (0, 0),
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "explicit",
        sequential: bool = False,
        chunk: int = 32,
    ):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={impl!r} is not one of {ATTN_IMPLS}")
        if chunk < 1:
            raise ValueError(f"attn_chunk must be >= 1 window, got {chunk}")
        self.dim = dim
        self.window_size = tuple(window_size)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.impl = impl
        self.sequential = sequential
        self.chunk = chunk
        self.attn_drop = attn_drop

        self.logit_scale = nn.Parameter(torch.empty(num_heads, 1, 1))
        self.cpb_mlp = nn.Sequential(
            TruncNormalLinear(2, 512, bias=True), nn.ReLU(inplace=True), TruncNormalLinear(512, num_heads, bias=False)
        )
        # k has no bias in SwinV2; q and v do (timm/official keep them as separate parameters).
        self.qkv = QKVLinear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.empty(dim))
        self.v_bias = nn.Parameter(torch.empty(dim))
        self.proj = TruncNormalLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Integer, non-persistent (see the module docstring): not in the state dict, never cast.
        self.register_buffer("relative_offsets", relative_offsets(self.window_size), persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameters (the Linears reset themselves) and its geometry buffers.

        Called at the end of ``__init__`` (still whole there under ``zero.Init``) and again by
        ``models.init.reset_after_meta`` after a meta-device build is materialised (FSDP2), where
        ``to_empty`` leaves parameters and buffers uninitialised."""
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10.0))
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
            device = self.relative_offsets.device
            self.relative_offsets.copy_(relative_offsets(self.window_size, device))
            self.relative_position_index.copy_(relative_position_index(self.window_size, device))

    def position_bias(self, dtype) -> torch.Tensor:
        """(heads, N, N) continuous position bias 16*sigmoid(CPB MLP(log-spaced offsets)), in
        fp32 or wider: the MLP runs in ``dtype`` (the activations'; under autocast, bf16), the
        sigmoid in fp32 on the ((2W-1)^2, heads) table, then the gather.

        dtype comes from the activations: under ZeRO-3 (offload) another module's parameter seen
        from outside its forward is a placeholder that need not match them."""
        table = coords_table(self.relative_offsets, self.window_size, self.pretrained_window_size)
        out = self.cpb_mlp(table.to(dtype))  # ((2W-1)^2, heads): run once, then gather
        out = 16 * torch.sigmoid(out.to(torch.promote_types(out.dtype, torch.float32)))
        n = self.window_size[0] * self.window_size[1]
        # Contiguous: CUDA's fused SDPA kernels need the float mask's last dim at stride 1; the
        # permuted view (stride heads) sent every unshifted block to the math path on an H200.
        return out[self.relative_position_index].view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) additive shift mask (0 / -inf) or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x, torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias)))
        qkv = qkv.reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if not compiling_for_cpu(x):
            # Eager (and CUDA graphs, as the GPU run measured them): one contiguous copy of q,
            # k, v; every later reshape is a view (SDPA's window-into-head fold, the batched
            # matmuls), and the per-row arithmetic of the
            # normalisation does not depend on how many windows a call holds (sequential chunks
            # equal the batched path bit for bit).
            qkv = qkv.contiguous()
        # Compiled for the CPU: q and k stay strided views of the qkv output; the cosine
        # normalisation reads them in place and writes the score GEMM's operands, which it has to write
        # anyway. A contiguous copy first is one more transposing pass over the qkv output
        # in every block (inductor keeps the copy the model asks for). Only v goes to a
        # GEMM as it is, so only v is made contiguous (a no-op in eager).
        q, k, v = qkv.unbind(0)
        v = v.contiguous()
        # A non-parameter copy of the temperature: what the (re)computed core may hold on to.
        logit_scale = self.logit_scale.clone()
        bias = self.position_bias(x.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is not None and bw % mask.shape[0]:
            raise ValueError(f"{bw} windows are not a whole number of images of {mask.shape[0]} windows")
        nw = 1 if mask is None else mask.shape[0]

        # Sequential even when one chunk holds every window: the recompute is what keeps the
        # scores out of the saved activations (e.g. 4 windows of a 32x32 map at window 16).
        if not self.sequential:
            out = _attend(q, k, v, logit_scale, bias, mask, self.impl, dropout_p)
        else:
            recompute = torch.is_grad_enabled()
            outs = []
            for s, e, j in _chunks(bw, nw, self.chunk):
                # Whole images share the full mask; a run inside one image uses its slice (a view).
                m = None if mask is None else (mask if e - s >= nw else mask[j:j + e - s])
                args = (q[s:e], k[s:e], v[s:e], logit_scale, bias, m, self.impl, dropout_p)
                if recompute:
                    # Backward recomputes this chunk's scores instead of keeping them: the
                    # quadratic tensors never exist for more than one chunk at a time.
                    outs.append(checkpoint(_attend, *args, use_reentrant=False, preserve_rng_state=True))
                else:
                    outs.append(_attend(*args))
            out = torch.cat(outs, dim=0)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"window={self.window_size}, pretrained_window={self.pretrained_window_size}, heads={self.num_heads}, "
            f"impl={self.impl}, sequential={self.sequential}, chunk={self.chunk}"
        )
