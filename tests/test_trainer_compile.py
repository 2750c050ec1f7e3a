"""`model.compile=true` through `gigamim pretrain`: 2 CPU ranks, ZeRO-3 (blocks as z3 leaf
modules, each block's forward compiled with inductor), activation checkpointing on. It trains
(the loss falls, compared with its own first steps), and a stop + `--resume auto` gives the
same losses as the straight compiled run. The eager-vs-compiled numerics are checked against
the eager path in tests/test_compile*.py; here the reference is the uninterrupted run.
Slow: inductor compiles every block geometry once per rank (minutes on 2 cores, cold)."""

from __future__ import annotations

import pytest

from tests.launch import deepspeed_cmd, run
from tests.test_trainer import _ok, by_step, pretrain_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

COMPILED = ("model.compile=true", "model.grad_checkpointing=true", "model.img_size=64", "model.window_size=4",
            "optim.lr=2e-3", "optim.warmup_steps=1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 96, image_size=80, samples_per_shard=48))


def test_compiled_zero3_trains_and_resumes_exactly(tmp_path, shards):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _ok(run(deepspeed_cmd(2, *pretrain_args(straight, shards, 8, *COMPILED)), timeout=1500))
    _ok(run(deepspeed_cmd(2, *pretrain_args(stopped, shards, 8, "train.stop_at_step=4", *COMPILED)), timeout=1500))
    resumed = _ok(run(deepspeed_cmd(2, *pretrain_args(stopped, shards, 8, *COMPILED), "--resume", "auto"),
                      timeout=1500))
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = by_step(straight), by_step(stopped)
    losses = [ref[s]["loss"] for s in range(1, 9)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns
    for step in range(5, 9):
        assert got[step]["data_digest"] == ref[step]["data_digest"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-7), step
