"""The official SimMIM ViT (`vit_*_patch16_simmim`, `_ft`) against an independent reference.

Reference: timm's ``Beit`` (the BEiT code base the official ``models/vision_transformer.py``
is written from: the same layer scale ``gamma_1/gamma_2``, q/v biases, the same relative
position tables and index with the three class-token entries, LayerNorm eps 1e-6, the same
key names), and, around it, the official ``VisionTransformerForSimMIM.forward`` and
``SimMIM.forward`` restated here line by line (patch embed -> mask token -> class token ->
blocks with the shared bias -> norm -> patch tokens -> 1x1 conv + PixelShuffle(16) -> L1 over
masked pixels / (count + 1e-5) / 3). Fine-tuning: the official ``remap_pretrained_keys_vit``
restated (the shared table copied into every block) and timm's ``Beit`` with per-block tables
and mean pooling + ``fc_norm``. Everything in fp64 on randomised weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Beit

from gigamim.models import SimMIM, create_model
from gigamim.models.vit_simmim import remap_pretrained_state
from tests.helpers.randomize import randomize_weights

NANO = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, init_values=0.1, drop_path_rate=0.0)


def _beit(**kw) -> Beit:
    return Beit(num_classes=kw.pop("num_classes", 0), use_abs_pos_emb=False, **NANO, **kw).double().eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach().clamp_min(1e-300))


def _official_simmim_loss(beit: Beit, mask_token, decoder, x, mask, patch=16):
    """microsoft/SimMIM VisionTransformerForSimMIM.forward + SimMIM.forward, on timm's modules."""
    t = beit.patch_embed(x)
    B, L, _ = t.shape
    w = mask.flatten(1).unsqueeze(-1).type_as(t)
    t = t * (1 - w) + mask_token.expand(B, L, -1) * w
    t = torch.cat((beit.cls_token.expand(B, -1, -1), t), dim=1)
    rel = beit.rel_pos_bias()
    for blk in beit.blocks:
        t = blk(t, shared_rel_pos_bias=rel)
    t = beit.norm(t)[:, 1:]
    side = int(L ** 0.5)
    z = t.permute(0, 2, 1).reshape(B, -1, side, side)
    rec = decoder(z)
    m = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).contiguous().type_as(rec)
    loss = (F.l1_loss(x, rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / 3
    return loss, z


def _pretrain_pair(seed=0):
    enc = create_model("vit_nano_patch16_simmim")
    sim = SimMIM(enc, encoder_stride=16).double()
    randomize_weights(sim, seed=seed)
    # the tables are zero at init: give them values, and layer scales other than 0.1
    ref = _beit(global_pool="token", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    enc_sd = {k[len("encoder."):]: v for k, v in sim.state_dict().items() if k.startswith("encoder.")}
    mask_token = enc_sd.pop("mask_token").reshape(1, 1, -1).clone().requires_grad_(True)
    missing, unexpected = ref.load_state_dict(enc_sd, strict=False)
    assert not unexpected and all("relative_position_index" in k or k.endswith("k_bias") for k in missing), missing
    decoder = nn.Sequential(nn.Conv2d(64, 16 * 16 * 3, 1), nn.PixelShuffle(16)).double()
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in sim.state_dict().items() if k.startswith("decoder.")})
    return sim, ref, mask_token, decoder


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 4, 4, generator=g) < 0.6
    return x, mask


def test_pretrain_encoder_loss_and_every_gradient_equal_official_fp64():
    sim, ref, mask_token, decoder = _pretrain_pair()
    x, mask = _batch()
    z = sim.encoder(x, mask=mask, features_only=True)  # B, h, w, C
    loss = sim(x, mask)
    loss.backward()
    ref_loss, ref_z = _official_simmim_loss(ref, mask_token, decoder, x, mask)
    ref_loss.backward()
    assert _rel(z.permute(0, 3, 1, 2), ref_z) < 1e-12
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    ref_grads = {f"encoder.{n}": p.grad for n, p in ref.named_parameters()}
    ref_grads["encoder.mask_token"] = mask_token.grad.reshape(sim.encoder.mask_token.shape)
    ref_grads.update({f"decoder.{n}": p.grad for n, p in decoder.named_parameters()})
    worst = 0.0
    for name, p in sim.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        worst = max(worst, _rel(p.grad, ref_grads[name]))
    assert worst < 1e-9, worst
    assert set(ref_grads) == {n for n, _ in sim.named_parameters()}


