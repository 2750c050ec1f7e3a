"""Calibrate `gigamim plan`'s step-time model against real 2-rank ZeRO runs on CPU (gloo).

    flock /tmp/gigamim_heavy.lock nice python -m benchmarks.plan_calibration --stages 3 --fsdp2 1,0 --steps 5 --out DIR

For each case (swinv2_tiny / swinv2_small x ZeRO-1/2/3 x checkpointing off/on) two ranks
are started as plain processes (env:// rendezvous), each wraps the `torch.distributed`
collectives (benchmarks/comm_count.py) BEFORE DeepSpeed sets up its backend, builds
`SimMIM(create_model(...))` (under `deepspeed.zero.Init` for stage 3), calls
`deepspeed.initialize` directly (not the trainer) and runs a few optimizer steps on random
images. Measured per step: wall and CPU seconds of every rank, bytes and calls per collective
kind, wall and CPU seconds inside collectives. Right before each case, in the case's own two
processes, the harness measures the inputs the model gets: the CPU's fp32 GEMM peak (1 thread
per rank, both ranks busy), the gloo bandwidth and latency of all-reduce / all-gather /
reduce-scatter / reduce, the memory bandwidth (the optimizer step) and the compute efficiency
(model FLOPs / GEMM peak of a plain forward + backward of swinv2_tiny, no DeepSpeed, on both
ranks at once).

Clock (`--clock`, default cpu): the machine is shared (2 cores, other jobs that take no lock),
so wall time measures the neighbours as much as the model: the same case differed by 1.8x
between two runs. A rank's CPU seconds (user + sys, all its threads; gloo over loopback is
CPU work: the kernel's socket copies are the rank's sys time) leave out the time it waited
for a core or for the other rank, and approximate the wall time of a quiet machine where
both ranks do the same work (checked on a case in benchmarks/results/plan_calibration_2026-12-04_cpu:
CPU vs wall seconds, rank imbalance). A step's time is the slower rank's; the case's is the
median over the timed steps (min beside it in steps.md). Inputs and steps use the same clock.

`--ab plain,fsdp2,...`: instead, checkpointing off / on alternating step by step in one engine
(`set_grad_checkpointing` between steps), per engine, against the step model's charge for it
(the recompute FLOPs at GEMM peak x efficiency): what checkpointing costs under each engine.

Then `gigamim.tools.step_model` predicts each case from those inputs alone and the table
(JSON + markdown) goes to DIR: predicted vs counted bytes (target within 5%), predicted vs
measured step time (target within 25%). `--fsdp2 1,0` adds runs of gigamim's FSDP2 engine
(through the engine seam, reshard_after_forward on / off), predicted the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

IMG, WINDOW = 96, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(stage: int, micro_batch: int, accumulation: int, world: int, max_live: float = 1e7) -> dict:
    """fp32 (CPU), no overlap (gloo has no streams). Stage 3: no persistent parameters, no reuse
    window, and max_live 1e7 (a third of swinv2_tiny, a fifth of swinv2_small) so that the
    backward gathers what forward could not keep (DeepSpeed keeps up to max_live gathered)."""
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8}
    if stage == 3:
        zero.update({"reduce_bucket_size": 5e6, "stage3_prefetch_bucket_size": 5e6,
                     "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": max_live,
                     "stage3_max_reuse_distance": 0})
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro_batch * accumulation * world, "zero_optimization": zero,
            "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


# ---------------------------------------------------------------------------- worker side


def _build(case: dict):
    from gigamim.models import SimMIM, create_model

    return SimMIM(create_model(case["model"], img_size=IMG, window_size=WINDOW, drop_path_rate=0.0,
                               grad_checkpointing=bool(case["ckpt"])))


def _batch(case: dict, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["micro_batch"], 3, IMG, IMG, generator=g)
    mask = torch.rand(case["micro_batch"], IMG // 4, IMG // 4, generator=g) > 0.4
    return x, mask


CLOCKS = ("wall", "cpu")


def _timed(fn) -> tuple:
    """(wall, CPU) seconds of one call. CPU = this process's user + sys seconds, all threads
    (gloo's worker thread does a collective's copies): what the call costs the rank, without
    the time it waited for the core (a shared machine) or for the other rank."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _best(fn, reps: int) -> dict:
    """Fastest of `reps` calls, per clock."""
    ts = [_timed(fn) for _ in range(reps)]
    return {k: min(t[i] for t in ts) for i, k in enumerate(CLOCKS)}


