"""One optimizer step: `accumulation` good micro-batches through the training engine.

`train_step` is the whole body of the loop (MAE's `train_one_epoch` body, as one function):
read a micro-batch, forward, agree across ranks that its loss is finite, backward + step.
It returns a small `StepResult`; the caller logs, pictures and checkpoints.

Synchronisation, and why: each micro-batch needs ONE small all-reduce before its backward,
[loss not finite, stop requested] with MAX, so that every rank either applies or drops that
micro-batch (an engine's backward is collective: a rank that skipped it alone would hang the
others) and all ranks see a stop signal at the same micro-batch. The stop flag rides on the
same all-reduce, so there is no second collective per step. The loss itself stays on the
device, summed; it is read back only when a metrics record is written.

The non-finite policy (`NonFiniteGuard`): a dropped micro-batch is counted and replaced by
the next one; `limit` in a row end the run (exit 3, no checkpoint of the bad state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class NonFiniteGuard:
    limit: int
    in_a_row: int = 0
    total: int = 0

    def record(self, bad: bool) -> None:
        if bad:
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit


@dataclass
class StepResult:
    loss_sum: torch.Tensor | None = None  # sum of the applied micro-batches' losses (device)
    micro_batches: int = 0  # applied
    dropped: int = 0  # non-finite micro-batches dropped before backward
    lr: float | None = None  # the LR this step applied
    data_s: float = 0.0  # time spent waiting for the loader
    keys: list[str] = field(default_factory=list)  # each micro-batch's sample keys, joined
    trained_keys: list[str] = field(default_factory=list)  # the applied samples (no padding repeats)
    last_batch: dict | None = field(default=None, repr=False)
    stop_requested: bool = False  # a stop signal reached some rank
    gave_up: bool = False  # the guard's limit of non-finite micro-batches in a row was hit


def agree(values: list[float], device: torch.device) -> list[float]:
    """Element-wise MAX over ranks of a few flags (one small all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float32, device=device if device.type == "cuda" else "cpu")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def train_step(engine, batches: Iterator[dict], accumulation: int, loss_of: Callable[[dict], torch.Tensor],
               guard: NonFiniteGuard, stop_requested: Callable[[], bool], device: torch.device,
               on_dropped: Callable[[int], None] = lambda in_a_row: None) -> StepResult:
    out = StepResult()
    while out.micro_batches < accumulation:
        t0 = time.perf_counter()
        batch = next(batches)
        out.data_s += time.perf_counter() - t0
        out.last_batch = batch
        out.keys.append(" ".join(batch["key"]))
        loss = loss_of(batch)  # the task's forward through the engine
        bad, stop = agree([0.0 if torch.isfinite(loss.detach()).all() else 1.0, 1.0 if stop_requested() else 0.0],
                          device)
        out.stop_requested = out.stop_requested or stop > 0
        guard.record(bad > 0)
        if bad > 0:
            # Dropped before backward on every rank: no rank applies it.
            out.dropped += 1
            on_dropped(guard.in_a_row)
            if guard.exhausted:
                out.gave_up = True
                return out
            continue
        valid = batch.get("valid")
        out.trained_keys += [k for i, k in enumerate(batch["key"]) if valid is None or bool(valid[i])]
        engine.backward(loss)
        out.lr = max(engine.lrs())  # read before step(): the LR this step applies (layer decay: the top group's)
        engine.step()
        detached = loss.detach().float()
        out.loss_sum = detached if out.loss_sum is None else out.loss_sum + detached
        out.micro_batches += 1
    return out
