"""`gigamim import` + `from_pretrained` on files in the official layout, written from a model
of independent code with random weights, compared in fp64 with that model's outputs.

The official layouts, as the official code's ``torch.save({'model': model.state_dict()})``
writes them: SwinV2 (microsoft/Swin-Transformer ``swin_transformer_v2.py``): PatchMerging at
the end of stage i (``layers.{i}.downsample``), classifier ``head.*``, persistent
``relative_position_index`` / ``relative_coords_table`` / ``attn_mask`` buffers, SimMIM files
``encoder.``-prefixed with ``encoder.mask_token`` (1, 1, C) and ``decoder.0.*``. The model
that writes them here is timm's SwinTransformerV2 (its buffers are those of the official code;
the keys are moved back to the official places) and timm's Beit for the SimMIM ViT (keys as
the official ``vision_transformer.py``; the official ``rel_pos_bias.relative_position_index``
buffer added). The references compute the SimMIM loss the official way
(``benchmarks/reference.py``, `tests/test_models_vit_simmim._official_simmim_loss`).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from timm.models.beit import Beit
from timm.models.swin_transformer_v2 import SwinTransformerV2

from gigamim.checkpoint.official_import import OfficialImportError, import_official
from gigamim.models import SimMIM, from_pretrained
from gigamim_benchmarks.reference import ReferenceSimMIM
from tests.helpers.randomize import randomize_weights
from tests.test_models_vit_simmim import NANO, _official_simmim_loss

V2 = dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)  # swinv2_nano


def _official_swin_layout(model: nn.Module, prefix: str = "") -> dict:
    """timm SwinV2 state + its buffers -> the official key layout."""
    out = {}
    items = list(model.state_dict().items()) + [(n, b) for n, b in model.named_buffers()
                                                if not n.endswith("k_bias")]
    for k, v in items:
        if k.startswith("encoder.mask_token"):
            out[prefix + "mask_token"] = v.reshape(1, 1, -1).clone()
            continue
        if k.startswith("encoder."):
            k = k[len("encoder."):]
        elif prefix and k.startswith("decoder."):
            out[k] = v.clone()
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        k = k.replace("head.fc.", "head.")
        out[prefix + k] = v.clone()
    return out


def _rand_batch(size, grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    return x, torch.rand(2, grid, grid, generator=g) < 0.6


def test_swinv2_simmim_pretraining_file_gives_the_official_loss(tmp_path):
    ref = ReferenceSimMIM(SwinTransformerV2(num_classes=0, **V2)).double()
    randomize_weights(ref, seed=1)
    sd = _official_swin_layout(ref, prefix="encoder.")
    assert "encoder.layers.0.downsample.reduction.weight" in sd and "encoder.layers.0.blocks.1.attn_mask" in sd
    src = tmp_path / "ckpt_epoch_799.pth"
    torch.save({"model": sd}, src)
    info = import_official(str(src), str(tmp_path / "v2.safetensors"))
    assert info["model"] == {"name": "swinv2_nano", "img_size": 64, "window_size": 4} and info["simmim"]
    sim = from_pretrained(str(tmp_path / "v2.safetensors")).double()
    assert isinstance(sim, SimMIM)
    x, mask = _rand_batch(64, 16)
    # SimMIM's mask is on the model's 4-px patch grid
    ours, theirs = sim(x, mask), ref(x, mask)
    assert abs(ours.item() - theirs.item()) <= 1e-12 * abs(theirs.item())


def test_swinv2_classification_file_with_pretrained_windows_gives_the_official_logits(tmp_path):
    kw = dict(V2, window_size=4, pretrained_window_sizes=(3, 3, 3, 0))
    ref = SwinTransformerV2(num_classes=7, **kw).double().eval()
    randomize_weights(ref, seed=2)
    src = tmp_path / "ft.pth"
    torch.save({"model": _official_swin_layout(ref)}, src)
    info = import_official(str(src), str(tmp_path / "ft.safetensors"))
    assert info["model"]["pretrained_window_sizes"] == [3, 3, 3, 0] and info["num_classes"] == 7
    enc = from_pretrained(str(tmp_path / "ft.safetensors")).double().eval()
    x, _ = _rand_batch(64, 16, seed=3)
    got, want = enc(x), ref(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-12
    # another window for a recipe: SwinV2's position bias is continuous, the weights load
    from_pretrained(str(tmp_path / "ft.safetensors"), img_size=96, window_size=6)


def _beit_official_file(tmp_path, finetune: bool):
    if finetune:
        ref = Beit(num_classes=5, use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                   global_pool="avg", **NANO).double().eval()
        randomize_weights(nn.ModuleDict({"encoder": ref}), seed=4)
        sd = dict(ref.state_dict())
        for i, b in enumerate(ref.blocks):
            sd[f"blocks.{i}.attn.relative_position_index"] = b.attn.relative_position_index.clone()
        return ref, None, None, sd
    ref = Beit(num_classes=0, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
               global_pool="token", **NANO).double()
    mask_token = nn.Parameter(torch.zeros(1, 1, 64, dtype=torch.float64))
    decoder = nn.Sequential(nn.Conv2d(64, 16 * 16 * 3, 1), nn.PixelShuffle(16)).double()
    randomize_weights(nn.ModuleDict({"encoder": ref, "decoder": decoder}), seed=5)
    with torch.no_grad():
        mask_token.normal_(0, 0.5)
    sd = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
    sd["encoder.rel_pos_bias.relative_position_index"] = ref.rel_pos_bias.relative_position_index.clone()
    sd["encoder.mask_token"] = mask_token.detach().clone()
    sd.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    return ref, mask_token, decoder, sd


def test_vit_simmim_pretraining_file_gives_the_official_loss_and_refuses_another_grid(tmp_path):
    ref, mask_token, decoder, sd = _beit_official_file(tmp_path, finetune=False)
    torch.save({"model": sd}, tmp_path / "vit.pth")
    info = import_official(str(tmp_path / "vit.pth"), str(tmp_path / "vit.safetensors"))
    assert info["model"] == {"name": "vit_nano_patch16_simmim", "img_size": 64}
    sim = from_pretrained(str(tmp_path / "vit.safetensors")).double()
    x, mask = _rand_batch(64, 4, seed=6)
    want, _ = _official_simmim_loss(ref, mask_token, decoder, x, mask)
    assert abs(sim(x, mask).item() - want.item()) <= 1e-12 * abs(want.item())
    # the decoder came along: continued pretraining starts from it
    assert torch.equal(sim.decoder[0].weight, sd["decoder.0.weight"])
    ft = create_ft = None  # noqa: F841
    with pytest.raises(ValueError, match=r"relative_position_bias_table: .*4x4.*6x6"):
        from gigamim.models import create_model

        create_ft = create_model("vit_nano_patch16_simmim_ft", img_size=96, num_classes=3)
        create_ft.remap_pretrained_state({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})


def test_vit_finetuned_file_gives_the_official_logits(tmp_path):
    ref, _, _, sd = _beit_official_file(tmp_path, finetune=True)
    torch.save({"model": sd, "epoch": 99}, tmp_path / "vit_ft.pth")
    info = import_official(str(tmp_path / "vit_ft.pth"), str(tmp_path / "vit_ft.safetensors"))
    assert info["name"] == "vit_nano_patch16_simmim_ft" and info["num_classes"] == 5
    model = from_pretrained(str(tmp_path / "vit_ft.safetensors")).double().eval()
    x, _ = _rand_batch(64, 4, seed=7)
    want = ref(x)
    assert float((model(x) - want).abs().max() / want.abs().max()) < 1e-12


def test_what_cannot_be_mapped_is_one_line(tmp_path):
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(OfficialImportError, match="not an official SimMIM / Swin / SwinV2 state dict"):
        import_official(str(tmp_path / "x.pth"), str(tmp_path / "x.safetensors"))
    ref = SwinTransformerV2(num_classes=0, **dict(V2, embed_dim=48, num_heads=(1, 2, 4, 8)))
    torch.save({"model": _official_swin_layout(ref)}, tmp_path / "odd.pth")
    with pytest.raises(OfficialImportError, match="no gigamim swinv2 model has embed_dim=48"):
        import_official(str(tmp_path / "odd.pth"), str(tmp_path / "odd.safetensors"))


def test_imported_files_serve_as_finetune_weights(tmp_path):
    """`finetune.weights` reads the imported file (its metadata names the model): SwinV2 SimMIM
    pretraining -> the encoder at the fine-tuning geometry; the SimMIM ViT -> its _ft form."""
    from gigamim.train.load_encoder import build_encoder

    ref = ReferenceSimMIM(SwinTransformerV2(num_classes=0, **V2)).double()
    randomize_weights(ref, seed=8)
    torch.save({"model": _official_swin_layout(ref, prefix="encoder.")}, tmp_path / "v2.pth")
    import_official(str(tmp_path / "v2.pth"), str(tmp_path / "v2.safetensors"))
    enc, info = build_encoder(None, str(tmp_path / "v2.safetensors"), dict(img_size=96, window_size=6), num_classes=4)
    assert info["model"] == "swinv2_nano"
    assert torch.equal(enc.layers[2].blocks[1].mlp.fc1.weight, ref.encoder.layers[2].blocks[1].mlp.fc1.weight.float())
    _, _, _, sd = _beit_official_file(tmp_path, finetune=False)
    torch.save({"model": sd}, tmp_path / "vit.pth")
    import_official(str(tmp_path / "vit.pth"), str(tmp_path / "vit.safetensors"))
    vit, _ = build_encoder("vit_nano_patch16_simmim_ft", str(tmp_path / "vit.safetensors"), num_classes=4)
    table = sd["encoder.rel_pos_bias.relative_position_bias_table"].float()
    assert all(torch.equal(b.attn.relative_position_bias_table.detach(), table) for b in vit.blocks)


def test_swin_v1_simmim_and_classification_files(tmp_path):
    """microsoft/SimMIM Swin V1 files (per-block relative_position_bias_table, its index and the
    shift masks as buffers): the window is read from the tables, the image size from the masks."""
    from timm.models.swin_transformer import SwinTransformer

    v1 = dict(img_size=96, window_size=6, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
              drop_path_rate=0.0)
    ref = ReferenceSimMIM(SwinTransformer(num_classes=0, **v1)).double()
    randomize_weights(ref, seed=12)
    torch.save({"model": _official_swin_layout(ref, prefix="encoder.")}, tmp_path / "swin.pth")
    info = import_official(str(tmp_path / "swin.pth"), str(tmp_path / "swin.safetensors"))
    assert info["model"] == {"name": "swin_nano", "img_size": 96, "window_size": 6}
    sim = from_pretrained(str(tmp_path / "swin.safetensors"))
    x, mask = _rand_batch(96, 24, seed=13)
    assert abs(sim(x, mask).item() - ref(x, mask).item()) <= 1e-12 * abs(ref(x, mask).item())
    cls = SwinTransformer(num_classes=3, **v1).double().eval()
    randomize_weights(cls, seed=14)
    torch.save({"model": _official_swin_layout(cls)}, tmp_path / "swin_ft.pth")
    import_official(str(tmp_path / "swin_ft.pth"), str(tmp_path / "swin_ft.safetensors"))
    enc = from_pretrained(str(tmp_path / "swin_ft.safetensors")).eval()
    want = cls(x)
    assert float((enc(x) - want).abs().max() / want.abs().max()) < 1e-12
