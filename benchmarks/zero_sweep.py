"""ZeRO stage 0/1/2/3 on 2 ranks, through `gigamim pretrain` itself (deepspeed launcher).

Each stage is a real run: synthetic shards, the packaged demo config with --set overrides,
DeepSpeed templates zero1, zero2.json, cpu.json (stage 3) and a stage-0
template written next to the results. images_per_sec and peak_mem_gb are read from the
run's metrics.jsonl (median images/s over logged steps after the first; the largest
peak_mem_gb). On CPU ranks the trainer's peak_mem_gb is rank 0's peak RSS, which includes
the interpreter and libraries: differences between stages are the signal, not the level.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import median

TEMPLATES = {0: None, 1: "zero1", 2: "zero2", 3: "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage0_template(folder: Path) -> str:
    path = folder / "zero0.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, "steps_per_print": 1000000,
                                "wall_clock_breakdown": False}))
    return str(path)


def run_zero_sweep(out_dir, *, stages=(0, 1, 2, 3), model: str = "swinv2_tiny", img_size: int = 96,
                   micro_batch: int = 4, steps: int = 6, nproc: int = 2, timeout: float = 600, log=print) -> list[dict]:
    """One `gigamim pretrain` per ZeRO stage; returns one result dict per stage."""
    from gigamim.data.synthetic import write_synthetic_shards
    from gigamim.train.metrics import read_metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    results = []
    with tempfile.TemporaryDirectory(prefix="gigamim_zero_sweep_") as tmp:
        tmp = Path(tmp)
        shards = write_synthetic_shards(tmp / "shards", micro_batch * nproc * (steps + 2), image_size=img_size + 16,
                                        samples_per_shard=micro_batch * 4, seed=0)
        for stage in stages:
            work = tmp / f"zero{stage}"
            template = TEMPLATES[stage] or _stage0_template(tmp)
            sets = [f"data.shards={shards}", f"model.name={model}", f"model.img_size={img_size}",
                    "model.window_size=6" if img_size % 192 else "model.window_size=12",
                    f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch * nproc}",
                    f"train.max_steps={steps}", "optim.warmup_steps=1", "data.num_workers=1", "data.shuffle_buffer=16",
                    f"deepspeed.config={template}", f"checkpoint.dir={work}/ck", "checkpoint.every_steps=0",
                    "checkpoint.keep_last=1", f"log.dir={work}/log", "log.every_steps=1", "log.tensorboard=false",
                    "log.progress_bar=false", "log.num_images=1"]
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                   "--master_port", str(_free_port()), "--module", "gigamim", "pretrain", "--config", "demo"]
            for s in sets:
                cmd += ["--set", s]
            env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
            except subprocess.TimeoutExpired:
                rc, tail = None, f"timed out after {timeout} s"
            wall = time.perf_counter() - t0
            res = {"case": {"name": f"zero{stage}", "group": "zero", "model": model, "img_size": img_size,
                            "batch": micro_batch, "ranks": nproc, "zero_stage": stage, "ds_template": TEMPLATES[stage]
                            or "zero0.json (written by the benchmark)", "steps": steps},
                   "label": f"ZeRO-{stage}", "wall_s": wall, "command": " ".join(cmd[1:])}
            metrics_file = work / "log" / "metrics.jsonl"
            if rc == 0 and metrics_file.exists():
                m = read_metrics(metrics_file)
                later = m[1:] or m
                res.update(images_per_sec=median([r["images_per_sec"] for r in later]),
                           peak_mem_gb=max(r.get("peak_mem_gb") or 0 for r in m),
                           peak_mem_method="trainer metrics.jsonl peak_mem_gb (CPU: rank 0 peak RSS)",
                           loss_last=m[-1]["loss"], steps_logged=len(m))
                log(f"  zero{stage}: {res['images_per_sec']:.2f} img/s, peak {res['peak_mem_gb']:.2f} GB ({wall:.0f} s)")
            else:
                res["error"] = f"exit {rc}: {tail}"
                log(f"  zero{stage}: failed (exit {rc}); see its JSON")
            results.append(res)
    return results


# --- ZeRO x compile axis: one 2-rank process group, several engines side by side ------------
#
# `run_zero_compile` starts `torch.distributed.run` on this file's worker. Every rank builds
# one DeepSpeed engine per variant (same seed, same weights; ZeRO-3 ones under zero.Init),
# warms them up (the compiled ones compile then), and alternates their timed steps ABAB so a
# load spike on the shared machine hits all alike. Collectives are counted by wrapping the
# torch.distributed functions before DeepSpeed binds them: calls and bytes per step.

ZERO_VARIANTS = {
    # name: (ZeRO stage, per-block compile, blocks as z3 leaf modules, activation checkpointing)
    "zero1_eager": (1, False, False, False),
    "zero1_compiled": (1, True, False, False),
    "zero3_eager": (3, False, False, False),
    "zero3_leaf_eager": (3, False, True, False),
    "zero3_compiled": (3, True, True, False),
    "zero3_ckpt_eager": (3, False, False, True),
    "zero3_ckpt_compiled": (3, True, True, True),
    # DeepSpeed's own engine.compile(): module.compile() of the whole model, ZeRO-3 hooks on
    # every module (their disabled hooks split the graph at each module boundary).
    "zero3_engine_compile": (3, "engine", False, False),
}

_COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
                "_reduce_scatter_base", "reduce_scatter", "all_reduce", "all_reduce_coalesced", "broadcast",
                "reduce", "all_to_all_single")


class CollectiveCounter:
    """Counts calls and payload bytes of torch.distributed collectives (all entry points DeepSpeed
    0.19's comm layer uses, and the all_gather_single / reduce_scatter_single that PyTorch FSDP2
    calls on torch >= 2.12), grouped as all_gather / reduce_scatter / all_reduce / other."""

    KIND = {"all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter",
            "all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather", "all_gather": "all_gather",
            "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
            "reduce_scatter": "reduce_scatter", "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce"}

    def __init__(self):
        self.calls, self.bytes, self.seconds = {}, {}, {}
        self._depth = 0

    @staticmethod
    def _payload(name, args, kwargs):
        import torch

        ts = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple))]
        for lst in lists:
            ts += [t for t in lst if isinstance(t, torch.Tensor)]
        if not ts:
            return 0
        # the gathered output / the scattered input: the largest tensor involved
        return max(t.numel() * t.element_size() for t in ts)

    def install(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in _COLLECTIVES:
            for mod in (dist, c10d):
                fn = getattr(mod, name, None)
                if fn is None or getattr(fn, "_gigamim_counted", False):
                    continue
                setattr(mod, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        import functools

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            outer = self._depth == 0  # one torch-level call may call another (all_gather -> base)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if outer:
                    kind = self.KIND.get(name, "other")
                    self.calls[kind] = self.calls.get(kind, 0) + 1
                    self.bytes[kind] = self.bytes.get(kind, 0) + self._payload(name, args, kwargs)
                    # Wall time inside the call: the whole collective for synchronous gloo calls
                    # (CPU ranks); only the launch for async ones (NCCL, async_op=True).
                    self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0

        counted._gigamim_counted = True
        return counted

    def snapshot(self):
        return dict(self.calls), dict(self.bytes)

    def reset(self):
        self.calls, self.bytes, self.seconds = {}, {}, {}


def alternate_steps(engines: dict, batches: list, device, warmup: int, steps: int, counter,
                    before_step=None) -> dict:
    """Warm every engine up (compiled ones compile there), then alternate their timed steps
    (ABAB...), each starting on all ranks together (barrier), with the collectives of that step
    counted and the process CPU seconds it took (`phases_s[i]["cpu"]`). An engine is anything with `engine(images, mask) -> loss`, `.backward(loss)` and
    `.step()` (a DeepSpeed engine, gigamim's engine seam). `before_step(name)` runs before each
    of a variant's steps (outside the timing). Returns per name: warm-up and timed step seconds,
    losses, per step collective calls / bytes / seconds, phase seconds, dynamo graphs new in
    the variant's warm-up, and the load average at the start and end of the timed steps."""
    import time as _time

    import torch
    from torch._dynamo.utils import counters

    from gigamim.data.transforms import normalize_on_device

    on_gpu = device.type == "cuda"
    phases = []

    def now():
        if on_gpu:
            torch.cuda.synchronize()
        return _time.perf_counter()

    def step(name, i):
        if before_step is not None:
            before_step(name)
        engine = engines[name]
        b = batches[i % len(batches)]
        images = normalize_on_device(b["image"], device)
        mask = b["mask"].to(device)
        if on_gpu:
            images = images.bfloat16()
        t0 = now()
        c0 = _time.process_time()
        loss = engine(images, mask)
        t1 = now()
        engine.backward(loss)
        t2 = now()
        engine.step()
        t3 = now()
        # CPU seconds of this process (all its threads, gloo's included): the work a step did,
        # which other jobs on a shared machine do not inflate the way they inflate wall time
        phases.append({"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "cpu": _time.process_time() - c0})
        return t3 - t0, float(loss.detach())

    names = list(engines)
    res = {n: {"warmup_s": [], "step_s": [], "loss": [], "calls": [], "bytes": [], "comm_s": [], "phases_s": []}
           for n in names}
    for i in range(warmup):
        for n in names:
            before = counters["stats"]["unique_graphs"]
            dt, loss = step(n, i)
            res[n]["warmup_s"].append(dt)
            res[n]["loss"].append(loss)
            # dynamo graphs first compiled in this variant's warm-up (0 when it reuses another's)
            res[n]["new_graphs"] = res[n].get("new_graphs", 0) + counters["stats"]["unique_graphs"] - before
    load_start = [round(x, 2) for x in os.getloadavg()]
    for i in range(steps):
        for n in names:
            torch.distributed.barrier()  # each timed step starts together on both ranks
            counter.reset()
            before = counters["stats"]["unique_graphs"]
            dt, loss = step(n, warmup + i)
            # a graph compiled inside a timed step (a recompile) would make that step meaningless
            res[n]["graphs_in_timed_steps"] = (res[n].get("graphs_in_timed_steps", 0)
                                               + counters["stats"]["unique_graphs"] - before)
            calls, nbytes = counter.snapshot()
            res[n]["phases_s"].append(phases[-1])
            res[n]["comm_s"].append(dict(counter.seconds))
            res[n]["step_s"].append(dt)
            res[n]["loss"].append(loss)
            res[n]["calls"].append(calls)
            res[n]["bytes"].append(nbytes)
    load_end = [round(x, 2) for x in os.getloadavg()]
    for n in names:
        res[n]["load_avg_timed"] = {"start": load_start, "end": load_end}
    return res


def _zero_worker(argv) -> int:
    import argparse
    import json
    import time as _time

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--variants", default="zero1_eager,zero3_eager,zero3_compiled")
    p.add_argument("--model", default="swinv2_tiny")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--window-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args(argv)

    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed caches any torch.distributed function
    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)
    import deepspeed

    from gigamim.models import SimMIM, create_model
    from gigamim.train.engines.deepspeed import compile_blocks, load_template, mark_z3_leaf_blocks

    from .train_step import Case, synthetic_batches

    from gigamim.runtime.dist import init_distributed
    from gigamim.train.engines.deepspeed import init_comm  # DeepSpeed's comm layer; unlinks its CPU shm buffers

    init_distributed("nccl" if on_gpu else "gloo")
    init_comm()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = a.variants.split(",")
    unknown = [n for n in names if n not in ZERO_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(ZERO_VARIANTS)}")
    case = Case(name="zero", group="zero", model=a.model, img_size=a.img_size, batch=a.micro_batch)
    batches = synthetic_batches(case, n=2, seed=rank)
    engines = {}
    t_build = {}
    for name in names:
        stage, comp, leaf, ckpt = ZERO_VARIANTS[name]
        ds = load_template("cpu" if stage == 3 else f"zero{stage}")
        ds.update(train_micro_batch_size_per_gpu=a.micro_batch, gradient_accumulation_steps=1,
                  train_batch_size=a.micro_batch * world, gradient_clipping=1.0, bf16={"enabled": on_gpu},
                  optimizer={"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "torch_adam": True}})
        t0 = _time.perf_counter()
        torch.manual_seed(0)
        kw = dict(img_size=a.img_size, drop_path_rate=0.0, grad_checkpointing=ckpt)
        if a.window_size:
            kw["window_size"] = a.window_size
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds):
                model = SimMIM(create_model(a.model, **kw))
        else:
            with torch.device(device):
                model = SimMIM(create_model(a.model, **kw))
        if leaf:
            mark_z3_leaf_blocks(model)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        if comp == "engine":
            engine.compile()
        elif comp:
            compile_blocks(engine.module, stage)
        engines[name] = engine
        t_build[name] = _time.perf_counter() - t0

    res = alternate_steps(engines, batches, device, a.warmup, a.steps, counter)
    for n in names:
        res[n]["build_s"] = t_build[n]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"zero_compile_rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "args": vars(a), "variants": res}, indent=1))
    return 0


def run_zero_compile(out_dir, *, variants=("zero1_eager", "zero3_eager", "zero3_compiled"), model="swinv2_tiny",
                     img_size=192, micro_batch=4, window_size=None, warmup=2, steps=4, nproc=2, timeout=1500,
                     log=print) -> list[dict]:
    """The ZeRO x compile axis on ``nproc`` CPU ranks; one result dict per variant (rank 0's
    step times, median over timed steps; collectives per step from rank 0)."""
    import json

    out_dir = Path(out_dir)
    raw = out_dir / "zero_compile_raw"
    rc, tail, wall, cmd = run_ranks(
        "gigamim_benchmarks.zero_sweep",
        ["--zero-worker", str(raw), "--variants", ",".join(variants), "--model", model, "--img-size", str(img_size),
         "--micro-batch", str(micro_batch), "--warmup", str(warmup), "--steps", str(steps)]
        + (["--window-size", str(window_size)] if window_size else []), nproc, timeout)
    results = []
    ranks = [raw / f"zero_compile_rank{r}.json" for r in range(nproc)]
    if rc != 0 or not all(f.exists() for f in ranks):
        for v in variants:
            results.append({"case": {"name": f"zc_{v}", "group": "zero_compile", "variant": v}, "label": v,
                            "error": f"exit {rc}: {tail}", "wall_s": wall})
        log(f"  zero x compile failed (exit {rc}); see the JSONs")
        return results
    data = [json.loads(f.read_text()) for f in ranks]
    for v in variants:
        stage, comp, leaf, ckpt = ZERO_VARIANTS[v]
        per_rank = [d["variants"][v] for d in data]
        # A step ends when the slower rank ends (they synchronise in the collectives).
        steps_s = [max(ts) for ts in zip(*(r["step_s"] for r in per_rank))]
        r0 = per_rank[0]
        res = {"case": {"name": f"zc_{v}", "group": "zero_compile", "variant": v, "zero_stage": stage, "compile": comp,
                        "z3_leaf_blocks": leaf, "checkpointing": ckpt, "model": model, "img_size": img_size, "batch": micro_batch,
                        "ranks": nproc, "steps": steps, "warmup": warmup},
               "label": v.replace("_", " "), "step_time_s": median(steps_s), "step_times_s": steps_s,
               "images_per_sec": micro_batch * nproc / median(steps_s), "warmup_s": r0["warmup_s"],
               "build_s": r0["build_s"], "loss": r0["loss"], "dynamo_graphs_compiled": r0.get("new_graphs"),
               "phases_s_median": {k: median([ph[k] for ph in r0["phases_s"]]) for k in ("forward", "backward", "step")},
               "collective_seconds_per_step_median": {
                   k: median([c.get(k, 0.0) for c in r0["comm_s"]]) for k in sorted({k for c in r0["comm_s"] for k in c})},
               "collective_calls_per_step": r0["calls"][-1], "collective_bytes_per_step": r0["bytes"][-1],
               "collective_calls_all_steps": r0["calls"], "wall_s": wall, "command": " ".join(cmd[1:])}
        results.append(res)
        calls = res["collective_calls_per_step"]
        ph = res["phases_s_median"]
        log(f"  {v:<20} {res['step_time_s']:.3f} s/step (fwd {ph['forward']:.3f} bwd {ph['backward']:.3f} "
            f"opt {ph['step']:.3f}; in collectives {sum(res['collective_seconds_per_step_median'].values()):.3f})  all_gather {calls.get('all_gather', 0)} "
            f"({res['collective_bytes_per_step'].get('all_gather', 0) / 2**20:.1f} MiB)  "
            f"reduce_scatter {calls.get('reduce_scatter', 0)}  all_reduce {calls.get('all_reduce', 0)}")
    return results


def run_ranks(module: str, args: list, nproc: int, timeout: float) -> tuple:
    """``torch.distributed.run`` of benchmark worker ``module`` on ``nproc`` local ranks (CPU ranks
    get DeepSpeed's CPU accelerator, one OpenMP thread each): (rc or None on timeout, the output's
    tail, wall seconds, the command list)."""
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if not _cuda_visible():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), _benchmarks_path(repo), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        rc, tail = None, f"timed out after {timeout} s"
    return rc, tail, time.perf_counter() - t0, cmd


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _benchmarks_path(repo: Path) -> str:
    """A folder in which `gigamim_benchmarks` resolves to this benchmarks/ (for the ranks)."""
    if (repo / "gigamim_benchmarks").exists():
        return str(repo)
    link = Path(tempfile.gettempdir()) / "gigamim_bench_path"
    link.mkdir(exist_ok=True)
    target = link / "gigamim_benchmarks"
    if not target.exists():
        target.symlink_to(repo / "benchmarks")
    return str(link)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--zero-worker":
        sys.exit(_zero_worker(sys.argv[2:]))
    print("usage: python -m gigamim_benchmarks.zero_sweep --zero-worker OUT [--variants ...]", file=sys.stderr)
    sys.exit(2)