def _official_remap(enc_sd: dict, depth: int) -> dict:
    """microsoft/SimMIM utils.remap_pretrained_keys_vit at an unchanged patch grid."""
    out = dict(enc_sd)
    table = out.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return {k: v for k, v in out.items() if "relative_position_index" not in k}


def test_finetune_form_from_pretraining_weights_equals_official_fp64():
    sim, _, _, _ = _pretrain_pair(seed=3)
    enc_sd = {k[len("encoder."):]: v for k, v in sim.state_dict().items()
              if k.startswith("encoder.") and k != "encoder.mask_token"}
    ft = create_model("vit_nano_patch16_simmim_ft", num_classes=5).double()
    g = torch.Generator().manual_seed(4)
    head = {k: (1.0 if k == "fc_norm.weight" else 0.0) + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)
            for k, v in ft.state_dict().items() if k.startswith(("head.", "fc_norm."))}
    missing, unexpected = ft.load_state_dict({**remap_pretrained_state(enc_sd, ft), **head}, strict=False)
    assert not missing and not unexpected
    ref = _beit(num_classes=5, global_pool="avg", use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    missing, unexpected = ref.load_state_dict({**_official_remap(enc_sd, 4), **head}, strict=False)
    # the official load is strict=False: the pretraining norm is left out (mean pooling + fc_norm)
    assert set(unexpected) == {"norm.weight", "norm.bias"} and all("relative_position_index" in k or k.endswith("k_bias") for k in missing), missing
    x, _ = _batch(5)
    ft.eval()
    logits, ref_logits = ft(x), ref(x)
    assert _rel(logits, ref_logits) < 1e-12
    logits.square().sum().backward()
    ref_logits.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    worst = max(_rel(p.grad, ref_grads[n].grad) for n, p in ft.named_parameters())
    assert worst < 1e-9, worst
    # the remapped per-block tables came from the shared one
    t = enc_sd["rel_pos_bias.relative_position_bias_table"]
    assert all(torch.equal(b.attn.relative_position_bias_table.detach(), t) for b in ft.blocks)


def test_remap_refuses_another_patch_grid_in_one_line():
    enc = create_model("vit_nano_patch16_simmim")
    sd = {k: v for k, v in enc.state_dict().items()}
    ft = create_model("vit_nano_patch16_simmim_ft", img_size=96, num_classes=5)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.relative_position_bias_table: .*4x4.*6x6"):
        remap_pretrained_state(sd, ft)


def test_official_init_values_and_layout():
    """The official defaults: layer scale 0.1, no absolute position embedding, zero tables,
    LayerNorm eps 1e-6, q/v biases and a bias-free qkv, fix_init_weight's rescale, head x 0.001."""
    torch.manual_seed(0)
    enc = create_model("vit_base_patch16_simmim")
    assert enc.pos_embed is None and enc.fc_norm is None and isinstance(enc.norm, nn.LayerNorm)
    assert enc.norm.eps == 1e-6 and enc.blocks[0].norm1.eps == 1e-6
    assert sum(p.numel() for p in enc.parameters()) == sum(
        p.numel() for p in Beit(img_size=224, embed_dim=768, depth=12, num_heads=12, num_classes=0, init_values=0.1,
                                use_abs_pos_emb=False, use_shared_rel_pos_bias=True, global_pool="token").parameters())
    assert torch.all(enc.blocks[5].gamma_1 == 0.1) and torch.all(enc.blocks[5].gamma_2 == 0.1)
    assert torch.all(enc.rel_pos_bias.relative_position_bias_table == 0)
    assert enc.blocks[0].attn.qkv.bias is None and torch.all(enc.blocks[0].attn.q_bias == 0)
    # pretraining encoder: trunc normal std .02 cut at +-.02 (VisionTransformerForSimMIM._trunc_normal_)
    w = enc.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 and 0.008 < w.std() < 0.012
    # fix_init_weight: proj / fc2 of block i (1-based) divided by sqrt(2 i)
    r = float(enc.blocks[0].mlp.fc2.weight.std() / enc.blocks[7].mlp.fc2.weight.std())
    assert r == pytest.approx((2 * 8) ** 0.5 / 2 ** 0.5, rel=0.05)
    ft = create_model("vit_base_patch16_simmim_ft", num_classes=1000)
    assert ft.rel_pos_bias is None and isinstance(ft.norm, nn.Identity) and ft.fc_norm.eps == 1e-6
    assert ft.blocks[0].attn.relative_position_bias_table.shape == (27 * 27 + 3, 12)
    assert float(ft.head.weight.std()) == pytest.approx(0.02 * 0.001, rel=0.1)  # init_scale


def test_partitioned_build_holds_the_same_init(tmp_path):
    """Built under deepspeed.zero.Init (1 CPU rank), each module initialises its own weights
    before it is partitioned: gathered, they equal a plain build's from the same seed; no buffer
    is floating point (zero.Init would cast it); a meta-device build re-initialises."""
    import os

    import deepspeed
    import torch.distributed as dist

    from gigamim.models.init import meta_init_problem, reset_after_meta

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    for k, v in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for name in ("vit_nano_patch16_simmim", "vit_nano_patch16_simmim_ft"):
            torch.manual_seed(7)
            plain = create_model(name, num_classes=3)
            torch.manual_seed(7)
            # dtype comes from the config (a dtype= argument is ignored on CPU: bf16)
            with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "bf16": {"enabled": False},
                                                          "zero_optimization": {"stage": 3}}):
                part = create_model(name, num_classes=3)
            assert all(hasattr(p, "ds_id") for p in part.parameters())
            with deepspeed.zero.GatheredParameters(list(part.parameters())):
                got = {n: p.detach().clone() for n, p in part.named_parameters()}
            for n, p in plain.named_parameters():
                assert torch.equal(got[n], p.detach()), n
            assert all(not b.is_floating_point() for b in part.buffers())
            with torch.device("meta"):
                meta = create_model(name, num_classes=3)
            assert meta_init_problem(meta) is None
            meta.to_empty(device="cpu")
            reset_after_meta(meta)
            for n, b in plain.named_buffers():
                assert torch.equal(dict(meta.named_buffers())[n], b), n
            assert torch.all(meta.blocks[1].gamma_1 == 0.1)
    finally:
        if started:
            dist.destroy_process_group()


