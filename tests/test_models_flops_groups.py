"""Analytic FLOPs against torch.utils.flop_counter; parameter groups against timm's rules."""

import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay
from torch.utils.flop_counter import FlopCounterMode

from gigamim.models import SimMIM, create_model
from gigamim.models.flops import forward_flops, train_flops
from gigamim.models.param_groups import layer_decay, layer_id_map, no_weight_decay_names, param_groups


def _counted(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_simmim_forward_flops_match_flop_counter(impl):
    model = SimMIM(create_model("swinv2_nano", attn_impl=impl))
    x, mask = torch.randn(2, 3, 192, 192), torch.rand(2, 48, 48) > 0.5
    # Grad mode on purpose: under no_grad CPU SDPA dispatches to a fused kernel that
    # FlopCounterMode (torch 2.14) does not count at all.
    counted = _counted(lambda: model(x, mask))
    # The counter sees the CPB MLP once per forward: per image it is amortised over the batch.
    assert forward_flops(model, batch_size=2) * 2 == counted


def test_encoder_with_head_other_size():
    model = create_model("swinv2_tiny", img_size=128, window_size=4, num_classes=10)
    with torch.no_grad():
        counted = _counted(lambda: model(torch.randn(1, 3, 128, 128)))
    assert forward_flops(model) == counted
    # asking for another resolution follows the same window rule as construction
    assert forward_flops(model, img_size=256) > 3.9 * forward_flops(model)
    with pytest.raises(ValueError, match="stage 2 feature map 10x10 is not divisible"):
        forward_flops(model, img_size=160)  # maps 40, 20, 10, 5: window 4 does not tile 10


def test_train_flops_vs_counted_backward():
    model = SimMIM(create_model("swinv2_nano"))
    x, mask = torch.randn(1, 3, 192, 192), torch.rand(1, 48, 48) > 0.5
    counted = _counted(lambda: model(x, mask).backward())
    est = train_flops(model)
    # backward = 2x forward for every matmul, except the patch-embed conv needs no input grad
    # (the images do not require grad): the counter is a little below 3x forward.
    assert 0.97 < counted / est <= 1.0
    assert train_flops(model, recompute=True) == 4 * forward_flops(model)


def test_no_weight_decay_matches_timm_rules():
    enc = create_model("swinv2_tiny", img_size=256, window_size=8)
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=0)
    # timm: 1-D params and biases, plus the model's own list (cpb_mlp, logit_scale)
    groups = param_groups_weight_decay(ref, 0.05, no_weight_decay_list=ref.no_weight_decay())
    ref_ids = {id(p) for p in groups[0]["params"]}
    ref_names = {n for n, p in ref.named_parameters() if id(p) in ref_ids}
    assert no_weight_decay_names(enc) == ref_names
    simmim = SimMIM(enc)
    assert no_weight_decay_names(simmim) == {"encoder." + n for n in ref_names} | {
        "encoder.mask_token", "decoder.0.bias"}


def test_param_groups_and_layer_ids():
    model = SimMIM(create_model("swinv2_tiny"))
    ids = layer_id_map(model)
    assert ids["encoder.patch_embed.proj.weight"] == 0 and ids["encoder.mask_token"] == 0
    assert ids["encoder.layers.0.blocks.0.attn.qkv.weight"] == 1
    assert ids["encoder.layers.0.blocks.1.norm1.weight"] == 2
    assert ids["encoder.layers.1.downsample.reduction.weight"] == 2  # with the end of stage 0
    assert ids["encoder.layers.1.blocks.0.mlp.fc1.weight"] == 3
    assert ids["encoder.layers.2.blocks.5.attn.proj.bias"] == 10
    assert ids["encoder.layers.3.blocks.1.norm2.bias"] == 12
    assert ids["encoder.norm.weight"] == 13 and ids["decoder.0.weight"] == 13

    plain = param_groups(model, 0.05)
    assert sorted(g["group_name"] for g in plain) == ["decay", "no_decay"]
    total = sum(p.numel() for g in plain for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    assert all(g["weight_decay"] == (0.05 if g["group_name"] == "decay" else 0.0) for g in plain)

    layered = param_groups(model, 0.05, lr_scale_fn=layer_decay(0.9))
    by_name = {g["group_name"]: g for g in layered}
    assert by_name["decay_layer13"]["lr_scale"] == 1.0
    assert by_name["decay_layer0"]["lr_scale"] == pytest.approx(0.9**13)
    assert sum(len(g["params"]) for g in layered) == len(list(model.parameters()))
