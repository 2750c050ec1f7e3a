"""Launch `ds_save_checkpoint.py` on N CPU ranks and cache the result for the test session.

Shared by tests/test_consolidate.py and tests/test_export.py: the 2-rank ZeRO-3 checkpoint
of swinv2_nano is made once per pytest session (under pytest's session temp folder) and
copied by tests that damage it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.launch import REPO, cpu_env, free_port

SCRIPT = Path(__file__).with_name("ds_save_checkpoint.py")

# The default test checkpoint: swinv2_nano at 64 px (window 4), 2 ranks, ZeRO-3, 2 AdamW steps.
NANO = dict(model="swinv2_nano", img_size=64, window=4)


def launch(num_ranks: int, out: Path, *, model: str = NANO["model"], img_size: int = NANO["img_size"],
           window: int = NANO["window"], stage: int = 3, steps: int = 2, extra_steps: int = 0,
           reference: Path | None = None, losses: Path | None = None, resume_tag: str | None = None,
           load_universal: bool = False, global_batch: int = 6, timeout: int = 900) -> None:
    """`deepspeed --num_gpus N ds_save_checkpoint.py ...` on CPU ranks; raises with the log on failure."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
           "--master_port", str(free_port()), str(SCRIPT), "--out", str(out), "--model", model,
           "--img-size", str(img_size), "--window", str(window), "--stage", str(stage),
           "--steps", str(steps), "--extra-steps", str(extra_steps), "--global-batch", str(global_batch)]
    if reference:
        cmd += ["--reference", str(reference)]
    if losses:
        cmd += ["--losses", str(losses)]
    if resume_tag:
        cmd += ["--resume-tag", resume_tag]
    if load_universal:
        cmd += ["--load-universal"]
    # A free port: other test runs may launch DeepSpeed at the same time.
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"deepspeed launch failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def nano_zero3(base: Path) -> tuple[Path, Path]:
    """(checkpoint dir, reference safetensors) of the shared 2-rank ZeRO-3 nano checkpoint."""
    root = base / "zero3_nano_2ranks"
    ckpt, ref, done = root / "ckpt", root / "gathered.safetensors", root / "done"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        launch(2, ckpt, reference=ref)
        done.touch()
    return ckpt, ref
