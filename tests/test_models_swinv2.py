"""SwinV2 encoder: timm equivalence, parameter counts, attention paths, checkpointing, errors.

References: timm's SwinTransformerV2 (weights loaded strictly, fp64 forward), published
parameter counts, the explicit attention path for SDPA/sequential, and the non-checkpointed
model for checkpointing. Weights are randomised first (the official init zeroes the
res-post-norms, which would make most comparisons vacuous).
"""

import pytest
import timm
import torch

from gigamim.models import create_model, list_models
from tests.helpers.randomize import randomize_weights

VARIANTS = ["swinv2_nano", "swinv2_tiny", "swinv2_small", "swinv2_base", "swinv2_large", "swinv2_huge", "swinv2_giant"]


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_list_models():
    # SwinV2 first, smallest to largest; other families (ViT, Swin V1) are registered after them.
    assert list_models()[: len(VARIANTS)] == VARIANTS


@pytest.mark.parametrize(
    "name,timm_name",
    [
        ("swinv2_tiny", "swinv2_tiny_window8_256"),
        ("swinv2_small", "swinv2_small_window8_256"),
        ("swinv2_base", "swinv2_base_window8_256"),
        ("swinv2_large", "swinv2_large_window12to16_192to256"),
    ],
)
def test_encoder_param_counts_equal_timm(name, timm_name):
    ours = _meta(name)
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
    assert _count(ours) == _count(ref)
    # Same keys and shapes, so checkpoints move between the two.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_published_counts_huge_giant():
    # DESIGN.md: timm encoder-only T/S/B/L; paper: H ~658M with a 1k head, G ~3.0B.
    assert _count(_meta("swinv2_tiny")) == 27_578_154
    huge = _count(_meta("swinv2_huge"))
    assert abs(huge - 655e6) / 655e6 < 0.01, huge
    assert 2.99e9 <= _count(_meta("swinv2_giant")) <= 3.01e9
    # huge/giant: a main-branch norm after every 6th block of a stage, nowhere else.
    keys = _meta("swinv2_giant").state_dict().keys()
    extra = {k for k in keys if ".norm3." in k and k.endswith("weight")}
    assert extra == {f"layers.2.blocks.{j}.norm3.weight" for j in (5, 11, 17, 23, 29, 35, 41)}
    assert not any(".norm3." in k for k in _meta("swinv2_large").state_dict())


