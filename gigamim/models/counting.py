"""How a model is counted for the planner (`gigamim plan`): what a family spec's `plan_count`
returns, so that the planner (gigamim/tools/) sums what it is given and never asks which
family it plans.

A `ModelCount` is a list of blocks in forward order plus what the model saves outside them
(patch embedding, merges, the final norm, SimMIM's decoder and loss) and its FLOPs. Each
block is a `BlockCount` of one *kind*; the kind holds the formulas for what autograd keeps of
such a block (per image, counted op by op and checked against saved-tensor bytes measured on
CPU, tests/test_plan.py), its FLOPs, the gradients in flight through it in backward and what
it saves once per micro-batch. The kinds here are the ones gigamim's families use:

- `WindowV2BlockCount`: SwinV2 (gigamim's own block: res-post-norm, cosine attention, the CPB
  MLP, explicit / fused / sequential attention, huge/giant's main-branch norm);
- `WindowBlockCount`: Swin V1 (timm's block: pre-norm, a relative-position table, SDPA with
  the bias as its mask);
- `GlobalBlockCount`: ViT (timm's block, and the official SimMIM ViT with its layer scale and
  shared relative-position bias): every token attends to every token.

A new family whose block is none of these subclasses `BlockCount` in its own file.

Attention modes, as the planner names them: ``explicit`` materialises the softmax scores
(gigamim's explicit path; also what SDPA's CPU math kernel does when the mask requires grad);
``fused`` is a fused SDPA kernel (flash / memory-efficient on GPU, flash on CPU when there is no
mask), which keeps the output and a log-sum-exp instead; ``sequential`` is SwinV2's chunked
attention. A family lists the modes its models run (`ModelCount.attention_modes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple


@dataclass(frozen=True)
class Saved:
    """Elements per image autograd keeps: ``tensors`` and ``scores`` in the model's dtype,
    ``stats`` fp32 (LayerNorm mean / rstd and softmax log-sum-exp stay fp32 under autocast),
    ``fp32`` at least fp32 (SimMIM's loss runs in fp32 whatever the model's dtype)."""

    tensors: int = 0
    scores: int = 0
    stats: int = 0
    fp32: int = 0

    def bytes(self, dtype_bytes: int) -> int:
        return (self.tensors + self.scores) * dtype_bytes + self.stats * 4 + self.fp32 * max(dtype_bytes, 4)

    def __add__(self, other: "Saved") -> "Saved":
        return Saved(self.tensors + other.tensors, self.scores + other.scores, self.stats + other.stats,
                     self.fp32 + other.fp32)


@dataclass(frozen=True)
class BlockCount:
    """A transformer block (attention + MLP) on ``tokens`` tokens of ``dim`` channels, each
    query attending to ``keys`` tokens. Subclasses give `saved` for the attention modes they run."""

    tokens: int
    dim: int
    heads: int
    keys: int
    mlp_ratio: float = 4.0
    stage: int = 0  # the stage the block belongs to (sequential attention is chosen per stage)

    @property
    def hidden(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    def saved(self, attn: str) -> Saved:
        raise NotImplementedError(f"{type(self).__name__} does not count attention mode {attn!r}")

    def input_elements(self) -> int:
        """What a checkpointed block keeps: its input."""
        return self.tokens * self.dim

    def grads_in_flight(self) -> int:
        """Elements (per image) of the gradients alive while the block runs its backward, on top
        of its own saved set: the block output's gradient (kept for the residual), the MLP
        output's and the MLP hidden layer's (fc2's input gradient), (2 + mlp_ratio) x T x C.
        Measured on the meta device (SwinV2-H with checkpointing, 64 images,
        benchmarks/activation_memory.py): the high-water of the recomputed first block is at its
        fc2 backward, its whole saved set still alive, with 6.0 x T x C of gradients beside it."""
        return int((2 + self.mlp_ratio) * self.tokens * self.dim)

    def constant(self) -> int:
        """Elements saved once per micro-batch, whatever the batch (position-bias tables)."""
        return 0

    def chunk(self, attn: str, batch: int, chunk: int) -> int:
        """Elements alive at once inside one recomputed attention chunk, whole batch."""
        return 0

    def attn_flops(self) -> int:
        """QK^T and AV per image: every token against its ``keys``."""
        return 2 * 2 * self.tokens * self.keys * self.dim

    def flops(self) -> int:
        """Forward FLOPs per image: qkv, the attention core, proj, fc1 + fc2."""
        t, d = self.tokens, self.dim
        return 2 * t * d * 3 * d + self.attn_flops() + 2 * t * d * d + 2 * 2 * t * d * self.hidden

    def flops_per_forward(self) -> int:
        """FLOPs once per forward pass, shared by the micro-batch (SwinV2's CPB MLP)."""
        return 0


@dataclass(frozen=True)
class WindowV2BlockCount(BlockCount):
    """A SwinV2 block (`models.swinv2.SwinTransformerV2Block`), ``keys`` = window**2.

    Op by op (T tokens, C channels, h heads, N tokens per window, H hidden = mlp_ratio*C):
    qkv linear input (window copy) TC; qkv output 3TC (q, k, v are views of it, saved by
    normalize); the batched matmuls' contiguous copies of normalised q, k and of v 3TC
    (explicit path; the norms ~4Th); the softmax output ThN (the logit scale is folded into
    q, so the raw scores are not kept); proj input TC; norm1 input TC; fc1 input TC; GELU input
    HT; fc2 input HT; norm2 input TC; LayerNorm mean/rstd 2T each. 'fused' (SDPA kernels on
    GPU): q*scale, q and k normalised, attention output TC each and a logsumexp Th instead of
    the scores. 'sequential': q/k normalisation and scores live inside recomputed chunks; the
    chunk's shift mask (N per token) is kept."""

    window: int = 1
    side: int = 1  # the stage's map side (windows per image = (side / window)**2)
    shifted: bool = False
    extra_norm: bool = False  # huge/giant's main-branch norm3 at the end of the block

    def saved(self, attn: str) -> Saved:
        t, c, h, n = self.tokens, self.dim, self.heads, self.keys
        tensors = 11 * t * c + 2 * self.hidden * t
        scores, stats = 0, 2 * 2 * t
        if attn == "explicit":
            scores = t * h * n
            stats += 4 * t * h
        elif attn == "fused":
            tensors += t * c  # q*scale, q and k normalised, v and the output kept by the kernel
            stats += 4 * t * h + t * h
        elif attn == "sequential":
            tensors -= 3 * t * c  # no q, k, v copies outside the recomputed chunks
            stats += t * n if self.shifted else 0
        else:
            raise ValueError(f"attention mode {attn!r} is not one of explicit, fused, sequential")
        if self.extra_norm:  # norm3 (inside the block, so inside its checkpoint): input + stats
            tensors += t * c
            stats += 2 * t
        return Saved(tensors, scores, stats)

    def constant(self) -> int:
        """The CPB MLP's hidden layer ((2W-1)^2 x 512) and output, and the gathered (heads, N, N)
        bias under its sigmoid."""
        cells = (2 * self.window - 1) ** 2
        return cells * 512 + cells * self.heads + self.keys * self.keys * self.heads

    def chunk(self, attn: str, batch: int, chunk: int) -> int:
        if attn != "sequential":
            return 0
        n, h, d = self.keys, self.heads, self.dim // self.heads
        windows = min(chunk, batch * (self.side // self.window) ** 2)
        return windows * h * (3 * n * n + 4 * n * d)

    def flops_per_forward(self) -> int:
        return 2 * (2 * self.window - 1) ** 2 * (2 * 512 + 512 * self.heads)


@dataclass(frozen=True)
class WindowBlockCount(BlockCount):
    """A Swin V1 block (timm's ``SwinTransformerBlock``: x + attn(norm1(x)), x + mlp(norm2(x));
    the relative-position bias, plus the shift mask in shifted blocks, is SDPA's float mask).

    Both modes keep norm1's input, the window copy that is qkv's input, norm2's input, fc1's
    input TC each, GELU's input and fc2's input HT each, LayerNorm mean / rstd 2T each.
    'explicit' (SDPA's math kernel, which CPU runs because the mask requires grad; measured with
    saved-tensor hooks): q x scale, k x scale and a contiguous v TC each, the softmax output ThN,
    the proj input (the output's transpose copy) TC. 'fused' (the memory-efficient kernel on
    GPU): q, k, v as views of the qkv output 3TC, the output TC (proj reads it as a view), a
    logsumexp Th, and in shifted blocks the dense (windows, heads, N, N) mask it was given."""

    shifted: bool = False

    def saved(self, attn: str) -> Saved:
        t, c, h, n, hid = self.tokens, self.dim, self.heads, self.keys, self.hidden
        if attn == "explicit":
            return Saved(8 * t * c + 2 * hid * t, t * h * n, 2 * 2 * t)
        if attn == "fused":
            return Saved(8 * t * c + 2 * hid * t, t * h * n if self.shifted else 0, 2 * 2 * t + t * h)
        raise ValueError(f"attention mode {attn!r} is not one of explicit, fused")


@dataclass(frozen=True)
class GlobalBlockCount(BlockCount):
    """A ViT block: every token attends to all ``keys`` = ``tokens`` (class token included).

    'fused' (SDPA's flash kernel on GPU, and on CPU when there is no mask; measured with
    saved-tensor hooks): norm1's input, qkv's input, the qkv output 3TC (q, k, v are views of
    it), the output TC (proj reads it as a view), norm2's input, fc1's input, GELU's and fc2's
    inputs HT each, a logsumexp Th, LayerNorm mean / rstd 2T each. 'explicit' (gigamim's
    explicit path, or SDPA's math kernel when a position-bias mask requires grad): q x scale,
    k x scale and a contiguous v TC each instead of the qkv output, the softmax output ThT, the
    proj input (transpose copy) TC. Layer scale (``layer_scale``) keeps the input of each of its
    two products, TC each."""

    layer_scale: bool = False

    def saved(self, attn: str) -> Saved:
        t, c, h, hid = self.tokens, self.dim, self.heads, self.hidden
        extra = 2 * t * c if self.layer_scale else 0
        if attn == "fused":
            return Saved(8 * t * c + 2 * hid * t + extra, 0, 2 * 2 * t + t * h)
        if attn == "explicit":
            return Saved(8 * t * c + 2 * hid * t + extra, t * h * self.keys, 2 * 2 * t)
        raise ValueError(f"attention mode {attn!r} is not one of explicit, fused")


@dataclass(frozen=True)
class ModelCount:
    """A SimMIM model as the planner counts it (per image, at one image size).

    ``before``: what is saved ahead of block i that is not block i's (SwinV2's / Swin's
    PatchMerging at a stage start); ``stem``: patch embedding and the mask-token blend;
    ``head``: the final norm, the decoder's input and the loss. ``forward_flops``: the whole
    SimMIM forward per image without what runs once per forward (``per_forward_flops``)."""

    img_size: int
    blocks: Tuple[BlockCount, ...]
    stem: Saved
    head: Saved
    forward_flops: float
    per_forward_flops: float = 0.0
    before: Dict[int, Saved] = field(default_factory=dict)
    attention_modes: Tuple[str, ...] = ("fused",)  # the modes this family's models run
    checkpoint_every: Tuple[int, ...] = (1,)  # the k of "checkpoint every k-th block" the model takes
    window_size: object = None  # what `gigamim plan` prints beside the image size (None: no window)


def simmim_head(tokens: int, dim: int, img_size: int, in_chans: int = 3) -> Saved:
    """Final LayerNorm input + stats, the decoder conv's input (the normed map, permuted), and
    the fp32 loss terms: |x - x_rec| (3HW) and the pixel mask (HW)."""
    px = img_size * img_size
    return Saved(tensors=2 * tokens * dim, stats=2 * tokens, fp32=(in_chans + 1) * px)


def decoder_flops(model, img_size: int) -> int:
    """SimMIM's 1x1 decoder conv (``decoder.0``) per image."""
    conv = model.decoder[0]
    side = img_size // model.encoder_stride
    return 2 * side * side * conv.in_channels * conv.out_channels


def patch_embed_flops(tokens: int, dim: int, patch: int, in_chans: int = 3) -> int:
    return 2 * tokens * dim * in_chans * patch * patch


__all__ = ["Saved", "BlockCount", "WindowV2BlockCount", "WindowBlockCount", "GlobalBlockCount", "ModelCount",
           "simmim_head", "decoder_flops",
           "patch_embed_flops"]
