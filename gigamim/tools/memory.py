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

Activations: the tensors autograd saves for backward, counted op by op per block by the
model's family (`FamilySpec.plan_count`; the block kinds and their formulas live in
`gigamim.models.counting`: SwinV2's windows, Swin V1's, ViT's global attention), plus what the
family saves outside its blocks (patch embedding, merges, the final norm, the SimMIM decoder +
loss). This module only sums them, whatever the family. Checkpointed blocks keep only their
input; in backward one block at a time is recomputed, so the peak adds one block's full set
plus the gradients in flight through it (`BlockCount.grads_in_flight`), and the recompute grows with the
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

GiB = 2**30
# Mixed-precision Adam bytes per parameter: bf16 weights, bf16 grads, fp32 master + m + v.
PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES = 2, 2, 12
# fp32 training (the CPU check): weights, grads, Adam m + v; no master copy. Also FSDP2's
# sharded states under bf16 training (fp32 parameter and gradient shards, m, v).
FP32_STATE_BYTES = (4, 4, 8)
FSDP2_STATE_BYTES = FP32_STATE_BYTES
FSDP2_LABELS = {True: "FSDP2", False: "FSDP2 no-reshard"}


def activation_bytes(name: str, img_size: int | None = None, *, window_size=None, batch: int = 1,
                     dtype_bytes: int = 2, attn: str = "explicit", checkpointing: bool = False,
                     attn_chunk: int = 64, ckpt_every: int | None = None, sequential_stages=()) -> dict:
    """Activation memory of one micro-batch: 'saved' (kept from forward to backward) and
    'transient' (on top of it at the backward's high-water: the recompute of one checkpointed
    block, the gradients in flight through the block being differentiated, one attention chunk),
    bytes; 'per_image' and 'fixed' (what `gigamim plan` fits micro-batches with: total <= fixed +
    batch x per_image for every batch, with equality once the batch fills a sequential chunk).

    The model is counted by its family (`FamilySpec.plan_count`: per block what autograd saves
    in attention mode ``attn``, what is saved outside the blocks); this sums it.
    `checkpointing=True` is `ckpt_every=1` (every block); `ckpt_every=k` checkpoints blocks
    0, k, 2k, ... in forward order (the model's `grad_checkpointing=k`). `sequential_stages`
    run sequential attention in those stages and `attn` in the others."""
    from gigamim.tools.model_facts import model_facts

    count = model_facts(name, img_size, window_size).count
    modes = count.attention_modes
    sequential_stages = tuple(sequential_stages)
    for mode in {attn, *(["sequential"] if sequential_stages else [])}:
        if mode not in modes:
            raise ValueError(f"{name} does not run attention mode {mode!r} (its modes: {', '.join(modes)})")
    every = (1 if checkpointing else 0) if ckpt_every is None else ckpt_every
    # (full saved bytes, input bytes, bytes saved before this block, checkpointed, constant, grads in flight)
    fixed = count.stem.bytes(dtype_bytes)
    blocks = []
    before = fixed
    for k, blk in enumerate(count.blocks):
        if k in count.before:  # e.g. a PatchMerging at a stage start
            extra = count.before[k].bytes(dtype_bytes)
            fixed += extra
            before += extra
        mode = "sequential" if blk.stage in sequential_stages else attn
        b = blk.saved(mode).bytes(dtype_bytes)
        inp = blk.input_elements() * dtype_bytes
        ck = every > 0 and k % every == 0
        blocks.append((b, inp, before, ck, blk.constant() * dtype_bytes, blk.grads_in_flight() * dtype_bytes))
        before += inp if ck else b
    fixed += count.head.bytes(dtype_bytes)
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
        return max((blk.chunk("sequential" if blk.stage in sequential_stages else attn, n_images, attn_chunk)
                    for blk in count.blocks), default=0) * dtype_bytes

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


def fit_micro_batch(budget: float, states: float, act_per_image: float, act_fixed: float = 0.0,
                    cap: int = 4096) -> int:
    """Largest micro-batch with states + fixed + mb * act_per_image <= budget (0 if none)."""
    room = budget - states - act_fixed
    if room <= 0 or act_per_image <= 0:
        return 0
    return int(min(cap, room // act_per_image))
