"""Calibrate `gigamim plan`'s step-time model against real 2-rank ZeRO runs on CPU (gloo).

    flock /tmp/gigamim-heavy.lock -c 'PYTHONPATH=$PWD python -m benchmarks.plan_calibration --out DIR'

For each case (swinv2_tiny / swinv2_small x ZeRO-1/2/3 x checkpointing off/on) two ranks
are started as plain processes (env:// rendezvous), each wraps the `torch.distributed`
collectives (benchmarks/comm_count.py) BEFORE DeepSpeed sets up its backend, builds
`SimMIM(create_model(...))` (under `deepspeed.zero.Init` for stage 3), calls
`deepspeed.initialize` directly (not the trainer) and runs a few optimizer steps on random
images. Measured per step: wall time, bytes and calls per collective kind, seconds inside
collectives. Before the cases, the same 2-process harness measures the inputs the model
gets: the CPU's fp32 GEMM peak (1 thread per rank, both ranks busy), the gloo bandwidth
and latency of all-reduce / all-gather / reduce-scatter / reduce, the memory bandwidth (the
optimizer step) and the compute efficiency (model FLOPs / GEMM peak of a plain forward +
backward of swinv2_tiny, no DeepSpeed, on both ranks at once).

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


def _measure_inputs(out: dict, counter) -> None:
    """Inputs of the model, measured in the harness (both ranks busy, one thread each)."""
    import torch
    import torch.distributed as dist

    from gigamim.models.flops import train_flops

    rank = dist.get_rank()
    # GEMM peak: best of n=1024 fp32 matmuls, both ranks at once (what a rank gets when both compute).
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    dist.barrier()
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(8))
    out["gemm_tflops"] = 2 * 1024**3 / best / 1e12
    # Memory bandwidth: a copy of 64 MB (read + write).
    src = torch.randn(16 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    dist.barrier()
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    out["mem_gbps"] = 2 * src.numel() * 4 / best / 1e9
    # First touch: filling a freshly allocated 64 MB tensor (new pages from the kernel each time,
    # as DeepSpeed's per-micro-step flat buffers are on CPU; a GPU's caching allocator reuses them).
    del dst

    def fresh():
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)
        return t

    fresh()
    dist.barrier()
    best = min(_timed(fresh) for _ in range(5))
    out["fresh_gbps"] = 16 * 2**20 * 4 / best / 1e9
    # gloo: time per call vs size for each collective kind, fitted as latency + bytes / bandwidth.
    world = dist.get_world_size()
    sizes = [2**14, 2**20, 2**23, 2**25]  # bytes of the logical buffer
    res = {}
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "reduce"):
        pts = []
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
            reps = 3 if nbytes >= 2**23 else 10
            ts = []
            for _ in range(reps):
                dist.barrier()
                ts.append(_timed(fn))
            t = sorted(ts)[len(ts) // 2]
            # Both ranks must agree on one number: the slower rank's median.
            tt = torch.tensor([t], dtype=torch.float64)
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)
            pts.append((nbytes, float(tt)))
        res[kind] = _fit_alpha_beta(pts)
    out["gloo"] = res
    counter.reset()
    # Optimizer: torch AdamW on one flat fp32 tensor (ZeRO steps flat partitions), seconds per parameter.
    flat = torch.nn.Parameter(torch.randn(4 * 2**20))
    flat.grad = torch.randn_like(flat)
    adam = torch.optim.AdamW([flat], lr=1e-4, weight_decay=0.05)
    adam.step()
    dist.barrier()
    out["optim_s_per_param"] = min(_timed(adam.step) for _ in range(3)) / flat.numel()
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

    fwd_bwd()
    dist.barrier()
    t = min(_timed(fwd_bwd) for _ in range(2)) / 2
    flops = train_flops(model, IMG, batch_size=case["micro_batch"]) * case["micro_batch"]
    out["efficiency_step_s"] = t
    out["efficiency"] = flops / t / (out["gemm_tflops"] * 1e12)
    del model


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
    if case.get("inputs"):
        result["micro_batch"] = case["micro_batch"]
        _measure_inputs(result, counter)
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
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


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
    DeepSpeed engine or gigamim's FSDP2 engine (the same forward / backward / step calls)."""
    import torch.distributed as dist

    batches = [_batch(case, rank * 1000 + i) for i in range(case["accumulation"])]
    times, comm = [], []
    phases = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    marks = []
    for step in range(case["warmup"] + case["steps"]):
        if step == case["warmup"]:
            counter.reset()
            phases = dict.fromkeys(phases, 0.0)
            marks = []
        dist.barrier()
        t0 = time.perf_counter()
        for x, mask in batches:
            t = time.perf_counter()
            loss = engine(x, mask)
            t1 = time.perf_counter()
            marks.append((dict(counter.bytes), dict(counter.calls)))
            engine.backward(loss)
            t2 = time.perf_counter()
            marks.append((dict(counter.bytes), dict(counter.calls)))
            engine.step()
            t3 = time.perf_counter()
            phases["forward"] += t1 - t
            phases["backward"] += t2 - t1
            phases["step"] += t3 - t2
            marks.append((dict(counter.bytes), dict(counter.calls)))
        counter.enabled = False
        dist.barrier()
        counter.enabled = True
        if step >= case["warmup"]:
            times.append(time.perf_counter() - t0)
    snap = counter.snapshot()
    n = case["steps"]
    result.update(step_times=times, step_s=sorted(times)[len(times) // 2],
                  bytes_per_step={k: v / n for k, v in snap["bytes"].items()},
                  calls_per_step={k: v / n for k, v in snap["calls"].items()},
                  comm_s_per_step={k: v / n for k, v in snap["seconds"].items()},
                  phase_s_per_step={k: v / n for k, v in phases.items()},
                  loss=float(loss.detach()), marks=marks)


# ---------------------------------------------------------------------------- driver side


def run_case(case: dict, tmp: Path, timeout: float = 600) -> dict:
    repo = Path(__file__).resolve().parent.parent
    out_file = tmp / f"case_{os.getpid()}_{time.time_ns()}.json"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.plan_calibration", "--worker",
                                       json.dumps(case), "--worker-out", str(out_file)], env=env, cwd=repo,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.perf_counter()
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        logs.append(out)
    if any(p.returncode for p in procs) or not out_file.exists():
        raise RuntimeError(f"case {case} failed: {[p.returncode for p in procs]}\n{logs[0][-3000:]}\n{logs[1][-2000:]}")
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
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.worker_out)
        return 0
    import tempfile

    from benchmarks.common import machine_info, versions
    from benchmarks.plan_calibration_report import write_report

    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"plan_calibration_{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_info(), "versions": versions(), "command": " ".join([sys.executable, "-m",
            "benchmarks.plan_calibration"] + (argv if argv is not None else sys.argv[1:])), "started": time.time(),
            "img_size": IMG, "window_size": WINDOW, "ranks": 2}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gigamim_plan_cal_") as tmp:
        tmp = Path(tmp)
        inputs = run_case({"inputs": True, "micro_batch": args.micro_batch}, tmp)
        print(f"inputs: GEMM {inputs['gemm_tflops'] * 1e3:.1f} GFLOP/s per rank, efficiency {inputs['efficiency']:.3f}, "
              f"mem {inputs['mem_gbps']:.1f} GB/s, gloo all-reduce {inputs['gloo']['all_reduce']['bytes_per_s'] / 1e9:.2f} GB/s",
              flush=True)
        runs = []
        plans = [({"stage": int(x)}, f"ZeRO-{x}") for x in args.stages.split(",") if x]
        plans += [({"engine": "fsdp2", "reshard": bool(int(x))}, "FSDP2" + ("" if int(x) else " no-reshard"))
                  for x in args.fsdp2.split(",") if x]
        for model in args.models.split(","):
            for what, label in plans:
                for ckpt in (int(c) for c in args.ckpt.split(",")):
                    case = {"model": model, **what, "ckpt": ckpt, "micro_batch": args.micro_batch,
                            "accumulation": args.accumulation, "steps": args.steps, "warmup": args.warmup}
                    r = run_case(case, tmp)
                    runs.append(r)
                    print(f"{model} {label} ckpt={ckpt}: {r['step_s']:.3f} s/step, bytes {r['bytes_per_step']}, "
                          f"calls {r['calls_per_step']} ({r['wall_s']:.0f} s)", flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "raw.json").write_text(json.dumps({"meta": meta, "inputs": inputs, "runs": runs}, indent=1))
    table = write_report(out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
