"""A newcomer's photo folder from real photographs: scikit-image's and scikit-learn's bundled
sample images (the files as they ship, plus the formats a phone or a scanner folder holds: RGBA,
greyscale, 16-bit, 1-bit, CMYK and EXIF-rotated JPEG), as `photos/{train,val}/<class>/`, and a
note file that is not an image. Two classes, 12 photos each (9 train, 3 val).

    python -m tests.helpers.photos OUT      # writes OUT/photos/...
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

# class -> (train files, val files); names are skimage.data's files unless marked sklearn:
OBJECTS = (["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "coins.png", "horse.png",
            "logo.png", "sklearn:china.jpg"], ["sklearn:flower.jpg", "motorcycle_left.png", "moon.png"])
TEXTURES = (["brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "chessboard_RGB.png",
             "color.png", "cell.png", "microaneurysms.png"], ["ihc.png", "page.png", "text.png"])
CLASSES = {"objects": OBJECTS, "textures": TEXTURES}


def _source(name: str) -> Path:
    if name.startswith("sklearn:"):
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / name.split(":", 1)[1]
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def _write(src: Path, dst_dir: Path) -> str:
    """Copy `src` into `dst_dir`, some in another format; returns what was written."""
    from PIL import Image

    stem = src.stem
    if stem == "chelsea":
        # A phone photo: pixels stored sideways, EXIF orientation 6 says "rotate 90 clockwise to view".
        img = Image.open(src).convert("RGB").transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(dst_dir / "chelsea_phone.jpg", quality=92, exif=exif)
        return "EXIF-rotated JPEG"
    if stem == "coffee":
        Image.open(src).convert("CMYK").save(dst_dir / "coffee_cmyk.jpg", quality=92)
        return "CMYK JPEG"
    if stem == "coins":
        import numpy as np

        grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(dst_dir / "coins_16bit.png")  # mode I;16
        return "16-bit PNG"
    if stem == "horse":
        Image.open(src).convert("1").save(dst_dir / "horse_1bit.png")
        return "1-bit PNG"
    shutil.copyfile(src, dst_dir / src.name)
    with Image.open(src) as im:
        return f"{im.format} {im.mode}"


def write_photos(root: str | os.PathLike) -> dict[str, str]:
    """Write `root/photos/{train,val}/<class>/...` and a note; returns {relative path: format}."""
    root = Path(root)
    written = {}
    for cls, splits in CLASSES.items():
        for split, names in zip(("train", "val"), splits):
            folder = root / "photos" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                written[f"{split}/{cls}/{name}"] = _write(_source(name), folder)
    (root / "photos" / "train" / "objects" / "notes.txt").write_text("camera roll, sorted by hand\n")
    return written


if __name__ == "__main__":
    for path, kind in write_photos(sys.argv[1]).items():
        print(f"{path}: {kind}")
