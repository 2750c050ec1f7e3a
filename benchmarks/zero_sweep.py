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