def _both_ranks_max(values: dict) -> dict:
    """The slower rank's value per clock: both ranks must give the model one number."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([values[k] for k in CLOCKS], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(CLOCKS, t.tolist()))


def _measure_inputs(out: dict, counter, clock: str = "cpu") -> None:
    """Inputs of the model, measured in the harness (both ranks busy, one thread each), on
    both clocks; the top-level values are `clock`'s, `out["by_clock"]` holds both."""
    import torch
    import torch.distributed as dist

    from gigamim.models.flops import train_flops

    was = counter.enabled
    counter.enabled = False  # the inputs' own collectives are not the case's
    v = {k: {} for k in CLOCKS}

    def put(name, per_clock, fn=lambda s: s):
        for k in CLOCKS:
            v[k][name] = fn(per_clock[k])

    # GEMM peak: best of n=1024 fp32 matmuls, both ranks at once (what a rank gets when both compute).
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    dist.barrier()
    put("gemm_tflops", _both_ranks_max(_best(lambda: torch.mm(a, b), 8)), lambda s: 2 * 1024**3 / s / 1e12)
    # Memory bandwidth: a copy of 64 MB (read + write).
    src = torch.randn(16 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    dist.barrier()
    put("mem_gbps", _both_ranks_max(_best(lambda: dst.copy_(src), 5)), lambda s: 2 * src.numel() * 4 / s / 1e9)
    # First touch: filling a freshly allocated 64 MB tensor (new pages from the kernel each time,
    # as DeepSpeed's per-micro-step flat buffers are on CPU; a GPU's caching allocator reuses them).
    del dst

    def fresh():
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)
        return t

    fresh()
    dist.barrier()
    put("fresh_gbps", _both_ranks_max(_best(fresh, 5)), lambda s: 16 * 2**20 * 4 / s / 1e9)
    # gloo: time per call vs size for each collective kind, fitted as latency + bytes / bandwidth.
    world = dist.get_world_size()
    sizes = [2**14, 2**20, 2**23, 2**25]  # bytes of the logical buffer
    pts = {k: {} for k in CLOCKS}
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "reduce"):
        for k in CLOCKS:
            pts[k][kind] = []
        for nbytes in sizes:
            n = nbytes // 4
            full = torch.randn(n)
            part = torch.randn(n // world)
            if kind == "all_reduce":
                fn = lambda: dist.all_reduce(full)  # noqa: E731
            elif kind == "all_gather":
                fn = lambda: dist.all_gather_into_tensor(full, part)  # noqa: E731
            elif kind == "reduce_scatter":
                fn = lambda: dist.reduce_scatter_tensor(part, full)  # noqa: E731
            else:
                fn = lambda: dist.reduce(full, dst=0)  # noqa: E731
            fn()
            reps = 5 if nbytes >= 2**23 else 10
            ts = []
            for _ in range(reps):
                dist.barrier()
                ts.append(_timed(fn))
            med = {k: sorted(t[i] for t in ts)[len(ts) // 2] for i, k in enumerate(CLOCKS)}
            med = _both_ranks_max(med)  # the slower rank's median
            for k in CLOCKS:
                pts[k][kind].append((nbytes, med[k]))
    for k in CLOCKS:
        v[k]["gloo"] = {kind: _fit_alpha_beta(p) for kind, p in pts[k].items()}
    # Optimizer: torch AdamW on one flat fp32 tensor (ZeRO steps flat partitions), seconds per parameter.
    flat = torch.nn.Parameter(torch.randn(4 * 2**20))
    flat.grad = torch.randn_like(flat)
    adam = torch.optim.AdamW([flat], lr=1e-4, weight_decay=0.05)
    adam.step()
    dist.barrier()
    put("optim_s_per_param", _both_ranks_max(_best(adam.step, 3)), lambda s: s / flat.numel())
    del flat, adam
    # Compute efficiency: plain forward + backward of swinv2_tiny (no DeepSpeed, no checkpointing),
    # both ranks at once, gradients freed after each step as a trainer does (their first touch
    # is part of the cost); achieved model FLOP/s / GEMM peak.
    case = {"model": "swinv2_tiny", "ckpt": False, "micro_batch": out["micro_batch"]}
    torch.manual_seed(0)
    model = _build(case)
    x, mask = _batch(case, 0)

    def fwd_bwd():
        model(x, mask).backward()
        model(x, mask).backward()
        model.zero_grad(set_to_none=True)

    def fwd():  # a training forward alone (graph built, activations saved), then dropped
        model(x, mask)
        model(x, mask)

    fwd_bwd()
    dist.barrier()
    t = _both_ranks_max(_best(fwd_bwd, 3))
    tf = _both_ranks_max(_best(fwd, 3))
    flops = train_flops(model, IMG, batch_size=case["micro_batch"]) * case["micro_batch"]
    for k in CLOCKS:
        v[k]["efficiency_step_s"] = t[k] / 2
        v[k]["efficiency"] = flops / (t[k] / 2) / (v[k]["gemm_tflops"] * 1e12)
        # The forward's own: what a recompute (a checkpointed block's second forward) runs at.
        v[k]["efficiency_forward"] = flops / 3 / (tf[k] / 2) / (v[k]["gemm_tflops"] * 1e12)
    del model
    out.update(v[clock])
    out["clock"] = clock
    out["by_clock"] = v
    counter.enabled = was
    counter.reset()


def _fit_alpha_beta(pts):
    """Least squares t = alpha + bytes / bw over (bytes, seconds) points."""
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    slope = sxy / sxx
    alpha = max(0.0, my - slope * mx)
    return {"latency_s": alpha, "bytes_per_s": 1.0 / slope, "points": pts}


def worker(case: dict, out_file: str) -> None:
    from benchmarks.comm_count import CollectiveCounter

    counter = CollectiveCounter().install()  # before DeepSpeed captures the functions
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from gigamim.runtime.dist import init_distributed
    from gigamim.train.engines.deepspeed import init_comm  # DeepSpeed's comm layer; unlinks its CPU shm buffers

    info = init_distributed("gloo")
    fsdp2 = case.get("engine") == "fsdp2"
    if not fsdp2:
        init_comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"case": case, "world": world}
    clock = case.get("clock", "cpu")
    if case.get("chatter"):
        # Rank 1 writes this many bytes of output before the first collective (as DeepSpeed's
        # deprecation warnings do): the driver must not let a rank's output block it.
        if rank == 1:
            sys.stderr.write("x" * int(case["chatter"]) + "\n")
            sys.stderr.flush()
        dist.barrier()
        return _finish(result, rank, out_file)
    if case.get("inputs"):
        result["micro_batch"] = case["micro_batch"]
        _measure_inputs(result, counter, clock)
        return _finish(result, rank, out_file)
    if case.get("inputs_before"):
        # The model's inputs right before the case, in the same processes: what the machine
        # gives a rank now, not an hour ago.
        result["inputs"] = {"micro_batch": case["micro_batch"]}
        _measure_inputs(result["inputs"], counter, clock)
    if case.get("engine") == "plain":
        _timed_steps(_PlainEngine(case), case, rank, counter, result)
    elif fsdp2:
        engine = _fsdp2_engine(case, info)
        result["fsdp"] = {"reshard_after_forward": bool(case.get("reshard", True)), "reduce_dtype": "fp32",
                          "units": _fsdp_units(engine.module)}
        _timed_steps(engine, case, rank, counter, result)
    else:
        import deepspeed

        result["ds_zero"] = ds_config(case["stage"], 1, 1, world, case.get("max_live", 1e7))["zero_optimization"]
        cfg = ds_config(case["stage"], case["micro_batch"], case["accumulation"], world, case.get("max_live", 1e7))
        torch.manual_seed(0)
        # zero.Init patches tensor construction; anything imported lazily inside it (timm pulls
        # in torch._dynamo) breaks, so import the model code first.
        import torch._dynamo  # noqa: F401

        import gigamim.models  # noqa: F401
        if case["stage"] == 3:
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model = _build(case)
        else:
            model = _build(case)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        _timed_steps(engine, case, rank, counter, result)
    _finish(result, rank, out_file)


def _finish(result: dict, rank: int, out_file: str) -> None:
    import torch.distributed as dist

    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


class _PlainEngine:
    """The model whole on each rank, no communication, AdamW: the reference for what
    checkpointing costs without any engine (the A/B runs)."""

    def __init__(self, case: dict):
        import torch

        torch.manual_seed(0)
        self.module = _build(case)
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-4, weight_decay=0.05)

    def __call__(self, x, mask):
        return self.module(x, mask)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _encoder(engine):
    return engine.module.encoder


def _fsdp2_engine(case: dict, info):
    """gigamim's FSDP2 engine (train/engines/fsdp2.py) through the engine seam, as the trainer
    builds it: meta build, every block its own fully_shard unit + the root, fp32 (CPU), AdamW
    over the sharded parameters, clipping at 1.0 like the DeepSpeed runs."""
    from gigamim.config import load_config
    from gigamim.train.engines import create_engine

    world = info.world_size
    cfg = load_config("demo", [
        f"model.name={case['model']}", f"model.img_size={IMG}", f"model.window_size={WINDOW}",
        "model.drop_path_rate=0.0", f"model.grad_checkpointing={str(bool(case['ckpt'])).lower()}",
        "train.engine=fsdp2", "train.precision=fp32", "train.grad_clip=1.0",
        f"train.micro_batch_size={case['micro_batch']}",
        f"train.global_batch_size={case['micro_batch'] * case['accumulation'] * world}",
        f"fsdp.reshard_after_forward={str(bool(case.get('reshard', True))).lower()}", "fsdp.reduce_dtype=fp32"])
    engine = create_engine(cfg, info, "fp32")
    # One parameter group, as the DeepSpeed runs' AdamW (the group split changes no collective).
    engine.build(lambda: _build(case), lambda m: [{"params": list(m.parameters()), "weight_decay": 0.05}])
    return engine


def _fsdp_units(model) -> list:
    """Parameters (elements) of each fully_shard unit: the blocks in forward order, the root
    (what no block holds) last. Recorded with the run; the prediction does not read it."""
    from torch.distributed.fsdp import FSDPModule

    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return sizes + [sum(p.numel() for p in model.parameters()) - sum(sizes)]


def _timed_steps(engine, case: dict, rank: int, counter, result: dict) -> None:
    """Warm-up, then timed optimizer steps of `accumulation` micro-batches each; `engine` is a
    DeepSpeed engine, gigamim's FSDP2 engine or `_PlainEngine` (the same forward / backward /
    step calls). Wall and CPU seconds per step and phase on every rank; the case's step time
    is, per step, the slower rank's (`case["clock"]`), then the median over steps.

    `case["ab"]`: checkpointing alternates off / on from step to step in the SAME model and
    engine (`set_grad_checkpointing`), so its cost is measured against the same process,
    same shards, same machine minute; steps are counted in pairs (warm-up: one pair)."""
    import torch.distributed as dist

    clock = case.get("clock", "cpu")
    ab = bool(case.get("ab"))
    warmup = case["warmup"] * (2 if ab else 1)
    batches = [_batch(case, rank * 1000 + i) for i in range(case["accumulation"])]
    per_step = []  # {"ckpt", "wall", "cpu", "phases": {clock: {phase: s}}}
    marks = []
    for step in range(warmup + case["steps"] * (2 if ab else 1)):
        if ab:
            _encoder(engine).set_grad_checkpointing(bool(step % 2))
        if step == warmup:
            counter.reset()
            marks = []
        dist.barrier()
        t0 = _now()
        phases = {k: {"forward": 0.0, "backward": 0.0, "step": 0.0} for k in CLOCKS}
        for x, mask in batches:
            t = _now()
            loss = engine(x, mask)
            t1 = _now()
            marks.append((dict(counter.bytes), dict(counter.calls)))
            engine.backward(loss)
            t2 = _now()
            marks.append((dict(counter.bytes), dict(counter.calls)))
            engine.step()
            t3 = _now()
            for i, k in enumerate(CLOCKS):
                phases[k]["forward"] += t1[i] - t[i]
                phases[k]["backward"] += t2[i] - t1[i]
                phases[k]["step"] += t3[i] - t2[i]
            marks.append((dict(counter.bytes), dict(counter.calls)))
        t_end = _now()
        counter.enabled = False
        dist.barrier()
        counter.enabled = True
        if step >= warmup:
            per_step.append({"ckpt": bool(step % 2) if ab else bool(case.get("ckpt")),
                             "wall": t_end[0] - t0[0], "cpu": t_end[1] - t0[1], "phases": phases})
    snap = counter.snapshot()
    n = len(per_step)
    counter.enabled = False
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, per_step)  # every rank's steps, for the slower rank and the imbalance
    counter.enabled = True
    walls = [max(r[i]["wall"] for r in ranks) for i in range(n)]
    cpus = [max(r[i]["cpu"] for r in ranks) for i in range(n)]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    by_clock = {"wall": walls, "cpu": cpus}

    def phase_med(sel, k):
        # per phase: the slower rank's seconds per step, median over the selected steps
        return {ph: med([max(r[i]["phases"][k][ph] for r in ranks) for i in sel])
                for ph in ("forward", "backward", "step")}

    everything = list(range(n))
    result.update(
        clock=clock, step_times=by_clock[clock], step_s=med(by_clock[clock]),
        wall_step_times=walls, cpu_step_times=cpus,
        cpu_step_times_per_rank=[[s["cpu"] for s in r] for r in ranks],
        wall_step_times_per_rank=[[s["wall"] for s in r] for r in ranks],
        step_s_by_clock={k: med(v) for k, v in by_clock.items()},
        step_min_by_clock={k: min(v) for k, v in by_clock.items()},
        # rank imbalance: per step, slower rank's CPU seconds / faster rank's
        cpu_rank_imbalance=[max(r[i]["cpu"] for r in ranks) / min(r[i]["cpu"] for r in ranks) for i in range(n)],
        bytes_per_step={k: v / n for k, v in snap["bytes"].items()},
        calls_per_step={k: v / n for k, v in snap["calls"].items()},
        comm_s_per_step={k: v / n for k, v in snap["seconds"].items()},
        comm_cpu_s_per_step={k: v / n for k, v in snap["cpu_seconds"].items()},
        phase_s_per_step=phase_med(everything, clock),
        phase_s_by_clock={k: phase_med(everything, k) for k in CLOCKS},
        loss=float(loss.detach()), marks=marks)
    if ab:
        sel = {on: [i for i in everything if per_step[i]["ckpt"] == on] for on in (False, True)}
        result["ab"] = {("on" if on else "off"): {
            "step_s_by_clock": {k: med([by_clock[k][i] for i in sel[on]]) for k in CLOCKS},
            "step_min_by_clock": {k: min(by_clock[k][i] for i in sel[on]) for k in CLOCKS},
            "phase_s_by_clock": {k: phase_med(sel[on], k) for k in CLOCKS}} for on in (False, True)}
        # paired differences (on - off, step 2j+1 - step 2j): the machine minute cancels
        result["ab"]["paired_cpu_diff_s"] = [cpus[i + 1] - cpus[i] for i in range(0, n - 1, 2)]