@pytest.mark.parametrize(
    "name,timm_name,kw",
    [
        ("swinv2_tiny", "swinv2_tiny_window8_256", dict(img_size=256, window_size=8)),
        # base at the SimMIM geometry (192/w12), shallower stage 2 to stay fast (shapes unchanged),
        # with pretrained windows so the CPB coordinate rescaling is exercised too.
        (
            "swinv2_base",
            "swinv2_base_window12_192",
            dict(img_size=192, window_size=12, depths=(2, 2, 4, 2), pretrained_window_sizes=(8, 8, 6, 6)),
        ),
    ],
)
def test_forward_features_equal_timm_fp64(name, timm_name, kw):
    torch.manual_seed(0)
    ours = randomize_weights(create_model(name, **kw), seed=1).double().eval()
    timm_kw = {k: v for k, v in kw.items() if k in ("depths", "pretrained_window_sizes")}
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kw).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, kw["img_size"], kw["img_size"], dtype=torch.float64)
    with torch.no_grad():
        a, b = ours.forward_features(x), ref.forward_features(x)
    assert a.shape == (1, kw["img_size"] // 32, kw["img_size"] // 32, ours.num_features)
    assert a.abs().mean() > 0.1  # non-trivial output
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _small(**kw):
    # nano at 128 px / window 4: maps 32, 16, 8, 4, so stages 0-2 have shifted windows and
    # many windows per image (stage 0: 64) exercise the chunking.
    base = dict(img_size=128, window_size=4, drop_path_rate=0.0)
    base.update(kw)
    return create_model("swinv2_nano", **base)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model.forward_features(x)
    # A weighted sum so that every output element matters for the gradient.
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad


def _assert_same(run_a, run_b, atol):
    (oa, ga, xa), (ob, gb, xb) = run_a, run_b
    torch.testing.assert_close(oa, ob, rtol=0, atol=atol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(xa, xb, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def ref_weights():
    return randomize_weights(_small(), seed=3).double().state_dict()


def _run(ref_weights, x, seed=0, **kw):
    model = _small(**kw).double()
    model.load_state_dict(ref_weights)
    model.train()
    torch.manual_seed(seed)  # drop-path draws happen in forward: same seed, same draws
    return _grads(model, x)


@pytest.fixture(scope="module")
def x128():
    return torch.randn(2, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def test_sdpa_equals_explicit_fp64(ref_weights, x128):
    _assert_same(_run(ref_weights, x128), _run(ref_weights, x128, attn_impl="sdpa"), atol=1e-10)


@pytest.mark.parametrize("impl,chunk", [("explicit", 3), ("explicit", 16), ("sdpa", 5)])
def test_sequential_equals_batched_fp64(ref_weights, x128, impl, chunk):
    # chunk 3 does not divide the 64 windows of an image in stage 0: runs of windows inside
    # one image with a ragged last run, each using its slice of the shift mask.
    batched = _run(ref_weights, x128, attn_impl=impl)
    seq = _run(ref_weights, x128, attn_impl=impl, sequential_stages=(0, 1, 2), attn_chunk=chunk)
    _assert_same(batched, seq, atol=1e-12)


@pytest.mark.parametrize(
    "ckpt,offload",
    [(True, False), (2, False), ([0, 2], False), (True, True)],
)
def test_checkpointing_same_grads_with_drop_path(ref_weights, x128, ckpt, offload):
    def run(**kw):
        return _run(ref_weights, x128, seed=1234, drop_path_rate=0.3, **kw)

    plain = run()
    ckpt_run = run(grad_checkpointing=ckpt, checkpoint_offload=offload, sequential_stages=(1,), attn_chunk=4)
    _assert_same(plain, ckpt_run, atol=1e-12)
    # drop path really was active: a different seed gives a different output
    other = _run(ref_weights, x128, seed=99, drop_path_rate=0.3)
    assert (other[0] - plain[0]).abs().max() > 1e-3


def test_checkpoint_plan():
    m = _meta("swinv2_tiny", grad_checkpointing=2)
    assert [b.checkpointed for b in m.blocks()] == [i % 2 == 0 for i in range(12)]
    m.set_grad_checkpointing([2])
    assert [b.checkpointed for b in m.blocks()] == [False] * 4 + [True] * 6 + [False] * 2
    m.set_grad_checkpointing(True)
    assert all(b.checkpointed for b in m.blocks())


def test_windows_shrink_and_shift():
    m = _meta("swinv2_base")  # 192 px, window 12: maps 48, 24, 12, 6
    assert m.window_sizes == (12, 12, 12, 6) and m.shift_sizes == (6, 6, 0, 0)
    blk = m.layers[1].blocks[1]
    assert blk.shift_size == (6, 6) and m.layers[2].blocks[1].shift_size == (0, 0)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("swinv2_tinyy", {}, "known models: swinv2_nano, swinv2_tiny"),
        ("swinv2_tiny", dict(img_size=200), "img_size=200 must be divisible by 32"),
        ("swinv2_tiny", dict(img_size=0), "img_size=0 must be a positive integer"),
        ("swinv2_tiny", dict(num_heads=(3, 6)), r"num_heads \(3, 6\) must have one entry per stage \(4\)"),
        ("swinv2_tiny", dict(img_size=224, window_size=12), "stage 0 feature map 56x56 is not divisible"),
        ("swinv2_tiny", dict(windowsize=8), "unknown argument"),
        ("swinv2_tiny", dict(attn_impl="flash"), "attn_impl='flash'"),
        ("swinv2_tiny", dict(sequential_stages=(4,)), "sequential_stages"),
        ("swinv2_tiny", dict(grad_checkpointing=[7]), "stage ids"),
    ],
)
def test_bad_arguments(name, kw, match):
    with pytest.raises(ValueError, match=match):
        _meta(name, **kw)


def test_wrong_input_size():
    m = _small()
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 128, 128\)"):
        m.forward_features(torch.zeros(1, 3, 192, 192))


def test_meta_construction_giant_has_no_storage():
    m = _meta("swinv2_giant", img_size=384, window_size=12)
    assert all(p.is_meta for p in m.parameters())
    # Geometry only, integer and non-persistent: nothing zero.Init / .bfloat16() casts, nothing saved.
    bufs = dict(m.named_buffers())
    assert bufs and all(not b.is_floating_point() for b in bufs.values())
    assert not set(bufs) & set(m.state_dict())