def test_finetune_weights_from_a_pretraining_checkpoint_load_through_build_encoder(tmp_path):
    """`finetune.weights` = a SimMIM pretraining file of vit_*_simmim builds the _ft form with
    the shared table in every block (the official remap), the pretraining norm left out."""
    import yaml
    from safetensors.torch import save_file

    from gigamim.train.load_encoder import build_encoder

    torch.manual_seed(0)
    sim = SimMIM(create_model("vit_nano_patch16_simmim"), encoder_stride=16)
    randomize_weights(sim, seed=2)
    path = tmp_path / "pre.safetensors"
    save_file(sim.state_dict(), str(path), metadata={"format": "simmim", "gigamim_config": yaml.safe_dump(
        {"model": {"name": "vit_nano_patch16_simmim", "img_size": 64}})})
    enc, info = build_encoder("vit_nano_patch16_simmim_ft", str(path), num_classes=7)
    table = sim.encoder.rel_pos_bias.relative_position_bias_table.detach()
    assert all(torch.equal(b.attn.relative_position_bias_table.detach(), table) for b in enc.blocks)
    assert torch.equal(enc.blocks[2].mlp.fc1.weight.detach(), sim.encoder.blocks[2].mlp.fc1.weight.detach())


def test_weight_decay_groups_follow_the_official_optimizer():
    """microsoft/SimMIM optimizer.py: no decay for 1-D parameters, names ending in .bias and the
    model's no_weight_decay() ({'pos_embed', 'cls_token'}, 'encoder.'-prefixed under SimMIM);
    the ViT defines no keywords, so its relative position tables and mask token are decayed."""
    from gigamim.models.param_groups import param_groups

    for sim in (SimMIM(create_model("vit_nano_patch16_simmim"), encoder_stride=16),
                create_model("vit_nano_patch16_simmim_ft", num_classes=3)):
        prefix = "encoder." if isinstance(sim, SimMIM) else ""
        skip = {prefix + "pos_embed", prefix + "cls_token"}
        names = {id(p): n for n, p in sim.named_parameters()}
        official = {n for n, p in sim.named_parameters()
                    if n != prefix + "mask_token" and (p.ndim == 1 or n.endswith(".bias") or n in skip)}
        got = {names[id(p)] for g in param_groups(sim, 0.05) if g["weight_decay"] == 0 for p in g["params"]}
        assert got == official
        assert any("relative_position_bias_table" in n for n in names.values())


