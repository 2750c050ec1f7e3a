"""`gigamim doctor`: versions against the installed packages, and the all-reduce bandwidth
figure on 2 real CPU ranks under the deepspeed launcher, checked against the nccl-tests
formulas (algbw = bytes / time, busbw = algbw * 2(n-1)/n)."""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gigamim.launch import doctor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def test_doctor_single_process_reports_versions_and_skips_bandwidth(tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    out_json = tmp_path / "doctor.json"
    assert doctor.main(["--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert f"torch        {torch.__version__}" in text
    assert "skipped: one process" in text
    report = json.loads(out_json.read_text())
    for name in ("deepspeed", "timm", "webdataset", "triton"):
        assert report["report"]["packages"][name] == importlib.metadata.version(name)
    assert report["report"]["python"] == ".".join(map(str, sys.version_info[:3]))
    ops = report["report"]["deepspeed_ops"]
    assert "cpu_adam" in ops["compatible"] + ops["incompatible"]  # DeepSpeed's op table was read
    assert report["allreduce"] is None


def check_bandwidth(bw, ranks, size_mb):
    assert bw["ranks"] == ranks and bw["correct"] is True
    assert bw["bytes"] == int(size_mb * 2**20) // 4 * 4
    algbw = bw["bytes"] / bw["seconds_per_iter"] / 1e9
    assert bw["algbw_gbps"] == pytest.approx(algbw, rel=1e-9)
    assert bw["busbw_gbps"] == pytest.approx(algbw * 2 * (ranks - 1) / ranks, rel=1e-9)
    assert bw["busbw_gbps"] > 0


def test_doctor_two_cpu_ranks_deepspeed_launcher(tmp_path):
    out_json = tmp_path / "doctor.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
           "--module", "gigamim", "doctor", "--no-ops", "--bandwidth-mb", "4", "--iters", "3", "--json", str(out_json)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "busbw" in run.stdout and "launcher deepspeed, 2 rank(s)" in run.stdout
    got = json.loads(out_json.read_text())
    assert got["launch"]["launcher"] == "deepspeed" and got["launch"]["backend"] == "gloo"
    assert [r["rank"] for r in got["ranks"]] == [0, 1]
    check_bandwidth(got["allreduce"], 2, 4)
