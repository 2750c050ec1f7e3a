"""A training run (SimMIM pretraining or fine-tuning): set-up, then a loop that reads top to bottom.

`Trainer.setup()` joins the process group, builds the configured engine (`train/engines`:
DeepSpeed by default) with the task's model (partitioned as it is made where the engine
partitions: ZeRO-3), the loader and the `TrainState`, and
loads the resume point that `train/verb.py` resolved. `Trainer.fit()` is the loop: one
`step.train_step` per optimizer step, then the task's after-step (evaluation, pictures),
log / checkpoint / stop. What is trained is the task's business (`train/tasks.py`).

Preemption: SIGTERM/SIGINT (`signals.StopFlag`) are agreed on by all ranks inside the
step; the loop then saves a checkpoint and exits 0, so `--resume auto` continues.
A checkpoint is never written from non-finite weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gigamim.config import Config, gradient_accumulation_steps
from gigamim.train.metrics import merge_counters
from gigamim.train.optim import lr_schedule_change, lr_schedule_record

EXIT_NONFINITE = 3


class Trainer:
    def __init__(self, cfg: Config, task, resume=None, force_unlock: bool = False):
        """task: what is trained (a `train.tasks` task: SimMIM pretraining, fine-tuning).
        resume: a `train.resume.ResumePoint` (already resolved and checked) or None.
        force_unlock: take checkpoint.dir's run lock even from a holder that cannot be checked."""
        self.cfg = cfg
        self.task = task
        self.resume = resume
        self.force_unlock = force_unlock
        self.lock = None

    def run(self) -> int:
        from gigamim.train.signals import Deadline, StopFlag

        self.deadline = Deadline(self.cfg.train.stop_after)  # the clock starts with the run
        with StopFlag() as stop:
            try:
                self.setup()
                return self.fit(stop)
            finally:
                if self.lock is not None:
                    self.lock.release()

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        from gigamim.runtime.dist import init_distributed
        from gigamim.train.engines import create_engine
        from gigamim.train.precision import resolve_precision
        from gigamim.train.state import TrainState, seed_everything
        from gigamim.train.step import NonFiniteGuard

        cfg = self.cfg
        record_window_size(cfg)
        self.dist = init_distributed()
        self.rank, self.world, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self._take_run_lock()
        self.accum = gradient_accumulation_steps(cfg, self.world)
        self.precision = resolve_precision(cfg.train.precision, self.device.type == "cuda")

        # Same seed on every rank for the weights; the training RNG (drop path) differs per rank.
        seed_everything(cfg.train.seed)
        self.engine = create_engine(cfg, self.dist, self.precision)
        build_model, partition_at_build = self.task.build_model(self)
        model = self.engine.build(
            build_model, self.task.param_groups, partition_at_build=partition_at_build,
            after_build=lambda m: self.task.after_build(m, self.engine),
            load_universal=bool(self.resume and self.resume.universal))
        self.task.on_engine(self)
        # MFU counts model FLOPs (3x forward); HFU adds what checkpointing / sequential chunks recompute.
        self.model_flops, self.hardware_flops = self.task.flops(model)
        # MFU's denominator, once per run: a GPU's datasheet peak, else a short GEMM probe (CPU).
        from gigamim.train.peak import peak_tflops

        self.peak_tflops, peak_source = peak_tflops(self.device, self.precision)
        self.say(f"gigamim: peak for MFU: {self.peak_tflops:.3g} TFLOP/s ({peak_source})")
        seed_everything(cfg.train.seed + 1000 * (self.rank + 1))

        self.num_params = self.engine.num_parameters()
        self.loader = self.task.make_loader(self, model)
        self.state = TrainState(self.loader, rank=self.rank, world_size=self.world)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        if self.resume:
            self.load()

    def _take_run_lock(self) -> None:
        self.lock = take_run_lock(self.cfg.checkpoint.dir, self.rank, self.force_unlock)

    def load(self) -> None:
        from gigamim.train.optim import lr_factor, peak_lr
        from gigamim.train.state import CLIENT_KEY

        self._agree_on_resume_tag()
        client = self.engine.load(str(self.resume.root), self.resume.tag)
        self.task.load_state_dict(client)  # first: it may refuse the tag
        self.state.load_state_dict(client.get(CLIENT_KEY, {}))
        self.guard.total = self.state.nonfinite_total
        # The restored LR schedule carries the old run's peak (LambdaLR.base_lrs) and the
        # optimizer its last LR; the config is the source of truth, so a resume with a new
        # optim.lr or global batch follows the new schedule from this step on, each group
        # with its layer-decay scale, computed as LambdaLR does (base x factor) so that a
        # resumed step applies the very same float as the uninterrupted run.
        scheduler = self.engine.scheduler
        peak, groups = peak_lr(self.cfg), scheduler.optimizer.param_groups
        scheduler.base_lrs = [peak * g.get("lr_scale", 1.0) for g in groups]
        for base, group in zip(scheduler.base_lrs, groups):
            group["lr"] = base * lr_factor(self.state.step, self.cfg, group.get("lr_scale", 1.0))
        self.say(f"gigamim: resumed from {self.resume.tag_dir} at step {self.state.step}")
        change = lr_schedule_change(self.resume.meta.get("lr_schedule"), self.cfg, self.state.step)
        if change:
            self.say(f"gigamim: warning: {change}", err=True)

    def _agree_on_resume_tag(self) -> None:
        """Every rank resolved the tag on its own (shared file system): all load the same one or none."""
        import torch.distributed as dist

        tags = [None] * self.world
        dist.all_gather_object(tags, str(self.resume.tag_dir))
        if len(set(tags)) > 1:
            from gigamim.checkpoint.layout import CheckpointError

            raise CheckpointError(f"ranks picked different checkpoints to resume ({sorted(set(tags))}); "
                                  "is checkpoint.dir on a file system that every node sees?")

    # ------------------------------------------------------------------ the loop

    def fit(self, stop) -> int:
        from gigamim.train.metrics import Meter
        from gigamim.train.step import train_step

        cfg, state = self.cfg, self.state
        end = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        logger, bar = self._open_outputs()
        keys_log = self._open_keys_log() if cfg.log.sample_keys else None
        batches = iter(self.loader)
        meter, last_batch = Meter(), None
        try:
            while state.step < end:
                result = train_step(self.engine, batches, self.accum,
                                    lambda batch: self.task.loss(self.engine, batch, self), self.guard,
                                    stop_requested=lambda: bool(stop) or bool(self.deadline), device=self.device,
                                    on_dropped=self._warn_dropped)
                state.nonfinite_total = self.guard.total
                if result.gave_up:
                    self.say(f"gigamim: stopping: {self.guard.in_a_row} non-finite losses in a row "
                             f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optim.lr, check "
                             "the data, or resume from the last checkpoint. No checkpoint written.", err=True)
                    return EXIT_NONFINITE
                state.step += 1
                meter.add(result)
                if keys_log is not None:
                    keys_log.write(json.dumps({"step": state.step, "keys": result.trained_keys}) + "\n")
                last_batch = result.last_batch
                stopping, step = result.stop_requested, state.step
                extra = self.task.after_step(self, step, end, last_batch, stopping)  # EMA, evaluations, pictures
                if step % cfg.log.every_steps == 0 or step == end or stopping or extra:
                    self.log(logger, meter, **extra)
                    meter = Meter()
                if bar is not None:
                    bar.update(1)
                if stopping or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or step == end:
                    self.save()
                if stopping:
                    # Agreed over ranks: rank 0 names its reason (its own signal, else the clock).
                    why = (f"got signal {stop.signum}" if stop else
                           f"train.stop_after={cfg.train.stop_after} reached" if self.deadline else "another rank got a signal")
                    self.say(f"gigamim: {why}; checkpoint saved at step {step}, exiting. Continue with --resume auto.")
                    return 0
            self.task.finish(self, last_batch)
            return 0
        finally:
            batches.close()  # stops the loader's workers now, before interpreter exit
            for closable in (bar, logger, keys_log):
                if closable is not None:
                    closable.close()

    # ------------------------------------------------------------------ pieces of the loop

    def say(self, message: str, err: bool = False) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr if err else sys.stdout, flush=True)

    def _warn_dropped(self, in_a_row: int) -> None:
        self.say(f"gigamim: non-finite loss at step {self.state.step}; micro-batch skipped ({in_a_row} in a row)",
                 err=True)

    def _open_outputs(self):
        """Rank 0: metrics.jsonl (+ TensorBoard), the resolved config, a progress bar."""
        from gigamim.train.metrics import MetricsLogger

        if self.rank != 0:
            return None, None
        cfg = self.cfg
        # On a resume, records past the checkpoint (a crashed run's tail) are dropped.
        logger = MetricsLogger(cfg.log.dir, cfg.log.tensorboard, after_step=self.state.step)
        (Path(cfg.log.dir) / "config.yaml").write_text(cfg.dump())
        bar = None
        if cfg.log.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, desc=self.task.name, dynamic_ncols=True)
        return logger, bar

    def _open_keys_log(self):
        """This rank's sample-key log, continued on resume (records past the resume step, a
        crashed run's tail, are dropped: each step appears once)."""
        path = Path(self.cfg.log.dir) / "sample_keys" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.state.step]
            path.write_text("".join(f"{line}\n" for line in kept))
        return open(path, "a", buffering=1)

    def _sum_over_ranks(self, values: list[float], op: str = "sum") -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def log(self, logger, meter, **extra) -> None:
        """Collective (the record sums over ranks); rank 0 writes it. extra: the task's metrics."""
        import torch.distributed as dist

        from gigamim.train.metrics import data_counters, peak_memory_gb

        counters = [None] * self.world
        dist.all_gather_object(counters, data_counters(self.loader))
        grad_norm = self.engine.grad_norm()
        record = meter.record(
            self.state.step, global_batch=self.cfg.train.global_batch_size, world_size=self.world,
            model_flops=self.model_flops, hardware_flops=self.hardware_flops,
            peak_tflops=self.peak_tflops, sum_over_ranks=self._sum_over_ranks,
            grad_norm=grad_norm,
            peak_mem_gb=peak_memory_gb(self.device), nonfinite_skipped=self.state.nonfinite_total,
            epoch=self.loader.epoch, **merge_counters(counters), **extra,
        )
        if logger is not None:
            logger.log(record)

    def save(self) -> None:
        """Collective: every rank writes its partition; rank 0 the meta and `latest` (last)."""
        from gigamim import __version__
        from gigamim.checkpoint.save import save
        from gigamim.train.state import CLIENT_KEY

        step = self.state.step
        if not self._weights_finite():
            raise RuntimeError(f"weights are not finite at step {step}; refusing to write a checkpoint")
        from gigamim.checkpoint.space import estimate_tag_bytes

        meta = {"step": step, "model": self.cfg.model.name, "img_size": self.cfg.model.img_size,
                "window_size": self.cfg.model.window_size,
                "world_size": self.world, **self.engine.describe(), "precision": self.precision,
                "lr_schedule": lr_schedule_record(self.cfg), "version": __version__, **self.task.meta()}
        client = {CLIENT_KEY: self.state.state_dict(), **self.task.state_dict()}
        tag_dir = save(self.engine, self.cfg.checkpoint.dir, step, client, meta,
                       self.cfg.dump(), self.cfg.checkpoint.keep_last,
                       size_estimate=estimate_tag_bytes(self.num_params))
        self.say(f"gigamim: saved checkpoint {tag_dir}")

    def _weights_finite(self) -> bool:
        """Each rank checks its own part of the weights (the engine's valid local elements)."""
        import torch

        ok = all(bool(torch.isfinite(t).all()) for t in self.engine.local_shards() if t.numel())
        return self._sum_over_ranks([0.0 if ok else 1.0], op="max")[0] == 0.0


def record_window_size(cfg: Config) -> None:
    """Write the variant's default window into the resolved config when it has none, so that
    resume checks, exports and fine-tune builds never have to guess the geometry."""
    if cfg.model.window_size is None:
        from gigamim.models.registry import model_defaults

        cfg.model.window_size = model_defaults(cfg.model.name).get("window_size")


def take_run_lock(ckpt_dir: str, rank: int, force: bool):
    """Collective: rank 0 locks checkpoint.dir before anything is written (returns the held
    `RunLock`, None on other ranks); all ranks stop if it cannot."""
    import torch.distributed as dist

    from gigamim.checkpoint.layout import CheckpointError
    from gigamim.checkpoint.lock import RunLock, RunLockError

    refused, lock = [None], None
    if rank == 0:
        try:
            lock = RunLock(ckpt_dir, force=force).acquire()
        except RunLockError as e:
            refused = [str(e)]
    dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise RunLockError(refused[0]) if rank == 0 else CheckpointError("run lock refused on rank 0")
    return lock
