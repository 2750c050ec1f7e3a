"""Transforms and masks against independent references (torchvision, formulas)."""

import io
import math
import random

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, Normalize

from gigamim.data.masking import MaskGenerator
from gigamim.data.seeding import sample_rng
from gigamim.data.transforms import SimMIMTransform, normalize_on_device, rrc_params
from tests.test_data_helpers import image_bytes


@pytest.mark.parametrize("size,mpatch,ratio", [(192, 32, 0.6), (64, 32, 0.6), (224, 32, 0.75)])
def test_mask_counts_and_blocks(size, mpatch, ratio):
    gen = MaskGenerator(size, mpatch, 4, ratio)
    mask = gen(random.Random(0))
    side = size // 4
    assert mask.shape == (side, side) and mask.dtype == bool
    cells = (size // mpatch) ** 2
    scale = mpatch // 4
    assert mask.sum() == math.ceil(cells * ratio) * scale * scale   # SimMIM: 192 -> 22 of 36 cells
    blocks = mask.reshape(size // mpatch, scale, size // mpatch, scale)
    assert (blocks == blocks[:, :1, :, :1]).all()                 # constant on each 32-px cell
    assert (gen(random.Random(5)) == gen(random.Random(5))).all()


def test_mask_rejects_bad_sizes():
    with pytest.raises(ValueError, match="mask_patch_size=30"):
        MaskGenerator(192, 30, 4)


def test_rrc_params_ranges():
    rng = random.Random(1)
    for _ in range(300):
        top, left, h, w = rrc_params(200, 150, rng)
        assert 0 <= top and top + h <= 150 and 0 <= left and left + w <= 200
        frac = h * w / (200 * 150)
        assert 0.6 <= frac <= 1.0 + 1e-9


def test_crop_matches_torchvision_resized_crop():
    data = image_bytes(96, 80, seed=3)
    t = SimMIMTransform(64)
    for s in range(6):
        out, info = t(data, sample_rng("x", s))
        top, left, h, w, flip = info["params"]
        ref = TF.resized_crop(Image.open(io.BytesIO(data)).convert("RGB"), top, left, h, w, [64, 64],
                              InterpolationMode.BILINEAR, antialias=True)
        if flip:
            ref = TF.hflip(ref)
        ref = TF.pil_to_tensor(ref)
        assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
        # resize(box=) may use pixels just outside the box at the border; interior is identical.
        assert (out.float() - ref.float()).abs().mean() < 1.0
        assert (out[:, 4:-4, 4:-4].float() - ref[:, 4:-4, 4:-4].float()).abs().max() <= 1


def test_draft_path_close_to_full_decode():
    data = image_bytes(800, 640, seed=2, quality=95)
    a, _ = SimMIMTransform(96, use_draft=True)(data, sample_rng(1))
    b, _ = SimMIMTransform(96, use_draft=False)(data, sample_rng(1))
    assert (a.float() - b.float()).abs().mean() < 6.0


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "I;16", "LA", "1"])
def test_modes_become_rgb(mode):
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out, info = SimMIMTransform(32)(image_bytes(48, 40, mode=mode, fmt=fmt), sample_rng(0))
    assert out.shape == (3, 32, 32) and info["converted"]


def test_16bit_scaled_not_clipped():
    out, _ = SimMIMTransform(32, scale=(1, 1), ratio=(1, 1))(image_bytes(32, 32, mode="I;16", fmt="PNG"), sample_rng(0))
    assert 0 < out.float().mean() < 250   # PIL's plain convert would give all-white


def test_normalize_on_device_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x.float() / 255)
    got = normalize_on_device(x, "cpu", torch.float32)
    assert torch.allclose(got, ref, atol=1e-5)
    assert normalize_on_device(x, "cpu", torch.bfloat16).dtype == torch.bfloat16
