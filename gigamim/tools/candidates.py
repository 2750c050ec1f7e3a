"""Candidate plans for a cluster: every ZeRO stage / ZeRO++ / offload / checkpointing /
sequential-attention combination at the largest micro-batch that fits, with its memory and
its predicted step time (`step_model`), ranked by images/s.

Memory per GPU (bf16 training on GPUs): model states as `memory.model_state_bytes` (ZeRO
paper, K=12), plus DeepSpeed's buffers: stage 1/2 the gradient bucket (`reduce_bucket_size`
elements, twice with overlap_comm) and the all-gather bucket; stage 3 the parameters kept
gathered (up to `stage3_max_live_parameters`, measured on CPU: DeepSpeed really keeps that
many from forward into backward) and the reduce bucket; hpZ its secondary partition
(2 bytes x P / gpus_per_node); plus activations from `memory.activation_per_image` with SDPA
('fused') attention: per image x micro-batch + once per micro-batch. Only what the model's
family runs is enumerated (its `ModelCount`: which k of "checkpoint every k-th block",
whether it has sequential attention).

PyTorch FSDP2 (`train.engine: fsdp2`, with and without `fsdp.reshard_after_forward`): its
sharded fp32 states (16 bytes per parameter / GPUs) plus `memory.fsdp2_buffer_bytes` (the
gathered bf16 units in flight, the gradients being reduce-scattered, and with accumulation
the unsharded gradients of the whole model), the same activations; its step time from
`step_model` (engine "fsdp2"). It counts one step of complexity more than a DeepSpeed plan
(the default engine).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from gigamim.tools.model_facts import model_facts
from gigamim.tools.step_model import Candidate, Costs, Precision, ZeroKnobs, step_time

GiB = 2**30


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def buffer_bytes(stage: int, params: int, small: int, knobs: ZeroKnobs, prec: Precision, hpz: bool,
                 gpus_per_node: int) -> float:
    if stage in (1, 2):
        return 2 * knobs.reduce_bucket * prec.grad_bytes + knobs.allgather_bucket * prec.param_bytes
    live = min(params - small, knobs.max_live) * prec.param_bytes + small * prec.param_bytes
    extra = 2 * params / gpus_per_node if hpz else 0.0
    return live + knobs.reduce_bucket * prec.grad_bytes + extra


def enumerate_candidates(name: str, gpus: int, gpus_per_node: int, gpu_mem_gb: float, device, net, *,
                         img_size=None, window_size=None, global_batch=None, micro_batch=None,
                         knobs: ZeroKnobs = ZeroKnobs(), prec: Precision = Precision(), costs: Costs = Costs(),
                         margin: float = 0.1, reserved_gb: float = 2.0, attn_chunk: int = 64,
                         max_micro_batch: int = 1024) -> list:
    """One row per configuration that fits (dicts, JSON-able), fastest first."""
    from gigamim.tools.memory import activation_per_image, model_state_bytes

    facts = model_facts(name, img_size, window_size)
    P = facts.params
    small = facts.small_params.get(knobs.persistence_threshold, 0)
    budget = gpu_mem_gb * GiB * (1 - margin) - reserved_gb * GiB
    multi_node = gpus > gpus_per_node
    per_gpu = global_batch // gpus if global_batch else None
    act_cache = {}

    def act(ckpt_every, seq):
        key = (ckpt_every, seq)
        if key not in act_cache:
            kw = dict(window_size=window_size, attn="fused", ckpt_every=ckpt_every, sequential_stages=seq,
                      attn_chunk=attn_chunk)
            act_cache[key] = activation_per_image(name, img_size, **kw)  # per image, fixed
        return act_cache[key]

    # What the family's models can run (`ModelCount`): checkpointing every k-th block for these
    # k, sequential attention (stage 0) only where the family has it.
    ckpt_options = (0,) + tuple(facts.count.checkpoint_every)
    seq_options = ((), (0,)) if "sequential" in facts.count.attention_modes else ((),)

    rows = []
    for stage in (1, 2, 3):
        zpp = [(False, False, False)]
        if stage == 3 and multi_node:
            zpp += [(True, False, False), (True, True, True)]
        for offload in (False, True):
            for hpz, qwz, qgz in zpp:
                if offload and hpz:
                    continue
                states = model_state_bytes(P, gpus, stage, offload, 0)["gpu"]["total"]
                states += buffer_bytes(stage, P, small, knobs, prec, hpz, gpus_per_node)
                for ckpt_every in ckpt_options:
                    for seq in seq_options:
                        per_img, fixed = act(ckpt_every, seq)
                        room = budget - states - fixed
                        mb_fit = int(min(max_micro_batch, room // per_img)) if room > 0 else 0
                        if micro_batch:
                            choices = [micro_batch] if micro_batch <= mb_fit else []
                        elif per_gpu:
                            choices = [d for d in divisors(per_gpu) if d <= mb_fit]
                        else:
                            choices = [mb_fit] if mb_fit else []
                        if not choices:
                            continue
                        mb = max(choices)
                        acc = per_gpu // mb if per_gpu else 1
                        cand = Candidate(stage, mb, acc, offload, hpz, qwz, qgz, ckpt_every, seq)
                        t = step_time(facts, cand, gpus, gpus_per_node, device, net, knobs, prec, costs)
                        mem = states + fixed + mb * per_img
                        rows.append({
                            "plan": cand.label, "engine": "deepspeed", "zero_stage": stage, "offload": offload, "hpz": hpz, "qwz": qwz,
                            "qgz": qgz, "checkpointing": cand.ckpt_label, "ckpt_every": ckpt_every,
                            "sequential_stages": list(seq), "micro_batch": mb, "accumulation": acc,
                            # DeepSpeed under bf16 sums micro-steps in the model dtype (plan.grad_accumulation_text)
                            "grad_accum_dtype": "bf16" if acc > 1 else None,
                            "global_batch": mb * acc * gpus, "max_micro_batch": mb_fit,
                            "mem_gb": mem / GiB, "states_gb": states / GiB, "activations_gb": (fixed + mb * per_img) / GiB,
                            "step_s": t["step_s"], "images_per_s": t["images_per_s"], "mfu": t["mfu"],
                            "compute_s": t["compute_s"], "comm_s": t["comm_s"], "comm_exposed_s": t["comm_exposed_s"],
                            "optimizer_s": t["optimizer_s"], "zero_copies_s": t["zero_copies_s"],
                            "hooks_s": t["hooks_s"], "data_s": t["data_s"], "data_bound": t["data_bound"],
                            "comm_over_compute": t["comm_over_compute"],
                            "comm_gb_per_step": {k: v / 1e9 for k, v in t["comm_bytes"].items()},
                            "complexity": int(offload) * 4 + int(hpz) + int(qwz) + int(qgz) + stage * 0
                            + (1 if seq else 0) + (1 if ckpt_every else 0),
                        })
    rows += _fsdp2_rows(facts, gpus, gpus_per_node, budget, device, net, knobs, prec, costs, act, per_gpu,
                        micro_batch, max_micro_batch, ckpt_options, seq_options)
    rows.sort(key=lambda r: -r["images_per_s"])
    return rows


def _fsdp2_rows(facts, gpus, gpus_per_node, budget, device, net, knobs, prec, costs, act, per_gpu, micro_batch,
                max_micro_batch, ckpt_options, seq_options) -> list:
    from gigamim.tools.memory import FSDP2_STATE_BYTES, fsdp2_buffer_bytes, model_state_bytes

    P = facts.params
    root, block = facts.root_params, facts.largest_block_params
    states = model_state_bytes(P, gpus, 3, False, 0, state_bytes=FSDP2_STATE_BYTES)["gpu"]["total"]
    rows = []
    for reshard in (True, False):
        for ckpt_every in ckpt_options:
            for seq in seq_options:
                per_img, fixed = act(ckpt_every, seq)

                def fit(accumulation):
                    buf = fsdp2_buffer_bytes(P, root, block, reshard, accumulation, prec.param_bytes,
                                             prec.fsdp_reduce_bytes)["total"]
                    room = budget - states - buf - fixed
                    return (int(min(max_micro_batch, room // per_img)) if room > 0 else 0), buf

                def choose(mb_fit):
                    if micro_batch:
                        return micro_batch if micro_batch <= mb_fit else 0
                    if per_gpu:
                        return max((d for d in divisors(per_gpu) if d <= mb_fit), default=0)
                    return mb_fit

                mb_fit, buf = fit(1)
                mb = choose(mb_fit)
                if mb and per_gpu and per_gpu // mb > 1:
                    # accumulating: gradient sync is off until the boundary, the unsharded
                    # gradients of the whole model stay; refit with them
                    mb_fit, buf = fit(2)
                    mb = choose(mb_fit)
                if not mb:
                    continue
                acc = per_gpu // mb if per_gpu else 1
                cand = Candidate(3, mb, acc, False, False, False, False, ckpt_every, seq, engine="fsdp2",
                                 reshard_after_forward=reshard)
                t = step_time(facts, cand, gpus, gpus_per_node, device, net, knobs, prec, costs)
                mem = states + buf + fixed + mb * per_img
                rows.append({
                    "plan": cand.label, "engine": "fsdp2", "reshard_after_forward": reshard, "zero_stage": None,
                    "offload": False, "hpz": False, "qwz": False, "qgz": False, "checkpointing": cand.ckpt_label,
                    "ckpt_every": ckpt_every, "sequential_stages": list(seq), "micro_batch": mb, "accumulation": acc,
                    "global_batch": mb * acc * gpus, "max_micro_batch": mb_fit,
                    "mem_gb": mem / GiB, "states_gb": (states + buf) / GiB, "activations_gb": (fixed + mb * per_img) / GiB,
                    "step_s": t["step_s"], "images_per_s": t["images_per_s"], "mfu": t["mfu"],
                    "compute_s": t["compute_s"], "comm_s": t["comm_s"], "comm_exposed_s": t["comm_exposed_s"],
                    "optimizer_s": t["optimizer_s"], "data_s": t["data_s"], "data_bound": t["data_bound"],
                    "comm_over_compute": t["comm_over_compute"],
                    "comm_gb_per_step": {k: v / 1e9 for k, v in t["comm_bytes"].items()},
                    "complexity": 1 + (1 if seq else 0) + (1 if ckpt_every else 0),
                })
    return rows


def recommend(rows: list, tolerance: float = 0.02) -> dict | None:
    """The fastest plan; a simpler one (no offload, no ZeRO++, less checkpointing, lower stage)
    wins if it is within `tolerance` of the fastest."""
    if not rows:
        return None
    best = rows[0]["images_per_s"]
    near = [r for r in rows if r["images_per_s"] >= best * (1 - tolerance)]
    return min(near, key=lambda r: (r["complexity"], r["zero_stage"] or 3, -r["images_per_s"]))


def as_json(obj) -> dict:
    return asdict(obj)


def with_costs(costs: Costs, **kw) -> Costs:
    return replace(costs, **{k: v for k, v in kw.items() if v is not None})


def nodes_of(gpus: int, gpus_per_node: int) -> int:
    return math.ceil(gpus / gpus_per_node)
