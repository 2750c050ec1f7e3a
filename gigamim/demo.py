"""`gigamim demo`: the whole system on a laptop-sized problem, end to end.

1. writes a synthetic shard set (procedural images a model can learn to reconstruct);
2. pretrains swinv2_nano with SimMIM under ZeRO-3 on 2 CPU ranks (or the local GPUs)
   with the real `deepspeed` launcher;
3. consolidates the ZeRO checkpoint into fp32 safetensors;
4. reloads those weights in a fresh model and saves a reconstruction picture and a loss
   curve, then prints where everything is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigamim demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints, logs and pictures")
    p.add_argument("--images", type=int, default=2048, help="synthetic images to write")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo config's)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, every GPU on a GPU machine)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides passed to pretrain")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    import torch

    from gigamim.runtime.dist import free_port

    on_gpu = torch.cuda.is_available()
    nproc = args.nproc or (torch.cuda.device_count() if on_gpu else 2)

    # 1. data
    from gigamim.data.synthetic import write_synthetic_shards

    index = out / "shards" / "index.json"
    if index.is_file() and json.loads(index.read_text()).get("total") == args.images:
        print(f"[1/4] synthetic shards already in {index.parent}")
    else:
        print(f"[1/4] writing {args.images} synthetic images as tar shards to {index.parent}")
        index = Path(write_synthetic_shards(out / "shards", args.images, image_size=224, samples_per_shard=256))

    # 2. pretrain under the deepspeed launcher
    ckpt_dir, log_dir = out / "checkpoints", out / "logs"
    overrides = [f"data.shards={index}", f"checkpoint.dir={ckpt_dir}", f"log.dir={log_dir}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if nproc != 2:  # the demo config's global batch is 16 per rank x 2 ranks
        overrides.append(f"train.global_batch_size={16 * nproc}")
    overrides += args.overrides
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), "--module", "gigamim", "pretrain", "--config", "demo",
           # a demo run again into the same --out starts over; the previous one is moved into
           # <out>/checkpoints/replaced/ and <out>/logs/replaced/, never deleted
           "--overwrite"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    if not on_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    print(f"[2/4] pretraining swinv2_nano with SimMIM, ZeRO-3 on {nproc} {'GPU' if on_gpu else 'CPU'} ranks:\n      "
          + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        print(f"gigamim demo: pretraining failed (exit {result.returncode}); see the output above", file=sys.stderr)
        return result.returncode

    # 3. consolidate
    from gigamim.checkpoint.consolidate import consolidate

    weights = out / "swinv2_nano_simmim_fp32.safetensors"
    print(f"[3/4] consolidating the ZeRO-3 checkpoint in {ckpt_dir} -> {weights}")
    consolidate(str(ckpt_dir), str(weights))

    # 4. pictures from the consolidated weights
    print("[4/4] reconstruction picture and loss curve from the consolidated weights")
    picture = save_demo_reconstruction(weights, index, out / "reconstruction.png", args.overrides)
    from gigamim.train.metrics import read_metrics

    metrics = read_metrics(log_dir / "metrics.jsonl")
    curve = save_loss_curve(metrics, out / "loss.png")
    first, last = metrics[0], metrics[-1]
    print(f"\ngigamim demo done in {time.time() - t_start:.0f} s")
    print(f"  loss            {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})")
    print(f"  throughput      {last['images_per_sec']:.1f} images/s")
    print(f"  shards          {index}")
    print(f"  checkpoints     {ckpt_dir}")
    print(f"  metrics         {log_dir / 'metrics.jsonl'}  (TensorBoard: {log_dir / 'tensorboard'})")
    print(f"  fp32 weights    {weights}")
    print(f"  reconstruction  {picture}")
    print(f"  loss curve      {curve}")
    return 0


def save_demo_reconstruction(weights: Path, index: Path, path: Path, overrides: list[str] = ()) -> Path:
    """Load consolidated weights into a fresh (unpartitioned) SimMIM and reconstruct a few
    images, so the picture also proves the consolidated file is complete."""
    import torch

    from gigamim.config import load_config
    from gigamim.data.loader import SimMIMLoader
    from gigamim.data.transforms import normalize_on_device
    from gigamim.checkpoint.export import load_export
    from gigamim.models.build import build_simmim
    from gigamim.train.visualize import save_reconstruction_png

    cfg = load_config("demo", list(overrides))  # the same model the run trained
    model = build_simmim(dataclasses.asdict(cfg.model)).eval()
    state, _ = load_export(str(weights))
    model.load_state_dict(state, strict=True)
    loader = SimMIMLoader(str(index), 6, num_workers=0, seed=1234, img_size=cfg.model.img_size,
                          mask_ratio=cfg.data.mask_ratio)
    batch = next(iter(loader))
    images = normalize_on_device(batch["image"])
    with torch.no_grad():
        rec = model.reconstruct(images, batch["mask"])
    return save_reconstruction_png(path, batch["image"], batch["mask"], rec, title="SimMIM reconstruction (demo)")


def save_loss_curve(metrics: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("SimMIM L1 loss (masked pixels)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