def _now() -> tuple:
    return time.perf_counter(), time.process_time()


# ---------------------------------------------------------------------------- driver side


def run_case(case: dict, tmp: Path, timeout: float = 600) -> dict:
    repo = Path(__file__).resolve().parent.parent
    stem = f"case_{os.getpid()}_{time.time_ns()}"
    out_file = tmp / f"{stem}.json"
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # Each rank's output to a file, not a pipe: a pipe read one rank at a time fills up on the
        # other (DeepSpeed's deprecation warnings), whose write then blocks it inside a step while
        # its peer waits in a collective: a deadlock that looked like a hang in DeepSpeed.
        logs.append(tmp / f"{stem}_rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.plan_calibration", "--worker",
                                           json.dumps(case), "--worker-out", str(out_file)], env=env, cwd=repo,
                                          stdout=log, stderr=subprocess.STDOUT, text=True))
    t0 = time.perf_counter()
    for p in procs:
        try:
            p.wait(timeout=max(1, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            p.wait()
    if any(p.returncode for p in procs) or not out_file.exists():
        tails = [log.read_text()[-3000:] for log in logs]
        raise RuntimeError(f"case {case} failed: {[p.returncode for p in procs]}\n{tails[0]}\n{tails[1]}")
    res = json.loads(out_file.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/plan_calibration_<date>)")
    p.add_argument("--models", default="swinv2_tiny,swinv2_small")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages (DeepSpeed runs); '' for none")
    p.add_argument("--fsdp2", default="", help="FSDP2 runs (gigamim's engine): reshard_after_forward values, "
                                              "e.g. 1,0; '' for none")
    p.add_argument("--ckpt", default="0,1")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clock", choices=CLOCKS, default="cpu",
                   help="what a step and the model's inputs are timed with: each rank's CPU seconds "
                        "(user + sys; default: robust on a shared machine) or wall seconds")
    p.add_argument("--inputs-once", action="store_true",
                   help="measure the model's inputs once before all cases (default: right before each case, "
                        "in the case's own processes)")
    p.add_argument("--ab", default="", help="instead of the calibration: checkpointing off / on alternating step "
                                           "by step in one engine, for these engines (plain, zero3, fsdp2, "
                                           "fsdp2-noreshard), e.g. plain,fsdp2")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.worker_out)
        return 0
    import tempfile

    from benchmarks.common import machine_info, versions

    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"plan_calibration_{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_info(), "versions": versions(), "command": " ".join([sys.executable, "-m",
            "benchmarks.plan_calibration"] + (argv if argv is not None else sys.argv[1:])), "started": time.time(),
            "img_size": IMG, "window_size": WINDOW, "ranks": 2, "clock": args.clock,
            "inputs_before_each_case": not args.inputs_once}
    t_all = time.perf_counter()
    common = {"micro_batch": args.micro_batch, "accumulation": args.accumulation, "steps": args.steps,
              "warmup": args.warmup, "clock": args.clock, "inputs_before": not args.inputs_once}
    with tempfile.TemporaryDirectory(prefix="gigamim_plan_cal_") as tmp:
        tmp = Path(tmp)
        if args.ab:
            return _ab_main(args, common, meta, out, tmp, t_all)
        inputs = run_case({"inputs": True, "micro_batch": args.micro_batch, "clock": args.clock}, tmp)
        _print_inputs("inputs", inputs)
        runs = []
        plans = [({"stage": int(x)}, f"ZeRO-{x}") for x in args.stages.split(",") if x]
        plans += [({"engine": "fsdp2", "reshard": bool(int(x))}, "FSDP2" + ("" if int(x) else " no-reshard"))
                  for x in args.fsdp2.split(",") if x]
        for model in args.models.split(","):
            for what, label in plans:
                for ckpt in (int(c) for c in args.ckpt.split(",")):
                    r = run_case({"model": model, **what, "ckpt": ckpt, **common}, tmp)
                    runs.append(r)
                    if "inputs" in r:
                        _print_inputs("  inputs before", r["inputs"])
                    print(f"{model} {label} ckpt={ckpt}: {_step_line(r)}, bytes {r['bytes_per_step']} "
                          f"({r['wall_s']:.0f} s)", flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "raw.json").write_text(json.dumps({"meta": meta, "inputs": inputs, "runs": runs}, indent=1))
    (out / "steps.md").write_text(steps_markdown(runs))
    from benchmarks.plan_calibration_report import write_report

    table = write_report(out)
    print(table)
    what_if = recompute_term_markdown(json.loads((out / "raw.json").read_text()))
    if what_if:
        (out / "recompute_term.md").write_text(what_if)
        print(what_if)
    return 0


