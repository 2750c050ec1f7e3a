"""Window attention paths: the shift mask reaches SDPA broadcast over the images (never
gathered per window), and explicit / SDPA / sequential outputs and gradients equal a plain
fp64 reference written here (cosine attention, clamped per-head temperature, CPB bias, one
mask per window looked up the naive way, window i -> mask i % nW)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gigamim.models import create_model
from gigamim.models.attention import WindowAttention


def test_sdpa_gets_mask_broadcast_over_images(monkeypatch):
    torch.manual_seed(0)
    batch = 4
    model = create_model("swinv2_nano", img_size=192, attn_impl="sdpa").eval()
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(attn_mask.shape), attn_mask.stride()))
        return real(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)  # restored after the test
    with torch.no_grad():
        model(torch.randn(batch, 3, 192, 192), features_only=True)
    monkeypatch.undo()

    blocks = model.blocks()
    assert len(calls) == len(blocks)
    shifted = 0
    for blk, (q_shape, m_shape, m_stride) in zip(blocks, calls):
        side, ws = blk.resolution[0], blk.window_size[0]
        nw, heads, n = (side // ws) ** 2, blk.attn.num_heads, ws * ws
        assert len(m_shape) == 4 and m_shape[-2:] == (n, n)
        # Leading (batch) dim broadcast: one copy of the mask for all images.
        assert m_shape[0] == 1 or m_stride[0] == 0, (blk.shift_size, m_shape, m_stride)
        if any(blk.shift_size):
            shifted += 1
            # One distinct mask per window of an image (and per head), not per window of the batch.
            assert m_shape[1] == nw * heads
            assert q_shape == (batch, nw * heads, n, blk.attn.dim // heads)
    assert shifted == 3  # nano at 192 px: stages 0-2 have a shifted block each


def _reference(attn: WindowAttention, x: torch.Tensor, mask):
    """Plain SwinV2 window attention from the paper / official code, per-window mask by index."""
    wh, ww = attn.window_size
    n, heads = wh * ww, attn.num_heads
    bw, _, c = x.shape
    # CPB inputs: offsets scaled to [-8, 8] (by the window itself: no pretrained window), log-spaced;
    # in fp32 as the official code and timm build this table (a float32 buffer), then cast.
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float32) / (wh - 1)
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float32) / (ww - 1)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), -1).reshape(-1, 2) * 8
    table = (torch.sign(table) * torch.log2(table.abs() + 1) / math.log2(8)).to(x.dtype)
    mlp = F.linear(F.relu(F.linear(table, attn.cpb_mlp[0].weight, attn.cpb_mlp[0].bias)), attn.cpb_mlp[2].weight)
    bias = torch.empty(heads, n, n, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            ri, rj = i // ww - j // ww, i % ww - j % ww
            bias[:, i, j] = 16 * torch.sigmoid(mlp[(ri + wh - 1) * (2 * ww - 1) + rj + ww - 1])
    qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(bw, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    scores = scores * torch.clamp(attn.logit_scale, max=math.log(100.0)).exp() + bias
    if mask is not None:
        per_window = torch.stack([mask[i % mask.shape[0]] for i in range(bw)])  # (bw, N, N)
        scores = scores + per_window[:, None]
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("impl,sequential,chunk", [
    ("explicit", False, 32),
    ("sdpa", False, 32),
    ("explicit", True, 3),   # chunk < windows per image, not a divisor: runs inside one image
    ("sdpa", True, 20),      # chunk > windows per image: rounded down to whole images
    ("explicit", True, 100),  # one chunk holds the batch
])
@pytest.mark.parametrize("shifted", [True, False])
def test_paths_equal_plain_reference_fp64(impl, sequential, chunk, shifted):
    torch.manual_seed(0)
    batch, side, ws, dim, heads = 2, 16, 4, 32, 4
    nw, n = (side // ws) ** 2, ws * ws
    attn = WindowAttention(dim, (ws, ws), heads, impl=impl, sequential=sequential, chunk=chunk).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        attn.logit_scale.copy_(torch.tensor([0.5, 2.0, 5.0, 6.0]).view(heads, 1, 1))  # 5, 6 > log(100): clamped
    # A different random 0/-100 pattern per window of an image: any window -> mask mix-up shows.
    mask = (torch.rand(nw, n, n) > 0.7).double() * -100.0 if shifted else None
    x = torch.randn(batch * nw, n, dim, dtype=torch.float64)

    def run(fn):
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        return out.detach(), xi.grad, {k: p.grad for k, p in attn.named_parameters()}

    ref = run(lambda xi: _reference(attn, xi, mask))
    got = run(lambda xi: attn(xi, mask=mask))
    # fp64 rounding only (outputs are O(10) here; a real slip, e.g. an fp64 CPB table, is ~1e-6).
    tol = dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, **tol, msg=lambda m: f"{name}: {m}")
    assert attn.logit_scale.grad[2:].abs().max() == 0  # clamped heads get no gradient


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_autocast_bf16_keeps_attention_tensors_bf16(monkeypatch, impl):
    """Under autocast bf16 (fp32 weights) q, k, v, the cosine operands and the core's output
    are bf16 (the old fp32 q/v bias add promoted them all to fp32); the CPB sigmoid ran in fp32
    on the small table before the gather."""
    import gigamim.models.attention as A

    seen = {}
    real_attend, real_norm = A._attend, A.cosine_normalize

    def attend(q, k, v, logit_scale, bias, mask, *rest):
        seen.setdefault("qkv", set()).update({q.dtype, k.dtype, v.dtype})
        seen.setdefault("bias", set()).add(bias.dtype)
        out = real_attend(q, k, v, logit_scale, bias, mask, *rest)
        seen.setdefault("out", set()).add(out.dtype)
        return out

    def norm(q, k, *rest):
        qo, ko = real_norm(q, k, *rest)
        seen.setdefault("cosine", set()).update({qo.dtype, ko.dtype})
        return qo, ko

    monkeypatch.setattr(A, "_attend", attend)
    monkeypatch.setattr(A, "cosine_normalize", norm)
    model = create_model("swinv2_nano", img_size=64, window_size=4, attn_impl=impl).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 64, 64), features_only=True).float().sum().backward()
    assert seen["qkv"] == {torch.bfloat16} and seen["cosine"] == {torch.bfloat16} and seen["out"] == {torch.bfloat16}
    assert seen["bias"] == {torch.float32}  # cast to the scores' dtype inside the core only
    assert next(model.parameters()).grad.dtype == torch.float32


def test_shift_mask_is_minus_inf_and_matches_official_regions():
    """The official code's region labelling (written here independently), -inf across regions."""
    from gigamim.models.swinv2 import shift_mask

    h = w = 8
    ws, s = 4, 2
    img = torch.zeros(h, w)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[hs, wsl] = cnt
            cnt += 1
    win = img.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    official = (win.unsqueeze(1) - win.unsqueeze(2)) != 0
    got = shift_mask(h, w, (ws, ws), (s, s))
    assert torch.equal(torch.isinf(got), official)
    assert (got[official] == float("-inf")).all() and (got[~official] == 0).all()


