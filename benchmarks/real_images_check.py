"""Does SimMIM pretraining help on REAL images? scikit-learn's 1,797 handwritten digits.

    python -m benchmarks.real_images_check [--quick] [--out benchmarks/results/real_images_<date>]

Everything runs through gigamim's own verbs, as a user would run them (in this process,
a DeepSpeed group of one on the CPU):

1. Data: ``sklearn.datasets.load_digits`` (real 8x8 scans, 17 grey levels), upscaled to
   ``--img`` px (bicubic), written as PNG ImageFolders and turned into labelled webdataset
   shards by ``gigamim make-shards`` (``.cls`` members). A stratified split: a test set
   (``--test`` images), a small labelled fine-tune set (``--labels-per-class``), and the
   pretraining pool = every non-test image, without labels.
2. ``gigamim pretrain``: swinv2_nano (img 32, window 4), SimMIM with 8-px mask cells, ratio
   0.6, DeepSpeed ZeRO-1, then ``gigamim consolidate`` to one safetensors file.
3. For each of 3 seeds, the SAME ``gigamim finetune`` budget for the consolidated encoder
   and for the same architecture from random init (``finetune.weights=""``): layer-wise LR
   decay, drop path, label smoothing, RandomResizedCrop (no flips: digits), top-1 on the
   test shards (its evaluation pass). And ``gigamim probe`` of each frozen encoder.
4. ``results.json`` + ``report.md`` in ``--out``: per-seed accuracies, mean, spread
   (max - min), the margin, machine, versions, command, load, wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "swinv2_nano"


def make_digit_shards(out: Path, img: int, labels_per_class: int, test_size: int, seed: int = 0) -> dict:
    """PNG ImageFolders -> `gigamim make-shards` -> {split: index.json}."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from gigamim.data.make_shards import main as make_shards

    shutil.rmtree(out, ignore_errors=True)  # a fresh, deterministic data set every run
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    test_idx, ft_idx = [], []
    per_class_test = test_size // 10
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx += idx[:per_class_test].tolist()
        ft_idx += idx[per_class_test:per_class_test + labels_per_class].tolist()
    test_set = set(test_idx)
    pool_idx = [i for i in range(len(labels)) if i not in test_set]  # pretraining: no test image
    splits = {"test": test_idx, "finetune": ft_idx, "pretrain": pool_idx}
    index = {}
    for split, idx in splits.items():
        folder = out / "images" / split
        for i in idx:
            d = folder / str(labels[i])
            d.mkdir(parents=True, exist_ok=True)
            pil = Image.fromarray(images[i], mode="L").resize((img, img), Image.BICUBIC).convert("RGB")
            pil.save(d / f"digit_{i:04d}.png")
        shard_dir = out / "shards" / split
        rc = make_shards([str(folder), str(shard_dir), "--max-count", "400"])
        if rc != 0:
            raise RuntimeError(f"make-shards failed for {split}")
        index[split] = str(shard_dir / "index.json")
    return {"index": index, "sizes": {k: len(v) for k, v in splits.items()}}


def _sets(items: dict) -> list[str]:
    return [a for k, v in items.items() for a in ("--set", f"{k}={v}")]


