"""What a run trains: the few things `Trainer` asks of its task.

The trainer owns everything a serious run needs whatever it trains (process group, run lock,
DeepSpeed engine, the step with its non-finite agreement, exact resume, signals and
deadlines, metrics, progress bar, checkpoints). A task says what differs:

- `build_model(trainer)`: a function returning the nn.Module, and whether the trainer should
  call it under `zero.Init` for ZeRO-3 (partitioned as it is made) or hand DeepSpeed the
  whole model it returns (fine-tuning under ZeRO-0/1/2, weights already read in);
- `after_build(model, engine)`: once the model exists, before the engine's optimizer copies
  its parameters (fine-tuning under ZeRO-3 reads the pretrained weights into the partitioned
  model here, through `engine.load_weights`);
- `on_engine(trainer)`: once the engine exists, before a resume loads into it (the EMA copy);
- `param_groups(model)`, `make_loader(trainer, model)`, `flops(model)`;
- `loss(engine, batch, trainer)`: one micro-batch's loss;
- `after_step(trainer, step, end, batch, stopping)`: EMA update, evaluations / pictures
  (not when stopping: the save comes first, a grace period may not cover an evaluation
  pass), returning metrics to log;
- `finish(trainer, batch)`: at the end of a completed run (the final picture, the export);
- `state_dict()` / `load_state_dict()`: what the task keeps across a resume (EMA weights);
- `meta()`: what the checkpoint meta records about the task.

`Task` holds the shared parts and the hooks' defaults (nothing to do); `PretrainTask` is
SimMIM; `FinetuneTask` is classification (layer decay, Mixup/CutMix, label
smoothing, EMA, periodic top-1/top-5 on held-out shards, a timm-loadable export at the end).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gigamim.config import Config, ConfigError


class Task:
    """The hooks every task has, doing nothing by default, and what the tasks share."""

    name = "task"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def configure(self) -> list[str]:
        """Complete the config from the task's inputs (in place, before it is validated or
        printed); returns what was taken from where, as lines to say. Nothing by default."""
        return []

    def check(self) -> None:
        """Refuse what this task cannot train (its model, its data, its weights), before any process group."""

    def data_specs(self) -> dict:
        """config key -> shard spec of the data this task reads (checked for a readable shard)."""
        return {}

    def check_data_readable(self) -> None:
        """Before any process group: each shard set has at least one readable tar archive."""
        from gigamim.data.readable import first_readable_shard

        for key, spec in self.data_specs().items():
            if not spec:
                continue
            try:
                first_readable_shard(spec)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None

    def after_build(self, model, engine) -> None:
        pass

    def on_engine(self, trainer) -> None:
        pass

    def after_step(self, trainer, step: int, end: int, batch, stopping: bool = False) -> dict:
        return {}

    def finish(self, trainer, batch) -> None:
        pass

    def summary(self, trainer) -> list[str]:
        """The task's lines of the closing summary (what it wrote, what it measured)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def meta(self) -> dict:
        return {"task": self.name}

    def loader_options(self, trainer) -> dict:
        """The loader arguments that come from the train and data sections, for any task."""
        from gigamim.sizes import parse_size

        cfg = self.cfg
        return dict(rank=trainer.rank, world_size=trainer.world, num_workers=cfg.data.num_workers,
                    seed=cfg.train.seed, img_size=cfg.model.img_size, image_key=cfg.data.image_key,
                    cache_dir=cfg.data.cache_dir, cache_size=parse_size(cfg.data.cache_size))

    @staticmethod
    def images(batch: dict, trainer):
        """uint8 images travel from the loader workers; they are normalised on the device, in
        the activation dtype."""
        import torch

        from gigamim.data.transforms import normalize_on_device
        from gigamim.train.precision import PRECISION_DTYPES

        return normalize_on_device(batch["image"], trainer.device, getattr(torch, PRECISION_DTYPES[trainer.precision]))


