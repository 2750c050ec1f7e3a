"""What the trainer, the step, the tasks and the checkpoint code ask of a training engine.

An engine owns the model's parameters once it is built: how they are partitioned, how a
micro-batch's gradients are reduced and applied, what one rank writes into a checkpoint tag.
Everything above it (the loop, the non-finite agreement, exact resume of the data and RNG,
the tag folder's `latest`, meta, lock and completeness) is engine-agnostic and lives in
`train/` and `checkpoint/`.

The life of an engine in a run:

    cls = engine_class(cfg)                 # before any process group: check_config(cfg),
                                            # partitions_at_build(cfg) are class-level
    engine = cls(cfg, dist, precision)      # after the process group exists
    model = engine.build(build_model, groups, ...)
    loss = task.loss(engine, batch)         # engine(*inputs) is the forward
    engine.backward(loss); engine.step()    # once per micro-batch; the optimizer steps at
                                            # the accumulation boundary
    engine.save(root, tag, client) / client = engine.load(root, tag)
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn


class Engine:
    name = "engine"

    # -- before any process group: the config alone ------------------------------------------

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise `ConfigError` (one line) for settings this engine cannot run."""

    @classmethod
    def partitions_at_build(cls, cfg) -> bool:
        """True when no rank ever holds the whole model: the model is built partitioned (or on
        the meta device), and whole parameters exist only inside the engine (`load_weights`,
        `full_state_dict`)."""
        return False

    # -- after the process group ---------------------------------------------------------------

    def __init__(self, cfg, dist, precision: str):
        self.cfg, self.dist, self.precision = cfg, dist, precision
        self.module: Optional[nn.Module] = None  # the model, once built
        self.scheduler = None  # gigamim's LR schedule (train.optim), stepped with the optimizer

    def build(self, build_model: Callable[[], nn.Module], groups: Callable[[nn.Module], list],
              partition_at_build: bool = True, after_build: Optional[Callable[[nn.Module], None]] = None,
              load_universal: bool = False) -> nn.Module:
        """Build the model (`build_model()` returns a plain nn.Module; called partitioned when
        `partition_at_build` and the engine partitions), call `after_build(model)` once it
        exists and before the optimizer copies its parameters, then the optimizer with the
        param groups `groups(model)` and the LR schedule. Returns the model."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a checkpoint's meta records about the engine (name, partitioning). An engine
        whose tags load on any world size as they are says `"reshardable": True` (resume
        then accepts another world size; the loader's elastic resume keeps the data position)."""
        return {"engine": self.name}

    # -- the step ------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """After each micro-batch's backward: the optimizer (clipping, LR schedule) runs at the
        accumulation boundary, the gradients are kept in between."""
        raise NotImplementedError

    def lrs(self) -> list[float]:
        """The LR of every param group for the next optimizer step."""
        raise NotImplementedError

    def grad_norm(self) -> Optional[float]:
        """The global gradient norm (before clipping) of the last optimizer step, or None."""
        raise NotImplementedError

    # -- parameters ----------------------------------------------------------------------------

    def load_weights(self, model: nn.Module, state: Optional[dict], names: Iterable[str]) -> None:
        """Collective, in `after_build`: write the whole tensors `state[name]` (read by rank 0;
        other ranks pass None) into the parameters `names` of the model being built, whatever
        the partitioning. Every rank passes the same `names`."""
        raise NotImplementedError

    def full_state_dict(self, module: nn.Module) -> Optional[dict]:
        """Collective: `module`'s state dict as whole fp32 tensors in host memory on rank 0
        (None on other ranks); `module` is the engine's model or a plain module (an EMA copy)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Elements of the whole model's parameters (not this rank's part)."""
        return sum(p.numel() for p in self.module.parameters())

    def local_shards(self) -> Iterator[torch.Tensor]:
        """This rank's own elements of every parameter (valid elements only, no padding), for
        checks that every rank makes on its part (finite weights before a save)."""
        for p in self.module.parameters():
            yield p.detach()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, root: str, tag: str, client_state: dict) -> None:
        """Collective: this rank's files of tag `root/tag` (weights, optimizer, scheduler, and
        `client_state`); returns once every rank's files are written (ends in a barrier). The
        tag's `latest`, meta and config are the caller's (`checkpoint.save`)."""
        raise NotImplementedError

    # Whether `save_async` exists: the tag is written in the background after a snapshot.
    supports_async_save = False

    def save_async(self, root: str, tag: str, client_state: dict):
        """Collective: snapshot this rank's state (device -> host copy) and start writing the tag
        in the background; returns a handle with `done() -> bool` (this rank's write ended) and
        `wait()` (blocks until it ended; raises this rank's failure). When every rank's wait()
        returned, every rank's files are on disk (the caller then marks the tag complete)."""
        raise NotImplementedError(f"train.engine={self.name} saves synchronously")

    def load(self, root: str, tag: str) -> dict:
        """Collective: restore weights, optimizer and scheduler from `root/tag`; returns the
        client state given to `save`."""
        raise NotImplementedError
