"""Helpers for tests that start real multi-rank jobs: the `deepspeed` launcher (CPU ranks,
gloo) and torchrun, each in its own process group so a test can signal or kill it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gigamim.runtime.dist import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent


# What an in-process run (a group of one, started by a test in this pytest process) exports
# for env://: a child must not inherit them, or it would bind the port this process holds.
GROUP_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")


def cpu_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Rank processes started from a test file import tests.helpers: the checkout must be importable.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def deepspeed_cmd(nproc: int, *module_args: str, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(port or free_port()), "--module", "gigamim", *module_args]


def torchrun_cmd(nproc: int, *module_args: str, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(port or free_port()), "-m", "gigamim", *module_args]


def run(cmd: list[str], timeout: float = 300, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cpu_env(**env_extra), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], log: Path, **env_extra) -> subprocess.Popen:
    """Background job in a new session (its own process group), output to `log`."""
    return subprocess.Popen(cmd, env=cpu_env(**env_extra), cwd=REPO, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def exit_now() -> None:
    """End a rank-script worker that has written its results: exit 0 without interpreter
    finalisation. A gloo collective shortly before exit can abort the process (torch 2.14; a
    core dump: gloo's worker thread frees the finished work's tensor, needs the GIL while Python
    finalises, `std::terminate`), which failed a full-suite run once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_rank_script(script: str, nproc: int, *args: str, out: Path, timeout: float) -> list[dict]:
    """torchrun `script` (a test file whose __main__ block is the per-rank worker writing
    `<out>/rank{r}.json`) on `nproc` CPU ranks; returns each rank's JSON."""
    import json

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script, *args]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
