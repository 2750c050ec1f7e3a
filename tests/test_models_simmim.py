"""SimMIM: loss and reconstruction against a hand computation, gradients reach every parameter,
bad masks are refused."""

import numpy as np
import pytest
import torch

from gigamim.models import SimMIM, create_model
from tests.helpers.randomize import randomize_weights


def _simmim(**kw):
    torch.manual_seed(0)
    return randomize_weights(SimMIM(create_model("swinv2_nano", **kw)), seed=2)


def _mask(b, grid=48, ratio=0.6, seed=0):
    # SimMIM masking: 32-px cells (8x8 patches of 4 px), expanded to the 4-px patch grid.
    g = torch.Generator().manual_seed(seed)
    cells = grid // 8
    m = torch.zeros(b, cells * cells, dtype=torch.bool)
    for i in range(b):
        m[i, torch.randperm(cells * cells, generator=g)[: int(round(ratio * cells * cells))]] = True
    return m.view(b, cells, cells).repeat_interleave(8, 1).repeat_interleave(8, 2)


def test_state_dict_keys():
    keys = set(SimMIM(create_model("swinv2_nano")).state_dict())
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias"} <= keys
    assert all(k.startswith("encoder.") or k.startswith("decoder.0.") for k in keys)


def test_reconstruction_and_loss_by_hand():
    model = _simmim().double().eval()
    enc = model.encoder
    x = torch.randn(2, 3, 192, 192, dtype=torch.float64)
    mask = _mask(2)
    with torch.no_grad():
        rec = model.reconstruct(x, mask)
        loss = model(x, mask)
        # Reference: mask token swapped in after patch embed + norm, encoder, 1x1 conv as an
        # einsum, pixel shuffle as an explicit reshape (independent of nn.PixelShuffle).
        z = enc.patch_embed(x)
        z = torch.where(mask.unsqueeze(-1), enc.mask_token.view(1, 1, 1, -1).expand_as(z), z)
        z = enc.norm(enc.layers(z))  # B, 6, 6, C
        w, b = model.decoder[0].weight[:, :, 0, 0], model.decoder[0].bias
        y = torch.einsum("bhwc,oc->bohw", z, w) + b.view(1, -1, 1, 1)  # B, 3*32*32, 6, 6
        ref = y.view(2, 3, 32, 32, 6, 6).permute(0, 1, 4, 2, 5, 3).reshape(2, 3, 192, 192)
    torch.testing.assert_close(rec, ref, rtol=0, atol=1e-10)

    # loss = sum(|x - rec| * mask_px) / (sum(mask_px) + 1e-5) / 3, computed in numpy
    xn, rn = x.numpy(), rec.numpy()
    m_px = np.kron(mask.numpy().astype(np.float64), np.ones((4, 4)))[:, None]  # B,1,192,192
    expect = (np.abs(xn - rn) * m_px).sum() / (m_px.sum() + 1e-5) / 3
    assert abs(loss.item() - expect) < 1e-10
    assert loss.item() > 0.1


def test_every_parameter_gets_a_gradient():
    model = _simmim(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 192, 192)
    model(x, _mask(2)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, missing


def test_any_bool_mask_on_patch_grid():
    model = _simmim().eval()
    x = torch.randn(1, 3, 192, 192)
    mask = torch.rand(1, 48, 48, generator=torch.Generator().manual_seed(3)) > 0.5  # not cell-aligned
    with torch.no_grad():
        assert torch.isfinite(model(x, mask))
        # no masked pixels -> zero loss (the 1e-5 keeps it finite)
        assert model(x, torch.zeros(1, 48, 48, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.zeros(1, 6, 6, dtype=torch.bool), r"mask must be bool of shape \(B, H/4, W/4\) = \(1, 48, 48\)"),
        (torch.zeros(2, 48, 48, dtype=torch.bool), r"= \(1, 48, 48\)"),
        (torch.zeros(1, 48, 48), "must be a bool tensor"),
        (None, "got None"),
    ],
)
def test_bad_mask(mask, match):
    model = SimMIM(create_model("swinv2_nano"))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 3, 192, 192), mask)


def test_bad_stride_and_image_size():
    with pytest.raises(ValueError, match="encoder_stride=16 must equal the encoder.s total reduction 32"):
        SimMIM(create_model("swinv2_nano"), encoder_stride=16)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 192, 192\)"):
        SimMIM(create_model("swinv2_nano"))(torch.zeros(1, 3, 128, 128), torch.zeros(1, 32, 32, dtype=torch.bool))