def _metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def pretrain(index: str, out: Path, img: int, steps: int, batch: int, lr: float, seed: int = 0) -> dict:
    """`gigamim pretrain` (ZeRO-1, one process) + `gigamim consolidate`."""
    from gigamim.checkpoint.consolidate import main as consolidate
    from gigamim.train.pretrain import main as pretrain_main

    run = out / "pretrain"
    t0 = time.time()
    rc = pretrain_main(["--config", "demo"] + _sets({
        "model.name": MODEL, "model.img_size": img, "model.window_size": 4, "model.drop_path_rate": 0.0,
        "data.shards": index, "data.mask_patch_size": 8, "data.mask_ratio": 0.6, "data.num_workers": 1,
        "train.micro_batch_size": batch, "train.global_batch_size": batch, "train.max_steps": steps,
        "train.seed": seed, "train.grad_clip": 5.0, "optim.lr": lr, "optim.lr_scaling": "none",
        "optim.min_lr": lr / 100, "optim.warmup_lr": lr / 100, "optim.warmup_steps": max(1, steps // 10),
        "optim.weight_decay": 0.05, "deepspeed.config": "zero1", "checkpoint.dir": run / "ckpt",
        "checkpoint.every_steps": 0, "checkpoint.keep_last": 1, "log.dir": run / "logs",
        "log.every_steps": max(1, steps // 20), "log.progress_bar": "false", "log.tensorboard": "false"}))
    if rc != 0:
        raise RuntimeError(f"gigamim pretrain exited {rc}")
    weights = out / "pretrained_simmim.safetensors"
    if consolidate([str(run / "ckpt"), str(weights), "--force"]) != 0:
        raise RuntimeError("gigamim consolidate failed")
    losses = [r["loss"] for r in _metrics(run / "logs")]
    return {"weights": str(weights), "steps": steps, "batch": batch, "lr": lr, "seconds": round(time.time() - t0, 1),
            "loss_first": losses[0], "loss_last": losses[-1], "loss_curve": [round(v, 4) for v in losses]}


def finetune(weights: str | None, train_index: str, test_index: str, out: Path, img: int, seed: int, steps: int,
             batch: int, lr: float, layer_decay: float, drop_path: float) -> dict:
    """`gigamim finetune`; top-1 of its final evaluation pass over the test shards."""
    from gigamim.train.finetune import main as finetune_main

    run = out / f"finetune_{'pretrained' if weights else 'random'}_seed{seed}"
    t0 = time.time()
    rc = finetune_main(_sets({
        "model.name": MODEL, "model.img_size": img, "model.window_size": 4, "model.drop_path_rate": drop_path,
        "finetune.weights": weights or "", "finetune.num_classes": 10, "finetune.train_shards": train_index,
        "finetune.val_shards": test_index, "finetune.layer_decay": layer_decay, "finetune.mixup": 0,
        "finetune.cutmix": 0, "finetune.label_smoothing": 0.1, "finetune.hflip": "false",
        "finetune.crop_scale": "[0.6, 1.0]", "data.num_workers": 1, "train.micro_batch_size": batch,
        "train.global_batch_size": batch, "train.max_steps": steps, "train.seed": seed, "train.grad_clip": 5.0,
        "optim.lr": lr, "optim.lr_scaling": "none", "optim.min_lr": lr / 100, "optim.warmup_lr": lr / 100,
        "optim.warmup_steps": max(1, steps // 10), "optim.weight_decay": 0.05, "deepspeed.config": "zero1",
        "checkpoint.dir": run / "ckpt", "checkpoint.every_steps": 0, "checkpoint.keep_last": 1,
        "log.dir": run / "logs", "log.every_steps": max(1, steps // 10), "log.progress_bar": "false",
        "log.tensorboard": "false"}))
    if rc != 0:
        raise RuntimeError(f"gigamim finetune exited {rc}")
    last = _metrics(run / "logs")[-1]
    return {"top1": last["top1"], "eval_images": last["eval_images"], "seconds": round(time.time() - t0, 1)}


def run_probe(weights: str | None, train_index: str, test_index: str, out: Path, img: int, seed: int,
              stage=None) -> dict:
    """`gigamim probe` of the frozen encoder (random init of the same model without weights)."""
    from gigamim.train.probe import main as probe_main

    result = out / f"probe_{'pretrained' if weights else 'random'}_seed{seed}_stage{stage}.json"
    args = ["--train", train_index, "--val", test_index, "--seed", str(seed), "--out", str(result),
            "--num-workers", "1"]
    args += ["--weights", weights] if weights else ["--model", MODEL, "--img-size", str(img), "--window-size", "4"]
    if stage is not None:
        args += ["--stage", str(stage)]
    if probe_main(args) != 0:
        raise RuntimeError("gigamim probe failed")
    return json.loads(result.read_text())


def _stats(values):
    return {"values": [round(v, 4) for v in values], "mean": round(float(np.mean(values)), 4),
            "spread": round(float(np.max(values) - np.min(values)), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="shortened run (the slow test)")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--labels-per-class", type=int, default=10)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-batch", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-batch", type=int, default=32)
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", help="scratch folder for shards, checkpoints and run logs (default: a temporary "
                   "folder, deleted at the end)")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 120, 60, args.seeds[:2]
    from benchmarks.common import machine_info, versions

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"real_images_{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    # Shards, checkpoints and run logs go to a scratch folder; only the results go to --out.
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gigamim-real-images-"))
    t0 = time.time()
    data = make_digit_shards(work / "data", args.img, args.labels_per_class, args.test)
    train, test = data["index"]["finetune"], data["index"]["test"]
    pre = pretrain(data["index"]["pretrain"], work, args.img, args.pretrain_steps, args.pretrain_batch,
                   args.pretrain_lr)
    print(f"pretrain: loss {pre['loss_first']:.3f} -> {pre['loss_last']:.3f} in {pre['seconds']} s", flush=True)
    ft = {"pretrained": [], "random": []}
    pr = {"pretrained": [], "random": []}
    pr2 = {"pretrained": [], "random": []}  # intermediate features (stage 2), for information
    for seed in args.seeds:
        for kind, w in (("pretrained", pre["weights"]), ("random", None)):
            r = finetune(w, train, test, work / "runs", args.img, seed, args.finetune_steps, args.finetune_batch,
                         args.finetune_lr, args.layer_decay, args.drop_path)
            q = run_probe(w, train, test, work / "runs", args.img, seed)
            q2 = run_probe(w, train, test, work / "runs", args.img, seed, stage=2)
            ft[kind].append(r["top1"])
            pr[kind].append(q["top1"])
            pr2[kind].append(q2["top1"])
            print(f"seed {seed} {kind:10s}: fine-tune top-1 {r['top1']:.4f} ({r['seconds']} s), "
                  f"probe top-1 {q['top1']:.4f} (stage 2: {q2['top1']:.4f})", flush=True)
    res = {
        "what": "SimMIM-pretrained vs random-init swinv2_nano on sklearn digits (real 8x8 scans, upscaled)",
        "data": data["sizes"], "img_size": args.img, "model": MODEL, "window_size": 4,
        "pretrain": {k: v for k, v in pre.items() if k != "weights"},
        "finetune": {"steps": args.finetune_steps, "batch": args.finetune_batch, "lr": args.finetune_lr,
                     "layer_decay": args.layer_decay, "drop_path": args.drop_path, "label_smoothing": 0.1,
                     "augmentation": "RandomResizedCrop(scale 0.6-1), no flip", "verb": "gigamim finetune (ZeRO-1)",
                     "pretrained": _stats(ft["pretrained"]), "random": _stats(ft["random"])},
        "probe": {"pretrained": _stats(pr["pretrained"]), "random": _stats(pr["random"])},
        "probe_stage2": {"pretrained": _stats(pr2["pretrained"]), "random": _stats(pr2["random"])},
        "seeds": args.seeds, "quick": args.quick,
        "wall_seconds": round(time.time() - t0, 1),
        "machine": machine_info(), "versions": versions(), "command": " ".join([sys.executable] + sys.argv),
    }
    for part in ("finetune", "probe", "probe_stage2"):
        a, b = res[part]["pretrained"], res[part]["random"]
        res[part]["margin"] = round(a["mean"] - b["mean"], 4)
        res[part]["margin_exceeds_spread"] = bool(min(a["values"]) - max(b["values"]) > 0 and
                                                  a["mean"] - b["mean"] > max(a["spread"], b["spread"]))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    lines = [f"# Real-image check: {res['what']}", "",
             f"data: {res['data']} (img {args.img} px); pretrain {pre['steps']} steps x {pre['batch']}, "
             f"loss {pre['loss_first']:.3f} -> {pre['loss_last']:.3f} ({pre['seconds']} s)", "",
             "| | pretrained (SimMIM) | random init | margin | spread (max-min) | margin > spread |",
             "|---|---|---|---|---|---|"]
    for part in ("finetune", "probe", "probe_stage2"):
        a, b = res[part]["pretrained"], res[part]["random"]
        lines.append(f"| {part} top-1 | {a['mean']:.4f} {a['values']} | {b['mean']:.4f} {b['values']} | "
                     f"{res[part]['margin']:+.4f} | {a['spread']:.4f} / {b['spread']:.4f} | "
                     f"{res[part]['margin_exceeds_spread']} |")
    m = res["machine"]
    lines += ["", f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}, "
              f"load {m['load_avg_1_5_15']}; wall {res['wall_seconds']} s", f"versions: {res['versions']}",
              f"command: `{res['command']}`"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
