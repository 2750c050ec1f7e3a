"""ViT and Swin V1 SimMIM encoders built from timm's modules.

References: timm's own models (parameter counts, keys, strict load, forward), the official
SimMIM mask-token placement rebuilt here from timm's modules, the official SimMIM layer-id
functions (written out independently below), and real DeepSpeed ZeRO-3 on 2 CPU ranks.
"""

import json
import os
import sys

import pytest
import timm
import torch

from gigamim.models import SimMIM, create_model
from gigamim.models.param_groups import layer_id_map, no_weight_decay_names, num_layer_ids
from tests.helpers.randomize import randomize_weights
from tests.launch import run_rank_script

HERE = os.path.abspath(__file__)


@pytest.mark.parametrize("name,timm_name,kw", [
    ("vit_base_patch16", "vit_base_patch16_224", {}),
    ("swin_base", "swin_base_patch4_window7_224", dict(img_size=192, window_size=6)),  # SimMIM geometry
    ("swin_base", "swin_base_patch4_window7_224", None),  # fine-tune geometry: timm's own
    ("swin_large", "swin_large_patch4_window7_224", dict(img_size=192, window_size=12)),
])
def test_parameter_counts_and_shapes_equal_timm(name, timm_name, kw):
    with torch.device("meta"):
        ours = create_model(name, **({} if kw is not None else dict(img_size=224, window_size=7)))
        ref = timm.create_model(timm_name, num_classes=0, **(kw or {}))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    # SimMIM adds exactly the mask token (embed_dim) and the decoder to the encoder
    with torch.device("meta"):
        sim = SimMIM(ours)
    s = ours.encoder_stride
    assert s == (16 if name.startswith("vit") else 32)
    extra = ours.embed_dim + ours.num_features * s * s * 3 + s * s * 3
    assert sum(p.numel() for p in sim.parameters()) == sum(p.numel() for p in ref.parameters()) + extra


def _pair(name, timm_cls_kwargs):
    torch.manual_seed(0)
    sim = randomize_weights(SimMIM(create_model(name)), seed=3).eval()
    enc = sim.encoder
    weights = {k: v for k, v in enc.state_dict().items() if k != "mask_token"}
    ref = timm_cls_kwargs().eval()
    ref.load_state_dict(weights, strict=True)  # the encoder loads strictly into timm
    return sim, ref


