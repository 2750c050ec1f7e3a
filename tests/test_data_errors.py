"""Bad data that stops a run crosses processes as a type (`gigamim.data.errors.DataError`),
not as a message with a crafted prefix: raised in a DataLoader worker, it reaches the verb,
which says one line and exits 2."""

from __future__ import annotations

import sys

from tests.launch import run, tail
from tests.test_data_helpers import image_bytes, write_tar


def test_unlabelled_sample_met_in_a_worker_is_one_line_exit_2(tmp_path):
    # Only the first sample is checked before the run (check_labelled): the 9th has no label,
    # so a DataLoader worker (data.num_workers=1) meets it while training.
    members = []
    for i in range(8):
        members += [(f"k{i}.jpg", image_bytes(40, 40, seed=i)), (f"k{i}.cls", str(i % 3).encode())]
    members += [("k8.jpg", image_bytes(40, 40, seed=8))]
    shard = write_tar(tmp_path / "train.tar", members)
    sets = ["model.name=swinv2_nano", "model.img_size=32", "model.window_size=4", "finetune.num_classes=3",
            "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=3", "deepspeed.config=cpu",
            "data.num_workers=1", f"finetune.train_shards={shard}", f"checkpoint.dir={tmp_path}/ckpt",
            f"log.dir={tmp_path}/logs"]
    p = run([sys.executable, "-m", "gigamim", "finetune", *[a for s in sets for a in ("--set", s)]], timeout=240)
    want = ("gigamim finetune: data error: labels were asked for but sample 'k8' of train.tar has no .cls member "
            "(write labelled shards with `gigamim make-shards` from an ImageFolder)")
    assert p.returncode == 2, tail(p.stdout + p.stderr)
    assert p.stderr.strip().splitlines()[-1] == want, tail(p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.count("no .cls member") == 1, tail(p.stderr)
