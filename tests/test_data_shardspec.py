"""One shard-spec parser: every form is accepted or rejected alike by config.validate and the loader."""

import json
import os

import pytest

from gigamim.config import Config, ConfigError, missing_local_shards, validate
from gigamim.data.loader import SimMIMLoader
from gigamim.data.shardspec import ShardSpecError, resolve, split_spec
from tests.test_data_helpers import write_dataset

SMALL = dict(img_size=32, mask_patch_size=16, model_patch_size=4, shuffle_buffer=4, num_workers=0)


@pytest.fixture
def shards(tmp_path):
    """part-000..003.tar with 2,3,1,4 samples + index.json; also a bare folder of tars."""
    index, keys = write_dataset(tmp_path / "d", [2, 3, 1, 4], w=40, h=40)
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in (0, 1):
        os.link(tmp_path / "d" / f"part-00{i}.tar", bare / f"x{i}.tar")
    (tmp_path / "emptydir").mkdir()
    return tmp_path


def _p(root, *names):
    return [str(root / "d" / n) for n in names]


# (spec builder, expected url list builder, samples)
ACCEPTED = {
    "double_colon": (lambda r: f"{r}/d/part-000.tar::{r}/d/part-001.tar", lambda r: _p(r, "part-000.tar", "part-001.tar"), 5),
    "comma": (lambda r: f"{r}/d/part-000.tar, {r}/d/part-002.tar", lambda r: _p(r, "part-000.tar", "part-002.tar"), 3),
    "range": (lambda r: f"{r}/d/part-{{000..003}}.tar", lambda r: _p(r, *[f"part-00{i}.tar" for i in range(4)]), 10),
    "brace_list": (lambda r: f"{r}/d/part-00{{1,3}}.tar", lambda r: _p(r, "part-001.tar", "part-003.tar"), 7),
    "range_and_list": (lambda r: f"{r}/d/part-{{000..001}}.tar::{r}/d/part-00{{2,3}}.tar",
                       lambda r: _p(r, *[f"part-00{i}.tar" for i in range(4)]), 10),
    "list_and_comma": (lambda r: f"{r}/d/part-00{{0,1}}.tar,{r}/d/part-003.tar",
                       lambda r: _p(r, "part-000.tar", "part-001.tar", "part-003.tar"), 9),
    "index": (lambda r: f"{r}/d/index.json", lambda r: _p(r, *[f"part-00{i}.tar" for i in range(4)]), 10),
    "folder_with_index": (lambda r: f"{r}/d", lambda r: _p(r, *[f"part-00{i}.tar" for i in range(4)]), 10),
    "folder_of_tars": (lambda r: f"{r}/bare", lambda r: [f"{r}/bare/x0.tar", f"{r}/bare/x1.tar"], 5),
    "file_url": (lambda r: f"file:{r}/d/part-000.tar", lambda r: [f"file:{r}/d/part-000.tar"], 2),
    "pipe": (lambda r: f"pipe:cat {r}/d/part-{{000..001}}.tar", lambda r: [f"pipe:cat {r}/d/part-000.tar",
                                                                         f"pipe:cat {r}/d/part-001.tar"], 5),
}

REJECTED = {
    "empty": (lambda r: "  ", "empty"),
    "unbalanced_open": (lambda r: f"{r}/d/part-{{000..003.tar", "unbalanced braces"),
    "unbalanced_close": (lambda r: f"{r}/d/part-000}}.tar", "unbalanced braces"),
    "unbalanced_list": (lambda r: f"{r}/d/part-{{0,1.tar", "unbalanced braces"),
    "empty_folder": (lambda r: f"{r}/emptydir", "no index.json and no .tar"),
    "missing_index": (lambda r: f"{r}/d/nope.json", "does not exist"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_alike(shards, name):
    spec_fn, want_fn, n = ACCEPTED[name]
    spec = spec_fn(shards)
    assert resolve(spec).urls == want_fn(shards)
    assert missing_local_shards(spec) == []
    cfg = Config()
    cfg.data.shards = spec
    validate(cfg)                                               # config time
    loader = SimMIMLoader(spec, 2, **SMALL)                     # loader
    assert loader.urls == want_fn(shards) and loader.num_samples == n


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_alike(shards, name):
    spec_fn, words = REJECTED[name]
    spec = spec_fn(shards)
    cfg = Config()
    cfg.data.shards = spec
    with pytest.raises(ConfigError, match=words) as exc:
        validate(cfg)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("data.shards")
    with pytest.raises(ValueError, match=words):
        SimMIMLoader(spec, 2, **SMALL)


def test_missing_local_shard_is_a_config_error(shards):
    cfg = Config()
    cfg.data.shards = f"{shards}/d/part-{{000..005}}.tar"        # 004, 005 do not exist
    with pytest.raises(ConfigError, match=r"part-004.tar' does not exist \(and 1 more\)"):
        validate(cfg)
    os.remove(shards / "d" / "part-002.tar")
    cfg.data.shards = f"{shards}/d/index.json"                   # listed in the index, gone
    with pytest.raises(ConfigError, match="part-002.tar' does not exist"):
        validate(cfg)
    cfg.data.shards = "pipe:cat /nonexistent/x.tar::s3://bucket/y-{0..3}.tar"   # not checked
    validate(cfg)


def test_split_rules():
    assert split_spec("a.tar,b-{0,1}.tar::c-{0..2}.tar") == ["a.tar", "b-{0,1}.tar", "c-{0..2}.tar"]
    assert resolve("s3://b/x-{00..02}.tar").urls == ["s3://b/x-00.tar", "s3://b/x-01.tar", "s3://b/x-02.tar"]
    assert resolve(["pipe:cmd a,b", "y.tar"]).urls == ["pipe:cmd a,b", "y.tar"]     # list items are not split
    with pytest.raises(ShardSpecError):
        resolve([])


def test_index_relative_urls_and_classes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "index.json").write_text(json.dumps(
        {"shards": [{"url": "a.tar", "num_samples": 3}, {"url": "/abs/b.tar", "num_samples": 1},
                    {"url": "pipe:cat c.tar", "num_samples": 2}], "total": 6, "classes": ["cat", "dog"]}))
    got = resolve(str(tmp_path / "sub" / "index.json"))
    assert got.urls == [str(tmp_path / "sub" / "a.tar"), "/abs/b.tar", "pipe:cat c.tar"]
    assert got.counts == [3, 1, 2] and got.classes == ["cat", "dog"]
    (tmp_path / "bad.json").write_text('{"shards": [{"url": "a.tar"}]}')
    with pytest.raises(ShardSpecError, match="not a gigamim index"):
        resolve(str(tmp_path / "bad.json"))
