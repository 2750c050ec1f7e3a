"""How long a checkpoint save stops training: synchronous vs background (`checkpoint.async_save`).

    python -m gigamim_benchmarks.ckpt_save --model swinv2_small --steps 25 --every 5 --out benchmarks/results/X
    python -m gigamim_benchmarks.ckpt_save --settings deepspeed_sync,deepspeed_async --steps 40 --every 10 \
        --repeats 2 --out benchmarks/results/Y

Runs `gigamim launch --nproc-per-node N pretrain` once per setting and repeat (the settings
interleaved: sync, async, sync, async, ...), same model, data, seed and save interval, and reads `ckpt_blocking_s` (the step loop's time lost to a save: snapshot +
waiting for its end + marking it complete) and `ckpt_write_s` (start of the save to every
rank's files written) from each run's metrics.jsonl. The last save of a run is always waited
for (the process exits next) and is not counted. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "fsdp2_sync": ("train.engine=fsdp2", "checkpoint.async_save=false"),
    "fsdp2_async": ("train.engine=fsdp2", "checkpoint.async_save=true"),
    "deepspeed_sync": ("train.engine=deepspeed", "checkpoint.async_save=false"),
    "deepspeed_async": ("train.engine=deepspeed", "checkpoint.async_save=true"),
}


def run_one(name: str, sets: tuple, args, shards: str, work: Path) -> dict:
    wd = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=work))
    overrides = [f"data.shards={shards}", f"model.name={args.model}", f"model.img_size={args.img_size}",
                 "model.window_size=6", f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch * args.nproc}", f"train.max_steps={args.steps}",
                 f"checkpoint.every_steps={args.every}", "checkpoint.keep_last=2", f"checkpoint.dir={wd}/ck",
                 f"log.dir={wd}/log", "log.every_steps=1", "log.tensorboard=false", "log.progress_bar=false",
                 "data.num_workers=1", "optim.warmup_steps=2", *sets]
    cmd = [sys.executable, "-m", "gigamim", "launch", "--nproc-per-node", str(args.nproc), "pretrain",
           "--config", "demo"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (wd / "log" / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if "ckpt_blocking_s" in r and r["ckpt_step"] < args.steps]
    step_s = [args.micro_batch * args.nproc / r["images_per_sec"] for r in records if "ckpt_blocking_s" not in r]
    return {"setting": name, "overrides": list(sets), "wall_s": wall,
            "saves": [{k: r[k] for k in ("ckpt_step", "ckpt_blocking_s", "ckpt_write_s")} for r in saves],
            "median_blocking_s": statistics.median(r["ckpt_blocking_s"] for r in saves),
            "median_write_s": statistics.median(r["ckpt_write_s"] for r in saves),
            "median_step_s_without_save": statistics.median(step_s) if step_s else None,
            "console_lines": len([line for line in (done.stdout + done.stderr).splitlines() if line.strip()])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swinv2_small")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--settings", default="fsdp2_sync,fsdp2_async,deepspeed_sync")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved with the other settings'")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from gigamim.data.synthetic import write_synthetic_shards

    with tempfile.TemporaryDirectory(prefix="ckpt_save_") as tmp:
        shards = str(write_synthetic_shards(Path(tmp) / "shards", 128, image_size=112, samples_per_shard=64))
        runs = []
        for _ in range(args.repeats):
            for name in args.settings.split(","):
                runs.append(run_one(name, SETTINGS[name], args, shards, Path(tmp)))
                (out / "partial.json").write_text(json.dumps(runs, indent=1))  # kept if a later run fails
    results = [_pooled([r for r in runs if r["setting"] == name]) for name in args.settings.split(",")]
    import torch

    doc = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "python": platform.python_version(), "args": vars(args), "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    by_name = {r["setting"]: r for r in results}
    lines = [f"# checkpoint save blocking time ({args.model}, {args.img_size} px, {args.nproc} CPU ranks, a save "
             f"every {args.every} steps, {args.steps} steps, {args.repeats} run(s) per setting)", "",
             f"`{doc['command']}` — {doc['machine']}, {doc['cpus']} CPUs, torch {doc['torch']}", "",
             "| setting | median ckpt_blocking_s | vs the engine's sync save | median ckpt_write_s | median step s | saves |",
             "|---|---|---|---|---|---|"]
    for r in results:
        sync = by_name.get(r["setting"].rsplit("_", 1)[0] + "_sync")
        ratio = f"{r['median_blocking_s'] / sync['median_blocking_s']:.2f}" if sync else "-"
        lines.append(f"| {r['setting']} | {r['median_blocking_s']:.3f} | {ratio} | {r['median_write_s']:.3f} | "
                     f"{r['median_step_s_without_save'] or float('nan'):.2f} | {len(r['saves'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _pooled(runs: list[dict]) -> dict:
    """One setting's runs as one row: the medians over all their saves and steps."""
    saves = [s for r in runs for s in r["saves"]]
    steps = [r["median_step_s_without_save"] for r in runs if r["median_step_s_without_save"]]
    return {"setting": runs[0]["setting"], "overrides": runs[0]["overrides"], "runs": runs, "saves": saves,
            "median_blocking_s": statistics.median(s["ckpt_blocking_s"] for s in saves),
            "median_write_s": statistics.median(s["ckpt_write_s"] for s in saves),
            "median_step_s_without_save": statistics.median(steps) if steps else None,
            "console_lines": max(r["console_lines"] for r in runs)}


if __name__ == "__main__":
    sys.exit(main())
