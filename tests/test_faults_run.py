"""The fault suite of `gigamim pretrain` on real CPU ranks (DeepSpeed ZeRO-3, gloo, real tar
shards, real checkpoints): each case asserts what was kept on disk and what the user saw
(one line, no traceback). Launch faults (SIGTERM, kill -9 of a rank) are in
test_faults_launch.py; SIGKILL mid-save is test_trainer.py's
test_kill_during_save_keeps_previous_checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from gigamim.checkpoint.layout import LATEST_FILE, META_FILE, complete_tags, read_latest
from gigamim.checkpoint.lock import LOCK_FILE
from tests.helpers.faults import (launch_cmd, logged_steps, no_traceback, pretrain_args, sigterm_job, signal_job,
                                  small_tmpfs)
from tests.launch import REPO, cpu_env, run

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 96, image_size=112, samples_per_shard=48))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, shards):
    """A finished 2-rank run with complete tags at steps 2 and 4 (copied by the tests that damage it)."""
    wd = tmp_path_factory.mktemp("four")
    done = run(launch_cmd(2, *pretrain_args(wd, shards, 4, "checkpoint.every_steps=2")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert complete_tags(wd / "ck") == ["step_00000002", "step_00000004"]
    return wd


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src / "ck", dst / "ck")
    return dst


def _one_line_error(done, *needles):
    err = done.stderr
    no_traceback(done.stdout + err)
    hits = [line for line in err.splitlines() if all(n in line for n in needles)]
    assert len(hits) == 1, err[-3000:]
    return hits[0]


# ---------------------------------------------------------------------- resume from damaged folders


@pytest.mark.slow
def test_damaged_newest_tag_falls_back_on_every_rank(four_steps, tmp_path, shards):
    wd = _copy_run(four_steps, tmp_path)
    victim = wd / "ck" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    done = run(launch_cmd(2, *pretrain_args(wd, shards, 5), "--resume", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    warning = [line for line in out.splitlines() if "warning" in line and victim.name in line]
    assert len(warning) == 1, out[-3000:]
    assert "at step 2" in done.stdout and "step_00000002" in warning[0]
    assert json.loads((wd / "ck" / "step_00000005" / META_FILE).read_text())["step"] == 5
    no_traceback(out)


@pytest.mark.slow
def test_binary_latest_is_treated_as_absent(four_steps, tmp_path, shards):
    wd = _copy_run(four_steps, tmp_path)
    (wd / "ck" / LATEST_FILE).write_bytes(os.urandom(64))
    done = run(launch_cmd(2, *pretrain_args(wd, shards, 5), "--resume", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "does not hold a readable tag name" in done.stdout + done.stderr
    assert "at step 4" in done.stdout
    no_traceback(done.stdout + done.stderr)
    consolidate = subprocess.run([sys.executable, "-m", "gigamim", "consolidate", str(wd / "ck"),
                                  str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, env=cpu_env())
    assert consolidate.returncode == 0, consolidate.stderr[-3000:]
    no_traceback(consolidate.stdout + consolidate.stderr)


@pytest.mark.slow
def test_other_model_refused_before_any_weight_is_read_other_size_warned(four_steps, tmp_path, shards):
    wd = _copy_run(four_steps, tmp_path)
    done = run(launch_cmd(2, *pretrain_args(wd, shards, 6, "model.name=swinv2_tiny", "model.window_size=6"), "--resume", "auto"))
    assert done.returncode == 2
    line = _one_line_error(done, "holds model swinv2_nano", "model.name=swinv2_tiny")
    assert "step_00000004" in line
    assert "saved checkpoint" not in done.stdout and complete_tags(wd / "ck") == ["step_00000002", "step_00000004"]
    # Another image size: SwinV2's weights follow, with one warning naming the change; and the
    # LR schedule, changed by the new max_steps, says so once.
    done = run(launch_cmd(2, *pretrain_args(wd, shards, 6, "model.img_size=192"), "--resume", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("model.img_size changed since step_00000004: 96 -> 192") == 1, out[-3000:]
    lr_lines = [line for line in out.splitlines() if "LR schedule changed" in line]
    assert len(lr_lines) == 1 and "train.max_steps 4 -> 6" in lr_lines[0]


# ---------------------------------------------------------------------- bad input


def test_yaml_error_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: swinv2_nano\ntrain:\n  max_steps: [3\n")
    done = subprocess.run([sys.executable, "-m", "gigamim", "pretrain", "--config", str(bad)], capture_output=True,
                          text=True, cwd=REPO, env=cpu_env(), timeout=60)
    assert done.returncode == 2
    line = _one_line_error(done, str(bad))
    # PyYAML reports the problem at the end of the file (line 5 of 4 newline-ended lines, 1-based).
    import yaml

    with pytest.raises(yaml.YAMLError) as ref:
        yaml.safe_load(bad.read_text())
    mark = ref.value.problem_mark
    assert f"line {mark.line + 1}, column {mark.column + 1}" in line


@pytest.mark.slow
def test_shards_without_a_readable_sample_one_line(tmp_path):
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(os.urandom(4096))
    spec = f"{tmp_path}/junk-{{0..1}}.tar"
    done = run(launch_cmd(2, *pretrain_args(tmp_path, spec, 3)))
    assert done.returncode == 2, done.stderr[-3000:]
    _one_line_error(done, "data.shards", "readable tar")


# ---------------------------------------------------------------------- two runs, one folder


@pytest.mark.slow
def test_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, shards):
    first_dir = tmp_path / "first"
    first_dir.mkdir()

    def second_start_then_sigterm(job):
        holder = json.loads((tmp_path / "ck" / LOCK_FILE).read_text())
        second = run(launch_cmd(2, *pretrain_args(tmp_path / "second", shards, 3, f"checkpoint.dir={tmp_path}/ck")))
        assert job.poll() is None  # the first run goes on
        assert second.returncode == 2
        line = _one_line_error(second, "in use by another run")
        assert f"pid {holder['pid']}" in line and holder["host"] in line and "--force-unlock" in line
        assert not (tmp_path / "second" / "log" / "metrics.jsonl").exists()  # wrote nothing
        sigterm_job(job)

    rc, _ = signal_job(launch_cmd(2, *pretrain_args(first_dir, shards, 500, f"checkpoint.dir={tmp_path}/ck")),
                       first_dir / "job.log", lambda job: logged_steps(first_dir) >= 1, "the first run's step 1",
                       second_start_then_sigterm)
    assert rc == 0
    assert not (tmp_path / "ck" / LOCK_FILE).exists()  # released at the end
    assert read_latest(tmp_path / "ck") in complete_tags(tmp_path / "ck")


# ---------------------------------------------------------------------- disk full


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_disk_full_before_the_second_save_keeps_the_first(tmp_path, shards, engine):
    """A nano tag on 2 ranks is ~37 MB (either engine): a 56 MB disk holds one. The second save
    is refused before writing (previous tag's size > free), one line, exit 2; step 2 stays loadable."""
    with small_tmpfs(tmp_path / "disk", 56 << 20) as disk:
        done = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 6, f"checkpoint.dir={disk}/ck",
                                                "checkpoint.every_steps=2", f"train.engine={engine}")))
        assert done.returncode == 2, done.stderr[-3000:]
        line = _one_line_error(done, f"no space left on {disk}/ck: need ~", " GB, have ")
        assert complete_tags(disk / "ck") == ["step_00000002"] and read_latest(disk / "ck") == "step_00000002"
        from gigamim.checkpoint.check import check_checkpoint

        assert check_checkpoint(disk / "ck").tag == "step_00000002"
        assert not (disk / "ck" / LOCK_FILE).exists()
        need = float(line.split("need ~")[1].split(" GB")[0]) * 1e9
        from gigamim.checkpoint.space import tree_bytes

        assert need == pytest.approx(tree_bytes(disk / "ck" / "step_00000002") * 1.05, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_disk_full_during_the_first_save_one_line(tmp_path, shards, engine):
    """A 20 MB disk cannot hold one tag: the engine's write (torch.save, DCP's) fails mid-way
    on some rank; every rank stops with one line, the half-written tag is removed, no
    `latest` names anything."""
    with small_tmpfs(tmp_path / "disk", 20 << 20) as disk:
        done = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 3, f"checkpoint.dir={disk}/ck",
                                                f"train.engine={engine}")))
        assert done.returncode == 2, done.stderr[-3000:]
        _one_line_error(done, f"no space left on {disk}/ck")
        assert complete_tags(disk / "ck") == [] and read_latest(disk / "ck") is None
        assert not (disk / "ck" / "step_00000003").exists()


