"""Step time of one SimMIM pretraining plan: compute + ZeRO communication + optimizer + data.

Pure arithmetic on the architecture (a meta-device model), a device, a network and the
DeepSpeed knobs that change what moves. `gigamim plan` ranks candidate plans with it;
`benchmarks/plan_calibration.py` checks it against 2-rank CPU runs (bytes counted by
wrapping `torch.distributed`, wall time measured).

Compute. Training FLOPs per image = 3 x forward (backward = 2x) + 1 x forward of every
recomputed block (`gigamim.models.flops` for the forward); time = FLOPs / (peak x
efficiency). `efficiency` is the fraction of the device peak a plain forward + backward of
the model reaches (MFU of compute alone); calibrate it from `gigamim bench` (train-step
MFU) or pass it. Default for H100/H200 bf16: 0.50 (stated, not measured here: no GPU).

Communication, per rank, logical bytes (the buffer a collective works on; what
`benchmarks/comm_count.py` counts), as DeepSpeed 0.19 does it with the packaged templates:
- ZeRO-1: one all-reduce of all gradients per STEP (gradients accumulate locally over
  micro-steps; DeepSpeed all-reduces buckets that span several ranks' partitions), then an
  all-gather of the updated parameters.
- ZeRO-2: the gradient all-reduce on EVERY micro-step (gradients are partitioned, so
  they cannot accumulate unreduced), then the parameter all-gather once per step.
- ZeRO-3, per micro-step: forward all-gather of the partitioned parameters; backward
  all-gather of those not still resident: DeepSpeed keeps the modules at the end of forward
  (backward's first) gathered as long as they fit in `stage3_max_live_parameters`
  (`ModelFacts.kept_from_forward`; measured on CPU), so the backward gather is P - kept; a
  reduce-scatter of all gradients. Activation checkpointing adds NO gathers while max_live covers a block (the
  recompute's gather serves that block's backward); otherwise one more gather of the
  recomputed blocks. Parameters under `stage3_param_persistence_threshold` elements are
  never partitioned (no gathers).
- ZeRO++ (stage 3): hpZ keeps a secondary bf16 partition per node (+2 P / gpus_per_node
  bytes of memory), so backward (and recompute) gathers stay inside the node; qwZ sends the
  forward gather as int8 (x 0.5 of bf16, + 1/256 for the fp32 scales); qgZ replaces the
  gradient reduce-scatter by a 2-hop all-to-all of int4 data (x 0.25 of bf16 on both
  hops, the inter-node hop carries 1/gpus_per_node of it).
- PyTorch FSDP2 (`train.engine: fsdp2`, gigamim's engine: every block its own `fully_shard`
  unit, the root unit holds the rest), per micro-step: one all-gather per unit in forward
  (the parameter dtype: bf16 under bf16 training), and with `reshard_after_forward` one more
  per unit in backward. The engine passes the setting to the root as well, so torch (2.9+)
  re-gathers the root too (left to torch's default, the root would stay gathered). Gradients:
  one reduce-scatter per unit in `fsdp.reduce_dtype` (fp32 by default, also under bf16) at
  the accumulation boundary only (the engine turns gradient sync off in between; the
  unsharded gradients accumulate locally meanwhile). FSDP2 shards dim 0 of every parameter
  in `torch.chunk` pieces padded to the first one's size, so a collective's buffer is
  sum over parameters of ceil(dim0 / ranks) x ranks x (the other dims) elements
  (`ModelFacts.fsdp_padded`). Activation checkpointing adds no gathers (the block's
  pre-backward hook gathers; the recompute's forward finds it gathered).
Time per collective: `hardware.collective_seconds` (ring busbw + per-call latency).

Overlap (stated): on GPUs with `overlap_comm`, communication that runs during compute
hides behind up to `overlap` (default 0.8) of that compute: ZeRO-3's prefetched gathers and
bucketed reduce-scatter behind the micro-step's forward + backward, ZeRO-2's per-micro
all-reduce behind the backward, ZeRO-1's boundary all-reduce behind the last backward only.
The post-step parameter all-gather (stage 1/2) and the optimizer are never hidden. CPU
ranks (gloo, no streams, comm threads share the core): overlap 0.

Optimizer: AdamW over the rank's fp32 partition, memory-bound: `optim_bytes_per_param`
(36: fp32 master, m, v read + written, gradient read and converted, bf16 copy written) / the
device's memory bandwidth; with offload, DeepSpeedCPUAdam at `cpu_adam_params_per_s` per GPU
(1.0e9: ~12 AVX-512 cores) plus gradients down / parameters up over PCIe (25 GB/s).
ZeRO bookkeeping (DeepSpeed's flat buffers: gradient buckets, gather outputs, fp32
partitions): `zero_passes[stage]` passes over P x grad_bytes per micro-step (ZeRO-1: per step) at the device
memory bandwidth (on CPU ranks: the first-touch bandwidth of fresh memory, which is what
those buffers cost there), calibrated on 2 CPU ranks; plus `hook_s` per ZeRO-3 module hook
(4 per module per micro-step: pre/post forward and backward; 20 us). FSDP2 the same way:
`fsdp_passes` over P x param_bytes per micro-step (its copy-in / copy-out around every
all-gather and reduce-scatter; calibrated on 2 CPU ranks) and 4 hooks per unit per micro-step.
Data (stated, overlapped by the loader workers): `cpu_ms_per_image` of decode + crop per
host core / `host_cores_per_gpu`; a step is never faster than its data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gigamim.tools.hardware import Device, Network, collective_seconds
from gigamim.tools.model_facts import ModelFacts


@dataclass(frozen=True)
class ZeroKnobs:
    """The DeepSpeed settings that change bytes, calls and memory (zero_optimization.*)."""

    reduce_bucket: float = 5e8
    allgather_bucket: float = 5e8
    prefetch_bucket: float = 5e8
    max_live: float = 1e9
    persistence_threshold: float = 1e6


@dataclass(frozen=True)
class Precision:
    param_bytes: int = 2  # what the gathers carry (bf16)
    grad_bytes: int = 2  # what the reductions carry (communication_data_type)
    master_bytes: int = 4  # fp32 optimizer partition element
    fsdp_reduce_bytes: int = 4  # FSDP2's gradient reduce-scatter (fsdp.reduce_dtype, fp32 by default)


@dataclass(frozen=True)
class Costs:
    """Stated host/device constants (see the module docstring)."""

    efficiency: float = 0.50
    forward_efficiency: float | None = None  # of a forward alone (recomputes); None: efficiency
    overlap: float = 0.8
    optim_bytes_per_param: float = 36.0
    optim_s_per_param: float | None = None  # measured (CPU calibration) instead of the bytes model
    cpu_adam_params_per_s: float = 1.0e9
    pcie_bps: float = 25e9
    hook_s: float = 20e-6
    # DeepSpeed's per-micro-step host work on its flat buffers (gradient buckets, gather outputs,
    # fp32 partitions), in passes over P x grad_bytes per micro-step (ZeRO-1: per step), at
    # `buffer_bps` (None: the device memory bandwidth; CPU: first-touch bandwidth of fresh
    # memory). Calibrated on 2 CPU ranks (benchmarks/plan_calibration.py, swinv2_tiny without
    # checkpointing; checked on the other runs): see benchmarks/results/plan_calibration_*.
    # GPU default: ~3 passes (flatten into the bucket, copy back, copy into the fp32 partition) at
    # HBM speed; the CPU fit is larger because fresh host memory is paged in on first touch.
    zero_passes: tuple = (0.0, 3.0, 3.0, 3.0)
    # FSDP2's copies around its collectives (all-gather copy-in / copy-out into the unsharded
    # parameters, reduce-scatter copy-in), passes over P x param_bytes per micro-step at
    # `buffer_bps`. GPU default ~3 (copy-out forward and backward, reduce-scatter copy-in);
    # the CPU fit (CPU-seconds clock) is 0.00: benchmarks/results/plan_calibration_2026-12-04_cpu
    # (the wall-clock fit of 1.41 in plan_calibration_2026-12-04 was the shared machine's load).
    fsdp_passes: float = 3.0
    buffer_bps: float | None = None
    cpu_ms_per_image: float = 2.5
    host_cores_per_gpu: float = 11.0


@dataclass(frozen=True)
class Candidate:
    zero_stage: int
    micro_batch: int
    accumulation: int = 1
    offload: bool = False
    hpz: bool = False
    qwz: bool = False
    qgz: bool = False
    ckpt_every: int = 0  # 0 none, 1 every block, k every k-th block (the model's grad_checkpointing=k)
    sequential_stages: tuple = ()
    engine: str = "deepspeed"  # or "fsdp2" (then zero_stage is 3: parameters, gradients and states sharded)
    reshard_after_forward: bool = True  # fsdp2 only (fsdp.reshard_after_forward)

    @property
    def label(self) -> str:
        if self.engine == "fsdp2":
            return "FSDP2" + ("" if self.reshard_after_forward else " no-reshard")
        parts = [f"ZeRO-{self.zero_stage}"]
        if self.hpz or self.qwz or self.qgz:
            parts.append("+".join(n for n, on in (("hpZ", self.hpz), ("qwZ", self.qwz), ("qgZ", self.qgz)) if on))
        if self.offload:
            parts.append("offload")
        return " ".join(parts)

    @property
    def ckpt_label(self) -> str:
        k = self.ckpt_every
        nth = {2: "2nd", 3: "3rd"}.get(k, f"{k}th")
        return {0: "none", 1: "every block"}.get(k, f"every {nth} block")


def _small_params(facts: ModelFacts, threshold: float) -> int:
    if threshold in facts.small_params:
        return facts.small_params[threshold]
    raise ValueError(f"persistence threshold {threshold:g} not tabulated (use 0, 1e5, 1e6 or 1e7)")


def recomputed_blocks(facts: ModelFacts, ckpt_every: int) -> list:
    n = len(facts.block_params)
    if ckpt_every <= 0:
        return [False] * n
    return [i % ckpt_every == 0 for i in range(n)]


def recompute_flops_per_image(facts: ModelFacts, cand: Candidate) -> float:
    """The forward of every recomputed block; sequential attention recomputes its chunks' QK^T /
    AV in backward (as the memory model assumes), once more for those stages."""
    on = recomputed_blocks(facts, cand.ckpt_every)
    extra = sum(f for f, r in zip(facts.block_flops, on) if r)
    seq = sum(a for a, st, r in zip(facts.block_attn_flops, facts.block_stage, on)
              if st in cand.sequential_stages and not r)
    return extra + seq


def train_flops_per_image(facts: ModelFacts, cand: Candidate) -> float:
    """3 x forward + what is recomputed (`recompute_flops_per_image`)."""
    return 3 * (facts.forward_flops + facts.cpb_flops / cand.micro_batch) + recompute_flops_per_image(facts, cand)


def comm_plan(facts: ModelFacts, cand: Candidate, ranks: int, gpus_per_node: int, knobs: ZeroKnobs,
              prec: Precision) -> list:
    """Every collective of one optimizer step: dicts with kind, logical bytes (all calls), calls,
    scope ('world' or 'node'), when ('micro' fwd/bwd, 'boundary', 'post'), and wire dtype factor."""
    if ranks <= 1:
        return []
    P, acc = facts.params, cand.accumulation
    out = []

    def add(kind, nbytes, calls, when, scope="world", what=""):
        out.append({"kind": kind, "bytes": float(nbytes), "calls": float(calls), "when": when, "scope": scope,
                    "what": what})

    gb, pb = prec.grad_bytes, prec.param_bytes
    if cand.engine == "fsdp2":
        blocks, root = facts.fsdp_padded(ranks)
        units = facts.fsdp_units
        add("all_gather", acc * (blocks + root) * pb, acc * units, "micro_fwd", what="parameters, forward (every unit)")
        if cand.reshard_after_forward:
            # The engine gives the root the same setting, so it is re-gathered like the blocks.
            add("all_gather", acc * (blocks + root) * pb, acc * units, "micro_bwd",
                what="parameters, backward (resharded after forward)")
        add("reduce_scatter", (blocks + root) * prec.fsdp_reduce_bytes, units, "boundary",
            what="gradients (fsdp.reduce_dtype), at the accumulation boundary")
        return out
    if cand.zero_stage in (1, 2):
        reductions = 1 if cand.zero_stage == 1 else acc
        calls = math.ceil(P / knobs.reduce_bucket)
        add("all_reduce", reductions * P * gb, reductions * calls, "boundary" if cand.zero_stage == 1 else "micro_bwd",
            what="gradients")
        add("all_gather", P * pb, math.ceil(P / knobs.allgather_bucket), "post", what="updated parameters")
    elif cand.zero_stage == 3:
        part = P - _small_params(facts, knobs.persistence_threshold)
        kept = facts.kept_from_forward(knobs.max_live, knobs.persistence_threshold)
        bwd = part - kept
        if cand.ckpt_every and knobs.max_live < max(facts.block_params):
            bwd += sum(p for p, on in zip(facts.block_params, recomputed_blocks(facts, cand.ckpt_every)) if on)
        fwd_factor = (0.5 + 1 / 256) if cand.qwz else 1.0
        fwd_calls = math.ceil(part / knobs.prefetch_bucket)
        bwd_calls = math.ceil(bwd / knobs.prefetch_bucket) if bwd else 0
        add("all_gather", acc * part * pb * fwd_factor, acc * fwd_calls, "micro_fwd", what="parameters, forward")
        if bwd:
            add("all_gather", acc * bwd * pb, acc * bwd_calls, "micro_bwd", scope="node" if cand.hpz else "world",
                what="parameters, backward" + (" (hpZ: inside the node)" if cand.hpz else ""))
        rs_calls = math.ceil(P / knobs.reduce_bucket)
        if cand.qgz:
            nodes = math.ceil(ranks / gpus_per_node)
            add("all_to_all", acc * P * gb * 0.25, acc * rs_calls, "micro_bwd", scope="node",
                what="gradients, qgZ int4 hop 1 (node)")
            if nodes > 1:
                add("all_to_all", acc * P * gb * 0.25 / gpus_per_node, acc * rs_calls, "micro_bwd",
                    what="gradients, qgZ int4 hop 2 (nodes)")
        else:
            add("reduce_scatter", acc * P * gb, acc * rs_calls, "micro_bwd", what="gradients")
    return out


def comm_bytes_by_kind(plan: list) -> dict:
    out = {}
    for c in plan:
        out[c["kind"]] = out.get(c["kind"], 0.0) + c["bytes"]
    return out


def _seconds(c: dict, ranks: int, gpus_per_node: int, net: Network) -> float:
    if c["scope"] == "node":
        n = min(ranks, gpus_per_node)
        return collective_seconds(c["kind"] if c["kind"] != "all_to_all" else "all_gather", c["bytes"], n, n, net,
                                  c["calls"])
    kind = c["kind"] if c["kind"] != "all_to_all" else "all_gather"
    return collective_seconds(kind, c["bytes"], ranks, gpus_per_node, net, c["calls"])


def step_time(facts: ModelFacts, cand: Candidate, ranks: int, gpus_per_node: int, device: Device, net: Network,
              knobs: ZeroKnobs = ZeroKnobs(), prec: Precision = Precision(), costs: Costs = Costs()) -> dict:
    """Predicted seconds per optimizer step, its parts, images/s and MFU."""
    mb, acc = cand.micro_batch, cand.accumulation
    flops_img = train_flops_per_image(facts, cand)
    rate = device.peak_tflops * 1e12 * costs.efficiency
    # A recompute is a forward, which reaches a slightly lower fraction of the peak than a
    # forward + backward (CPU: 0.47-0.53 vs 0.51-0.57, plan_calibration_2026-12-04_cpu).
    recompute = recompute_flops_per_image(facts, cand)
    fwd_rate = device.peak_tflops * 1e12 * (costs.forward_efficiency or costs.efficiency)
    compute_micro = mb * (flops_img - recompute) / rate + mb * recompute / fwd_rate
    bwd_micro = compute_micro * 2 / 3
    plan = comm_plan(facts, cand, ranks, gpus_per_node, knobs, prec)
    t = {w: 0.0 for w in ("micro_fwd", "micro_bwd", "boundary", "post")}
    for c in plan:
        c["seconds"] = _seconds(c, ranks, gpus_per_node, net)
        t[c["when"]] += c["seconds"]
    ov = costs.overlap
    fsdp2 = cand.engine == "fsdp2"
    if cand.zero_stage == 3 or fsdp2:
        exposed = max(0.0, t["micro_fwd"] + t["micro_bwd"] - ov * acc * compute_micro)
    else:
        exposed = max(0.0, t["micro_bwd"] - ov * acc * bwd_micro)
    exposed += max(0.0, t["boundary"] - ov * bwd_micro) + t["post"]
    # Optimizer over the local partition.
    P = facts.params
    n_opt = P / ranks if cand.zero_stage >= 1 or fsdp2 else P
    bw = device.mem_bw_gbps * 1e9
    if cand.offload:
        optim = n_opt / costs.cpu_adam_params_per_s + n_opt * (prec.grad_bytes + prec.param_bytes) / costs.pcie_bps
    elif costs.optim_s_per_param is not None:
        optim = n_opt * costs.optim_s_per_param
    else:
        optim = n_opt * costs.optim_bytes_per_param / bw
    # DeepSpeed's flat-buffer work and per-module hooks (ZeRO-3: pre/post forward and backward).
    kinds = comm_bytes_by_kind(plan)
    buf_bw = costs.buffer_bps or bw
    # ZeRO-1 touches its flat buffers once per step (gradients accumulate in place); 2/3 per micro-step.
    if fsdp2:
        copies = acc * costs.fsdp_passes * P * prec.param_bytes / buf_bw
        hooks = acc * 4 * facts.fsdp_units * costs.hook_s
    else:
        reps = 1 if cand.zero_stage == 1 else acc
        copies = reps * costs.zero_passes[cand.zero_stage] * P * prec.grad_bytes / buf_bw
        hooks = acc * 4 * facts.modules_with_params * costs.hook_s if cand.zero_stage == 3 else 0.0
    gpu_step = acc * compute_micro + exposed + optim + copies + hooks
    images = mb * acc  # per rank
    data = images * costs.cpu_ms_per_image * 1e-3 / costs.host_cores_per_gpu if costs.cpu_ms_per_image else 0.0
    step = max(gpu_step, data)
    model_flops = 3 * facts.forward_flops * images  # MFU counts no recompute
    return {
        "step_s": step, "compute_s": acc * compute_micro, "comm_s": sum(c["seconds"] for c in plan),
        "comm_exposed_s": exposed, "optimizer_s": optim, "zero_copies_s": copies, "hooks_s": hooks, "data_s": data,
        "data_bound": data > gpu_step, "images_per_s": images * ranks / step,
        "mfu": model_flops / step / (device.peak_tflops * 1e12),
        "comm_bytes": kinds, "comm": plan, "train_flops_per_image": flops_img,
        "comm_over_compute": sum(c["seconds"] for c in plan) / (acc * compute_micro),
    }


def as_dict(x) -> dict:
    return asdict(x)