class PretrainTask(Task):
    """SimMIM: masked images in, L1 on the masked pixels out."""

    name = "pretrain"

    def check(self) -> None:
        """The model, asked of the model code: built on the meta device (no memory, no process
        group), so a window that does not tile a stage or an unknown name is one line now."""
        import torch

        from gigamim.models.attention import resolve_attn_impl

        try:
            attn_impl = resolve_attn_impl(self.cfg.model.attn_impl, "cpu")
            with torch.device("meta"):
                self._build(attn_impl)()
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model: {str(e).splitlines()[0]}") from None

    def data_specs(self) -> dict:
        return {"data.shards": self.cfg.data.shards}

    def _build(self, attn_impl: str):
        from gigamim.config import ModelConfig
        from gigamim.models.build import build_simmim

        cfg = self.cfg
        section = dict(dataclasses.asdict(cfg.model), attn_impl=attn_impl)
        return lambda: build_simmim(section, defaults=dataclasses.asdict(ModelConfig()),
                                    norm_target=cfg.data.norm_target, norm_target_patch=cfg.data.norm_target_patch)

    def build_model(self, trainer):
        from gigamim.models.attention import resolve_attn_impl

        return self._build(resolve_attn_impl(self.cfg.model.attn_impl, trainer.device.type)), True

    def after_build(self, model, engine) -> None:
        if self.cfg.model.init_from:  # continued pretraining (e.g. an imported official checkpoint)
            from gigamim.train.init_from import load_init_from

            load_init_from(self.cfg.model.init_from, model, engine, engine.dist.rank)

    def param_groups(self, model):
        from gigamim.models.param_groups import param_groups

        return param_groups(model, self.cfg.optim.weight_decay)

    def flops(self, model):
        from gigamim.models.family import family_of

        return family_of(model).flops(model, self.cfg.model.img_size)  # (None, None): no count, mfu null

    def make_loader(self, trainer, model):
        from gigamim.data.loader import SimMIMLoader

        cfg = self.cfg
        try:
            return SimMIMLoader(
                cfg.data.shards, cfg.train.micro_batch_size, mask_patch_size=cfg.data.mask_patch_size,
                model_patch_size=model.patch_size, mask_ratio=cfg.data.mask_ratio, mode=cfg.data.mode,
                shuffle_buffer=cfg.data.shuffle_buffer, **self.loader_options(trainer))
        except (ValueError, FileNotFoundError) as e:
            # Every rank counts the same shards, so every rank gets here alike.
            raise ConfigError(f"data.shards: {e}") from None

    def to_inputs(self, batch: dict, trainer) -> tuple:
        return self.images(batch, trainer), batch["mask"].to(trainer.device, non_blocking=True)

    def loss(self, engine, batch: dict, trainer):
        return engine(*self.to_inputs(batch, trainer))

    def after_step(self, trainer, step: int, end: int, batch, stopping: bool = False) -> dict:
        every = self.cfg.log.image_every_steps
        if every and step % every == 0 and not stopping:
            self.picture(trainer, batch)
        return {}

    def finish(self, trainer, batch) -> None:
        if batch is not None:
            self.picture(trainer, batch)

    def summary(self, trainer) -> list[str]:
        return [f"picture     {self.last_picture}"] if getattr(self, "last_picture", None) else []

    def picture(self, trainer, batch: dict) -> None:
        """A reconstruction PNG. Collective under ZeRO-3 (the forward gathers parameters)."""
        import torch

        from gigamim.train.visualize import save_reconstruction_png

        n = min(self.cfg.log.num_images, batch["image"].shape[0])
        images, mask = self.to_inputs({"image": batch["image"][:n], "mask": batch["mask"][:n]}, trainer)
        module = trainer.engine.module
        module.eval()
        with torch.no_grad():
            rec = module(images, mask, return_reconstruction=True)
        module.train()
        if trainer.rank == 0:
            step = trainer.state.step
            path = Path(self.cfg.log.dir) / "reconstructions" / f"step_{step:08d}.png"
            save_reconstruction_png(path, batch["image"][:n], batch["mask"][:n], rec, title=f"step {step}")
            self.last_picture = path


