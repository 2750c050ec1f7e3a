"""`gigamim export`: encoder / timm / simmim safetensors.

References: the weights gathered inside a real 2-rank ZeRO-3 run (tests/helpers), timm's
own SwinTransformerV2 and model registry (strict load + forward_features), and the
safetensors library's reader/writer. Nothing is mocked.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from gigamim.checkpoint import consolidate, export
from gigamim.models import SimMIM, create_model
from tests.helpers.randomize import randomize_weights
from tests.helpers import zero_checkpoints as zc


@pytest.fixture(scope="session")
def nano_ckpt(tmp_path_factory):
    return zc.nano_zero3(tmp_path_factory.getbasetemp())


def _nano_encoder():
    return create_model(zc.NANO["model"], img_size=zc.NANO["img_size"], window_size=zc.NANO["window"]).eval()


def test_encoder_export_from_checkpoint(nano_ckpt, tmp_path, capsys):
    ckpt, ref_path = nano_ckpt
    out = tmp_path / "enc.safetensors"
    assert export.main([str(ckpt), str(out), "--format", "encoder"]) == 0  # consolidated on the fly
    sd, md = export.load_export(str(out))
    ref = load_file(str(ref_path))
    want = {k[len("encoder."):]: v for k, v in ref.items() if k.startswith("encoder.") and k != "encoder.mask_token"}
    assert sorted(sd) == sorted(want) and "mask_token" not in sd
    assert all(torch.equal(sd[k], want[k]) for k in want)
    assert md["format"] == "encoder" and md["step"] == "2" and md["gigamim_version"]
    cfg = yaml.safe_load(md["gigamim_config"])
    assert cfg["model"]["name"] == zc.NANO["model"]
    # fine-tuning starts from it: a bare gigamim encoder loads it strictly
    _nano_encoder().load_state_dict(sd, strict=True)


def test_simmim_export_loads_into_gigamim_simmim(nano_ckpt, tmp_path):
    ckpt, ref_path = nano_ckpt
    consolidated = tmp_path / "full"
    assert consolidate.main([str(ckpt), str(consolidated)]) == 0
    out = tmp_path / "simmim.safetensors"
    assert export.main([str(consolidated), str(out), "--format", "simmim"]) == 0
    sd, md = export.load_export(str(out))
    assert md["format"] == "simmim" and md["step"] == "2"
    model = SimMIM(_nano_encoder())
    model.load_state_dict(sd, strict=True)
    ref = load_file(str(ref_path))
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_timm_export_loads_strictly_and_matches_forward(nano_ckpt, tmp_path, capsys):
    """nano has no timm name, but timm's SwinTransformerV2 with the printed arguments loads
    the export strictly and computes the same features as gigamim's encoder."""
    ckpt, ref_path = nano_ckpt
    out = tmp_path / "timm.safetensors"
    assert export.main([str(ckpt), str(out), "--format", "timm"]) == 0
    printed = capsys.readouterr().out
    assert "none fits" in printed and "SwinTransformerV2(" in printed
    sd, md = export.load_export(str(out))
    assert md["format"] == "timm" and md["timm_model"] == ""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    tm = SwinTransformerV2(**json.loads(md["timm_kwargs"])).eval()
    tm.load_state_dict(sd, strict=True)
    ours = _nano_encoder()
    ref = load_file(str(ref_path))  # the weights gathered in the run
    ours.load_state_dict({k[8:]: v for k, v in ref.items() if k.startswith("encoder.") and "mask_token" not in k})
    x = torch.randn(2, 3, zc.NANO["img_size"], zc.NANO["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.forward_features(x), tm.forward_features(x)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_timm_named_model_tiny_window8_256(tmp_path, capsys):
    """A SwinV2-T at 256 px / window 8 exports to exactly timm's swinv2_tiny_window8_256:
    `timm.create_model(name, num_classes=0)` loads it strictly, same forward_features."""
    torch.manual_seed(0)
    model = SimMIM(create_model("swinv2_tiny", img_size=256, window_size=8))
    randomize_weights(model, seed=3)
    src = tmp_path / "consolidated.safetensors"
    cfg = {"model": {"name": "swinv2_tiny", "img_size": 256, "window_size": 8}}
    save_file(model.state_dict(), str(src), metadata={"gigamim_config": yaml.safe_dump(cfg), "step": "7",
                                                       "format": "simmim"})
    out = tmp_path / "timm"
    assert export.main([str(src), str(out), "--format", "timm"]) == 0
    assert "timm model: swinv2_tiny_window8_256" in capsys.readouterr().out
    sd, md = export.load_export(str(out))
    assert md["timm_model"] == "swinv2_tiny_window8_256" and md["step"] == "7"
    tm = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=0).eval()
    tm.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model.encoder.eval().forward_features(x), tm.forward_features(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,img,window,expected", [
    ("swinv2_tiny", 256, 8, "swinv2_tiny_window8_256"),
    ("swinv2_small", 256, 16, "swinv2_small_window16_256"),
    ("swinv2_base", 192, 12, "swinv2_base_window12_192"),
    ("swinv2_large", 192, 12, "swinv2_large_window12_192"),
    ("swinv2_base", 192, 6, None),  # no timm model has this window
    ("swinv2_nano", 192, 6, None),
    ("swinv2_huge", 192, 12, None),
    ("swinv2_giant", 192, 12, None),
])
def test_timm_name_against_timm_registry(name, img, window, expected):
    with torch.device("meta"):  # shapes only
        enc = create_model(name, img_size=img, window_size=window).state_dict()
    got, why = export.pick_timm_name(export.swinv2_arch(enc), {"img_size": img, "window_size": window})
    assert got == expected, why


def test_timm_export_refuses_keys_timm_lacks():
    """SwinV2-H's extra main-branch norms have no timm counterpart: a clear error, no file."""
    with torch.device("meta"):
        enc = create_model("swinv2_huge").state_dict()
    kwargs = export.timm_kwargs(export.swinv2_arch(enc), {"img_size": 192, "window_size": 12})
    with pytest.raises(export.ExportError, match=r"norm3.*--format encoder"):
        export.check_timm_keys(enc, kwargs)


def test_load_export_never_unpickles(tmp_path):
    bad = tmp_path / "weights.safetensors"
    torch.save({"a": torch.zeros(2)}, bad)  # a pickle wearing a safetensors name
    with pytest.raises(export.ExportError, match="weights.safetensors"):
        export.load_export(str(bad))


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    assert export.main([str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    src = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, str(src))
    assert export.main([str(src), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "encoder." in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()
