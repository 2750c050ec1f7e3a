"""gigamim.runtime.dist: hostlist expansion, launcher detection, single-process start-up.

References: expected host lists written out by hand from SLURM's hostlist rules; the
environments each launcher sets (deepspeed/launcher/launch.py, torchrun, srun, mpirun)."""

import json
import subprocess
import sys

import pytest

from gigamim.runtime.dist import detect_launch
from gigamim.runtime.hostlist import expand_hostlist, slurm_master_port


@pytest.mark.parametrize(
    "expr, hosts",
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("login1,gpu[2-3],cpu[5]", ["login1", "gpu2", "gpu3", "cpu5"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("a[1,3]b", ["a1b", "a3b"]),
        ("10.0.0.1,localhost", ["10.0.0.1", "localhost"]),
    ],
)
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr", ["", "gpu[3-1]", "gpu[01", "gpu01]", "gpu[a-b]", "gpu[1-2],,x", "g[[1]]"])
def test_expand_hostlist_rejects_bad_input_naming_it(expr):
    with pytest.raises(ValueError) as err:
        expand_hostlist(expr)
    assert repr(expr) in str(err.value) or "empty" in str(err.value)


def test_hostlist_cli():
    run = lambda *a: subprocess.run([sys.executable, "-m", "gigamim.runtime.hostlist", *a], capture_output=True, text=True)
    assert run("gpu[01-03]").stdout.split() == ["gpu01", "gpu02", "gpu03"]
    assert run("gpu[01-03]", "--first").stdout.strip() == "gpu01"
    assert run("gpu[01-03],x", "--count").stdout.strip() == "4"
    bad = run("gpu[2-1]")
    assert bad.returncode == 2 and "gpu[2-1]" in bad.stderr and "Traceback" not in bad.stderr


def test_detect_deepspeed_launcher():
    # What deepspeed/launcher/launch.py exports to each rank (node 1 of 2, 8 GPUs each).
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "8"}
    le = detect_launch(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("deepspeed", 9, 16, 1, 8)
    assert (le.master_addr, le.master_port) == ("gpu01", 29500)


def test_detect_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
           "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1"}
    le = detect_launch(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("torchrun", 3, 4, 1, 2)


def test_detect_srun_one_task_per_gpu():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8"}
    le = detect_launch(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert le.master_addr == "gpu07"
    assert le.master_port == 20000 + 123456 % 20000 == slurm_master_port(123456)


def test_batch_shell_python_is_single_not_a_rank():
    # A `python` run by the batch script itself (no srun step) is not rank 0 of N.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[1-4]", "SLURM_JOB_ID": "7"}
    le = detect_launch(env)
    assert (le.launcher, le.rank, le.world_size) == ("single", 0, 1)


def test_detect_openmpi():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29501"}
    le = detect_launch(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.local_world_size, le.master_port) == ("openmpi", 2, 4, 0, 2, 29501)


def test_bad_rank_variable_is_named():
    with pytest.raises(RuntimeError, match="RANK='two'"):
        detect_launch({"RANK": "two", "WORLD_SIZE": "2"})


def test_init_distributed_single_process():
    # In a subprocess: DeepSpeed keeps a process-wide comm backend once initialised.
    code = """
import json, torch, torch.distributed as dist
from gigamim.runtime.dist import init_distributed, is_rank0, destroy_distributed
info = init_distributed(timeout_s=60)
again = init_distributed()
t = torch.ones(3); dist.all_reduce(t)
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank, "backend": info.backend,
                  "device": str(info.device), "launcher": info.launcher, "rank0": is_rank0(), "same": again == info,
                  "sum": t.tolist()}))
destroy_distributed()
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"rank": 0, "world": 1, "local": 0, "backend": "gloo", "device": "cpu", "launcher": "single",
                   "rank0": True, "same": True, "sum": [1.0, 1.0, 1.0]}


def test_cpu_ranks_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU comm op (used when its launcher sets LOCAL_SIZE) leaves one ~66 MiB
    /dev/shm buffer per rank and never unlinks it; the DeepSpeed engine's comm set-up
    (`init_comm`, on the runtime's process group) removes the names once every rank has
    mapped them. Checked on the file system (the reference: what /dev/shm holds)
    under the real deepspeed launcher, with an all-reduce after the unlink to show the group
    still works."""
    import json
    import sys
    from pathlib import Path

    from gigamim.runtime.dist import free_port
    from tests.launch import run

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    port = free_port()
    script = tmp_path / "ranks.py"
    script.write_text(
        "import json, os, sys, torch, torch.distributed as dist\n"
        "from gigamim.runtime.dist import init_distributed\n"
        "from gigamim.train.engines.deepspeed import init_comm\n"
        "d = init_distributed()\n"
        "init_comm()\n"
        "t = torch.ones(3) * (d.rank + 1)\n"
        "dist.all_reduce(t)\n"
        "dist.barrier()\n"
        "open(os.path.join(sys.argv[-1], f'rank{d.rank}.json'), 'w').write(json.dumps(t.tolist()))\n"
        "dist.destroy_process_group()\n"
        "from tests.launch import exit_now\n"
        "exit_now()  # gloo's abort at interpreter exit (tests.launch.exit_now) failed a full run once\n"
    )
    proc = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
                str(script), str(tmp_path)], timeout=180,
               GIGAMIM_VERBOSE=1)  # DeepSpeed's own "... built" print, which gigamim hides by default
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "shm_comm_op built" in proc.stdout + proc.stderr, "DeepSpeed's shm comm op was not used: nothing tested"
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [3.0, 3.0, 3.0]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == []
