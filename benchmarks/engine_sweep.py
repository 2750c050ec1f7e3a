"""DeepSpeed ZeRO-3 vs PyTorch FSDP2 side by side, eager and per-block compiled (issue 20).

Both engines are built the way `gigamim pretrain` builds them: `gigamim.train.engines.
create_engine` on a config that differs only in `train.engine` (and `model.compile`), the
pretrain task's model builder and parameter groups, AdamW + the LR schedule + clipping.
ZeRO-3 uses the packaged CPU template (`deepspeed.config: cpu`), FSDP2 the `fsdp:` defaults.

Time and bytes: one 2-rank process group (`torch.distributed.run`, gloo on CPU) builds every
variant, warms them up (the compiled ones compile there) and alternates their timed steps
ABAB (`zero_sweep.alternate_steps`), so a load spike on the shared machine hits all alike;
collectives are counted per step by wrapping `torch.distributed` before any engine binds
it (`zero_sweep.CollectiveCounter`: DeepSpeed's entry points and FSDP2's all_gather_single /
reduce_scatter_single). Step time is the slower rank's, median over the timed steps; CPU
time per step is both ranks' process CPU seconds (all threads) summed: the work a step takes,
which other jobs on a shared machine inflate much less than they inflate wall time.

`F.linear`: `deepspeed.zero.Init` replaces `torch.nn.functional.linear` process-wide with
its own autograd function (and leaves it replaced); DeepSpeed's compiled path puts torch's
back. In a run of its own each engine has exactly one of the two: ZeRO-3 eager the
replacement, ZeRO-3 compiled and FSDP2 torch's. Sharing one process, each variant's step runs
with the one its own run would have (set before its step, outside the timing).

Weights: every variant starts from the same weights (ZeRO-3's init, copied into the FSDP2
variants through the seam), so their losses agree step by step (to reduction order).

Peak RSS per rank: a process holding several engines cannot say which one its peak belongs
to, so memory is a second pass: one short 2-rank run per variant (same build, 1 warm-up + 2
steps), each rank reporting its VmHWM (peak resident set) and its VmRSS before the engine
was built (interpreter, torch, deepspeed, the process group), from /proc/self/status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import median

# name: (train.engine, model.compile, extra --set, what it is)
ENGINE_VARIANTS = {
    "zero3_eager": ("deepspeed", False, (), "ZeRO-3, packaged CPU template (max_live 1e8: forward's gathers kept for backward)"),
    "zero3_compiled": ("deepspeed", True, (), "ZeRO-3, blocks compiled (z3 leaf modules: one gather per block)"),
    "fsdp2_eager": ("fsdp2", False, (), "FSDP2, fsdp: defaults (reshard_after_forward, fp32 reduce)"),
    "fsdp2_compiled": ("fsdp2", True, (), "FSDP2, blocks compiled before fully_shard (torchtitan order)"),
    # The two engines' other policy, for pairs that move the same bytes:
    "zero3_regather_eager": ("deepspeed", False, ("@regather",),
                             "ZeRO-3 with stage3_max_live_parameters 0, max_reuse_distance 0: re-gathers in backward, "
                             "like FSDP2's reshard_after_forward"),
    "fsdp2_keep_eager": ("fsdp2", False, ("fsdp.reshard_after_forward=false",),
                         "FSDP2 with reshard_after_forward false: gathered once per step, like the packaged ZeRO-3 template"),
}

DEFAULT_VARIANTS = ("zero3_eager", "fsdp2_eager", "zero3_compiled", "fsdp2_compiled", "zero3_regather_eager",
                    "fsdp2_keep_eager")


def _regather_template(folder: Path) -> str:
    """The packaged CPU ZeRO-3 template with nothing kept gathered between forward and backward."""
    from gigamim.train.engines.deepspeed import load_template

    ds = load_template("cpu")
    ds["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
    path = folder / "zero3_regather.json"
    path.write_text(json.dumps(ds, indent=1))
    return str(path)


def _config(variant: str, model: str, img_size: int, micro_batch: int, world: int, folder: Path):
    from gigamim.config import load_config

    engine, comp, extra, _ = ENGINE_VARIANTS[variant]
    sets = [f"model.name={model}", f"model.img_size={img_size}", "model.window_size=12", "model.attn_impl=auto",
            "model.drop_path_rate=0.0", f"model.compile={str(comp).lower()}", f"train.engine={engine}",
            "train.precision=fp32" if not _on_gpu() else "train.precision=bf16", "train.grad_clip=1.0",
            f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch * world}",
            "optim.warmup_steps=1", "deepspeed.config=cpu" if not _on_gpu() else "deepspeed.config=zero3_bf16"]
    for s in extra:
        sets.append(f"deepspeed.config={_regather_template(folder)}" if s == "@regather" else s)
    return load_config("demo", sets)


def _on_gpu() -> bool:
    from .zero_sweep import _cuda_visible

    return _cuda_visible()


def _memory_status() -> dict:
    """VmHWM (peak resident set) and VmRSS of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _same_weights(engines: dict, rank: int) -> None:
    """FSDP2 draws its initial shards per rank (train/engines/fsdp2.py), ZeRO-3 from one seed:
    the FSDP2 variants get the first ZeRO-3 variant's initial weights through the seam
    (`full_state_dict` -> `load_weights`), so every variant trains the same model and their
    losses can be compared. Nothing to do unless both engines are in the run."""
    import gc

    source = next((e for n, e in engines.items() if ENGINE_VARIANTS[n][0] == "deepspeed"), None)
    targets = [e for n, e in engines.items() if ENGINE_VARIANTS[n][0] == "fsdp2"]
    if source is None or not targets:
        return
    full = source.full_state_dict(source.module)  # rank 0 only; None elsewhere
    for engine in targets:
        names = [n for n, _ in engine.module.named_parameters()]
        engine.load_weights(engine.module, full, names)
    del full
    gc.collect()


