"""Distributed start-up: find out how this process was launched, then join the process group.

One trainer runs under every way users start it, so rank discovery lives here and nowhere
else:

- the `deepspeed` launcher (single node, hostfile + pdsh, or `--no_ssh --node_rank` per node
  under SLURM): RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* plus its own CROSS_RANK;
- `torchrun` (same variables plus TORCHELASTIC_RUN_ID) or any other `env://` launcher;
- `mpirun` (OpenMPI, e.g. `deepspeed --launcher openmpi`): OMPI_COMM_WORLD_*;
- `srun` with one task per GPU: SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID;
- a plain `python` process: a group of one on 127.0.0.1, so the trainer keeps one code path.

`detect_launch(env)` is a pure function of the environment (tested without launching
anything); `init_distributed()` exports the variables `env://` needs and starts a plain
torch.distributed group (an engine builds its own communication layer on it).

Torch is imported inside the functions, so detection stays cheap. SLURM
hostlists are expanded by `gigamim.runtime.hostlist`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass

from gigamim.runtime.hostlist import expand_hostlist, slurm_master_port
from typing import Mapping

DEFAULT_TIMEOUT_S = 1800  # ZeRO-3 resumes and first-step JIT builds can exceed torch's 10 min default


# --------------------------------------------------------------------------- launch detection


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this process's place in the job."""

    launcher: str  # "deepspeed" | "torchrun" | "env" | "openmpi" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {key} is not set")
        return default
    try:
        # SLURM writes counts like "8(x2)"; the first number is the per-node value.
        return int(re.match(r"\s*(-?\d+)", value).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Classify the launcher from environment variables (no side effects)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "CROSS_RANK" in env:  # set by deepspeed.launcher.launch, not by torchrun
            launcher = "deepspeed"
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        else:
            launcher = "env"
        world = _int(env, "WORLD_SIZE")
        port = env.get("MASTER_PORT")
        return LaunchEnv(
            launcher=launcher,
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_SIZE", _int(env, "LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        port = env.get("MASTER_PORT")
        return LaunchEnv(
            launcher="openmpi",
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            world_size=_int(env, "OMPI_COMM_WORLD_SIZE"),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
            local_world_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else 29500,
        )
    # Only inside an srun step (SLURM_STEP_NUM_TASKS): a lone `python` in the batch script
    # also sees SLURM_PROCID=0 and SLURM_NTASKS=<nodes>, but it is not one of N ranks.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        master = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else None)
        port = env.get("MASTER_PORT")
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        return LaunchEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=_int(env, "SLURM_STEP_TASKS_PER_NODE", _int(env, "SLURM_NTASKS_PER_NODE", world)),
            master_addr=master,
            master_port=int(port) if port else slurm_master_port(env.get("SLURM_JOB_ID", "0")),
        )
    return LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", None)


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistInfo:
    """This process's place in an initialised process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: "object"  # torch.device; typed loosely so this module imports without torch
    launcher: str = "single"
    local_world_size: int = 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wants_cuda() -> bool:
    import torch

    # DS_ACCELERATOR=cpu is how DeepSpeed is told to run on CPU ranks; honour it even on a
    # machine that happens to have a GPU, so the trainer and DeepSpeed agree on the device.
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return False
    return torch.cuda.is_available()


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join (or create) the process group of this launch and return this rank's place in it.

    backend: None picks "nccl" on CUDA and "gloo" on CPU. Idempotent: a second call returns
    the existing group's info. A single process with no launcher gets a group of one on
    127.0.0.1, so DeepSpeed (which always wants a group) runs the same code path.
    """
    import datetime

    import torch
    import torch.distributed as tdist

    global _INFO
    if _INFO is not None and tdist.is_initialized():
        return _INFO
    launch = detect_launch()
    use_cuda = _wants_cuda()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, but no GPU is visible (or DS_ACCELERATOR is not 'cuda')")
    if launch.world_size > 1 and not launch.master_addr and not (launch.launcher == "openmpi" and _has_mpi4py()):
        raise RuntimeError(
            f"{launch.launcher} launch of {launch.world_size} ranks but MASTER_ADDR is not set: "
            "export MASTER_ADDR (the first host) and MASTER_PORT to every rank"
        )

    # A port this process picks itself (a single process, no launcher) may be taken by another
    # process between free_port() and the store's bind: then it simply picks another.
    own_port = not launch.master_port and "MASTER_PORT" not in os.environ and launch.world_size == 1
    # env:// initialisation (torch and DeepSpeed alike) reads these five variables.
    defaults = {
        "RANK": launch.rank,
        "WORLD_SIZE": launch.world_size,
        "LOCAL_RANK": launch.local_rank,
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": launch.master_port if launch.master_port else free_port(),
    }
    for key, value in defaults.items():
        if value is not None:
            os.environ.setdefault(key, str(value))

    if use_cuda:
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    else:
        device = torch.device("cpu")

    if not tdist.is_initialized():
        # A plain torch process group; an engine that wants its own communication layer on top
        # (DeepSpeed's) builds it on this group (`train.engines`).
        timeout = datetime.timedelta(seconds=timeout_s)
        for attempt in range(3):
            try:
                tdist.init_process_group(backend=backend, timeout=timeout, init_method="env://")
                break
            except RuntimeError as e:  # torch's DistNetworkError is a RuntimeError
                if not (own_port and "EADDRINUSE" in str(e)) or attempt == 2:
                    raise
                os.environ["MASTER_PORT"] = str(free_port())

    _INFO = DistInfo(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=launch.local_rank,
        backend=str(tdist.get_backend()),
        device=device,
        launcher=launch.launcher,
        local_world_size=launch.local_world_size,
    )
    return _INFO


# The first call's answer: after it, RANK & co. are exported, so re-detecting would call a
# single process an "env" launch.
_INFO: DistInfo | None = None


def _has_mpi4py() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def is_rank0() -> bool:
    """True on global rank 0 (or before/without a process group, when RANK is 0 or unset)."""
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return tdist.get_rank() == 0
    except ImportError:
        pass
    return os.environ.get("RANK", "0") == "0"


# How a collective fails when a peer process died (gloo, NCCL, DeepSpeed's comm layer).
PEER_LOST_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "NCCL communicator was aborted", "remote process exited", "Connection refused")


def peer_lost(exc: BaseException) -> bool:
    """True when `exc` is a collective that failed because another rank is gone."""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in PEER_LOST_MESSAGES)


def destroy_distributed() -> None:
    """Leave the process group (so the process exits without gloo/NCCL teardown warnings)."""
    import torch.distributed as tdist

    global _INFO
    _INFO = None
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m gigamim.runtime.dist`: print the launcher detected from this environment, as JSON."""
    argparse.ArgumentParser(prog="python -m gigamim.runtime.dist",
                            description="Print the launch detected from this environment (JSON).").parse_args(argv)
    print(json.dumps(asdict(detect_launch())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