def recompute_term_markdown(raw: dict) -> str:
    """The step model with checkpointing's recompute charged at the FORWARD's efficiency
    (`efficiency_forward`, measured with the inputs) instead of forward + backward's: the
    term the planner lacks (what `--ab` found), applied to the report's calibrated predictions.
    Empty when the inputs predate `efficiency_forward`."""
    import torch

    from benchmarks.plan_calibration_report import TIME_TOL, build_table, inputs_of
    from gigamim.models.flops import recompute_flops

    rows = build_table(raw)
    if "efficiency_forward" not in inputs_of(raw, raw["runs"][0]):
        return ""
    lines = ["| model | plan | ckpt | measured s/step | calibrated s/step (error) | + recompute at forward efficiency "
             "(error) |", "|---|---|---|---|---|---|"]
    ok = {"deepspeed": [0, 0, 0.0], "fsdp2": [0, 0, 0.0]}  # within, held out, worst
    for run, row in zip(raw["runs"], rows):
        c, inp = run["case"], inputs_of(raw, run)
        extra = 0.0
        if c["ckpt"]:
            with torch.device("meta"):
                model = _build({**c, "ckpt": True})
            flops = recompute_flops(model, IMG, batch_size=c["micro_batch"]) * c["micro_batch"] * c["accumulation"]
            peak = inp["gemm_tflops"] * 1e12
            extra = flops / peak * (1 / inp["efficiency_forward"] - 1 / inp["efficiency"])
        pred = row["predicted_step_s"] + extra
        err = pred / row["measured_step_s"] - 1
        if not row["calibration_run"]:
            k = ok[row["engine"]]
            k[0] += abs(err) <= TIME_TOL
            k[1] += 1
            k[2] = max(k[2], abs(err))
        lines.append(f"| {row['model']} | {row['plan']} | {'on' if row['ckpt'] else 'off'} | "
                     f"{row['measured_step_s']:.3f} | {row['predicted_step_s']:.3f} ({row['time_rel_err']:+.1%}) | "
                     f"{pred:.3f} ({err:+.1%}){' fit' if row['calibration_run'] else ''} |")
    lines += ["", "Held-out runs within " + f"{TIME_TOL:.0%} with the term: " + ", ".join(
        f"{'ZeRO' if e == 'deepspeed' else 'FSDP2'} {k[0]}/{k[1]} (worst {k[2]:.1%})" for e, k in ok.items() if k[1])
        + "."]
    return "\n".join(lines) + "\n"


