"""The real-image check (benchmarks/real_images_check.py), shortened: sklearn's real digits
through make-shards, `gigamim pretrain` + `consolidate`, then `gigamim finetune` and `gigamim
probe` of the pretrained and the random-init encoder. The full run
(benchmarks/results/real_images_*) is what shows pretraining helps; this short one (120
pretraining steps) checks the pipeline: the reconstruction loss falls and every accuracy is
far above chance (10 classes)."""

import json

import pytest


@pytest.mark.slow
def test_real_images_check_quick(tmp_path):
    from benchmarks.real_images_check import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["data"] == {"test": 600, "finetune": 100, "pretrain": 1197}
    assert res["pretrain"]["loss_last"] < 0.8 * res["pretrain"]["loss_first"]
    for part in ("finetune", "probe"):
        for kind in ("pretrained", "random"):
            assert len(res[part][kind]["values"]) == 2 and min(res[part][kind]["values"]) > 0.5, res[part]
    assert (tmp_path / "report.md").read_text().startswith("# Real-image check")
