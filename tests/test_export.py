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
from gigamim.models import SimMIM, create_model, timm_compat
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
    assert "timm model: no named one" in printed and "SwinTransformerV2(" in printed
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
    got, why = timm_compat.pick_timm_name(timm_compat.swinv2_arch(enc), {"img_size": img, "window_size": window})
    assert got == expected, why


def test_timm_export_refuses_keys_timm_lacks():
    """SwinV2-H's extra main-branch norms have no timm counterpart: a clear error, no file."""
    with torch.device("meta"):
        enc = create_model("swinv2_huge").state_dict()
    kwargs = timm_compat.timm_kwargs(timm_compat.swinv2_arch(enc), {"img_size": 192, "window_size": 12})
    with pytest.raises(export.ExportError, match=r"norm3.*--format encoder"):
        timm_compat.check_timm_keys(enc, kwargs)


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


# ----------------------------------------------------------------------------- ViT / Swin V1
@pytest.mark.parametrize("name,kw,timm_path,cls_kwargs_want", [
    ("vit_nano_patch16", {}, "timm.models.vision_transformer.VisionTransformer",
     dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2)),
    ("swin_nano", dict(img_size=64, window_size=4), "timm.models.swin_transformer.SwinTransformer",
     dict(img_size=64, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4)),
])
def test_timm_export_vit_and_swin_load_strictly_same_forward(tmp_path, capsys, name, kw, timm_path, cls_kwargs_want):
    torch.manual_seed(0)
    model = randomize_weights(SimMIM(create_model(name, **kw)), seed=5).eval()
    src = tmp_path / "consolidated.safetensors"
    cfg = {"model": {"name": name, **kw}}
    save_file(model.state_dict(), str(src), metadata={"gigamim_config": yaml.safe_dump(cfg), "step": "3",
                                                       "format": "simmim"})
    out = tmp_path / "timm.safetensors"
    assert export.main([str(src), str(out), "--format", "timm"]) == 0
    assert timm_path in capsys.readouterr().out
    sd, md = export.load_export(str(out))
    kwargs = json.loads(md["timm_kwargs"])
    assert {k: kwargs[k] for k in cls_kwargs_want} == cls_kwargs_want
    module, cls = timm_path.rsplit(".", 1)
    tm = getattr(__import__(module, fromlist=[cls]), cls)(**kwargs).eval()
    tm.load_state_dict(sd, strict=True)
    img = model.encoder.img_size
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(x), tm.forward_features(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw,expected", [
    ("vit_base_patch16", {}, "vit_base_patch16_224"),
    ("vit_small_patch16", {}, "vit_small_patch16_224"),
    ("vit_base_patch16", dict(img_size=192), None),  # timm has no ViT-B/16 at 192
    ("swin_base", dict(img_size=224, window_size=7), "swin_base_patch4_window7_224"),
    ("swin_large", dict(img_size=384, window_size=12), "swin_large_patch4_window12_384"),
    ("swin_base", {}, None),  # SimMIM's 192 px / window 6: no timm name
])
def test_timm_names_vit_swin_against_timm_registry(name, kw, expected):
    with torch.device("meta"):
        enc = create_model(name, **kw).state_dict()
    from gigamim.models import model_defaults

    geo = {"img_size": kw.get("img_size", model_defaults(name)["img_size"])}
    arch = timm_compat.read_arch(enc, geo)
    got, why = timm_compat.pick_timm_name(arch, geo, enc)
    assert got == expected, why


def test_timm_export_refuses_another_family_of_keys():
    with torch.device("meta"):
        enc = create_model("swin_nano").state_dict()
    with pytest.raises(export.ExportError, match="does not load strictly into timm VisionTransformer"):
        timm_compat.check_timm_keys(enc, dict(img_size=192, embed_dim=32, depth=2, num_heads=1, num_classes=0), "vit")