class FinetuneTask(Task):
    """Classification from a (SimMIM-)pretrained encoder, the official SimMIM fine-tune recipe's
    pieces: layer-wise LR decay, drop path, timm's Mixup/CutMix with soft-target (or label-
    smoothing) cross-entropy, optional timm EMA, top-1/top-5 on held-out shards."""

    name = "finetune"
    EMA_KEY = "gigamim_finetune_ema"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ft = cfg.finetune
        self.ema = None
        self.val = None
        self.model = None  # ZeRO-0/1/2: the prepared whole classifier, until the engine takes it
        self.zero3 = False
        self.info: dict = {}  # from build_classifier; empty until prepare()
        self.loaded_keys: set[str] = set()  # ZeRO-3: the parameters after_build reads in
        self.last_eval: dict = {}  # the last evaluation's top-1 (top-5), for the closing summary
        self.export_path: Path | None = None
        self._setup_loss()

    def configure(self) -> list[str]:
        """The model from the weights' recorded run (unless the config gives it), the class
        count from the training shards (finetune.num_classes: 0)."""
        from gigamim.train.classifier import classes_from_shards, configure_from_weights

        lines = configure_from_weights(self.cfg) + classes_from_shards(self.cfg)
        self._setup_loss()  # Mixup's label smoothing needs the class count
        return lines

    def check(self) -> None:
        from gigamim.train.classifier import FinetuneError

        ft = self.ft
        if not ft.train_shards:
            raise FinetuneError("finetune.train_shards is empty: give labelled shards (make-shards of an ImageFolder)")
        if (ft.mixup > 0 or ft.cutmix > 0) and self.cfg.train.micro_batch_size % 2:
            raise FinetuneError(f"Mixup/CutMix pair the images of a micro-batch: train.micro_batch_size="
                                f"{self.cfg.train.micro_batch_size} must be even (or set finetune.mixup=0 "
                                "finetune.cutmix=0)")
        self.check_data()
        self.prepare()

    def data_specs(self) -> dict:
        return {"finetune.train_shards": self.ft.train_shards, "finetune.val_shards": self.ft.val_shards}

    # -- model

    def prepare(self) -> None:
        """Check the weights against the classifier, before any process group exists (weights
        of another architecture, a window that cannot be interpolated: one line).

        ZeRO-0/1/2: the classifier is built whole and the weights read into it; every rank
        holds it anyway. ZeRO-3: only checked, on the meta device; the checked weights (host
        memory, until the model is built) are read into the model built partitioned
        (`after_build`), so no rank ever holds the whole model's parameters, gradients or
        optimizer states. Same seed on every rank: the same head."""
        import contextlib

        import torch

        from gigamim.train.classifier import build_classifier
        from gigamim.train.engines import partitions_at_build

        self.zero3 = partitions_at_build(self.cfg)
        if self.ft.ema and self.zero3:
            raise ConfigError(f"finetune.ema needs whole parameters on each rank, and train.engine="
                              f"{self.cfg.train.engine} (as configured) partitions them: use train.engine=deepspeed "
                              "with a ZeRO stage 0-2 template (deepspeed.config=zero1) with EMA")
        torch.manual_seed(self.cfg.train.seed)
        with torch.device("meta") if self.zero3 else contextlib.nullcontext():
            model, self.info = build_classifier(self.cfg, keep_state=self.zero3)
        self.model = None if self.zero3 else model

    def build_model(self, trainer):
        """ZeRO-3: a factory that `build_engine` calls under `zero.Init`; else the prepared
        whole classifier (DeepSpeed takes it as it is)."""
        if not self.info:
            self.prepare()
        if self.zero3:
            from gigamim.models import create_model

            state = self.info.get("state")
            self.loaded_keys = set(state or ())
            if trainer.rank != 0:
                self.info["state"] = None  # rank 0 writes every parameter (after_build): free it here
            name, kwargs = self.info["model"], dict(self.info["kwargs"])
            seed, num_classes = self.cfg.train.seed, self.ft.num_classes

            def build():
                import torch

                torch.manual_seed(seed)
                return create_model(name, num_classes=num_classes, **kwargs)

            return build, True
        model, self.model = self.model, None  # the engine owns it from here
        return (lambda: model), False

    def after_build(self, model, engine) -> None:
        """ZeRO-3: read the checked weights into the partitioned model, one parameter at a
        time (gathered, written by rank 0, partitioned again), before the engine's optimizer
        copies the partitions."""
        state = self.info.pop("state", None)
        if not self.loaded_keys:
            return  # not ZeRO-3 (the weights are in already), or random init
        # The new head (not in loaded_keys) keeps its initialisation. Persistent buffers would
        # need every rank's copy; these encoders' index and coordinate tables are
        # non-persistent (rebuilt from the geometry).
        engine.load_weights(model, state, self.loaded_keys)

    def param_groups(self, model):
        from gigamim.models.param_groups import layer_decay, param_groups
        from gigamim.train.optim import peak_lr

        rate = self.ft.layer_decay
        groups = param_groups(model, self.cfg.optim.weight_decay, layer_decay(rate) if rate != 1 else None)
        for g in groups:
            g["lr"] = peak_lr(self.cfg) * g["lr_scale"]  # the LR schedule multiplies each group's own peak
        return groups

    def flops(self, model):
        from gigamim.models.family import family_of

        return family_of(model).flops(model, self.cfg.model.img_size)  # (None, None): no count, mfu null

    # -- data

    def _loader(self, trainer, shards: str, train: bool, key: str):
        from gigamim.data.loader import ClassificationLoader

        try:
            return ClassificationLoader(shards, self.cfg.train.micro_batch_size, train=train,
                                        scale=tuple(self.ft.crop_scale), hflip=0.5 if self.ft.hflip else 0.0,
                                        auto_augment=self.ft.auto_augment, reprob=self.ft.reprob,
                                        interpolation=self.ft.interpolation,
                                        **self.loader_options(trainer))
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"finetune.{key}: {e}") from None

    def check_data(self) -> None:
        """Before any process group: the labelled shards exist, are labelled, and have no
        more classes (index.json's class list) than finetune.num_classes. The loader still
        checks every label it reads (a label >= num_classes is one line, naming the sample)."""
        from gigamim.data import shardspec
        from gigamim.data.loader import check_labelled

        for key in ("train_shards", "val_shards"):
            spec = getattr(self.ft, key)
            if not spec:
                continue
            try:
                check_labelled(spec)
                classes = shardspec.resolve(spec).classes or []
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"finetune.{key}: {e}") from None
            if len(classes) > self.ft.num_classes:
                raise ConfigError(f"labels go up to {len(classes) - 1} but finetune.num_classes="
                                  f"{self.ft.num_classes} ({spec} has {len(classes)} classes): set num_classes "
                                  f"to at least {len(classes)}")

    def make_loader(self, trainer, model):
        if self.ft.val_shards:
            self.val = self._loader(trainer, self.ft.val_shards, train=False, key="val_shards")
        return self._loader(trainer, self.ft.train_shards, train=True, key="train_shards")

    def to_inputs(self, batch: dict, trainer) -> tuple:
        from gigamim.data.errors import DataError
        from gigamim.data.transforms import random_erasing

        labels = batch["label"]
        if len(labels) and int(labels.max()) >= self.ft.num_classes:
            i = int(labels.argmax())
            raise DataError(f"sample {batch['key'][i]!r} has label {int(labels[i])} but "
                            f"finetune.num_classes={self.ft.num_classes}")
        images = random_erasing(self.images(batch, trainer), batch.get("erase_seed"), self.ft.reprob, self.ft.remode,
                                self.ft.recount)  # per-sample seeds: train batches with finetune.reprob > 0 only
        return images, labels.to(trainer.device, non_blocking=True)

    # -- the step

    def _setup_loss(self):
        import torch
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        ft = self.ft
        self.mixup = None
        if ft.mixup > 0 or ft.cutmix > 0:
            # Mixup draws from numpy's global RNG: the trainer's per-rank RNG state (saved
            # with every checkpoint) makes its draws resume exactly.
            self.mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mixup_prob,
                               switch_prob=ft.mixup_switch_prob, label_smoothing=ft.label_smoothing,
                               num_classes=ft.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif ft.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=ft.label_smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def loss(self, engine, batch: dict, trainer):
        x, y = self.to_inputs(batch, trainer)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self.criterion(engine(x).float(), y)

    def on_engine(self, trainer) -> None:
        """The engine exists (before a resume loads into it): the EMA copy starts from the
        initial weights, as timm's does."""
        self.trainer = trainer
        if self.ft.ema:
            import torch
            from timm.utils import ModelEmaV3

            # fp32 averages whatever the training dtype: with decay 0.9999 a bf16 average would
            # lose most updates under its rounding (timm then rounds stochastically, with a
            # generator that a checkpoint does not carry, so a resume would not be exact).
            self.ema = ModelEmaV3(trainer.engine.module, decay=self.ft.ema_decay, dtype=torch.float32)

    def after_step(self, trainer, step: int, end: int, batch, stopping: bool = False) -> dict:
        if self.ema is not None:
            self.ema.update(trainer.engine.module, step=step)  # always: the step was applied
        every = self.ft.eval_every_steps
        if self.val is None or stopping or not ((every and step % every == 0) or step == end):
            return {}
        out = self.evaluate(trainer, trainer.engine.module)
        if self.ema is not None:
            out.update({f"ema_{k}": v for k, v in self.evaluate(trainer, self.ema.module).items()
                        if k != "eval_images"})
        trainer.say(f"gigamim finetune: step {step} top-1 {out['top1']:.4f}"
                    + (f" top-5 {out['top5']:.4f}" if "top5" in out else "")
                    + (f" (EMA top-1 {out['ema_top1']:.4f})" if "ema_top1" in out else ""))
        self.last_eval = dict(out, step=step)
        return out

    def evaluate(self, trainer, module) -> dict:
        """top-1 / top-5 over one pass of the held-out shards, every sample once (padding
        repeats, `valid` False, are not counted). Collective: every rank runs the same number
        of forwards (the loader pads ranks to equal batch counts; ZeRO-3 gathers are collective)."""
        import torch
        import torch.distributed as dist

        was_training = module.training
        module.eval()
        # [top-1 hits, top-5 hits, samples], summed on the device: one read-back per evaluation
        t = torch.zeros(3, dtype=torch.float64, device=trainer.device if trainer.device.type == "cuda" else "cpu")
        self.val.set_epoch(0)
        batches = iter(self.val)
        try:
            with torch.no_grad():
                for _ in range(len(self.val)):
                    batch = next(batches)
                    x, y = self.to_inputs(batch, trainer)
                    logits = module(x.to(next(module.parameters()).dtype)).float()  # the EMA copy is fp32
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
                    valid = batch["valid"].to(top.device, non_blocking=True)
                    t += torch.stack([(top[:, 0] & valid).sum(), (top.any(1) & valid).sum(), valid.sum()]).to(t)
        finally:
            batches.close()
        module.train(was_training)
        dist.all_reduce(t)
        n = max(1.0, t[2].item())
        out = {"top1": t[0].item() / n, "eval_images": int(t[2].item())}
        if self.ft.num_classes > 5:  # with 5 classes or fewer every label is in the top 5: no information
            out["top5"] = t[1].item() / n
        return out

    # -- the end, resume, meta

    def finish(self, trainer, batch) -> None:
        if trainer.state.step == self.cfg.train.max_steps:  # not after train.stop_at_step
            module = self.ema.module if self.ema is not None else trainer.engine.module
            self.export_path = export_finetuned(module, self.cfg, self.info, trainer.state.step, trainer.rank,
                                                trainer.engine.full_state_dict)

    def summary(self, trainer) -> list[str]:
        lines = []
        ev = self.last_eval
        if ev:
            lines.append(f"eval        top-1 {ev['top1']:.4f}" + (f", top-5 {ev['top5']:.4f}" if "top5" in ev else "")
                         + f" on {ev['eval_images']} held-out images ({self.ft.val_shards}), step {ev['step']}"
                         + (f"; EMA top-1 {ev['ema_top1']:.4f}" if "ema_top1" in ev else ""))
        if self.export_path is not None:
            lines.append(f"classifier  {self.export_path} ({self.ft.num_classes} classes; timm: "
                         "gigamim.models.timm_compat.timm_model_from_metadata, see README 'Your own images')")
        return lines

    def state_dict(self) -> dict:
        return {self.EMA_KEY: self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        from gigamim.train.state import CLIENT_KEY

        if CLIENT_KEY not in state and "gigamim_finetune" in state:
            from gigamim.checkpoint.layout import CheckpointError

            raise CheckpointError(f"{self.trainer.resume.tag_dir} was written by the 0.1 development fine-tune loop "
                                  "(in-memory data): its data position cannot be resumed; start the fine-tune again")
        if self.ema is None:
            return
        if state.get(self.EMA_KEY) is not None:
            self.ema.load_state_dict(state[self.EMA_KEY])
        else:
            # EMA turned on at this resume: start the average from the resumed weights, not
            # from the initial ones the copy was made of.
            self.ema.set(self.trainer.engine.module)
            self.trainer.say("gigamim finetune: warning: the checkpoint has no EMA state (written with "
                             "finetune.ema=false); the EMA starts from the resumed weights", err=True)

    def meta(self) -> dict:
        return {**super().meta(), "num_classes": self.ft.num_classes}


def export_finetuned(module, cfg: Config, info: dict, step: int, rank: int, full_state_dict) -> Path | None:
    """Rank 0 writes encoder + head as timm-keyed safetensors, with what rebuilds it in timm in
    the metadata (`timm_compat.timm_metadata`: the class, its constructor arguments, a timm model
    name when one fits); returns the path on rank 0. Collective: `full_state_dict`, the
    engine's, makes partitioned parameters whole on rank 0."""
    import torch

    from gigamim import __version__
    from gigamim.checkpoint import safetensors_io
    from gigamim.models.family import family_of

    ft = cfg.finetune
    sd = full_state_dict(module)
    if rank != 0:
        return None
    # What the keys do not show (SwinV2's pretrained windows, ViT's heads): the family says.
    spec = family_of(module)
    extra = spec.export_geometry(module, {"pretrained_window_sizes": cfg.model.pretrained_window_sizes})
    geometry = {"img_size": cfg.model.img_size, "window_size": cfg.model.window_size,
                **{k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}}
    timm_meta, _ = spec.timm_metadata(sd, geometry, num_classes=ft.num_classes)
    out = Path(cfg.checkpoint.dir) / "finetuned.safetensors"
    metadata = {"format": "finetuned", "step": str(step), "gigamim_version": __version__,
                "gigamim_config": cfg.dump(), **timm_meta, "num_classes": str(ft.num_classes), "model": cfg.model.name,
                "weights": str(info.get("weights", ""))}
    safetensors_io.save(str(out), sd, metadata, max_shard_size=None, dtype=torch.float32, overwrite=True)
    print(f"gigamim finetune: wrote {out} (timm {timm_meta['timm_class'].rsplit('.', 1)[-1]}"
          f"({', '.join(f'{k}={v!r}' for k, v in json.loads(timm_meta['timm_kwargs']).items())})"
          + (f", named {timm_meta['timm_model']}" if timm_meta["timm_model"] else "") + ")", flush=True)
    return out
