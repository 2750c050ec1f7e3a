"""cluster/ launch scripts, checked without SLURM or ssh: the sbatch dry run and the
deepspeed multi-node launcher's dry run. Each printed command is parsed back with
DeepSpeed's own launcher argument parser (the program that will really read it)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from deepspeed.launcher.runner import parse_args as ds_parse_args

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster/slurm/pretrain.sbatch"
GIANT = ROOT / "cluster/slurm/swinv2_giant_8x8.sbatch"
LAUNCH = ROOT / "cluster/launch_multinode.sh"

SLURM_VARS = {"SLURM_JOB_ID": "918273", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "gpu[07-08],gpu11"}


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GIGAMIM_", "MASTER_"))}
    env["GIGAMIM_ENV"] = "/nonexistent"  # do not source a site env file in tests
    env.update(extra)
    return env


def _run(script, *args, env):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def _node_commands(stdout):
    """{node: argv} from lines '[node N host] deepspeed ...'."""
    cmds = {}
    for line in stdout.splitlines():
        if line.startswith("[node "):
            head, _, cmd = line.partition("] ")
            node, host = head[len("[node "):].split()
            cmds[int(node)] = (host, shlex.split(cmd))
    return cmds


def test_sbatch_dry_run_three_nodes_distinct_correct_commands():
    env = _clean_env(GIGAMIM_DRY_RUN="1", GIGAMIM_GPUS_PER_NODE="8", **SLURM_VARS)
    out = _run(SBATCH, "--config", "gigamim/configs/demo.yaml", "--set", "log.dir=/runs/a b", env=env)
    assert out.returncode == 0, out.stderr
    cmds = _node_commands(out.stdout)
    assert sorted(cmds) == [0, 1, 2]
    assert [cmds[i][0] for i in range(3)] == ["gpu07", "gpu08", "gpu11"]
    assert len({tuple(argv) for _, argv in cmds.values()}) == 3  # distinct
    port = 20000 + 918273 % 20000
    for node, (_, argv) in cmds.items():
        assert argv[0] == "deepspeed"
        ds = ds_parse_args(argv[1:])
        assert ds.no_ssh and ds.node_rank == node and ds.num_nodes == 3 and ds.num_gpus == 8
        assert ds.master_addr == "gpu07" and ds.master_port == port
        assert ds.module and ds.no_local_rank and ds.user_script == "gigamim"
        assert ds.user_args == ["pretrain", "--config", "gigamim/configs/demo.yaml", "--set", "log.dir=/runs/a b",
                                "--resume", "auto"]
        assert ds.hostfile == "/tmp/gigamim-918273.hostfile"
    # The hostfile every node writes: SLURM's node order, 8 slots each.
    hostfile = [line[len("#   "):] for line in out.stdout.splitlines() if line.startswith("#   ")]
    assert hostfile == ["gpu07 slots=8", "gpu08 slots=8", "gpu11 slots=8"]
    # ...and the batch shell starts one task per node.
    srun = [line for line in out.stdout.splitlines() if line.startswith("# batch shell runs:")][0]
    assert "--ntasks-per-node=1" in srun and "--nodes=3" in srun and "cluster/slurm/node.sh" in srun


def test_sbatch_dry_run_flag_gpu_count_from_slurm_and_explicit_resume():
    env = _clean_env(SLURM_GPUS_PER_NODE="h100:4", **SLURM_VARS)
    out = _run(SBATCH, "--dry-run", "--config", "c.yaml", "--resume", "/ckpt/step_00000100", env=env)
    assert out.returncode == 0, out.stderr
    for _, argv in _node_commands(out.stdout).values():
        ds = ds_parse_args(argv[1:])
        assert ds.num_gpus == 4
        assert ds.user_args == ["pretrain", "--config", "c.yaml", "--resume", "/ckpt/step_00000100"]


@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_JOB_ID"])
def test_sbatch_dry_run_missing_variable_is_named(missing):
    slurm = {k: v for k, v in SLURM_VARS.items() if k != missing}
    out = _run(SBATCH, "--dry-run", "--config", "c.yaml", env=_clean_env(GIGAMIM_GPUS_PER_NODE="8", **slurm))
    assert out.returncode == 2
    assert missing in out.stderr and "not set" in out.stderr and "Traceback" not in out.stderr
    assert "[node" not in out.stdout


@pytest.mark.parametrize(
    "change, args, message",
    [
        ({}, ["--set", "a=1"], "no --config given"),
        ({"GIGAMIM_GPUS_PER_NODE": None}, ["--config", "c.yaml"], "GPUs per node"),
        ({"SLURM_NNODES": "4"}, ["--config", "c.yaml"], "names 3 hosts but SLURM_NNODES=4"),
        ({"SLURM_JOB_NODELIST": "gpu[9-7]"}, ["--config", "c.yaml"], "runs backwards"),
    ],
)
def test_sbatch_dry_run_bad_allocation_clear_error(change, args, message):
    env = _clean_env(GIGAMIM_GPUS_PER_NODE="8", **SLURM_VARS)
    for k, v in change.items():
        env.pop(k) if v is None else env.__setitem__(k, v)
    out = _run(SBATCH, "--dry-run", *args, env=env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_giant_recipe_dry_run_eight_nodes():
    env = _clean_env(SLURM_JOB_ID="5", SLURM_NNODES="8", SLURM_JOB_NODELIST="h200-[001-008]", SLURM_GPUS_ON_NODE="8")
    out = _run(GIANT, "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    cmds = _node_commands(out.stdout)
    assert sorted(cmds) == list(range(8))
    for node, (host, argv) in cmds.items():
        assert host == f"h200-{node + 1:03d}"
        ds = ds_parse_args(argv[1:])
        assert (ds.node_rank, ds.num_nodes, ds.num_gpus, ds.master_addr) == (node, 8, 8, "h200-001")
        args = ds.user_args
        assert args[0] == "pretrain" and args[args.index("--config") + 1] == "gigamim/configs/simmim_swinv2_giant_192.yaml"
        assert args[-2:] == ["--resume", "auto"]


def _ds_env_lines(text):
    """The env file as DeepSpeed's runner reads it: every line must split on '='."""
    return dict(line.split("=", 1) for line in text)


