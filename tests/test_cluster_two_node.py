"""Two nodes on one machine: cluster/slurm/node.sh is started twice, as srun would start it
on two nodes (SLURM_NODEID 0 and 1), on loopback (hosts 127.0.0.1 and localhost). Each
start runs `gigamim launch --nproc-per-node 1 --nnodes 2 --node-rank i --master-addr
127.0.0.1 ...`, so the ranks rendezvous across two launcher processes exactly as on two
machines. References: the doctor's all-reduce result (a formula) and, for
training, an ordinary single-node 2-rank launch, whose per-step losses must match."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
NODE_SH = ROOT / "cluster/slurm/node.sh"


def base_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "GIGAMIM_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def launch_two_nodes(tmp_path, verb, args, timeout=300):
    port = free_port()
    procs = []
    for node in (0, 1):
        env = base_env()
        env.update(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_NODEID=str(node),
                   SLURM_JOB_NODELIST="127.0.0.1,localhost", GIGAMIM_GPUS_PER_NODE="1",
                   GIGAMIM_HOSTFILE=str(tmp_path / f"hostfile.node{node}"), MASTER_PORT=str(port), GIGAMIM_VERB=verb)
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(["bash", str(NODE_SH), *args], env=env, cwd=tmp_path, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for proc, log in procs:
            codes.append(proc.wait(timeout=timeout))
            log.close()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n----\n".join(text[-3000:] for text in logs)
    return logs


def test_two_node_doctor_on_loopback(tmp_path):
    out_json = tmp_path / "doctor.json"
    logs = launch_two_nodes(tmp_path, "doctor", ["--no-ops", "--bandwidth-mb", "4", "--iters", "3", "--json", str(out_json)])
    # Each node ran its own launcher with its own node rank.
    assert "--node-rank 0" in logs[0] and "--node-rank 1" in logs[1]
    got = json.loads(out_json.read_text())
    assert got["launch"]["world_size"] == 2 and got["launch"]["local_world_size"] == 1
    # The SLURM node script runs `gigamim launch` (torch's elastic agent: seen as torchrun).
    assert got["launch"]["launcher"] == "torchrun" and got["launch"]["master_addr"] == "127.0.0.1"
    bw = got["allreduce"]
    assert bw["correct"] and bw["ranks"] == 2
    assert bw["busbw_gbps"] == pytest.approx(bw["bytes"] / bw["seconds_per_iter"] / 1e9 * 2 * (2 - 1) / 2)
    assert "busbw" in logs[0]  # rank 0 (node 0) prints the figure


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_node_pretrain_matches_single_node_two_ranks(tmp_path):
    pytest.importorskip("gigamim.train.pretrain")
    from gigamim.data.synthetic import write_synthetic_shards

    index = write_synthetic_shards(tmp_path / "shards", 48, image_size=192, samples_per_shard=12, seed=0)

    def pretrain_args(run):
        return ["--config", "demo", "--set", f"data.shards={index}", "--set", "train.max_steps=3",
                "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=8",
                "--set", "log.every_steps=1", "--set", "data.num_workers=0",
                "--set", f"checkpoint.dir={tmp_path / run / 'ckpt'}", "--set", f"log.dir={tmp_path / run / 'logs'}"]

    # Two "nodes", one rank each.
    (tmp_path / "two_node").mkdir()
    launch_two_nodes(tmp_path / "two_node", "pretrain", pretrain_args("two_node"), timeout=600)

    # Reference: one node, two ranks.
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
           "--module", "gigamim", "pretrain", *pretrain_args("one_node")]
    ref = subprocess.run(cmd, capture_output=True, text=True, env=base_env(), cwd=tmp_path, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    two, one = _metrics(tmp_path / "two_node/logs/metrics.jsonl"), _metrics(tmp_path / "one_node/logs/metrics.jsonl")
    assert [m["step"] for m in two] == [m["step"] for m in one] == [1, 2, 3]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        if "data_digest" in a:
            assert a["data_digest"] == b["data_digest"]
    # Both runs trained as one 2-rank job and checkpointed as such.
    for run in ("two_node", "one_node"):
        ckpt = tmp_path / run / "ckpt"
        tag = (ckpt / "latest").read_text().strip()
        assert json.loads((ckpt / tag / "gigamim_meta.json").read_text())["world_size"] == 2


# Local stand-ins for the three SLURM commands pretrain.sbatch calls (SLURM is not installed
# here). They keep SLURM's semantics that matter: srun starts one task per node, each in its
# own process group, and whatever outlives a task's main process is killed; `scancel --signal=SIG JOB` signals every process of the step's tasks
# (as slurmstepd does), not the batch shell; scontrol only records the requeue.
SRUN = r"""#!/usr/bin/env bash
nodes=1
while [[ "$1" == --* ]]; do case "$1" in --nodes=*) nodes="${1#--nodes=}" ;; esac; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i GIGAMIM_HOSTFILE="$SHIM_DIR/hostfile.$i" setsid "$@" >"$SHIM_DIR/node$i.log" 2>&1 &
    pids+=($!); echo $! >>"$SHIM_DIR/pgids"
