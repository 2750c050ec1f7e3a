"""SwinV2 window attention: cosine scores, log-spaced continuous position bias (CPB).

Three ways to compute the same thing, chosen per model / per stage:

* ``impl="explicit"``: matmul + softmax, the reference (same op order as the official code).
* ``impl="sdpa"``: ``F.scaled_dot_product_attention`` with the per-head logit scale folded
  into q (``scale=1``) and CPB bias + shift mask passed as one float ``attn_mask``.
* ``sequential=True`` (either impl): the windows are processed ``chunk`` at a time and each
  chunk runs under a non-reentrant checkpoint, so the quadratic (windows, heads, N, N)
  tensors of forward *and* backward exist for one chunk only. This is SwinV2's
  "sequential self-attention" for high resolutions.

Nothing here is a registered buffer: the coordinate table, the index and the masks are
computed lazily in forward (fp32/int64) and cached per device. DeepSpeed's ``zero.Init``
casts every float tensor created inside it (``torch.arange`` included) to bf16, and engines
call ``module.bfloat16()``; neither can reach a cache that does not exist yet.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint

ATTN_IMPLS = ("explicit", "sdpa")
# Official SwinV2 clamps the learned temperature at 1/0.01.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)


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


def relative_coords_table(window: Tuple[int, int], pretrained_window: Tuple[int, int], device=None) -> torch.Tensor:
    """((2Wh-1)*(2Ww-1), 2) fp32 CPB inputs: offsets scaled to [-8, 8], then sign*log2(1+|x|)/log2(8)."""
    axes = []
    for w, pw in zip(window, pretrained_window):
        r = torch.arange(-(w - 1), w, device=device, dtype=torch.float32)
        # max(.., 1): a window of 1 only has offset 0; avoid 0/0.
        axes.append(r / max((pw if pw > 0 else w) - 1, 1))
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(window: Tuple[int, int], device=None) -> torch.Tensor:
    """(N*N,) int64 index into the coordinate table for every (query, key) pair of a window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window[0], device=device), torch.arange(window[1], device=device), indexing="ij")
    ).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return ((rel[0] + window[0] - 1) * (2 * window[1] - 1) + rel[1] + window[1] - 1).reshape(-1)


def _attend(q, k, v, scale, bias, mask, impl: str, dropout_p: float) -> torch.Tensor:
    """Cosine attention core for a group of windows; no parameters are touched in here.

    q, k, v: (Bw, heads, N, d) raw projections; scale: (heads, 1, 1) exp(clamped logit scale);
    bias: (heads, N, N) CPB bias; mask: (Bw, N, N) shift mask or None. Keeping parameters out
    makes this safe to recompute in backward under ZeRO-3 (parameters may be released then).
    """
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    if impl == "sdpa":
        add = bias.unsqueeze(0)
        if mask is not None:
            add = add + mask.unsqueeze(1)
        add = add.expand(q.shape[0], -1, -1, -1)
        return F.scaled_dot_product_attention(q * scale, k, v, attn_mask=add, dropout_p=dropout_p, scale=1.0)
    attn = (q @ k.transpose(-2, -1)) * scale + bias.unsqueeze(0)
    if mask is not None:
        attn = attn + mask.unsqueeze(1)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn @ v


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

        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            TruncNormalLinear(2, 512, bias=True), nn.ReLU(inplace=True), TruncNormalLinear(512, num_heads, bias=False)
        )
        # k has no bias in SwinV2; q and v do (timm/official keep them as separate parameters).
        self.qkv = TruncNormalLinear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = TruncNormalLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._geometry = {}  # device -> (coords table fp32, index int64); see module docstring

    def _tables(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._geometry:
            self._geometry[key] = (
                relative_coords_table(self.window_size, self.pretrained_window_size, device),
                relative_position_index(self.window_size, device),
            )
        return self._geometry[key]

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) continuous position bias, 16*sigmoid(CPB MLP(log-spaced offsets))."""
        table, index = self._tables(self.qkv.weight.device)
        n = self.window_size[0] * self.window_size[1]
        out = self.cpb_mlp(table.to(self.cpb_mlp[0].weight.dtype))  # ((2W-1)^2, heads): run once, then gather
        bias = out[index].view(n, n, self.num_heads).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) additive shift mask or None."""
        bw, n, c = x.shape
        # Call the qkv module (not F.linear on its weight): under ZeRO-3 a submodule's weights
        # are gathered only when that submodule itself runs. The bias (q, 0 for k, v) is ours.
        qkv = self.qkv(x) + torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = qkv.reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
        bias = self.position_bias()
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is not None:
            mask = mask.to(q.dtype)

        def window_mask(start: int, stop: int):
            # Window i of the flattened (B*nW) batch uses mask i % nW.
            if mask is None:
                return None
            return mask[torch.arange(start, stop, device=mask.device) % mask.shape[0]]

        # Sequential even when one chunk holds every window: the recompute is what keeps the
        # scores out of the saved activations (e.g. 4 windows of a 32x32 map at window 16).
        if not self.sequential:
            out = _attend(q, k, v, scale, bias, window_mask(0, bw), self.impl, dropout_p)
        else:
            recompute = torch.is_grad_enabled()
            outs = []
            for s in range(0, bw, self.chunk):
                e = min(s + self.chunk, bw)
                args = (q[s:e], k[s:e], v[s:e], scale, bias, window_mask(s, e), self.impl, dropout_p)
                if recompute:
                    # Backward recomputes this chunk's scores instead of keeping them: the
                    # quadratic tensors never exist for more than one chunk at a time.
                    outs.append(checkpoint(_attend, *args, use_reentrant=False, preserve_rng_state=True))
                else:
                    outs.append(_attend(*args))
            out = torch.cat(outs, dim=0)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"window={self.window_size}, pretrained_window={self.pretrained_window_size}, heads={self.num_heads}, "
            f"impl={self.impl}, sequential={self.sequential}, chunk={self.chunk}"
        )