def _print_inputs(what: str, inp: dict) -> None:
    w = inp["by_clock"]["wall"]
    print(f"{what} ({inp['clock']}): GEMM {inp['gemm_tflops'] * 1e3:.1f} GFLOP/s per rank (wall {w['gemm_tflops'] * 1e3:.1f}), "
          f"efficiency {inp['efficiency']:.3f} (wall {w['efficiency']:.3f}), copy {inp['mem_gbps']:.1f} GB/s, "
          f"first touch {inp['fresh_gbps']:.2f} GB/s, gloo all-gather "
          f"{inp['gloo']['all_gather']['bytes_per_s'] / 1e9:.2f} GB/s (wall {w['gloo']['all_gather']['bytes_per_s'] / 1e9:.2f})",
          flush=True)


def _step_line(r: dict) -> str:
    m, lo = r["step_s_by_clock"], r["step_min_by_clock"]
    return (f"CPU {m['cpu']:.3f} s/step (min {lo['cpu']:.3f}), wall {m['wall']:.3f} (min {lo['wall']:.3f}), "
            f"rank imbalance {max(r['cpu_rank_imbalance']):.2f}")


def _label(case: dict) -> str:
    e = case.get("engine")
    if e == "fsdp2":
        return "FSDP2" + ("" if case.get("reshard", True) else " no-reshard")
    if e == "plain":
        return "plain (no engine)"
    return f"ZeRO-{case['stage']}"


