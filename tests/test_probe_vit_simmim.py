"""The real-image probe (sklearn digits) for the official SimMIM ViT, through `gigamim probe
--protocol simmim` (the paper's ViT probe: block 8, average-pooled patch tokens)."""

from __future__ import annotations

import json

from gigamim.train import probe
from tests.test_probe import digit_shards  # noqa: F401  (the fixture)


def test_paper_probe_protocol_on_real_digits(digit_shards, capsys):  # noqa: F811
    args = ["--train", digit_shards["train"], "--val", digit_shards["val"], "--model", "vit_small_patch16_simmim",
            "--img-size", "32", "--protocol", "simmim", "--num-workers", "0"]
    assert probe.main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["stage"] == 7 and res["feature_dim"] == 384 and res["n_val"] == 200
    assert 0.3 < res["top1"] <= 1.0, res  # real digits: far above 10% chance
    # the protocol is for ViTs of at least 8 blocks: anything else is one line
    assert probe.main(["--train", digit_shards["train"], "--val", digit_shards["val"], "--model",
                       "vit_nano_patch16_simmim", "--protocol", "simmim"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--protocol simmim" in err and "(4 blocks)" in err and "\n" not in err
