"""`gigamim probe`: real labelled shards (make-shards of an ImageFolder of sklearn's real
digits), the classifier against scikit-learn's LogisticRegression, weights from a SimMIM
file, an exported encoder and random init, and bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from gigamim.checkpoint import export
from gigamim.models import SimMIM, create_model
from gigamim.train import probe

KW = dict(img_size=32, window_size=4)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    from gigamim.data.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    out = {}
    for split, idx in (("train", order[:200]), ("val", order[200:400])):
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8), mode="L")
            img.resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"d{i}.png")
        assert make_shards([str(root / split), str(root / f"{split}_shards"), "--max-count", "120"]) == 0
        out[split] = str(root / f"{split}_shards" / "index.json")
    # unlabelled shards: the same images, a flat folder (no class subfolders)
    flat = root / "flat"
    flat.mkdir()
    for i in order[:20]:
        Image.fromarray((d.images[i] * 16).astype(np.uint8), mode="L").convert("RGB").save(flat / f"u{i}.png")
    assert make_shards([str(flat), str(root / "flat_shards")]) == 0
    out["unlabelled"] = str(root / "flat_shards" / "index.json")
    return out


def test_linear_classifier_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:600], dtype=torch.float64)
    y = torch.tensor(d.target[:600])
    xv = torch.tensor(d.data[600:1000], dtype=torch.float64)
    wd = 1e-2
    lin = probe.fit_linear(x, y, 10, wd=wd, max_iter=500)
    ours = lin(xv).argmax(1).numpy()
    # same objective: mean CE + wd/2 |W|^2 on standardised features == sklearn's C = 1 / (wd * N)
    mean, std = x.mean(0).numpy(), x.std(0).clamp(min=1e-6).numpy()
    ref = LogisticRegression(C=1.0 / (wd * len(y)), max_iter=5000, tol=1e-10)
    ref.fit((x.numpy() - mean) / std, y.numpy())
    theirs = ref.predict((xv.numpy() - mean) / std)
    assert (ours == theirs).mean() >= 0.995
    assert abs((ours == d.target[600:1000]).mean() - (theirs == d.target[600:1000]).mean()) <= 0.005


def test_stage_features_shapes():
    enc = create_model("swinv2_nano", **KW).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert probe.stage_features(enc, x).shape == (2, 256)
        assert probe.stage_features(enc, x, 1).shape == (2, 64)
        torch.testing.assert_close(probe.stage_features(enc, x, 3), enc(x, features_only=True).mean((1, 2)))
        vit = create_model("vit_nano_patch16").eval()
        assert probe.stage_features(vit, torch.randn(2, 3, 64, 64), 1).shape == (2, 64)
    with pytest.raises(ValueError, match="out of range"):
        probe.stage_features(enc, x, 7)


def _simmim_file(tmp_path, name="swinv2_nano", kw=KW):
    torch.manual_seed(0)
    model = SimMIM(create_model(name, **kw))
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path), metadata={
        "gigamim_config": yaml.safe_dump({"model": {"name": name, **kw}}), "step": "5", "format": "simmim"})
    return model, path


def test_cli_on_simmim_weights_export_and_random_init(digit_shards, tmp_path, capsys):
    model, path = _simmim_file(tmp_path)
    out = tmp_path / "p.json"
    assert probe.main(["--train", digit_shards["train"], "--val", digit_shards["val"], "--weights", str(path),
                       "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == json.loads(out.read_text())
    assert res["model"] == "swinv2_nano" and res["n_train"] == 200 and res["n_val"] == 200
    assert res["num_classes"] == 10 and res["step"] == "5"
    assert 0.3 < res["top1"] <= 1.0 and res["top5"] >= res["top1"]  # real digits: far above 10% chance
    # the exported encoder gives the same features, so the same probe
    enc_path = tmp_path / "enc.safetensors"
    assert export.main([str(path), str(enc_path), "--format", "encoder"]) == 0
    capsys.readouterr()
    assert probe.main(["--train", digit_shards["train"], "--val", digit_shards["val"], "--weights",
                       str(enc_path)]) == 0
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res2["top1"] == res["top1"]
    # random init, intermediate stage
    assert probe.main(["--train", digit_shards["train"], "--val", digit_shards["val"], "--model", "swinv2_nano",
                       "--img-size", "32", "--window-size", "4", "--stage", "1"]) == 0
    res3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res3["weights"] == "random init" and res3["feature_dim"] == 64 and res3["stage"] == 1


@pytest.mark.parametrize("case", ["no_labels", "other_arch", "missing_file", "no_model"])
def test_bad_input_is_one_line(digit_shards, tmp_path, capsys, case):
    args = ["--train", digit_shards["train"], "--val", digit_shards["val"]]
    if case == "no_labels":
        args = ["--train", digit_shards["unlabelled"], "--val", digit_shards["val"], "--model", "swinv2_nano",
                "--img-size", "32", "--window-size", "4"]
        want = "has no .cls member"
    elif case == "other_arch":
        _, path = _simmim_file(tmp_path, "swin_nano", dict(img_size=64, window_size=4))
        args += ["--weights", str(path), "--model", "swinv2_nano"]
        want = "is a swin encoder (swin_nano), not one of swinv2_nano (swinv2)"
    elif case == "missing_file":
        args += ["--weights", str(tmp_path / "nope.safetensors")]
        want = "nope.safetensors"
    else:
        want = "no model name"
    assert probe.main(args) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