def test_vit_encoder_loads_into_timm_and_masks_like_official():
    from timm.models.vision_transformer import VisionTransformer

    sim, ref = _pair("vit_nano_patch16", lambda: VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4,
                                                                     num_heads=2, num_classes=0))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2)) > 0.5
    with torch.no_grad():
        # unmasked: timm's forward_features token for token
        torch.testing.assert_close(sim.encoder.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
        # masked, official VisionTransformerForSimMIM order: patch embed -> mask token -> cls + pos -> blocks
        t = ref.patch_embed(x)
        t = torch.where(mask.flatten(1)[..., None], sim.encoder.mask_token.reshape(1, 1, -1).expand_as(t), t)
        t = torch.cat([ref.cls_token.expand(2, -1, -1), t], 1) + ref.pos_embed
        t = ref.norm(ref.blocks(t))[:, 1:].reshape(2, 4, 4, 64)
        got = sim.encoder(x, mask=mask, features_only=True)
    torch.testing.assert_close(got, t, rtol=1e-5, atol=1e-5)


def test_swin_encoder_loads_into_timm_and_masks_like_official():
    from timm.models.swin_transformer import SwinTransformer

    sim, ref = _pair("swin_nano", lambda: SwinTransformer(img_size=192, embed_dim=32, depths=(2, 2, 2, 2),
                                                            num_heads=(1, 2, 4, 8), window_size=6, num_classes=0))
    x = torch.randn(2, 3, 192, 192, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, 48, 48, generator=torch.Generator().manual_seed(2)) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(sim.encoder.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
        # official SwinTransformerForSimMIM: patch embed (+ norm) -> mask token -> stages -> norm
        t = ref.patch_embed(x)
        t = torch.where(mask[..., None], sim.encoder.mask_token.reshape(1, 1, 1, -1).expand_as(t), t)
        want = ref.norm(ref.layers(t))
        got = sim.encoder(x, mask=mask, features_only=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert sim(x, mask).item() > 0


def test_timm_init_without_a_late_pass():
    """Linear layers get timm's init (trunc normal 0.02, zero bias) in their own __init__."""
    torch.manual_seed(0)
    for name in ("vit_small_patch16", "swin_tiny"):
        enc = create_model(name)
        fc1 = enc.stage_modules()[-1]
        fc1 = (fc1.mlp if name.startswith("vit") else fc1.blocks[-1].mlp).fc1
        assert abs(fc1.weight.std().item() - 0.02) < 0.002
        assert fc1.bias.abs().max() == 0
    assert torch.nn.Linear(4, 4).bias.abs().max() > 0  # the patch is gone afterwards


def _official_vit_layer(name, num_layers):  # microsoft/SimMIM utils (get_vit_layer)
    if name in ("cls_token", "mask_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def _official_swin_layer(name, num_layers, depths):  # microsoft/SimMIM utils (get_swin_layer)
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        layer_id = int(name.split(".")[1])
        block_id = name.split(".")[3]
        if block_id in ("reduction", "norm"):
            return sum(depths[: layer_id + 1])
        return sum(depths[:layer_id]) + int(block_id) + 1
    return num_layers - 1


def _timm_to_official_swin_name(n):
    # timm keeps PatchMerging at the start of stage s; the official code at the end of s - 1
    parts = n.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
        return ".".join(["layers", str(int(parts[1]) - 1), "downsample"] + parts[3:])
    return n


def test_layer_ids_match_official_simmim():
    with torch.device("meta"):
        vit = SimMIM(create_model("vit_base_patch16"))
        swin = SimMIM(create_model("swin_base"))
    ids = layer_id_map(vit)
    assert num_layer_ids(vit) == 14
    for name, i in ids.items():
        n = name[len("encoder."):] if name.startswith("encoder.") else "decoder"
        assert i == _official_vit_layer(n, 14), name
    ids = layer_id_map(swin)
    depths = (2, 2, 18, 2)
    assert num_layer_ids(swin) == 26
    for name, i in ids.items():
        n = _timm_to_official_swin_name(name[len("encoder."):]) if name.startswith("encoder.") else "decoder"
        assert i == _official_swin_layer(n, 26, depths), name
    nwd = no_weight_decay_names(vit)
    assert {"encoder.cls_token", "encoder.pos_embed", "encoder.mask_token"} <= nwd
    assert "encoder.blocks.0.attn.qkv.weight" not in nwd
    assert "encoder.layers.0.blocks.0.attn.relative_position_bias_table" in no_weight_decay_names(swin)


def test_unknown_override_lists_timm_arguments():
    with pytest.raises(ValueError, match="unknown argument"):
        create_model("vit_nano_patch16", windw_size=3)
    assert create_model("vit_nano_patch16", qkv_bias=False).blocks[0].attn.qkv.bias is None  # a timm argument


# ----------------------------------------------------------------------------- ZeRO-3, 2 CPU ranks
def _launch(tmp_path, mode, timeout):
    return run_rank_script(HERE, 2, mode, str(tmp_path), out=tmp_path, timeout=timeout)


def test_zero3_partitioned_build_equals_plain_build_and_trains(tmp_path):
    """Built under zero.Init on 2 ranks: half of each model per rank, the gathered weights equal
    a plain build with the same seed (init inside each module's __init__), and 12 ZeRO-3 SimMIM
    steps on a fixed batch lower the loss, for a small ViT and a small Swin V1."""
    for r in _launch(tmp_path, "zero3", timeout=900):
        for name, res in r.items():
            assert res["weights_equal"], (name, res)
            assert abs(res["numel_local"] - res["numel_full"] / 2) < 0.02 * res["numel_full"], (name, res)
            losses = res["losses"]
            assert all(l == l for l in losses), (name, losses)
            assert losses[-1] < 0.9 * losses[0], (name, losses)


def _worker(mode, out):
    import deepspeed

    from gigamim.models.param_groups import param_groups

    from gigamim.runtime.dist import init_distributed
    from gigamim.train.engines.deepspeed import init_comm  # DeepSpeed's comm layer; unlinks its CPU shm buffers

    init_distributed("gloo")
    init_comm()
    rank = torch.distributed.get_rank()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "gradient_clipping": 0.0}
    result = {}
    for name, kw, img, grid in [("vit_nano_patch16", {}, 64, 4),
                                ("swin_nano", dict(img_size=64, window_size=4), 64, 16)]:
        torch.manual_seed(11)
        plain = SimMIM(create_model(name, **kw)).state_dict()
        torch.manual_seed(11)
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = SimMIM(create_model(name, **kw))
        res = {}
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            res["weights_equal"] = all(torch.equal(params[k].data, plain[k]) for k in params) and \
                set(params) == set(plain)
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=2e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        # after initialize: the mask token, attached by SimMIM after the encoder's __init__,
        # is converted by the engine like any parameter created outside zero.Init
        res["numel_full"] = sum(p.ds_numel for p in model.parameters())
        res["numel_local"] = sum(p.ds_tensor.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(2, 3, img, img, generator=g)
        mask = torch.rand(2, grid, grid, generator=g) > 0.4
        losses = []
        for _ in range(12):
            loss = engine(x, mask)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        res["losses"] = losses
        result[name] = res
    (out_dir := __import__("pathlib").Path(out)).mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    from gigamim.runtime.dist import destroy_distributed
    from tests.launch import exit_now

    _worker(sys.argv[1], sys.argv[2])
    destroy_distributed()
    exit_now()