def test_probe_features_of_an_intermediate_block_use_the_shared_bias():
    """The probe's block-k features (the paper's protocol: block 8, patch tokens averaged, no
    final norm) equal timm's Beit run through k blocks with the shared bias."""
    from gigamim.train.probe import stage_features

    sim, ref, _, _ = _pretrain_pair(seed=9)
    x, _ = _batch(10)
    with torch.no_grad():
        got = stage_features(sim.encoder, x, stage=1)
        t = torch.cat((ref.cls_token.expand(3, -1, -1), ref.patch_embed(x)), dim=1)
        rel = ref.rel_pos_bias()
        for blk in ref.blocks[:2]:
            t = blk(t, shared_rel_pos_bias=rel)
        want = t[:, 1:].mean(1)
    assert _rel(got, want) < 1e-12


def test_timm_equivalent_is_timm_beit_with_the_same_keys_and_logits():
    """The fine-tuning export names timm's Beit: the state dict loads strictly, logits agree."""
    ft = create_model("vit_nano_patch16_simmim_ft", num_classes=6).double().eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    family, kwargs = ft.timm_equivalent()
    assert family == "beit"
    ref = Beit(**kwargs).double().eval()
    ref.load_state_dict(ft.state_dict(), strict=True)
    x, _ = _batch(12)
    assert _rel(ft(x), ref(x)) < 1e-12


def test_timm_export_of_bare_weights_is_one_line(tmp_path, capsys):
    """`gigamim export --format timm` of SimMIM-ViT weights: the module's Beit flags are not in a
    weights file, so it refuses in one line (exit 2) instead of a KeyError traceback."""
    import yaml

    from gigamim.checkpoint import safetensors_io
    from gigamim.checkpoint.export import main as export_main
    from gigamim.models import SimMIM, create_model

    sd = {k: v.detach() for k, v in SimMIM(create_model("vit_nano_patch16_simmim")).state_dict().items()}
    src = tmp_path / "w.safetensors"
    meta = {"format": "consolidated", "step": "1",
            "gigamim_config": yaml.safe_dump({"model": {"name": "vit_nano_patch16_simmim", "img_size": 64}})}
    safetensors_io.save(str(src), sd, meta, max_shard_size=None, dtype=torch.float32, overwrite=True)
    assert export_main([str(src), str(tmp_path / "o.safetensors"), "--format", "timm"]) == 2
    err = capsys.readouterr()
    assert "--format encoder or simmim" in err.out + err.err and "Traceback" not in err.out + err.err