def test_launch_multinode_dry_run_pdsh(tmp_path):
    out = subprocess.run(["bash", str(LAUNCH), "--hostfile", "cluster/hostfile.example", "--dry-run", "--",
                          "--config", "c.yaml", "--set", "train.max_steps=5"], capture_output=True, text=True, cwd=ROOT,
                         env=_clean_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    cmd_line = out.stdout.strip().splitlines()[-1]
    argv = shlex.split(cmd_line)
    assert argv[0].startswith("DS_ENV_FILE=") and argv[1] == "deepspeed"
    ds = ds_parse_args(argv[2:])
    assert ds.hostfile == "cluster/hostfile.example" and ds.launcher == "pdsh"
    assert ds.master_addr == "gpu-node-01"  # first host of the hostfile
    assert ds.user_script == "gigamim" and ds.module and ds.no_local_rank
    assert ds.user_args == ["pretrain", "--config", "c.yaml", "--set", "train.max_steps=5", "--resume", "auto"]
    env_lines = [line[len("#   "):] for line in out.stdout.splitlines() if line.startswith("#   ")]
    parsed = _ds_env_lines(env_lines)
    # Comments of the template are gone; its settings are there.
    assert parsed["NCCL_DEBUG"] == "WARN" and "NCCL_SOCKET_IFNAME" in parsed
    assert not any(line.lstrip().startswith("#") or not line.strip() for line in env_lines)


def test_launch_multinode_openmpi_exports_master_and_rejects_bad_hostfile(tmp_path):
    out = subprocess.run(["bash", str(LAUNCH), "--hostfile", "cluster/hostfile.example", "--launcher", "openmpi",
                          "--verb", "doctor", "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=_clean_env())
    assert out.returncode == 0, out.stderr
    env_lines = [line[len("#   "):] for line in out.stdout.splitlines() if line.startswith("#   ")]
    parsed = _ds_env_lines(env_lines)
    assert parsed["MASTER_ADDR"] == "gpu-node-01" and parsed["MASTER_PORT"] == "29500"
    ds = ds_parse_args(shlex.split(out.stdout.strip().splitlines()[-1])[2:])
    assert ds.launcher == "openmpi" and ds.user_args == ["doctor"]

    bad = tmp_path / "hosts"
    bad.write_text("gpu1 slots=8\ngpu2 8\n")
    out = subprocess.run(["bash", str(LAUNCH), "--hostfile", str(bad), "--dry-run", "--", "--config", "c"],
                         capture_output=True, text=True, cwd=ROOT, env=_clean_env())
    assert out.returncode == 2 and "line 2" in out.stderr and "slots=" in out.stderr


def test_giant_recipe_shape_gives_the_paper_batch():
    """8 nodes x 8 GPUs with the recipe's micro-batch reach the paper's 9216 exactly."""
    import yaml

    cfg = yaml.safe_load((ROOT / "gigamim/configs/simmim_swinv2_giant_192.yaml").read_text())
    text = GIANT.read_text()
    nodes = int(text.split("#SBATCH --nodes=")[1].split()[0])
    gpus = int(text.split("#SBATCH --gpus-per-node=")[1].split()[0])
    micro, global_batch = cfg["train"]["micro_batch_size"], cfg["train"]["global_batch_size"]
    assert (nodes, gpus, global_batch) == (8, 8, 9216)
    assert global_batch % (nodes * gpus * micro) == 0
    assert cfg["model"]["name"] == "swinv2_giant" and cfg["model"]["img_size"] == 192
