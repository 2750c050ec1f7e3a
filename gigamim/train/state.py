"""The train state a checkpoint carries, as one object (torchtitan's `Stateful` pattern).

`TrainState` holds what is not in DeepSpeed's own files: the optimizer step, the count of
dropped non-finite micro-batches, and per rank the data loader's position and the RNG
streams (drop path). `state_dict()` is collective (every rank's loader position and RNG are
gathered to every rank, because ZeRO-1/2 write client state from rank 0 only and a resume
on another world size needs some rank's position); `load_state_dict()` takes this rank's
part, or rank 0's when this rank did not exist in the saved run.

On-disk format (client state key "gigamim", unchanged since 0.1, so old tags resume):
`{"step", "nonfinite_total", "loader_per_rank": {rank: ...}, "rng_per_rank": {rank: ...}}`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

CLIENT_KEY = "gigamim"


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


@dataclass
class TrainState:
    loader: Any  # anything with state_dict()/load_state_dict() (the data loader)
    rank: int = 0
    world_size: int = 1
    step: int = 0
    nonfinite_total: int = 0
    extra: dict = field(default_factory=dict)  # e.g. the LR schedule the run used

    def state_dict(self) -> dict:
        """Collective under torch.distributed (all ranks call it)."""
        import torch.distributed as dist

        mine = {"loader": self.loader.state_dict(), "rng": capture_rng()}
        everyone = [mine]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        return {
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "loader_per_rank": {str(r): s["loader"] for r, s in enumerate(everyone)},
            "rng_per_rank": {str(r): s["rng"] for r, s in enumerate(everyone)},
            **self.extra,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        per_rank = state.get("loader_per_rank") or {}
        if per_rank:
            # A rank that did not exist in the saved run (another world size, through a
            # universal checkpoint) gets rank 0's position: the loader knows the epoch from it.
            self.loader.load_state_dict(per_rank.get(str(self.rank), per_rank.get("0")))
        rng = (state.get("rng_per_rank") or {}).get(str(self.rank))
        if rng is not None:
            restore_rng(rng)
        self.extra = {k: v for k, v in state.items()
                      if k not in ("step", "nonfinite_total", "loader_per_rank", "rng_per_rank")}
