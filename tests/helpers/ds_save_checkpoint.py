"""Make a REAL DeepSpeed ZeRO checkpoint of a SimMIM model, for the consolidate/export tests.

Launched by the tests as `deepspeed --num_gpus N tests/helpers/ds_save_checkpoint.py ...`
with DS_ACCELERATOR=cpu (gloo ranks). It trains a few steps on a fixed synthetic batch,
then, on every save:
  * gathers the full fp32 parameters in-run (deepspeed.zero.GatheredParameters) and
    rank 0 writes them with safetensors' own `save_file` as the reference the
    consolidated weights are compared against (written by different code than ours);
  * calls `engine.save_checkpoint(dir, tag=...)` and writes `gigamim_config.yaml` and
    `gigamim_meta.json` beside it, as the trainer does.
With `--resume-tag` it loads a checkpoint first (`--load-universal` for a universal one)
and records the loss of every step, so a test can compare the first resumed losses on
another world size with an uninterrupted run.

The model is gigamim's `SimMIM(create_model(name))` when gigamim.models provides it; until
then (and with `--model standin`) a timm SwinTransformerV2 with the same key layout.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def _standin(img_size: int, window_size: int):
    """timm SwinV2 + mask token + SimMIM decoder: the key layout of gigamim's SimMIM."""
    import timm.models.swin_transformer_v2 as tsw
    from torch import nn

    class StandinSimMIM(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = tsw.SwinTransformerV2(img_size=img_size, window_size=window_size, embed_dim=32,
                                                 depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_classes=0,
                                                 drop_path_rate=0.0)
            self.encoder.mask_token = nn.Parameter(torch.zeros(1, 1, 32))
            self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, 32 * 32 * 3, 1), nn.PixelShuffle(32))

        def forward(self, x, mask):
            enc = self.encoder
            z = enc.patch_embed(x)  # (B, H/4, W/4, C)
            w = mask.unsqueeze(-1).to(z.dtype)
            z = z * (1 - w) + enc.mask_token.to(z.dtype) * w
            for layer in enc.layers:
                z = layer(z)
            z = enc.norm(z).permute(0, 3, 1, 2)
            rec = self.decoder(z)
            mask_px = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).to(x.dtype)
            return ((x - rec).abs() * mask_px).sum() / (mask_px.sum() + 1e-5) / 3

    return StandinSimMIM()


def build_model(name: str, img_size: int, window_size: int):
    if name != "standin":
        from gigamim.models import SimMIM, create_model

        return SimMIM(create_model(name, img_size=img_size, window_size=window_size, drop_path_rate=0.0))
    return _standin(img_size, window_size)


def randomise_(model, seed: int):
    """Random weights everywhere (SwinV2's init zeroes the block norms, which checks nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            if name.endswith("logit_scale"):
                p.copy_(torch.log(torch.full_like(p, 10.0)) + noise)
            elif p.dim() == 1 and ("norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def fixed_batch(global_batch: int, img_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(global_batch, 3, img_size, img_size, generator=g)
    grid = img_size // 32
    # The same number of masked cells in every sample: SimMIM's loss divides by the masked
    # count of the micro-batch, so only then is the mean over ranks the global-batch loss
    # on every world size (what the resume-on-another-world-size test compares).
    cells = grid * grid
    k = max(1, round(0.6 * cells))
    order = torch.stack([torch.randperm(cells, generator=g) for _ in range(global_batch)])
    mask32 = (order < k).reshape(global_batch, grid, grid)
    mask = mask32.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 32-px grid -> 4-px patch grid
    return images, mask


def gathered_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 parameters as the engine holds them, gathered across the ZeRO-3 ranks."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="checkpoint dir")
    ap.add_argument("--model", default="standin")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="steps before the first save")
    ap.add_argument("--extra-steps", type=int, default=0, help="steps after the save (losses recorded)")
    ap.add_argument("--tag", default=None, help="default step_XXXXXXXX")
    ap.add_argument("--reference", default=None, help="rank 0 writes the gathered fp32 weights here")
    ap.add_argument("--resume-tag", default=None)
    ap.add_argument("--load-universal", action="store_true")
    ap.add_argument("--losses", default=None, help="rank 0 writes {step: loss} JSON here")
    ap.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher may pass it
    args = ap.parse_args()

    import deepspeed

    from gigamim.runtime.dist import init_distributed
    from gigamim.train.engines.deepspeed import init_comm  # DeepSpeed's comm layer; unlinks its CPU shm buffers

    init_distributed("gloo")
    init_comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(args.model, args.img_size, args.window)
    randomise_(model, seed=1)
    if args.global_batch % world:
        raise SystemExit(f"global batch {args.global_batch} not divisible by world size {world}")
    micro = args.global_batch // world
    ds_config = {
        "train_batch_size": args.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}},
        "zero_optimization": {"stage": args.stage},
        "checkpoint": {"load_universal": bool(args.load_universal)},
        "steps_per_print": 10**9,
    }
    if args.stage == 3:
        # Small models: still split every parameter across ranks, so partitions are real.
        ds_config["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                               "stage3_max_live_parameters": 0})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    step = 0
    if args.resume_tag:
        path, client = engine.load_checkpoint(args.out, tag=args.resume_tag)
        if path is None:
            raise SystemExit(f"could not load {args.out}/{args.resume_tag}")
        step = int(client["step"])

    images, mask = fixed_batch(args.global_batch, args.img_size, seed=2)
    losses: dict[int, float] = {}

    def train_step():
        nonlocal step
        # Each step uses its own rotation of the fixed global batch, split by rank.
        sl = slice(rank * micro, (rank + 1) * micro)
        x, m = images.roll(step, 0)[sl], mask.roll(step, 0)[sl]
        loss = engine(x, m)
        engine.backward(loss)
        engine.step()
        step += 1
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses[step] = float(mean) / world

    for _ in range(args.steps):
        train_step()

    if args.steps or not args.resume_tag:
        tag = args.tag or f"step_{step:08d}"
        if args.reference:
            ref = gathered_state(engine)
            if rank == 0:
                from safetensors.torch import save_file

                save_file(ref, args.reference)
        engine.save_checkpoint(args.out, tag=tag, client_state={"step": step})
        if rank == 0:
            import yaml

            cfg = {"model": {"name": args.model, "img_size": args.img_size, "window_size": args.window},
                   "train": {"global_batch_size": args.global_batch}}
            with open(os.path.join(args.out, tag, "gigamim_config.yaml"), "w") as f:
                yaml.safe_dump(cfg, f)
            with open(os.path.join(args.out, tag, "gigamim_meta.json"), "w") as f:
                json.dump({"step": step, "model": args.model, "img_size": args.img_size, "world_size": world,
                           "version": "test"}, f)

    for _ in range(args.extra_steps):
        train_step()
    if rank == 0 and args.losses:
        with open(args.losses, "w") as f:
            json.dump(losses, f)
    dist.barrier()


if __name__ == "__main__":
    main()
