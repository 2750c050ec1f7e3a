"""`gigamim pretrain`: SimMIM pretraining of a SwinV2 under DeepSpeed (ZeRO-3 by default).

The same command runs as one process, under the `deepspeed` launcher
(`deepspeed --num_gpus N --module gigamim pretrain ...`) and under torchrun; gloo on CPU,
nccl on GPUs. One optimizer step = `accumulation` micro-batches on every rank.

What a step does, and why:
- uint8 images travel from the loader workers; they are normalised on the device.
- a non-finite loss is agreed on by all ranks (an all-reduce), the micro-batch is dropped
  before backward (so no rank applies it), counted, and K in a row stop the run with a
  clear message; a checkpoint is never written from non-finite weights.
- SIGTERM/SIGINT set a flag; at the next step boundary all ranks agree, save a
  checkpoint and exit 0, so a preempted job resumes with `--resume auto`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
import zlib
from pathlib import Path

from gigamim.config import Config, ConfigError, gradient_accumulation_steps, load_config, validate
from gigamim.checkpoint.layout import CheckpointError

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigamim pretrain", description="SimMIM pretraining of SwinV2 under DeepSpeed.")
    p.add_argument("--config", help="YAML file, or a packaged config name (demo, simmim_swinv2_base_192, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint in checkpoint.dir, else start fresh), "
                        "a checkpoint folder, or one tag folder (also a universal one)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The deepspeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        from gigamim.checkpoint.layout import find_resume
        from gigamim.launch.dist import detect_launch
        from gigamim.train.deepspeed_init import load_template

        validate(cfg, world_size=detect_launch().world_size)
        load_template(cfg.deepspeed.config)
        if args.resume:
            find_resume(args.resume, cfg.checkpoint.dir)
        return Trainer(cfg, resume=args.resume).run()
    except (ConfigError, CheckpointError) as e:
        # Raised before any rank has built a model or touched data, on every rank alike.
        kind = "config" if isinstance(e, ConfigError) else "checkpoint"
        print(f"gigamim pretrain: {kind} error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


# --------------------------------------------------------------------------- pieces


def build_model(cfg: Config):
    """SimMIM(SwinV2) as the config says. Pure PyTorch: the caller decides on zero.Init."""
    from gigamim.models import SimMIM, create_model

    m = cfg.model
    kwargs = dict(
        img_size=m.img_size,
        drop_path_rate=m.drop_path_rate,
        num_classes=0,
        attn_impl=m.attn_impl,
        sequential_stages=tuple(m.sequential_stages),
        attn_chunk=m.attn_chunk,
        grad_checkpointing=m.grad_checkpointing,
        checkpoint_offload=m.checkpoint_offload,
    )
    if m.window_size is not None:
        kwargs["window_size"] = m.window_size
    if m.pretrained_window_sizes is not None:
        kwargs["pretrained_window_sizes"] = tuple(m.pretrained_window_sizes)
    encoder = create_model(m.name, **kwargs)
    return SimMIM(encoder, encoder_stride=32)


def capture_rng() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _new_window() -> dict:
    """Sums over the steps since the last metrics record."""
    return {"loss": 0.0, "n": 0, "steps": 0, "data_s": 0.0, "t0": time.perf_counter()}


class _StopFlag:
    """SIGTERM/SIGINT -> finish the current step, save, exit. A second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None):
        self.cfg = cfg
        self.resume = resume

    # ---- set-up
    def _setup(self):
        import torch

        if not torch.cuda.is_available():
            # DeepSpeed picks its accelerator at import; CPU ranks need it told.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from gigamim.data.loader import SimMIMLoader
        from gigamim.checkpoint import layout as ckpt
        from gigamim.launch.dist import init_distributed
        from gigamim.train.deepspeed_init import build_ds_config, resolve_precision, zero_stage
        from gigamim.train.optim import make_lr_scheduler, peak_lr
        from gigamim.models.flops import train_flops
        from gigamim.models.param_groups import param_groups

        cfg = self.cfg
        if cfg.model.window_size is None:
            # Record the variant's window in the resolved config, so that exports and
            # resumes never have to guess the geometry.
            from gigamim.models.registry import model_defaults

            cfg.model.window_size = model_defaults(cfg.model.name).get("window_size")
        self.dist = init_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.device = self.dist.device
        on_gpu = self.device.type == "cuda"
        self.accum = gradient_accumulation_steps(cfg, self.world)
        self.precision = resolve_precision(cfg, on_gpu)

        self.resume_from = None
        if self.resume:
            self.resume_from = ckpt.find_resume(self.resume, cfg.checkpoint.dir)
            if self.resume_from is None and self.rank == 0:
                print(f"gigamim: no checkpoint in {cfg.checkpoint.dir}; starting from step 0", flush=True)

        ds_config = build_ds_config(cfg, self.world, on_gpu, peak_lr=peak_lr(cfg))
        if self.resume_from:
            tag_dir = self.resume_from[0] / self.resume_from[1]
            if ckpt.is_universal(tag_dir):
                ds_config.setdefault("checkpoint", {})["load_universal"] = True
            elif ckpt.read_meta(tag_dir).get("world_size") != self.world:
                raise CheckpointError(
                    f"{tag_dir} was saved by {ckpt.read_meta(tag_dir).get('world_size')} ranks and this run has "
                    f"{self.world}: convert it first (`gigamim consolidate {self.resume_from[0]} --tag "
                    f"{self.resume_from[1]} --universal`) and resume from {tag_dir}_universal")
        self.zero_stage = zero_stage(ds_config)

        # Same seed on every rank for the weights; the training RNG (drop path) differs per rank.
        seed_everything(cfg.train.seed)
        if self.zero_stage == 3:
            # No rank ever holds the whole model: parameters are partitioned as they are made.
            # The dtype comes from the config's bf16/fp16 flags. Do not pass dtype= : in
            # DeepSpeed 0.19 an explicit dtype is overridden by an operator-precedence slip
            # (`dtype or fp16 if ... else bf16`), which gives bf16 on CPU ranks.
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = build_model(cfg)
        else:
            model = build_model(cfg)
        self.flops_per_image = train_flops(model, cfg.model.img_size,
                                           recompute=bool(cfg.model.grad_checkpointing))
        groups = param_groups(model, cfg.optim.weight_decay)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config,
            lr_scheduler=make_lr_scheduler(cfg), dist_init_required=False,
        )
        seed_everything(cfg.train.seed + 1000 * (self.rank + 1))

        self.loader = SimMIMLoader(
            cfg.data.shards, cfg.train.micro_batch_size, rank=self.rank, world_size=self.world,
            num_workers=cfg.data.num_workers, seed=cfg.train.seed, img_size=cfg.model.img_size,
            mask_patch_size=cfg.data.mask_patch_size, model_patch_size=4, mask_ratio=cfg.data.mask_ratio,
            mode=cfg.data.mode, shuffle_buffer=cfg.data.shuffle_buffer,
        )
        self.start_step = 0
        self.nonfinite_total = 0
        if self.resume_from:
            self._load(*self.resume_from)

    def _load(self, load_dir: Path, tag: str):
        path, client = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        state = (client or {}).get("gigamim", {})
        self.start_step = int(state.get("step", 0))
        # The restored LR schedule carries the old run's peak (LambdaLR.base_lrs) and the
        # optimizer its last LR; the config is the source of truth, so a resume with a new
        # optim.lr or global batch follows the new schedule from this step on.
        from gigamim.train.optim import lr_at, peak_lr

        self.scheduler.base_lrs = [peak_lr(self.cfg)] * len(self.scheduler.base_lrs)
        for group in self.scheduler.optimizer.param_groups:
            group["lr"] = lr_at(self.start_step, self.cfg)
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        per_rank = state.get("loader_per_rank", {})
        if per_rank:
            # On another world size (a universal checkpoint) this rank has no saved position;
            # any rank's state tells the loader the epoch, and it starts cleanly at the next
            # one (the sample order of a different split cannot be continued exactly).
            self.loader.load_state_dict(per_rank.get(str(self.rank), per_rank["0"]))
        rng = state.get("rng_per_rank", {}).get(str(self.rank))
        if rng is not None:
            restore_rng(rng)
        if self.rank == 0:
            print(f"gigamim: resumed from {load_dir / tag} at step {self.start_step}", flush=True)

    # ---- collectives
    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _local_weights_finite(self) -> bool:
        import torch

        ok = True
        for p in self.engine.module.parameters():
            local = getattr(p, "ds_tensor", None)
            local = p.data if local is None else local
            if local.numel() and not torch.isfinite(local).all():
                ok = False
                break
        return self._all_reduce([0.0 if ok else 1.0], op="max")[0] == 0.0

    # ---- checkpoint
    def _save(self, step: int):
        from gigamim import __version__
        from gigamim.checkpoint import layout as ckpt

        if not self._local_weights_finite():
            raise RuntimeError(f"weights are not finite at step {step}; refusing to write a checkpoint")
        # Every rank's data position and RNG, gathered and stored keyed by rank: ZeRO-1/2
        # write the client state from rank 0 only, and a resume on another world size needs
        # some rank's position to know the epoch.
        import torch.distributed as dist

        mine = {"loader": self.loader.state_dict(), "rng": capture_rng()}
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        client = {"gigamim": {
            "step": step,
            "nonfinite_total": self.nonfinite_total,
            "loader_per_rank": {str(r): s["loader"] for r, s in enumerate(everyone)},
            "rng_per_rank": {str(r): s["rng"] for r, s in enumerate(everyone)},
        }}
        meta = {"step": step, "model": self.cfg.model.name, "img_size": self.cfg.model.img_size,
                "world_size": self.world, "zero_stage": self.zero_stage, "precision": self.precision,
                "version": __version__}
        tag_dir = ckpt.save(self.engine, self.cfg.checkpoint.dir, step, client, meta, self.cfg.dump(),
                            self.cfg.checkpoint.keep_last)
        if self.rank == 0:
            print(f"gigamim: saved checkpoint {tag_dir}", flush=True)

    # ---- pictures
    def _reconstruction_png(self, batch: dict, step: int):
        """Collective under ZeRO-3 (the forward gathers parameters): every rank calls it."""
        import torch

        from gigamim.train.visualize import save_reconstruction_png

        n = min(self.cfg.log.num_images, batch["image"].shape[0])
        images = self._normalize(batch["image"][:n])
        mask = batch["mask"][:n].to(self.device)
        self.engine.module.eval()
        with torch.no_grad():
            rec = self.engine.module(images, mask, return_reconstruction=True)
        self.engine.module.train()
        if self.rank == 0:
            path = Path(self.cfg.log.dir) / "reconstructions" / f"step_{step:08d}.png"
            save_reconstruction_png(path, batch["image"][:n], batch["mask"][:n], rec, title=f"step {step}")

    def _normalize(self, images_uint8):
        import torch

        from gigamim.data.transforms import normalize_on_device

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        return normalize_on_device(images_uint8, self.device, dtype)

    # ---- the loop
    def run(self) -> int:
        stop = _StopFlag()
        try:
            self._setup()
            return self._loop(stop)
        finally:
            stop.restore()

    def _loop(self, stop: "_StopFlag") -> int:
        import math

        from gigamim.train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb

        cfg = self.cfg
        rank0 = self.rank == 0
        # On a resume, records past the checkpoint (a crashed run's tail) are dropped.
        logger = MetricsLogger(cfg.log.dir, cfg.log.tensorboard, after_step=self.start_step) if rank0 else None
        if rank0:
            Path(cfg.log.dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.log.dir) / "config.yaml").write_text(cfg.dump())
        peak_tflops = device_peak_tflops(self.device, self.precision)
        bar = None
        if rank0 and cfg.log.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.max_steps, initial=self.start_step, desc="pretrain", dynamic_ncols=True)

        data_iter = iter(self.loader)
        step = self.start_step
        consecutive_bad = 0
        window = _new_window()
        last_batch = None
        end = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        try:
            while step < end:
                micro = 0
                while micro < self.accum:
                    t_data = time.perf_counter()
                    batch = next(data_iter)
                    window["data_s"] += time.perf_counter() - t_data
                    last_batch = batch
                    window["digest"] = zlib.crc32(" ".join(batch["key"]).encode(), window.get("digest", 0))
                    images = self._normalize(batch["image"])
                    mask = batch["mask"].to(self.device, non_blocking=True)
                    loss = self.engine(images, mask)
                    value = float(loss.detach().float())
                    bad = self._all_reduce([0.0 if math.isfinite(value) else 1.0], op="max")[0] > 0
                    if bad:
                        # Dropped before backward on every rank: no rank applies it.
                        consecutive_bad += 1
                        self.nonfinite_total += 1
                        if rank0:
                            print(f"gigamim: non-finite loss at step {step}; micro-batch skipped "
                                  f"({consecutive_bad} in a row)", file=sys.stderr, flush=True)
                        if consecutive_bad >= cfg.train.max_nonfinite_steps:
                            if rank0:
                                print(f"gigamim: stopping: {consecutive_bad} non-finite losses in a row "
                                      f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optim.lr, "
                                      f"check the data, or resume from the last checkpoint. No checkpoint written.",
                                      file=sys.stderr, flush=True)
                            return EXIT_NONFINITE
                        continue
                    consecutive_bad = 0
                    self.engine.backward(loss)
                    window["lr"] = self.engine.get_lr()[0]  # the LR this step applies (read before step())
                    self.engine.step()
                    window["loss"] += value
                    window["n"] += 1
                    micro += 1
                step += 1
                window["steps"] += 1

                stopping = self._all_reduce([1.0 if stop.signum else 0.0], op="max")[0] > 0
                if step % cfg.log.every_steps == 0 or step == end or stopping:
                    self._log(logger, step, window, peak_tflops, peak_memory_gb(self.device))
                    window = _new_window()
                if bar is not None:
                    bar.update(1)
                if cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0:
                    self._reconstruction_png(last_batch, step)
                every = cfg.checkpoint.every_steps
                if stopping or (every and step % every == 0) or step == end:
                    self._save(step)
                if stopping:
                    if rank0:
                        print(f"gigamim: got signal {stop.signum}; checkpoint saved at step {step}, exiting. "
                              f"Continue with --resume auto.", flush=True)
                    return 0
            if last_batch is not None:
                self._reconstruction_png(last_batch, step)
            return 0
        finally:
            data_iter.close()  # stops the loader's workers now, before interpreter exit
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()

    def _log(self, logger, step, window, peak_tflops, peak_mem):
        elapsed = time.perf_counter() - window["t0"]
        loss_sum, n, data_s, skipped = self._all_reduce(
            [window["loss"], float(window["n"]), window["data_s"], float(sum(self.loader.skip_counts.values()))]
        )
        if logger is None:
            return
        images_per_sec = window["steps"] * self.cfg.train.global_batch_size / max(elapsed, 1e-9)
        tflops = images_per_sec * self.flops_per_image / 1e12
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": step,
            "loss": loss_sum / max(n, 1.0),
            "lr": window.get("lr"),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_sec": images_per_sec,
            "tflops_per_sec": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "peak_mem_gb": peak_mem,
            "data_wait_frac": data_s / self.world / max(elapsed, 1e-9),
            "data_skipped": int(skipped),
            "nonfinite_skipped": self.nonfinite_total,
            "epoch": self.loader.epoch,
            # CRC32 of rank 0's sample keys since the last record: which data a step saw.
            "data_digest": window.get("digest", 0),
        }
        logger.log(record)