# ---------------------------------------------------------------------- signals during set-up


@pytest.mark.slow
def test_sigterm_during_setup_saves_after_the_first_step(tmp_path, shards):
    tmp_path.mkdir(exist_ok=True)
    from tests.helpers.faults import catches, rank_pids

    def set_up(job):  # nothing trained yet: the ranks are importing / setting up
        assert logged_steps(tmp_path) == 0
        sigterm_job(job)

    # ready: the ranks run and catch SIGTERM (`gigamim launch` has them keep an early signal for
    # the trainer). (A signal in the ~0.1 s between a rank's fork and that handler ends the
    # rank, exit 143, with nothing trained and nothing lost.)
    def started(job):
        ranks = rank_pids(job.pid)
        return len(ranks) == 2 and all(catches(p, signal.SIGTERM) for p in ranks.values())

    rc, out = signal_job(launch_cmd(2, *pretrain_args(tmp_path, shards, 50)), tmp_path / "job.log", started,
                         "the ranks to start", set_up, ready_s=120)
    assert rc == 0, out[-3000:]
    latest = read_latest(tmp_path / "ck")
    assert latest in complete_tags(tmp_path / "ck"), out[-3000:]
    no_traceback(out)


# ---------------------------------------------------------------------- ZeRO-3 padding


def test_finite_check_ignores_nan_in_zero3_padding(tmp_path):
    """Issue 14.6: NaN in a partition's alignment padding is not a non-finite weight (the
    gathered parameters, DeepSpeed's own view of the real elements, are the reference);
    a NaN in a real element is."""
    from tests.launch import free_port

    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "faults_padding.py"), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    assert all(r["padded_params"] > 0 for r in results)
    assert sum(r["planted"] for r in results) > 0  # some padding was really poisoned
    for r in results:
        assert r["reference_finite"] is True and r["check_with_padding_nan"] is True, r
        assert r["reference_after_real_nan"] is False and r["check_after_real_nan"] is False, r


# ---------------------------------------------------------------------- time-based stop


@pytest.mark.slow
def test_stop_after_saves_and_exits_zero(tmp_path, shards):
    done = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 100000, "train.stop_after=25s")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.stop_after=25s reached" in done.stdout
    latest = read_latest(tmp_path / "ck")
    assert latest in complete_tags(tmp_path / "ck") and 1 <= int(latest.split("_")[1]) < 100000
    no_traceback(done.stdout + done.stderr)
