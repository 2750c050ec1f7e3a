"""benchmarks/gpu_smoke.sh --cpu-dry-run: the GPU script's every step, at tiny sizes, on the CPU.

The script runs for real only on a lent GPU, once, with no second chance inside the lease: this
dry run is what keeps it from rotting between such runs. It checks what a GPU run must bring
back: at most 8 files in $OUT, no deeper than two folders (all that comes back from the GPU
machine), every step reported ok in summary.json (what only a GPU can answer: skipped, with the
reason), the archive holding each step's result and log, and the compact summary at the end of
the output (the last 12 KB of which come back).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from tests.helpers.randomize import randomize_weights
from tests.launch import GROUP_VARS, REPO

STEPS = ["env", "attention", "kernels", "throughput", "pretrain", "data", "max_batch", "compile"]
# What the GPU machine returns from $OUT: 8 files, each at most two folders down, plain names.
MAX_FILES, MAX_DEPTH, NAME = 8, 2, re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_smoke_out")
    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARS}
    env.update(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path_factory.mktemp("gpu_smoke_tmp")))
    proc = subprocess.run(["bash", "benchmarks/gpu_smoke.sh", "--cpu-dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    return out, proc


def test_dry_run_exits_0(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]


def test_out_holds_only_what_comes_back(dry_run):
    out, _ = dry_run
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    for f in files:
        assert len(f.parts) - 1 <= MAX_DEPTH and all(NAME.match(p) for p in f.parts), f
    assert sorted(map(str, files)) == ["results.tar.gz", "summary.json"]


def test_every_step_reported_ok(dry_run):
    out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu-dry-run"
    assert list(summary["steps"]) == STEPS
    for name, step in summary["steps"].items():
        assert step["status"] == "ok" or (step["status"] == "skipped" and step.get("reason")), (name, step)
        assert step["headline"], name
        for check, value in step["checks"].items():
            assert value is True or re.match(r"skipped: \S", str(value)), (name, check, value)
    checks = {n: s["checks"] for n, s in summary["steps"].items()}
    # What only a GPU can answer says so...
    assert checks["attention"]["sdpa_fused_backend"].startswith("skipped: on cpu")
    assert checks["pretrain"]["fused_adam_build"].startswith("skipped: on cpu")
    assert checks["pretrain"]["deepspeed_shm_comm_build"] is True  # the CPU ranks' JIT op, in the background
    assert checks["throughput"]["nano_mfu_at_least_20pct"] == "skipped: on cpu"
    # ...and what the CPU can answer is checked for real.
    for check in ("explicit_bf16", "sdpa_bf16", "sdpa_fp32", "flex_bf16", "flex_fp32"):
        assert checks["attention"][check] is True, check
    assert checks["kernels"]["triton_ran"] is True  # Triton's interpreter
    for check in ("run_a", "saved", "resumed_from_save", "losses_equal_after_resume", "deepspeed_config"):
        assert checks["pretrain"][check] is True, check
    assert checks["compile"]["nano_one_graph_no_break"] is True


def test_archive_holds_every_steps_result(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        results = {s: json.load(tar.extractfile(f"gpu_smoke/{s}.json")) for s in STEPS}
        inner = json.load(tar.extractfile("gpu_smoke/summary.json"))
    for step in STEPS:
        assert f"gpu_smoke/{step}.log" in names, step
        assert results[step]["status"] == "ok", (step, results[step].get("error"))
    assert inner == json.loads((out / "summary.json").read_text())
    assert {"gpu_smoke/throughput/report.md", "gpu_smoke/pretrain_run_a.log", "gpu_smoke/pretrain_run_b.log",
            "gpu_smoke/kernels.json", "gpu_smoke/install.log"} <= names
    assert any(n.endswith(".png") for n in names)
    resumed = results["pretrain"]["result"]["run_b"]
    assert resumed["first_resumed_rel"] == 0.0 and resumed["max_rel"] == 0.0


def test_output_ends_with_the_compact_summary(dry_run):
    _, proc = dry_run
    tail = proc.stdout[-12_000:]  # what comes back of a GPU run's output
    summary = tail[tail.rindex("== gigamim gpu_smoke (cpu-dry-run)"):]
    for step in STEPS:
        assert re.search(rf"^\[ok +\] {step} ", summary, re.M), step


def test_select_wheels_takes_missing_or_older_only(tmp_path):
    from gigamim_benchmarks.gpu_smoke import select_wheels
    import importlib.metadata as md

    torch_version = md.version("torch")
    for name in (f"torch-{torch_version}-py3-none-any.whl",  # installed, same version: skipped
                 "numpy-0.1-py3-none-any.whl",  # installed, newer here: skipped
                 "tqdm-999.0-py3-none-any.whl",  # installed, older here: taken
                 "typing_extensions-999.0-py3-none-any.whl",  # underscore vs dash in the name
                 "gigamim_no_such_dist-1.0-py3-none-any.whl"):  # missing: taken
        (tmp_path / name).write_bytes(b"")
    chosen = sorted(os.path.basename(p) for p in select_wheels(tmp_path))
    assert chosen == ["gigamim_no_such_dist-1.0-py3-none-any.whl", "tqdm-999.0-py3-none-any.whl",
                      "typing_extensions-999.0-py3-none-any.whl"]


def test_randomize_draws_on_the_cpu_whatever_the_default_device():
    """A model on a GPU is randomised inside `with torch.device("cuda")` in the GPU script; a CPU
    generator cannot draw there. The values come from the CPU generator and are the same."""
    from gigamim.models import create_model

    a = create_model("swinv2_nano", img_size=64, window_size=4)
    b = create_model("swinv2_nano", img_size=64, window_size=4)
    randomize_weights(a, seed=3)
    with torch.device("meta"):  # a default device the CPU generator cannot draw on
        randomize_weights(b, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_tame_weights_stay_near_the_init_scales():
    from gigamim.models import create_model

    m = randomize_weights(create_model("swinv2_nano", img_size=64, window_size=4), seed=1, tame=True)
    scales = torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("logit_scale")])
    assert scales.min() >= math.log(5) - 1e-6 and scales.max() <= math.log(20) + 1e-6
    norms = torch.cat([p.flatten() for n, p in m.named_parameters() if ".norm1.weight" in n])
    assert 0.1 < norms.mean() < 0.5 and (norms != 0).all()  # every residual branch contributes