def _mem_efficient_layout(real):
    """SDPA returning its true values in the layout of CUDA's memory-efficient kernel (the only
    fused kernel that takes a float mask): (B, H, N, D) as a transposed view of a (B, N, H, D)
    buffer. CPU's math kernel returns a contiguous tensor and hid a `.view` on the output."""
    def sdpa(q, k, v, attn_mask=None, *args, **kwargs):
        out = real(q, k, v, attn_mask, *args, **kwargs)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        assert not out.is_contiguous() or out.shape[1] == 1 or out.shape[2] == 1
        return out
    return sdpa


@pytest.mark.parametrize("sequential", [False, True])
def test_sdpa_under_cuda_output_layout_equals_explicit_fp64(monkeypatch, sequential):
    """swinv2 with attn_impl=sdpa, its SDPA answering in the memory-efficient kernel's strides,
    equals the explicit path in fp64: forward and every gradient (shifted blocks included)."""
    from tests.helpers.randomize import randomize_weights

    kw = dict(img_size=64, window_size=4, drop_path_rate=0.0)
    if sequential:
        kw.update(sequential_stages=(0, 1, 2, 3), attn_chunk=32)  # 2 images per chunk
    explicit = randomize_weights(create_model("swinv2_nano", attn_impl="explicit", **kw).double(), seed=3)
    sdpa = create_model("swinv2_nano", attn_impl="sdpa", **kw).double()
    sdpa.load_state_dict(explicit.state_dict())
    monkeypatch.setattr(F, "scaled_dot_product_attention", _mem_efficient_layout(F.scaled_dot_product_attention))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def run(model):
        out = model(x, features_only=True)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        return out.detach(), {k: p.grad for k, p in model.named_parameters()}

    want, got = run(explicit), run(sdpa)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