done
rc=0
for p in "${pids[@]}"; do
    wait "$p" || rc=$?
    kill -KILL -- "-$p" 2>/dev/null  # a task's main process is gone: SLURM kills what is left
done
exit $rc
"""
SCANCEL = r"""#!/usr/bin/env bash
echo "scancel $*" >>"$SHIM_DIR/calls"
sig="${1#--signal=}"
while read -r g; do kill -"$sig" -- "-$g" 2>/dev/null; done <"$SHIM_DIR/pgids"
"""
SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >>"$SHIM_DIR/calls"
"""


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@300` sends) -> SIGTERM to every rank on
    both nodes -> the trainer checkpoints -> `scontrol requeue`; the restarted job resumes."""
    import signal
    import time

    pytest.importorskip("gigamim.train.pretrain")
    from gigamim.data.synthetic import write_synthetic_shards

    index = write_synthetic_shards(tmp_path / "shards", 48, image_size=192, samples_per_shard=12, seed=0)
    shim = tmp_path / "shim"
    (shim / "bin").mkdir(parents=True)
    for name, text in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (shim / "bin" / name).write_text(text)
        (shim / "bin" / name).chmod(0o755)
    ckpt, logs = tmp_path / "run/ckpt", tmp_path / "run/logs"

    def start(max_steps, restart):
        (shim / "pgids").unlink(missing_ok=True)
        env = base_env()
        env.update(PATH=f"{shim / 'bin'}:{env['PATH']}", SHIM_DIR=str(shim), SLURM_JOB_ID="4343", SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="127.0.0.1,localhost", GIGAMIM_GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
                   GIGAMIM_ENV="/nonexistent", SLURM_RESTART_COUNT=str(restart))
        args = ["--config", "demo", "--set", f"data.shards={index}", "--set", f"train.max_steps={max_steps}",
                "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=8", "--set", "log.every_steps=1",
                "--set", "data.num_workers=0", "--set", "checkpoint.every_steps=1000",
                "--set", f"checkpoint.dir={ckpt}", "--set", f"log.dir={logs}"]
        return subprocess.Popen(["bash", str(ROOT / "cluster/slurm/pretrain.sbatch"), *args], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def node_logs():
        return "\n----\n".join((shim / f"node{n}.log").read_text()[-3000:] for n in (0, 1) if (shim / f"node{n}.log").exists())

    job = start(max_steps=10_000, restart=0)
    try:
        deadline = time.time() + 600
        while not (logs / "metrics.jsonl").exists() or len(_metrics(logs / "metrics.jsonl")) < 2:
            assert job.poll() is None, job.stdout.read() + node_logs()
            assert time.time() < deadline, node_logs()
            time.sleep(2)
        job.send_signal(signal.SIGUSR1)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out + node_logs()
    calls = (shim / "calls").read_text().splitlines()
    assert calls == ["scancel --signal=TERM 4343", "scontrol requeue 4343"]
    tag = (ckpt / "latest").read_text().strip()
    saved = json.loads((ckpt / tag / "gigamim_meta.json").read_text())["step"]
    assert saved >= 2 and saved == _metrics(logs / "metrics.jsonl")[-1]["step"]

    # The requeued start: same job, `--resume auto` continues after the saved step.
    job = start(max_steps=saved + 2, restart=1)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out + node_logs()
    assert (shim / "calls").read_text().splitlines() == calls  # finished: no second requeue
    steps = [m["step"] for m in _metrics(logs / "metrics.jsonl")]
    assert steps[-2:] == [saved + 1, saved + 2]
