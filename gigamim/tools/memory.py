"""The memory model behind `gigamim plan` (and its candidate enumeration): per GPU, the model
states of each engine and the activations per image, counted from the architecture alone.

Model states (mixed-precision Adam, the ZeRO paper's K=12): 2 bytes bf16 parameters +
2 bytes bf16 gradients + 12 bytes fp32 master/m/v per parameter. Stage 1 partitions the
12, stage 2 the 2+12, stage 3 all 16 over the data-parallel ranks. Offload moves the
optimizer (and with stage 3 the parameters) to host memory; what stays on the GPU then is
the working set (gathered parameters of the layers in flight).

PyTorch FSDP2 (`train.engine: fsdp2`) keeps fp32 shards of the parameters, gradients and
AdamW m / v: 16 bytes per parameter / GPUs, as ZeRO-3 (bf16 training). On top
(`fsdp2_buffer_bytes`): the bf16 compute copies gathered for the units in flight (the root
unit: patch embedding, merges, final norm, decoder, for the whole forward / backward, plus
the current and the prefetched block; every unit when `fsdp.reshard_after_forward` is off),
the unsharded gradients of the unit being reduce-scattered (bf16, and their copy in
`fsdp.reduce_dtype`), and with gradient accumulation the unsharded gradients of the whole
model in the reduce dtype (gradient sync is off until the boundary: P x 4 bytes in fp32).
CPU offload is not modelled for FSDP2.

Activations: the tensors autograd saves for backward, counted op by op for the blocks as
gigamim implements them (see `block_saved_elements`), plus patch embedding, merges, the
final norm and the SimMIM decoder + loss. Checkpointed blocks keep only their input; in
backward one block at a time is recomputed, so the peak adds one block's full set plus the
gradients in flight through it (`backward_grad_elements`), and the recompute grows with the
micro-batch like everything else per image. Sequential attention never keeps the (windows,
heads, N, N) scores: one chunk at a time; the chunk's working set is a per-micro-batch
constant once the micro-batch fills a chunk. `gigamim plan` fits micro-batches with
`activation_per_image` (per image + once per micro-batch, never a difference of two small
batches, which counted the chunk's growth as per-image memory).
`tests/test_plan.py` checks the counts against saved-tensor bytes measured on CPU,
`tests/test_plan_activation.py` the per-image figures against the fake-CUDA forward (bf16) and
a meta-device forward + backward (`benchmarks/activation_memory.py`, results in
benchmarks/results/activation_memory_2026-12-04).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

GiB = 2**30
# Mixed-precision Adam bytes per parameter: bf16 weights, bf16 grads, fp32 master + m + v.
PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES = 2, 2, 12
# fp32 training (the CPU check): weights, grads, Adam m + v; no master copy. Also FSDP2's
# sharded states under bf16 training (fp32 parameter and gradient shards, m, v).
FP32_STATE_BYTES = (4, 4, 8)
FSDP2_STATE_BYTES = FP32_STATE_BYTES
FSDP2_LABELS = {True: "FSDP2", False: "FSDP2 no-reshard"}
ATTN_MODES = ("explicit", "fused", "sequential")


@dataclass
class Stage:
    side: int  # feature-map side (tokens per image = side**2)
    dim: int
    heads: int
    window: int
    shift: int
    depth: int
    extra_norms: int  # huge/giant main-branch norms in this stage
    extra_norm_period: int = 0  # ... at the end of every period-th block (the block's own norm3)


def geometry(name: str, img_size: int | None = None, window_size=None) -> tuple[dict, list[Stage]]:
    """The variant's defaults (with overrides) and its per-stage geometry at img_size."""
    from gigamim.models import model_defaults
    from gigamim.models.swinv2 import stage_geometry

    cfg = model_defaults(name)
    if img_size is not None:
        cfg["img_size"] = img_size
    if window_size is not None:
        cfg["window_size"] = window_size
    depths, heads = cfg["depths"], cfg["num_heads"]
    geo = stage_geometry(cfg["img_size"], 4, len(depths), cfg["window_size"])
    period = cfg.get("extra_norm_period", 0)
    stages = [
        Stage(side, cfg["embed_dim"] * 2**i, heads[i], ws, shift, depths[i],
              (depths[i] // period) if period else 0, period)
        for i, ((side, ws, shift)) in enumerate(geo)
    ]
    return cfg, stages


@functools.lru_cache(maxsize=32)
def count_parameters(name: str, img_size: int | None = None, window_size=None) -> int:
    """Parameters of SimMIM(encoder) (mask token and decoder included), counted on the meta device."""
    import torch

    from gigamim.models import SimMIM, create_model

    kw = {} if img_size is None else {"img_size": img_size}
    if window_size is not None:
        kw["window_size"] = window_size
    with torch.device("meta"):
        model = SimMIM(create_model(name, **kw))
    return sum(p.numel() for p in model.parameters())


def block_saved_elements(st: Stage, mlp_ratio: float, attn: str, shifted: bool) -> dict:
    """Elements (per image) autograd keeps for one block; 'scores' and 'stats' listed apart.

    Op by op (T tokens, C channels, h heads, N tokens per window, H hidden = mlp_ratio*C):
    qkv linear input (window copy) TC; qkv output 3TC (q, k, v are views of it, saved by
    normalize); the batched matmuls' contiguous copies of normalised q, k and of v 3TC
    (explicit path; the norms ~4Th); the softmax output ThN (the logit scale is folded into
    q, so the raw scores are not kept);
    proj input TC; norm1 input TC;
    fc1 input TC; GELU input HT; fc2 input HT; norm2 input TC; LayerNorm mean/rstd 2T each.
    'fused' (SDPA kernels on GPU): q*scale, q and k normalised, attention output TC each and
    a logsumexp Th instead of the scores. 'sequential': q/k normalisation and scores live
    inside recomputed chunks; the chunk's shift mask (N per token) is kept.
    """
    t, c, h, n = st.side**2, st.dim, st.heads, st.window**2
    hidden = int(c * mlp_ratio)
    tc = 11 * t * c + 2 * hidden * t  # qkv in, qkv out (3), q/k/v copies (3), proj in, norm1, fc1, norm2 + MLP
    out = {"tensors": tc, "scores": 0, "stats": 2 * 2 * t}
    if attn == "explicit":
        out["scores"] = t * h * n
        out["stats"] += 4 * t * h
    elif attn == "fused":
        out["tensors"] += t * c  # q*scale, q and k normalised, v and the output kept by the kernel
        out["stats"] += 4 * t * h + t * h
    elif attn == "sequential":
        out["tensors"] -= 3 * t * c  # no q, k, v copies outside the recomputed chunks
        out["stats"] += t * n if shifted else 0
    else:
        raise ValueError(f"attention mode {attn!r} is not one of {ATTN_MODES}")
    return out


def backward_grad_elements(st: Stage, mlp_ratio: float) -> int:
    """Elements (per image) of the gradients alive while one block runs its backward, on top of
    its own saved set: the block output's gradient (kept for the residual), the MLP output's and
    the MLP hidden layer's (fc2's input gradient), (2 + mlp_ratio) x T x C. Measured on the meta
    device (SwinV2-H with checkpointing, 64 images, benchmarks/activation_memory.py): the
    high-water of the recomputed first block is at its fc2 backward, its whole saved set still
    alive, with 6.0 x T x C of gradients beside it. Later in the block the attention's dP and
    dS (or the fused kernels' dense bias gradient) are 2 x T x heads x N = 9 T x C at window 12,
    head dim 32, but by then the MLP's saved tensors (2 x 4 T x C + 2 T x C) are freed."""
    t, c = st.side**2, st.dim
    return int((2 + mlp_ratio) * t * c)


def block_constant_elements(st: Stage) -> int:
    """Elements one block saves once per micro-batch, whatever the batch: the CPB MLP's hidden
    layer ((2W-1)^2 x 512) and output, and the gathered (heads, N, N) bias under its sigmoid."""
    cells, n = (2 * st.window - 1) ** 2, st.window**2
    return cells * 512 + cells * st.heads + n * n * st.heads


def chunk_transient_elements(st: Stage, attn: str, batch: int, chunk: int) -> int:
    """Elements alive at once inside one recomputed attention chunk (sequential mode), whole batch."""
    if attn != "sequential":
        return 0
    n, h, d = st.window**2, st.heads, st.dim // st.heads
    windows = min(chunk, batch * (st.side // st.window) ** 2)
    return windows * h * (3 * n * n + 4 * n * d)


def activation_bytes(name: str, img_size: int | None = None, *, window_size=None, batch: int = 1,
                     dtype_bytes: int = 2, attn: str = "explicit", checkpointing: bool = False,
                     attn_chunk: int = 64, ckpt_every: int | None = None, sequential_stages=()) -> dict:
    """Activation memory of one micro-batch: 'saved' (kept from forward to backward) and
    'transient' (on top of it at the backward's high-water: the recompute of one checkpointed
    block, the gradients in flight through the block being differentiated, one attention chunk),
    bytes; 'per_image' and 'fixed' (what `gigamim plan` fits micro-batches with: total <= fixed +
    batch x per_image for every batch, with equality once the batch fills a sequential chunk).

    `checkpointing=True` is `ckpt_every=1` (every block); `ckpt_every=k` checkpoints blocks
    0, k, 2k, ... in forward order (the model's `grad_checkpointing=k`). `sequential_stages`
    run sequential attention in those stages and `attn` in the others."""
    cfg, stages = geometry(name, img_size, window_size)
    size, mlp = cfg["img_size"], cfg.get("mlp_ratio", 4.0)
    every = (1 if checkpointing else 0) if ckpt_every is None else ckpt_every
    stat_bytes = 4  # LayerNorm statistics and softmax logsumexp stay fp32 under autocast
    px = size * size
    # Patch embed: conv input (3HW), norm input + stats, mask-token blend (two T-sized masks).
    t0, c0 = stages[0].side ** 2, stages[0].dim
    fixed = (3 * px + t0 * c0 + 2 * t0) * dtype_bytes + 2 * t0 * stat_bytes
    # (full saved bytes, input bytes, bytes saved before this block, checkpointed, constant, grads in flight)
    blocks = []
    before = fixed
    k = 0
    for i, st in enumerate(stages):
        t = st.side**2
        mode = "sequential" if i in tuple(sequential_stages) else attn
        if i > 0:
            prev = stages[i - 1]
            # PatchMerging: the 2x2-concat copy (input of the reduction) + LayerNorm input + stats.
            merge = (prev.side**2 * prev.dim + t * st.dim) * dtype_bytes + 2 * t * stat_bytes
            fixed += merge
            before += merge
        for j in range(st.depth):
            shifted = j % 2 == 1 and st.shift > 0
            e = block_saved_elements(st, mlp, mode, shifted)
            b = (e["tensors"] + e["scores"]) * dtype_bytes + e["stats"] * stat_bytes
            if st.extra_norm_period and (j + 1) % st.extra_norm_period == 0:
                # huge/giant main-branch norm3 (inside the block, so inside its checkpoint): input + stats.
                b += t * st.dim * dtype_bytes + 2 * t * stat_bytes
            inp = t * st.dim * dtype_bytes
            ck = every > 0 and k % every == 0
            blocks.append((b, inp, before, ck, block_constant_elements(st) * dtype_bytes,
                           backward_grad_elements(st, mlp) * dtype_bytes))
            before += inp if ck else b
            k += 1
    last = stages[-1]
    # Final norm input + stats, the decoder conv's input (the normed map, permuted); the loss runs
    # in fp32 whatever the model's dtype (SimMIM.loss): |x - x_rec| (3HW) and the pixel mask (HW).
    t_last = last.side**2
    loss_bytes = max(dtype_bytes, 4)
    fixed += 2 * t_last * last.dim * dtype_bytes + 2 * t_last * stat_bytes + 4 * px * loss_bytes
    per_image_blocks = sum(blk[0] for blk in blocks)
    saved = fixed + sum(inp if ck else b for b, inp, _, ck, _, _ in blocks)
    # Backward differentiates one block at a time, last first; by then what later blocks and the
    # decoder saved is gone, what came before is not. A checkpointed block first recomputes its
    # full set (its input stays too); every block adds the gradients in flight through it.
    at_block = [pre + (inp if ck else 0) + b + g for b, inp, pre, ck, _, g in blocks]
    transient = max(0, max(at_block) - saved) if at_block else 0
    constant_saved = sum(c for _, _, _, ck, c, _ in blocks if not ck)
    constant_transient = max((c for _, _, _, ck, c, _ in blocks if ck), default=0)

    def chunk_bytes(n_images):
        return max((chunk_transient_elements(st, "sequential" if i in tuple(sequential_stages) else attn, n_images,
                                             attn_chunk) for i, st in enumerate(stages)), default=0) * dtype_bytes

    chunk = chunk_bytes(batch)
    # The chunk's working set stops growing once every stage fills a chunk (attn_chunk images
    # fill even a one-window stage): a per-micro-batch constant, never per-image memory.
    chunk_full = chunk_bytes(attn_chunk)
    return {
        "saved": saved * batch + constant_saved,
        "transient": transient * batch + chunk + constant_transient,
        "per_image_saved": saved,
        "per_image_blocks_full": per_image_blocks,
        "total": saved * batch + transient * batch + chunk + constant_saved + constant_transient,
        "per_image": saved + transient,
        "fixed": constant_saved + constant_transient + chunk_full,
    }


def activation_per_image(name: str, img_size: int | None = None, **kw) -> tuple[float, float]:
    """(bytes per image, bytes once per micro-batch) of `activation_bytes` (same keywords, no batch)."""
    a = activation_bytes(name, img_size, batch=1, **kw)
    return float(a["per_image"]), float(a["fixed"])


def model_state_bytes(params: int, gpus: int, stage: int, offload: bool, largest_layer: int = 0,
                      state_bytes=(PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES)) -> dict:
    """Per-GPU bytes of parameters, gradients and optimizer states (and host bytes under offload)."""
    p, g, o = (b * params for b in state_bytes)
    n = max(gpus, 1)
    if stage == 0:
        gpu = {"params": p, "grads": g, "optim": o}
    elif stage == 1:
        gpu = {"params": p, "grads": g, "optim": o / n}
    elif stage == 2:
        gpu = {"params": p, "grads": g / n, "optim": o / n}
    elif stage == 3:
        # Gathered parameters of the layers in flight (current + prefetched) come on top.
        gpu = {"params": p / n + 2 * state_bytes[0] * largest_layer, "grads": g / n, "optim": o / n}
    else:
        raise ValueError(f"ZeRO stage must be 0..3, got {stage}")
    host = 0.0
    if offload:
        if stage == 0:
            raise ValueError("offload needs ZeRO stage 1, 2 or 3")
        host += gpu["optim"] + (gpu["grads"] if stage >= 2 else 0)
        gpu["optim"] = 0.0
        if stage >= 2:
            gpu["grads"] = 0.0
        if stage == 3:  # offload_param: only the working set stays on the GPU
            host += p / n
            gpu["params"] = 2 * state_bytes[0] * largest_layer
    gpu["total"] = sum(gpu.values())
    return {"gpu": gpu, "host_per_gpu": host}


def largest_layer_params(name: str, img_size: int | None = None, window_size=None) -> int:
    """Parameters of the largest block (what ZeRO-3 gathers at once)."""
    _, stages = geometry(name, img_size, window_size)
    c = max(st.dim for st in stages)
    heads = max(st.heads for st in stages)
    return 3 * c * c + c * c + 8 * c * c + 2 * 512 + 512 * heads + 10 * c


def fsdp2_buffer_bytes(params: int, root_params: int, largest_block: int, reshard_after_forward: bool,
                       accumulation: int = 1, param_bytes: int = 2, reduce_bytes: int = 4) -> dict:
    """FSDP2's unsharded memory per GPU on top of its sharded states (see the module docstring)."""
    if reshard_after_forward:
        gathered = (root_params + 2 * largest_block) * param_bytes  # root + current + prefetched block
    else:
        gathered = params * param_bytes
    grads = root_params * param_bytes + largest_block * (param_bytes + reduce_bytes)
    accumulated = params * reduce_bytes if accumulation > 1 else 0
    return {"gathered": gathered, "grads_in_flight": grads, "accumulated_grads": accumulated,
            "total": gathered + grads + accumulated}


def fsdp2_sizes(name: str, img_size: int | None = None, window_size=None) -> tuple:
    """(parameters, the root unit's parameters, the largest block's) as the FSDP2 engine shards them."""
    from gigamim.tools.step_model import model_facts

    facts = model_facts(name, img_size, window_size)
    return facts.params, facts.params - sum(facts.block_params), max(facts.block_params)


def fit_micro_batch(budget: float, states: float, act_per_image: float, act_fixed: float = 0.0,
                    cap: int = 4096) -> int:
    """Largest micro-batch with states + fixed + mb * act_per_image <= budget (0 if none)."""
    room = budget - states - act_fixed
    if room <= 0 or act_per_image <= 0:
        return 0
    return int(min(cap, room // act_per_image))