def steps_markdown(runs: list) -> str:
    """Per case: each clock's median and min per step (the slower rank per step), CPU / wall,
    and how far apart the two ranks' CPU seconds were; where rank 0's wall time beyond its CPU
    time went (waiting inside collectives for the peer: the part a quiet machine keeps)."""

    def gap(wall, cpu):
        return sum(w - c for w, c in zip(wall, cpu)) / len(wall)

    lines = ["| model | plan | ckpt | steps | CPU s/step median (min) | wall s/step median (min) | CPU / wall "
             "(medians) | rank CPU imbalance, median (max) | rank 0: wall - CPU per step, of it inside collectives |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c, m, lo = r["case"], r["step_s_by_clock"], r["step_min_by_clock"]
        imb = sorted(r["cpu_rank_imbalance"])
        lines.append(f"| {c['model']} | {_label(c)} | {'on' if c['ckpt'] else 'off'} | {len(r['cpu_step_times'])} | "
                     f"{m['cpu']:.3f} ({lo['cpu']:.3f}) | {m['wall']:.3f} ({lo['wall']:.3f}) | "
                     f"{m['cpu'] / m['wall']:.2f} | {imb[len(imb) // 2]:.3f} ({imb[-1]:.3f}) | "
                     f"{gap(r['wall_step_times_per_rank'][0], r['cpu_step_times_per_rank'][0]):.3f} s, "
                     f"{sum(r['comm_s_per_step'].values()) - sum(r['comm_cpu_s_per_step'].values()):.3f} s |")
    return "\n".join(lines) + "\n"


def _ab_main(args, common: dict, meta: dict, out: Path, tmp: Path, t_all: float) -> int:
    """Checkpointing's cost per engine, off / on alternating in one engine (`case["ab"]`), next to
    what the step model charges for it: the recompute FLOPs at the case's GEMM peak x efficiency."""
    engines = {"plain": {"engine": "plain"}, "zero3": {"stage": 3}, "fsdp2": {"engine": "fsdp2", "reshard": True},
               "fsdp2-noreshard": {"engine": "fsdp2", "reshard": False}}
    runs = []
    for model in args.models.split(","):
        for name in args.ab.split(","):
            r = run_case({"model": model, **engines[name], "ckpt": 0, "ab": True, **common, "inputs_before": True},
                         tmp)
            r["ab"]["predicted_recompute_s"] = _predicted_recompute_s(r)
            runs.append(r)
            off, on = r["ab"]["off"], r["ab"]["on"]
            print(f"{model} {name}: CPU s/step off {off['step_s_by_clock']['cpu']:.3f} on {on['step_s_by_clock']['cpu']:.3f} "
                  f"(predicted +{r['ab']['predicted_recompute_s']:.3f}); wall off {off['step_s_by_clock']['wall']:.3f} "
                  f"on {on['step_s_by_clock']['wall']:.3f} ({r['wall_s']:.0f} s)", flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "ab_raw.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    md = ab_markdown(meta, runs)
    (out / "ab.md").write_text(md)
    print(md)
    return 0


def _predicted_recompute_s(run: dict) -> float:
    """The step model's charge for checkpointing every block: one more forward of each block
    (`gigamim.models.flops.recompute_flops`) at GEMM peak x efficiency (the case's own inputs)."""
    import torch

    from gigamim.models.flops import recompute_flops

    c, inp = run["case"], run["inputs"]
    with torch.device("meta"):
        model = _build({**c, "ckpt": True})
    flops = recompute_flops(model, IMG, batch_size=c["micro_batch"]) * c["micro_batch"] * c["accumulation"]
    return flops / (inp["gemm_tflops"] * 1e12 * inp["efficiency"])


def ab_markdown(meta: dict, runs: list) -> str:
    lines = [f"Checkpointing off / on alternating step by step in one engine (`--ab`), 2 ranks, {meta['img_size']} px, "
             f"CPU seconds per step (the slower rank), medians over the steps of each kind; "
             f"command `{meta['command']}`, load {meta['machine']['load_avg_1_5_15']} -> {meta.get('load_avg_end')}.",
             "", "| model | engine | mb x acc | steps per kind | off s/step | on s/step | on - off | paired on - off, "
             "median (min, max) | predicted recompute | off fwd / bwd / step | on fwd / bwd / step | wall off / on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c, ab = r["case"], r["ab"]
        off, on = ab["off"], ab["on"]
        d = sorted(ab["paired_cpu_diff_s"])

        def ph(x):
            q = x["phase_s_by_clock"]["cpu"]
            return f"{q['forward']:.3f} / {q['backward']:.3f} / {q['step']:.3f}"

        lines.append(f"| {c['model']} | {_label(c)} | {c['micro_batch']} x {c['accumulation']} | {c['steps']} | "
                     f"{off['step_s_by_clock']['cpu']:.3f} | {on['step_s_by_clock']['cpu']:.3f} | "
                     f"{on['step_s_by_clock']['cpu'] - off['step_s_by_clock']['cpu']:+.3f} | "
                     f"{d[len(d) // 2]:+.3f} ({d[0]:+.3f}, {d[-1]:+.3f}) | {ab['predicted_recompute_s']:.3f} | "
                     f"{ph(off)} | {ph(on)} | {off['step_s_by_clock']['wall']:.3f} / {on['step_s_by_clock']['wall']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
