"""cluster/ launch scripts, checked without SLURM or ssh: the sbatch dry run (each node's
`gigamim launch` command parsed back with that launcher's own argument parser) and the
deepspeed multi-node launcher's dry run (parsed with DeepSpeed's runner parser): the
programs that will really read them."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from deepspeed.launcher.runner import parse_args as ds_parse_args

from gigamim.launch.launcher import build_parser as launch_parser

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


def _launch_args(argv):
    """`python -m gigamim launch ...` -> the launcher's parsed arguments."""
    assert argv[1:4] == ["-m", "gigamim", "launch"], argv
    return launch_parser().parse_args(argv[4:])


def _node_commands(stdout):
    """{node: argv} from lines '[node N host] python -m gigamim launch ...'."""
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
        la = _launch_args(argv)
        assert (la.node_rank, la.nnodes, la.nproc_per_node) == (node, 3, 8)
        assert la.master_addr == "gpu07" and la.master_port == port
        assert la.verb == "pretrain"
        assert la.args == ["--config", "gigamim/configs/demo.yaml", "--set", "log.dir=/runs/a b", "--resume", "auto"]
        assert la.stop_timeout == 900  # not DeepSpeed's 30 s SIGKILL
    assert "# nodes in launch order: gpu07 gpu08 gpu11" in out.stdout
    # ...and the batch shell starts one task per node.
    srun = [line for line in out.stdout.splitlines() if line.startswith("# batch shell runs:")][0]
    assert "--ntasks-per-node=1" in srun and "--nodes=3" in srun and "cluster/slurm/node.sh" in srun


def test_sbatch_dry_run_flag_gpu_count_from_slurm_and_explicit_resume():
    env = _clean_env(SLURM_GPUS_PER_NODE="h100:4", **SLURM_VARS)
    out = _run(SBATCH, "--dry-run", "--config", "c.yaml", "--resume", "/ckpt/step_00000100", env=env)
    assert out.returncode == 0, out.stderr
    for _, argv in _node_commands(out.stdout).values():
        la = _launch_args(argv)
        assert la.nproc_per_node == 4
        assert [la.verb, *la.args] == ["pretrain", "--config", "c.yaml", "--resume", "/ckpt/step_00000100"]


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
        la = _launch_args(argv)
        assert (la.node_rank, la.nnodes, la.nproc_per_node, la.master_addr) == (node, 8, 8, "h200-001")
        args = la.args
        assert la.verb == "pretrain" and args[args.index("--config") + 1] == "gigamim/configs/simmim_swinv2_giant_192.yaml"
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


# ---------------------------------------------------------------------- the real batch script, SLURM stood in for

STAND_INS = {
    # srun: one task per node, all on this host, each task in its own session (a "step").
    "srun": r'''#!/usr/bin/env bash
n=1
while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && n="${1#--nodes=}"; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i setsid "$@" & pids+=($!); done
echo "${pids[*]}" >"$FAKE_SLURM/step.pids"
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
''',
    # scancel --signal=TERM: like SLURM, signal EVERY process of the job's steps (not the batch shell).
    "scancel": r'''#!/usr/bin/env bash
tree() { local c; for c in $(pgrep -P "$1"); do echo "$c"; tree "$c"; done; }
for p in $(cat "$FAKE_SLURM/step.pids"); do kill -TERM "$p" $(tree "$p") 2>/dev/null; done
echo "scancel $*" >>"$FAKE_SLURM/calls"
''',
    "scontrol": r'''#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_SLURM/calls"
''',
}


def _stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sbatch_time_limit_saves_before_exit_and_requeues_only_when_latest_advanced(tmp_path):
    """The real pretrain.sbatch with srun/scancel/scontrol stood in for: USR1 (the time-limit
    warning) -> SIGTERM to every process of the step -> the trainer saves -> `gigamim launch`
    exits 0 after the save -> the batch script sees `latest` advanced and requeues. Then a
    start that cannot save (a config whose shards vanish is refused at once): no requeue."""
    import signal
    import sys

    from gigamim.checkpoint.check import check_checkpoint
    from gigamim.checkpoint.layout import complete_tags, read_latest
    from gigamim.data.synthetic import write_synthetic_shards
    from tests.helpers.faults import logged_steps, pretrain_args, wait_for

    shards = str(write_synthetic_shards(tmp_path / "shards", 96, image_size=112, samples_per_shard=48))
    fake = tmp_path / "slurm"
    fake.mkdir()
    env = _clean_env(SLURM_JOB_ID="4321", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", GIGAMIM_GPUS_PER_NODE="2",
                     GIGAMIM_PYTHON=sys.executable, FAKE_SLURM=str(fake), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                     PYTHONWARNINGS="ignore", PATH=f"{_stand_ins(tmp_path)}:{os.environ['PATH']}")
    args = pretrain_args(tmp_path, shards, 500)[1:]  # without the verb
    log = open(tmp_path / "batch.log", "w")
    batch = subprocess.Popen(["bash", str(SBATCH), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2, 240, batch, "step 2")
        os.kill(batch.pid, signal.SIGUSR1)  # SLURM's --signal=B:USR1@300
        rc = batch.wait(timeout=300)
        latest = read_latest(tmp_path / "ck")  # the moment the batch script is done
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    text = (tmp_path / "batch.log").read_text()
    assert rc == 0, text[-3000:]
    assert latest in complete_tags(tmp_path / "ck") and check_checkpoint(tmp_path / "ck").tag == latest, text[-3000:]
    calls = (fake / "calls").read_text().splitlines()
    assert calls == ["scancel --signal=TERM 4321", "scontrol requeue 4321"], calls
    assert "Traceback" not in text

    # The requeued start runs with the same checkpoint.dir; here it cannot train (its shards
    # are gone) and `latest` stays where it was: the time-limit warning must not requeue it.
    (fake / "calls").unlink()
    (fake / "step.pids").unlink()
    import shutil

    shutil.rmtree(tmp_path / "shards")
    slow_srun = tmp_path / "bin" / "srun"
    slow_srun.write_text(STAND_INS["srun"].replace('for p in "${pids[@]}"', 'sleep 3; for p in "${pids[@]}"'))
    batch = subprocess.Popen(["bash", str(SBATCH), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    # the stand-in srun has started its step (so the batch script's traps are set): ~3 s of python
    # before that on an idle machine; a fixed 1.5 s sleep here had the signal kill the script first
    wait_for(lambda: (fake / "step.pids").exists(), 120, batch, "the batch script's srun step")
    os.kill(batch.pid, signal.SIGUSR1)
    out, _ = batch.communicate(timeout=120)
    assert batch.returncode == 1, out
    assert "not requeueing" in out and "did not advance" in out
    assert "scontrol requeue" not in (fake / "calls").read_text()
    assert read_latest(tmp_path / "ck") == latest