def _worker(argv) -> int:
    import argparse
    import time as _time
    from types import SimpleNamespace

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--model", default="swinv2_tiny")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tag", default="time")
    a = p.parse_args(argv)

    from .zero_sweep import CollectiveCounter, alternate_steps

    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed's comm layer or FSDP2 binds any torch.distributed function
    import torch
    import torch.nn.functional as F

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)
    torch_linear = F.linear

    from gigamim.runtime.dist import init_distributed
    from gigamim.train.engines import create_engine
    from gigamim.train.precision import resolve_precision
    from gigamim.train.state import seed_everything
    from gigamim.train.tasks import PretrainTask

    from .train_step import Case, synthetic_batches

    info = init_distributed("nccl" if on_gpu else "gloo")
    device, rank, world = info.device, info.rank, info.world_size
    names = a.variants.split(",")
    unknown = [n for n in names if n not in ENGINE_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(ENGINE_VARIANTS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    case = Case(name="engines", group="engines", model=a.model, img_size=a.img_size, batch=a.micro_batch)
    batches = synthetic_batches(case, n=2, seed=rank)
    rss_before = _memory_status()
    engines, t_build, linear = {}, {}, {}
    for name in names:
        cfg = _config(name, a.model, a.img_size, a.micro_batch, world, out)
        precision = resolve_precision(cfg.train.precision, on_gpu)
        t0 = _time.perf_counter()
        seed_everything(cfg.train.seed)  # the trainer's order: same seed on every rank for the weights
        task = PretrainTask(cfg)
        engine = create_engine(cfg, info, precision)
        build, partition = task.build_model(SimpleNamespace(device=device))
        engine.build(build, task.param_groups, partition_at_build=partition)
        engines[name] = engine
        t_build[name] = _time.perf_counter() - t0
        eng, comp, _, _ = ENGINE_VARIANTS[name]
        if eng == "deepspeed" and not comp:
            from deepspeed.runtime.zero.linear import zero3_linear_wrap

            linear[name] = zero3_linear_wrap  # what zero.Init leaves in place for an eager ZeRO-3 run
        else:
            linear[name] = torch_linear
    _same_weights(engines, rank)
    seed_everything(1000 * (rank + 1))

    def before_step(name):
        F.linear = linear[name]

    res = alternate_steps(engines, batches, device, a.warmup, a.steps, counter, before_step=before_step)
    F.linear = torch_linear
    mem = _memory_status()
    for n in names:
        res[n]["build_s"] = t_build[n]
        res[n]["rss_before_build_bytes"] = rss_before.get("VmRSS")
        res[n]["peak_rss_bytes"] = mem.get("VmHWM")  # of this process: every variant it holds
    (out / f"engines_{a.tag}_rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "args": vars(a), "variants": res}, indent=1))
    torch.distributed.barrier()
    return 0


def _launch(raw: Path, variants, model, img_size, micro_batch, warmup, steps, nproc, tag, timeout):
    from .zero_sweep import run_ranks

    rc, tail, wall, cmd = run_ranks(
        "gigamim_benchmarks.engine_sweep",
        ["--engine-worker", str(raw), "--variants", ",".join(variants), "--model", model, "--img-size",
         str(img_size), "--micro-batch", str(micro_batch), "--warmup", str(warmup), "--steps", str(steps),
         "--tag", tag], nproc, timeout)
    files = [raw / f"engines_{tag}_rank{r}.json" for r in range(nproc)]
    data = [json.loads(f.read_text()) for f in files] if rc == 0 and all(f.exists() for f in files) else None
    return data, rc, tail, wall, " ".join(cmd[1:])


def run_engine_sweep(out_dir, *, models=(("swinv2_tiny", 4), ("swinv2_small", 4)), variants=DEFAULT_VARIANTS,
                     img_size=192, warmup=2, steps=5, memory=True, memory_steps=2, nproc=2, timeout=2400,
                     log=print) -> list[dict]:
    """The engines axis: per (model, micro-batch), one ABAB run of every variant, then (with
    `memory`) one short run per variant for its peak RSS per rank. One result dict per
    (model, variant)."""
    out_dir = Path(out_dir)
    raw = out_dir / "engines_raw"
    results = []
    for model, mb in models:
        tag = f"{model.replace('swinv2_', '')}_b{mb}"
        log(f"  {model} b{mb} x {nproc} ranks: {', '.join(variants)} (ABAB, load {os.getloadavg()[0]:.1f})")
        data, rc, tail, wall, command = _launch(raw, variants, model, img_size, mb, warmup, steps, nproc,
                                                f"time_{tag}", timeout)
        mem = {}
        if memory and data is not None:
            for v in variants:
                md, mrc, mtail, mwall, mcmd = _launch(raw, [v], model, img_size, mb, 1, memory_steps, nproc,
                                                      f"mem_{tag}_{v}", timeout)
                mem[v] = ({"peak_rss_bytes": [d["variants"][v]["peak_rss_bytes"] for d in md],
                           "rss_before_build_bytes": [d["variants"][v]["rss_before_build_bytes"] for d in md],
                           "load_avg": md[0]["variants"][v]["load_avg_timed"], "wall_s": mwall, "command": mcmd}
                          if md is not None else {"error": f"exit {mrc}: {mtail}"})
                if md is not None:
                    log(f"    memory {v:<22} peak RSS per rank "
                        + " / ".join(f"{x / 2**30:.2f}" for x in mem[v]["peak_rss_bytes"]) + " GiB")
        for v in variants:
            base = {"case": {"name": f"engines_{tag}_{v}", "group": "engines", "variant": v, "model": model,
                             "img_size": img_size, "batch": mb, "ranks": nproc, "steps": steps, "warmup": warmup,
                             "engine": ENGINE_VARIANTS[v][0], "compile": ENGINE_VARIANTS[v][1],
                             "what": ENGINE_VARIANTS[v][3]},
                    "label": v.replace("_", " "), "wall_s": wall, "command": command}
            if data is None:
                results.append({**base, "error": f"exit {rc}: {tail}"})
                continue
            per_rank = [d["variants"][v] for d in data]
            steps_s = [max(ts) for ts in zip(*(r["step_s"] for r in per_rank))]  # the slower rank's
            r0 = per_rank[0]
            # CPU seconds of a step, both ranks together (the work done, robust to other jobs' load)
            cpu_s = [sum(ts) for ts in zip(*([ph["cpu"] for ph in r["phases_s"]] for r in per_rank))]
            res = {**base, "step_time_s": median(steps_s), "step_times_s": steps_s,
                   "cpu_time_per_step_s": median(cpu_s), "step_cpu_times_s": cpu_s,
                   "images_per_sec": mb * nproc / median(steps_s), "warmup_s": r0["warmup_s"],
                   "build_s": r0["build_s"], "loss": r0["loss"], "dynamo_graphs_compiled": r0.get("new_graphs"),
                   "dynamo_graphs_in_timed_steps": r0.get("graphs_in_timed_steps"),
                   "phases_s_median": {k: median([ph[k] for ph in r0["phases_s"]]) for k in ("forward", "backward", "step")},
                   "collective_seconds_per_step_median": {
                       k: median([c.get(k, 0.0) for c in r0["comm_s"]]) for k in sorted({k for c in r0["comm_s"] for k in c})},
                   "collective_calls_per_step": r0["calls"][-1], "collective_bytes_per_step": r0["bytes"][-1],
                   "collective_bytes_all_steps_all_ranks": [r["bytes"] for r in per_rank],
                   "load_avg_timed": r0["load_avg_timed"],
                   "peak_rss_all_variants_bytes": [r["peak_rss_bytes"] for r in per_rank],
                   "memory": mem.get(v)}
            results.append(res)
            b = res["collective_bytes_per_step"]
            log(f"    {v:<22} {res['step_time_s']:.3f} s/step  all_gather {b.get('all_gather', 0) / 2**20:.1f} MiB  "
                f"reduce_scatter {b.get('reduce_scatter', 0) / 2**20:.1f} MiB  warm-up "
                + "/".join(f"{x:.0f}" for x in res["warmup_s"]) + " s")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--engine-worker":
        sys.exit(_worker(sys.argv[2:]))
    print("usage: python -m gigamim_benchmarks.engine_sweep --engine-worker OUT [--variants ...]", file=sys.stderr)
    sys.exit(2)
