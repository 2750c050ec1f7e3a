"""make-shards accounts for every file; labelled shards feed labels and the ClassificationLoader."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, features

from gigamim.cli import main as cli_main
from gigamim.data.errors import DataError
from gigamim.data.loader import ClassificationLoader, SimMIMLoader
from tests.test_data_helpers import image_bytes, write_dataset, write_tar


def _encode(fmt, size=(40, 30), colour=(20, 120, 220)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _awkward_folder(root):
    files = {
        "cat/a.jpg": image_bytes(50, 40, seed=1),
        "cat/b.jfif": _encode("JPEG"),                  # JPEG under another name
        "cat/c.PNG": _encode("PNG"),
        "cat/mystery.xyz": _encode("PNG"),               # unknown extension, real PNG
        "cat/empty.jpg": b"",
        "dog/d.webp": _encode("WEBP"),
        "dog/notes.txt": b"not an image",
        "dog/fake.heic": b"\x00\x01garbage" * 10,
        "dog/e f.jpeg": image_bytes(30, 60, seed=2),
    }
    if features.check("avif"):
        files["dog/g.avif"] = _encode("AVIF")
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


def test_every_input_file_is_accounted_for(tmp_path):
    files = _awkward_folder(tmp_path / "src")
    assert cli_main(["make-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1",
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "make_shards_report.json").read_text())
    assert report["inputs"] == len(files)
    assert report["written"] + sum(report["skipped"].values()) == len(files)
    assert report["written"] == report["written_unchanged"] + sum(report["converted"].values())
    listed = [e["path"] for e in report["skipped_inputs"] + report["converted_inputs"]]
    assert len(listed) == len(set(listed))
    skipped = {os.path.relpath(e["path"], tmp_path / "src"): e for e in report["skipped_inputs"]}
    assert set(skipped) == {"cat/empty.jpg", "dog/notes.txt", "dog/fake.heic"}
    for e in skipped.values():
        assert "0x" not in e["detail"] and "object at" not in e["detail"] and e["reason"], e
    assert skipped["dog/notes.txt"]["detail"].startswith("cannot identify image file (extension .txt")
    conv = {os.path.relpath(e["path"], tmp_path / "src"): e["reason"] for e in report["converted_inputs"]}
    assert conv["cat/b.jfif"] == "renamed_jfif_to_jpg" and conv["cat/mystery.xyz"] == "renamed_xyz_to_png"
    if "dog/g.avif" in files:
        assert conv["dog/g.avif"] == "reencoded_avif_as_png"
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == report["written"] and index["classes"] == ["cat", "dog"]


def test_labels_follow_the_class_folders(tmp_path):
    for c, colour in (("ant", (250, 0, 0)), ("bee", (0, 250, 0)), ("cow", (0, 0, 250))):
        os.makedirs(tmp_path / "src" / c)
        for i in range(4):
            (tmp_path / "src" / c / f"{i}.png").write_bytes(_encode("PNG", (48, 48), colour))
    assert cli_main(["make-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--max-count", "5",
                     "--no-progress"]) == 0
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        assert any(n.endswith(".cls") for n in tf.getnames())
    index = str(tmp_path / "out" / "index.json")
    loader = SimMIMLoader(index, 4, labels=True, img_size=32, mask_patch_size=16, num_workers=0)
    assert loader.classes == ["ant", "bee", "cow"]
    for name, mk in (("simmim", lambda: loader),
                     ("train", lambda: ClassificationLoader(index, 4, img_size=32, num_workers=2)),
                     ("eval", lambda: ClassificationLoader(index, 4, img_size=32, train=False, num_workers=0))):
        ldr = mk()
        batches = collect_labels(ldr, len(ldr))
        assert len(batches) * 4 == 12
        for img, label in batches:
            assert label.dtype == torch.int64
            # the colour that dominates the image is the class folder's colour
            assert np.array_equal(img.float().mean(dim=(2, 3)).argmax(1).numpy(), label.numpy()), name


def collect_labels(loader, n):
    it = iter(loader)
    out = []
    for _ in range(n):
        b = next(it)
        assert "mask" in b if isinstance(loader, SimMIMLoader) else "mask" not in b
        out.append((b["image"].clone(), b["label"].clone()))
    return out


def test_missing_labels_are_one_clear_line(tmp_path):
    write_tar(tmp_path / "u.tar", [("a.jpg", image_bytes(40, 40)), ("b.jpg", image_bytes(40, 40, seed=1))])
    loader = ClassificationLoader([str(tmp_path / "u.tar")], 2, img_size=32, num_workers=2)
    with pytest.raises(DataError, match=r"^labels were asked for but sample 'a' of u.tar has no .cls member") as e:
        next(iter(loader))
    assert "\n" not in str(e.value)


def test_eval_is_centre_crop_and_marks_padding(tmp_path):
    index, keys = write_dataset(tmp_path, [3, 2], w=64, h=48)          # 5 samples, .cls members
    loader = ClassificationLoader(index, 2, img_size=32, train=False, num_workers=0, world_size=2, rank=1)
    batches = [next(it) for it in [iter(loader)] for _ in range(len(loader))]
    valid = [v for b in batches for v in b["valid"].tolist()]
    assert len(valid) == 4 and valid.count(False) == 3                  # slots 5..7 of 8 are padding
    # eval view = timm: resize shorter side to 32/0.875 = 36, centre crop 32
    from torchvision.transforms import v2 as T

    ref_tf = T.Compose([T.Resize(36), T.CenterCrop(32)])
    b = batches[0]
    key = b["key"][0]
    src = tmp_path / f"part-00{0 if int(key[1:]) < 3 else 1}.tar"
    with tarfile.open(src) as tf:
        data = tf.extractfile(f"{key}.jpg").read()
    ref = np.asarray(ref_tf(Image.open(io.BytesIO(data)).convert("RGB")), dtype=np.float32)
    ours = b["image"][0].permute(1, 2, 0).numpy().astype(np.float32)
    assert np.abs(ours - ref).mean() < 6            # one box resize vs resize-then-crop: rounding only


def test_eval_counts_each_readable_sample_once(tmp_path):
    """`valid` is True exactly once per readable sample: a substitute in a bad sample's slot and
    the last good batch standing in for an all-bad one are repeats (it was True for the latter)."""
    good = {k: image_bytes(40, 40, seed=i) for i, k in enumerate(["g0", "g1", "g3"])}
    members = []
    for key in ["g0", "g1", "b2", "g3", "b4", "b5"]:           # eval keeps tar order: (g0 g1) (b2 g3) (b4 b5)
        members += [(f"{key}.jpg", good.get(key, b"")), (f"{key}.cls", b"1")]
    write_tar(tmp_path / "v.tar", members)
    for workers in (0, 1):
        loader = ClassificationLoader([str(tmp_path / "v.tar")], 2, img_size=32, train=False, num_workers=workers)
        batches = [next(it) for it in [iter(loader)] for _ in range(len(loader))]
        assert [b["key"] for b in batches] == [["g0", "g1"], ["g3", "g3"], ["g3", "g3"]]
        assert loader.skip_counts == {"empty_member": 3, "batch_replaced": 1}
        counted = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]
        assert sorted(counted) == ["g0", "g1", "g3"], (workers, [b["valid"].tolist() for b in batches])
