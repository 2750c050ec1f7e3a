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
    def __init__(self, cfg: Config, task, resume: str | None = None, force_unlock: bool = False,
                 overwrite: bool = False):
        """task: what is trained (a `train.tasks` task: SimMIM pretraining, fine-tuning).
        resume: the `--resume` argument ('auto', a folder, a tag folder) or None; resolved by
        rank 0 once it holds the run lock (`_resolve_under_lock`), so the tag cannot change
        between the choice and the load.
        force_unlock: take checkpoint.dir's run lock even from a holder that cannot be checked.
        overwrite: a fresh start moves another run's tags and logs aside (`preflight`)."""
        self.cfg = cfg
        self.task = task
        self.resume_spec = resume
        self.resume = None  # the train.resume.ResumePoint, once resolved
        self.force_unlock = force_unlock
        self.overwrite = overwrite
        self.lock = None
        self.records: list[dict] = []  # first and last metrics record, for the closing summary
        self.last_tag = None  # the last checkpoint written

    def run(self) -> int:
        import time

        from gigamim.train.signals import Deadline, StopFlag, StoppedInSetup

        self.started = time.monotonic()
        self.deadline = Deadline(self.cfg.train.stop_after)  # the clock starts with the run
        with StopFlag() as stop:
            try:
                try:
                    self.setup()
                except StoppedInSetup as e:  # raised on every rank together
                    from gigamim.runtime.dist import destroy_distributed

                    self.say(f"gigamim: {e}")
                    destroy_distributed()  # nothing of the group outlives the run
                    return 0
                return self.fit(stop)
            finally:
                if self.lock is not None:
                    from gigamim.checkpoint.save import wait_for_prune

                    wait_for_prune()  # nothing of this run touches the folder once the lock is free
                    self.lock.release()

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        from gigamim.runtime.dist import init_distributed
        from gigamim.train.engines import create_engine
        from gigamim.train.preflight import record_window_size
        from gigamim.train.precision import resolve_precision
        from gigamim.train.state import TrainState, seed_everything
        from gigamim.train.step import NonFiniteGuard

        cfg = self.cfg
        record_window_size(cfg)
        self.dist = init_distributed()
        self.rank, self.world, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self._take_run_lock()
        self.resume = self._resolve_under_lock()
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

    def _resolve_under_lock(self):
        """Collective, right after the run lock: rank 0 chooses the resume point (or, on a fresh
        start, checks that no other run's work would be overwritten, moving it aside with
        --overwrite) while it holds the lock, then every rank gets rank 0's answer. Nothing
        can prune or replace the chosen tag before it is loaded: only the lock holder writes."""
        import torch.distributed as dist

        from gigamim.checkpoint.layout import CheckpointError

        answer = [None, None]  # (ResumePoint or None, refusal message or None)
        if self.rank == 0:
            from gigamim.train import preflight
            from gigamim.train.resume import check_compatible, resolve_resume

            try:
                point = None
                if self.resume_spec:
                    point = resolve_resume(self.resume_spec, self.cfg.checkpoint.dir, self.world, say=self.say)
                    if point is not None:
                        check_compatible(point.meta, self.cfg, point.tag_dir, say=self.say, task=self.task.name)
                elif self.overwrite:
                    preflight.replace_previous_run(self.cfg, say=self.say)
                else:
                    preflight.refuse_previous_run(self.cfg)
                answer = [point, None]
            except CheckpointError as e:
                answer = [None, str(e)]
            except OSError as e:  # --overwrite could not move the old run aside: say so on every rank
                answer = [None, f"could not prepare {self.cfg.checkpoint.dir}: {e}"]
        dist.broadcast_object_list(answer, src=0)
        if answer[1]:
            raise CheckpointError(answer[1])
        return answer[0]

    def load(self) -> None:
        from gigamim.train.optim import lr_factor, peak_lr
        from gigamim.train.state import CLIENT_KEY

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
        self.pending, self.ckpt_record = None, {}
        self.async_save = self._async_save_enabled()
        if state.step >= end:
            limit = (f"train.stop_at_step={cfg.train.stop_at_step}" if cfg.train.stop_at_step and end < cfg.train.max_steps
                     else f"train.max_steps={cfg.train.max_steps}")
            self.say(f"gigamim: the checkpoint is at step {state.step}, at or past {limit}: nothing to train "
                     f"(raise {limit.split('=')[0]} to continue)", err=True)
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
                    self.finish_pending_save()  # written from finite weights before the losses went bad
                    return EXIT_NONFINITE
                state.step += 1
                if self.pending is not None and self.pending.done_everywhere():
                    self.finish_pending_save()
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
                    # The last save and a stop's save are waited for (the process exits next).
                    self.save(background=self.async_save and not (stopping or step == end))
                if stopping:
                    # Agreed over ranks: rank 0 names its reason (its own signal, else the clock).
                    why = (f"got signal {stop.signum}" if stop else
                           f"train.stop_after={cfg.train.stop_after} reached" if self.deadline else "another rank got a signal")
                    self.say(f"gigamim: {why}; checkpoint saved at step {step}, exiting. Continue with --resume auto.")
                    return 0
            self.task.finish(self, last_batch)
            for line in self.summary():
                self.say(line)
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
            grad_norm=grad_norm, **self._pop_ckpt_record(),
            peak_mem_gb=peak_memory_gb(self.device), nonfinite_skipped=self.state.nonfinite_total,
            epoch=self.loader.epoch, **merge_counters(counters), **extra,
        )
        if logger is not None:
            logger.log(record)
        self.records[1:] = [record]

    def _async_save_enabled(self) -> bool:
        setting = self.cfg.checkpoint.async_save
        return bool(setting) and self.engine.supports_async_save  # "auto" or true: every engine has it

    def _pop_ckpt_record(self) -> dict:
        """ckpt_blocking_s / ckpt_write_s of the saves since the last record (the loop logs
        before it saves, so a save shows up in the next record)."""
        record, self.ckpt_record = getattr(self, "ckpt_record", {}), {}
        return record

    def save(self, background: bool = False) -> None:
        """Collective: every rank writes its partition; rank 0 the meta and `latest` (last).
        background: the engine's background write (`checkpoint.save.start_save`); the tag is
        marked complete later (`finish_pending_save`), so the loop blocks only for the snapshot.
        A save first waits for the one in flight: one background write at a time."""
        import time

        from gigamim import __version__
        from gigamim.checkpoint.save import save, start_save
        from gigamim.train.state import CLIENT_KEY

        self.finish_pending_save()
        step = self.state.step
        if not self._weights_finite():
            raise RuntimeError(f"weights are not finite at step {step}; refusing to write a checkpoint")
        from gigamim.checkpoint.space import estimate_tag_bytes

        meta = {"step": step, "model": self.cfg.model.name, "img_size": self.cfg.model.img_size,
                "window_size": self.cfg.model.window_size,
                "world_size": self.world, **self.engine.describe(), "precision": self.precision,
                "lr_schedule": lr_schedule_record(self.cfg), "version": __version__, **self.task.meta()}
        client = {CLIENT_KEY: self.state.state_dict(), **self.task.state_dict()}
        args = (self.engine, self.cfg.checkpoint.dir, step, client, meta, self.cfg.dump(), self.cfg.checkpoint.keep_last)
        size = estimate_tag_bytes(self.num_params)
        if background:
            self.pending = start_save(*args, size_estimate=size)
            return
        t0 = time.perf_counter()
        tag_dir = save(*args, size_estimate=size)
        took = time.perf_counter() - t0
        self.ckpt_record.update(ckpt_step=step, ckpt_blocking_s=took, ckpt_write_s=took)
        self.say(f"gigamim: saved checkpoint {tag_dir} ({took:.2f} s)")
        self.last_tag = tag_dir

    def finish_pending_save(self) -> None:
        """Collective: wait for the background write in flight (if any) and mark its tag complete."""
        pending, self.pending = getattr(self, "pending", None), None
        if pending is None:
            return
        import time

        t0 = time.perf_counter()
        write_s = pending.finish()
        waited = time.perf_counter() - t0
        # What the loop lost to this save: the snapshot, and here the wait for the write's end
        # (none when it ended on its own) plus marking the tag complete and pruning.
        blocked = pending.blocking_s + waited
        self.ckpt_record.update(ckpt_step=self.state_step_of(pending), ckpt_blocking_s=blocked, ckpt_write_s=write_s)
        self.say(f"gigamim: saved checkpoint {pending.tag_dir} (blocked {blocked:.2f} s, written in the background "
                 f"in {write_s:.2f} s)")
        self.last_tag = pending.tag_dir

    @staticmethod
    def state_step_of(pending) -> int:
        return int(pending.meta["step"])

    def summary(self) -> list[str]:
        """The closing lines of a completed run (rank 0 prints them): what it did (steps, time,
        loss first -> last, throughput) and where everything is (checkpoint, metrics, the
        task's own outputs)."""
        import time

        cfg, step = self.cfg, self.state.step
        took = time.monotonic() - self.started
        first, last = (self.records + [None, None])[:2] if self.records else (None, None)
        last = last or first
        lines = [f"gigamim {self.task.name}: done: step {step} of {cfg.train.max_steps} in {took / 60:.1f} min "
                 f"({self.world} rank(s), {self.precision}, {cfg.train.engine})"]
        if first is not None and first.get("loss") is not None:
            speed = f"{last['images_per_sec']:.1f} images/s"
            if last.get("mfu") is not None:
                speed += f", MFU {last['mfu']:.1%}"
            lines.append(f"  loss        {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
                         f"(step {last['step']}); {speed} (last logged interval)")
        if self.last_tag is not None:
            lines.append(f"  checkpoint  {self.last_tag} (continue: --resume auto; weights: gigamim consolidate "
                         f"{cfg.checkpoint.dir} OUT)")
        lines.append(f"  metrics     {Path(cfg.log.dir) / 'metrics.jsonl'}"
                     + (f" (TensorBoard: {Path(cfg.log.dir) / 'tensorboard'})" if cfg.log.tensorboard else ""))
        return lines + [f"  {line}" for line in self.task.summary(self)]

    def _weights_finite(self) -> bool:
        """Each rank checks its own part of the weights (the engine's valid local elements)."""
        import torch

        ok = all(bool(torch.isfinite(t).all()) for t in self.engine.local_shards() if t.numel())
        return self._sum_over_ranks([0.0 if ok else 1.0], op="max")[0] == 0.0


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
        except OSError as e:  # a read-only or vanished folder (preflight checks it; it may change)
            refused = [f"cannot take the run lock of checkpoint.dir={ckpt_dir} ({e.strerror or e}): give a "
                       "writable checkpoint.dir"]
    dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise RunLockError(refused[0]) if rank == 0 else CheckpointError("run lock refused on rank 0")
    return lock
