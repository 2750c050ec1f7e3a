"""EXIF orientation: the decode path gives what ImageOps.exif_transpose + the same crop gives."""

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from gigamim.data.loader import SimMIMLoader
from gigamim.data.transforms import SimMIMTransform
from tests.test_data_helpers import collect, write_tar


def photo(w, h, orientation, fmt="JPEG") -> bytes:
    """An asymmetric picture (so every transpose shows) stored with an EXIF Orientation tag."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx < w // 3) * 255], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt, exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def reference(data, params, size):
    top, left, h, w, flip = params
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out, dtype=np.int16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_equals_exif_transpose_then_same_crop(orientation):
    data = photo(120, 80, orientation)
    t = SimMIMTransform(64)
    for seed in range(3):
        out, info = t.apply(data, random.Random(seed))
        top, left, h, w, _ = info["params"]
        up_w, up_h = (80, 120) if orientation >= 5 else (120, 80)
        assert top + h <= up_h and left + w <= up_w               # drawn on the upright image
        assert info["exif_transposed"] == (orientation != 1)
        assert np.array_equal(np.asarray(out, dtype=np.int16), reference(data, info["params"], 64))


def test_draft_decode_is_rotated_too():
    """Large JPEG: decoded at reduced scale (draft), still upright; sideways would differ a lot."""
    data = photo(960, 640, 6)
    out, info = SimMIMTransform(64).apply(data, random.Random(0))
    ref = reference(data, info["params"], 64)
    assert np.abs(np.asarray(out, dtype=np.int16) - ref).mean() < 4
    sideways = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64)), dtype=np.int16)
    assert np.abs(sideways - ref).mean() > 30


def test_counted_in_fix_counts(tmp_path):
    write_tar(tmp_path / "e.tar", [(f"k{o}.jpg", photo(60, 40, o)) for o in range(1, 9)])
    loader = SimMIMLoader([str(tmp_path / "e.tar")], 8, img_size=32, mask_patch_size=16, num_workers=0)
    collect(loader, 1)
    assert loader.fix_counts["exif_orientation"] == 7