def test_bf16_model_matches_fp32():
    # The CPB table and masks are built in fp32 and cast to the weights' dtype, so a
    # bf16 model (what the DeepSpeed engine runs) stays close to fp32.
    model = _simmim().eval()
    x = torch.randn(2, 3, 192, 192)
    mask = _mask(2)
    with torch.no_grad():
        ref = model(x, mask).item()
        low = model.bfloat16()(x.bfloat16(), mask).item()
    assert abs(low - ref) / ref < 0.05


# ----------------------------------------------------------------------------- norm target
# The official SwinV2 SimMIM pretraining config normalises the target by the mean and the
# unbiased variance of its 47x47 neighbourhood (pixels outside the image do not count).
# Two independent references: a direct two-pass mean/variance over every window (numpy,
# NaN padding for the border), and summed-area tables for the full 192-px loss.


def _windowed_reference_two_pass(x: np.ndarray, k: int) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=np.nan)
    out = np.empty_like(x)
    for i in range(x.shape[2]):  # one image row at a time keeps the window view small
        win = sliding_window_view(xp[:, :, i:i + k, :], (k, k), axis=(2, 3))[:, :, 0]  # B,C,W,k,k
        mean = np.nanmean(win, axis=(-2, -1))
        var = np.nanvar(win, axis=(-2, -1), ddof=1)
        out[:, :, i, :] = (x[:, :, i, :] - mean) / np.sqrt(var + 1e-6)
    return out


def _windowed_reference_sat(x: np.ndarray, k: int) -> np.ndarray:
    """Mean / unbiased variance from summed-area tables of x and x^2."""
    pad = k // 2
    h, w = x.shape[-2:]

    def box_sum(a):
        s = np.zeros(a.shape[:-2] + (h + 1, w + 1))
        s[..., 1:, 1:] = a.cumsum(-2).cumsum(-1)
        r0, r1 = np.clip(np.arange(h) - pad, 0, h), np.clip(np.arange(h) + pad + 1, 0, h)
        c0, c1 = np.clip(np.arange(w) - pad, 0, w), np.clip(np.arange(w) + pad + 1, 0, w)
        return s[..., r1[:, None], c1] - s[..., r0[:, None], c1] - s[..., r1[:, None], c0] + s[..., r0[:, None], c0]

    n = box_sum(np.ones((h, w)))
    s1, s2 = box_sum(x), box_sum(x * x)
    mean = s1 / n
    var = np.maximum((s2 - n * mean**2) / (n - 1), 0.0)
    return (x - mean) / np.sqrt(var + 1e-6)


def test_norm_targets_equals_two_pass_windowed_statistics():
    from gigamim.models.simmim import norm_targets

    g = torch.Generator().manual_seed(5)
    # non-square, smaller than the window in one direction: every window is cut by a border
    x = torch.randn(2, 3, 40, 56, generator=g, dtype=torch.float64) * 1.7 + 0.3
    got = norm_targets(x, 47).numpy()
    want = _windowed_reference_two_pass(x.numpy(), 47)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-9
    small = norm_targets(x, 5).numpy()  # interior windows too
    assert np.abs(small - _windowed_reference_two_pass(x.numpy(), 5)).max() < 1e-9


def test_norm_target_loss_equals_official_formula_fp64():
    model = SimMIM(create_model("swinv2_nano"), norm_target=True, norm_target_patch=47)
    randomize_weights(model, seed=4)
    model = model.double().eval()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 192, 192, generator=g, dtype=torch.float64)
    x[:, :, :, 100:] = x[:, :, :, 100:] * 3.0 + 1.0  # local statistics that vary across the image
    mask = _mask(2)
    with torch.no_grad():
        loss = model(x, mask).item()
        rec = model.reconstruct(x, mask).numpy()
    target = _windowed_reference_sat(x.numpy(), 47)
    m_px = np.kron(mask.numpy().astype(np.float64), np.ones((4, 4)))[:, None]
    expect = (np.abs(target - rec) * m_px).sum() / (m_px.sum() + 1e-5) / 3
    assert abs(loss - expect) / expect < 1e-9
    # and it is a different loss from the raw-pixel one
    raw = SimMIM(create_model("swinv2_nano"))
    raw.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert abs(raw.double()(x, mask).item() - loss) / loss > 0.01


def test_norm_target_patch_must_be_odd():
    with pytest.raises(ValueError, match="norm_target_patch must be an odd"):
        SimMIM(create_model("swinv2_nano"), norm_target=True, norm_target_patch=48)


def test_stride_defaults_to_the_encoders():
    assert SimMIM(create_model("swinv2_nano")).encoder_stride == 32
