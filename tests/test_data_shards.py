"""`gigamim make-shards` writes readable, deterministic shards with an index and a report."""

import io
import json
import os
import re
import tarfile

import pytest
from PIL import Image

from gigamim.cli import main as cli_main
from gigamim.data.loader import SimMIMLoader
from gigamim.sizes import parse_size
from gigamim.data.synthetic import write_synthetic_shards
from tests.test_data_helpers import collect, image_bytes


def _folder(root):
    """ImageFolder: cat/ (3 images, one nested, one unreadable), dog/ (2 images, names with dots)."""
    files = {"cat/a.jpg": image_bytes(60, 50, seed=1), "cat/sub dir/b.JPEG": image_bytes(50, 60, seed=2),
             "cat/c.png": image_bytes(40, 40, fmt="PNG"), "cat/broken.jpg": b"\xff\xd8\xff not really",
             "dog/x.v1.jpg": image_bytes(300, 200, seed=3), "dog/../dog/y.jpg": image_bytes(30, 30, seed=4),
             "dog/notes.txt": b"ignored"}
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return [(m.name, tf.extractfile(m).read(), m.mtime, m.uid, m.uname) for m in tf.getmembers()]


def test_imagefolder_to_shards(tmp_path):
    files = _folder(tmp_path / "src")
    assert cli_main(["make-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--max-count", "2",
                     "--workers", "2", "--no-progress"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == 5 and [s["num_samples"] for s in index["shards"]] == [2, 2, 1]
    report = json.loads((tmp_path / "out" / "make_shards_report.json").read_text())
    assert report["skipped"] == {"not_an_image": 2} and report["inputs"] == 7      # broken.jpg, notes.txt
    assert sorted(os.path.basename(e["path"]) for e in report["skipped_inputs"]) == ["broken.jpg", "notes.txt"]
    assert report["classes"] == ["cat", "dog"] and index["classes"] == ["cat", "dog"]
    members = [m for s in index["shards"] for m in _members(tmp_path / "out" / s["url"])]
    by_key = {}
    for name, data, mtime, uid, uname in members:
        key, ext = name.split(".")                      # exactly one dot: keys have none
        assert re.fullmatch(r"[0-9]{8}_[A-Za-z0-9_-]+", key) and mtime == 0 and uid == 0
        by_key.setdefault(key, {})[ext] = data
    assert len(by_key) == 5
    cls = {k.split("_", 1)[1]: int(v["cls"]) for k, v in by_key.items()}
    assert cls == {"cat_a": 0, "cat_sub_dir_b": 0, "cat_c": 0, "dog_x_v1": 1, "dog_y": 1}
    originals = {files["cat/a.jpg"], files["cat/sub dir/b.JPEG"], files["cat/c.png"], files["dog/x.v1.jpg"],
                 files["dog/../dog/y.jpg"]}
    assert {d for v in by_key.values() for e, d in v.items() if e != "cls"} == originals   # bytes kept
    # the shards feed the loader
    loader = SimMIMLoader(str(tmp_path / "out" / "index.json"), 5, num_workers=0, img_size=32, mask_patch_size=16)
    assert sorted(collect(loader, 1)[0]["key"]) == sorted(by_key)


def test_deterministic_output(tmp_path):
    _folder(tmp_path / "src")
    for out, workers in (("o1", "1"), ("o2", "2")):
        assert cli_main(["make-shards", str(tmp_path / "src"), str(tmp_path / out), "--workers", workers,
                         "--no-progress"]) == 0
    for name in ("shard-000000.tar", "index.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()


def test_max_size_resize_and_file_list(tmp_path):
    _folder(tmp_path / "src")
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nsrc/dog/x.v1.jpg\t7\nsrc/cat/a.jpg\nsrc/missing.jpg\n")
    assert cli_main(["make-shards", str(lst), str(tmp_path / "out"), "--resize-max-side", "100",
                     "--max-size", "3K", "--no-progress"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == 2 and len(index["shards"]) == 2           # 3 kB cannot hold both
    report = json.loads((tmp_path / "out" / "make_shards_report.json").read_text())
    assert report["skipped"] == {"unreadable_file": 1}
    first = {n.rsplit(".", 1)[1]: d for n, d, *_ in _members(tmp_path / "out" / "shard-000000.tar")}
    img = Image.open(io.BytesIO(first["jpg"]))
    assert img.size == (100, 67)                                        # 300x200 -> longer side 100
    assert first["cls"] == b"7"


def test_parse_size():
    assert parse_size("500M") == 500_000_000 and parse_size("2GiB") == 2 * 1024 ** 3 and parse_size("4096") == 4096


def test_synthetic_shards_cli_and_api(tmp_path):
    assert cli_main(["make-shards", "--synthetic", "12", str(tmp_path / "a"), "--max-count", "5",
                     "--image-size", "64", "--no-progress"]) == 0
    index = write_synthetic_shards(tmp_path / "b", 12, image_size=64, samples_per_shard=5, seed=0)
    assert index == str(tmp_path / "b" / "index.json")
    for name in ("synth-000000.tar", "synth-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    data = json.loads((tmp_path / "a" / "index.json").read_text())
    assert data == {"shards": [{"url": f"synth-00000{i}.tar", "num_samples": n} for i, n in enumerate((5, 5, 2))],
                    "total": 12}
    members = _members(tmp_path / "a" / "synth-000000.tar")
    img = Image.open(io.BytesIO(next(d for n, d, *_ in members if n.endswith(".jpg"))))
    assert img.size == (64, 64) and img.mode == "RGB"
    other = write_synthetic_shards(tmp_path / "c", 5, image_size=64, samples_per_shard=5, seed=1)
    assert (tmp_path / "c" / "synth-000000.tar").read_bytes() != (tmp_path / "a" / "synth-000000.tar").read_bytes()
    assert other.endswith("index.json")


def test_clear_errors(tmp_path, capsys):
    assert cli_main(["make-shards", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["make-shards", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no files found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["make-shards", "--synthetic", "3"])


def test_imagefolder_classes_are_mixed_across_shards(tmp_path):
    """Sorted ImageFolder order would give one class per shard; the writer shuffles (seeded)."""
    for c in ("a", "b", "c", "d"):
        os.makedirs(tmp_path / "src" / c)
        for i in range(12):
            (tmp_path / "src" / c / f"{i:02d}.jpg").write_bytes(image_bytes(16, 16, seed=i))
    assert cli_main(["make-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--max-count", "12",
                     "--workers", "1", "--no-progress"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    for shard in index["shards"]:
        classes = {int(data) for name, data, *_ in _members(tmp_path / "out" / shard["url"]) if name.endswith(".cls")}
        assert len(classes) >= 3, (shard["url"], classes)  # unshuffled: exactly 1 per shard
