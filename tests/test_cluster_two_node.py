"""Two nodes on one machine: cluster/slurm/node.sh is started twice, as srun would start it
on two nodes (SLURM_NODEID 0 and 1), on loopback (hosts 127.0.0.1 and localhost). Each
start runs `deepspeed --hostfile H --no_ssh --node_rank i --num_nodes 2 --num_gpus 1
--master_addr 127.0.0.1 ...`, so the ranks rendezvous across two launcher processes exactly
as on two machines. References: the doctor's all-reduce result (a formula) and, for
training, an ordinary single-node 2-rank launch, whose per-step losses must match."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE_SH = ROOT / "cluster/slurm/node.sh"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    assert "--node_rank 0" in logs[0] and "--node_rank 1" in logs[1]
    got = json.loads(out_json.read_text())
    assert got["launch"]["world_size"] == 2 and got["launch"]["local_world_size"] == 1
    assert got["launch"]["launcher"] == "deepspeed" and got["launch"]["master_addr"] == "127.0.0.1"
    bw = got["allreduce"]
    assert bw["correct"] and bw["ranks"] == 2
    assert bw["busbw_gbps"] == pytest.approx(bw["bytes"] / bw["seconds_per_iter"] / 1e9 * 2 * (2 - 1) / 2)
    assert "busbw" in logs[0]  # rank 0 (node 0) prints the figure


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_node_pretrain_matches_single_node_two_ranks(tmp_path):
    pytest.importorskip("gigamim.engine.trainer")
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
