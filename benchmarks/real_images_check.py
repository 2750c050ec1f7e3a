"""Does SimMIM pretraining help on REAL images? scikit-learn's 1,797 handwritten digits.

    python -m benchmarks.real_images_check [--quick] [--out benchmarks/results/real_images_<date>]

1. Data: ``sklearn.datasets.load_digits`` (real 8x8 scans, 17 grey levels), upscaled to
   ``--img`` px (bicubic), written as PNG ImageFolders and turned into labelled webdataset
   shards by ``gigamim make-shards`` (``.cls`` members). A stratified split: a test set
   (``--test`` images), a small labelled fine-tune set (``--labels-per-class``), and the
   pretraining pool = every non-test image, without labels.
2. Pretrain swinv2_nano (img 32, window 4) with SimMIM on the pool through gigamim's own
   ``SimMIMLoader`` (its RandomResizedCrop + flip + masking; 8-px mask cells, ratio 0.6),
   single process, AdamW + warmup/cosine (until the new trainer lands; see the report).
   The weights are written as a consolidated-style safetensors with the run config.
3. For each of 3 seeds, the SAME fine-tuning budget for the pretrained encoder (read back
   through ``gigamim.train.load_encoder``, like ``gigamim probe``/``finetune``) and for the
   same architecture from random init: AdamW, layer-wise LR decay, drop path, label
   smoothing, random-shift augmentation; top-1 on the test set. And a linear probe
   (``gigamim.train.probe``) of each frozen encoder on the labelled set.
4. ``results.json`` + ``report.md`` in ``--out``: per-seed accuracies, mean, spread
   (max - min), the margin, machine, versions, command, load, wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "swinv2_nano"


def make_digit_shards(out: Path, img: int, labels_per_class: int, test_size: int, seed: int = 0) -> dict:
    """PNG ImageFolders -> `gigamim make-shards` -> {split: index.json}."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from gigamim.data.make_shards import main as make_shards

    import shutil

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


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(index: str, out: Path, img: int, steps: int, batch: int, lr: float, seed: int = 0) -> dict:
    from safetensors.torch import save_file
    import yaml

    from gigamim.data.loader import SimMIMLoader
    from gigamim.data.transforms import normalize_on_device
    from gigamim.models import SimMIM, create_model
    from gigamim.models.param_groups import param_groups

    torch.manual_seed(seed)
    model = SimMIM(create_model(MODEL, img_size=img, window_size=4, drop_path_rate=0.0))
    groups = param_groups(model, 0.05)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    loader = SimMIMLoader(index, batch, num_workers=1, seed=seed, img_size=img, mask_patch_size=8,
                          model_patch_size=4, mask_ratio=0.6)
    losses, t0 = [], time.time()
    it = iter(loader)
    model.train()
    for step in range(steps):
        b = next(it)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, max(1, steps // 10), lr)
        loss = model(normalize_on_device(b["image"]), b["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    close = getattr(loader, "close", None)
    if close:
        close()
    cfg = {"model": {"name": MODEL, "img_size": img, "window_size": 4}}
    path = out / "pretrained_simmim.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"gigamim_config": yaml.safe_dump(cfg), "step": str(steps), "format": "simmim"})
    k = max(1, steps // 20)
    return {"weights": str(path), "steps": steps, "batch": batch, "lr": lr, "seconds": round(time.time() - t0, 1),
            "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "loss_curve": [round(float(np.mean(losses[i:i + k])), 4) for i in range(0, steps, k)]}


def _shift(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    """Random translation by up to `pad` px (zero padding), per image: digits must not flip."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def finetune(weights: str | None, train: tuple, test: tuple, img: int, seed: int, steps: int, batch: int,
             lr: float, layer_decay: float, drop_path: float) -> dict:
    from gigamim.data.transforms import normalize_on_device
    from gigamim.models.param_groups import layer_decay as decay_fn
    from gigamim.models.param_groups import param_groups
    from gigamim.train.load_encoder import build_encoder

    torch.manual_seed(seed)
    model, _ = build_encoder(MODEL, weights, dict(img_size=img, window_size=4, drop_path_rate=drop_path),
                             num_classes=10)
    groups = param_groups(model, 0.05, decay_fn(layer_decay))
    for gr in groups:
        gr["base_lr"] = lr * gr["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=lr)
    g = torch.Generator().manual_seed(1000 + seed)
    x_all, y_all = train
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (batch,), generator=g)
        x = normalize_on_device(_shift(x_all[idx], g, pad=img // 8))
        for gr in opt.param_groups:
            gr["lr"] = _lr_at(step, steps, max(1, steps // 10), gr["base_lr"])
        loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(normalize_on_device(test[0][i:i + 256])) for i in range(0, len(test[1]), 256)])
    return {"top1": (logits.argmax(1) == test[1]).double().mean().item(), "seconds": round(time.time() - t0, 1)}


def run_probe(weights: str | None, train: tuple, test: tuple, img: int, seed: int, stage=None) -> dict:
    from gigamim.train.load_encoder import build_encoder
    from gigamim.train.probe import probe

    torch.manual_seed(seed)
    enc, _ = build_encoder(MODEL, weights, dict(img_size=img, window_size=4))
    return probe(enc, train, test, stage=stage, num_classes=10)


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
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 120, 60, args.seeds[:2]
    from benchmarks.common import machine_info, versions
    from gigamim.train.labelled import load_labelled

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"real_images_{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_digit_shards(out / "data", args.img, args.labels_per_class, args.test)
    train = load_labelled(data["index"]["finetune"], args.img)
    test = load_labelled(data["index"]["test"], args.img)
    pre = pretrain(data["index"]["pretrain"], out, args.img, args.pretrain_steps, args.pretrain_batch,
                   args.pretrain_lr)
    print(f"pretrain: loss {pre['loss_first']:.3f} -> {pre['loss_last']:.3f} in {pre['seconds']} s", flush=True)
    ft = {"pretrained": [], "random": []}
    pr = {"pretrained": [], "random": []}
    pr2 = {"pretrained": [], "random": []}  # intermediate features (stage 2), for information
    for seed in args.seeds:
        for kind, w in (("pretrained", pre["weights"]), ("random", None)):
            r = finetune(w, train, test, args.img, seed, args.finetune_steps, args.finetune_batch, args.finetune_lr,
                         args.layer_decay, args.drop_path)
            q = run_probe(w, train, test, args.img, seed)
            q2 = run_probe(w, train, test, args.img, seed, stage=2)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
