"""Background checkpoint writes for DeepSpeed (any ZeRO stage), on DeepSpeed's own CheckpointEngine seam.

`DeepSpeedEngine.save(_checkpoint)` hands every file of a tag to its `checkpoint_engine`
(`save(state_dict, path)`, then `commit(info)`). For a background save, gigamim puts a
`SnapshotWriter` there for the duration of that one call: `save` copies the state dict to
host memory (the snapshot: the only part the step loop waits for), `commit` hands the copies
to one writer thread, which writes each file as `torch.save` to a temp name, fsync, rename.
`checkpoint.save.PendingSave` then marks the tag complete (meta, `latest`) once every rank's
thread ended and rank 0 checked the files: until then `latest` names the previous tag.

Why not DeepSpeed 0.19's own engines (`runtime/checkpoint_engine/`, read at 0.19.8):
- `DecoupledCheckpointEngine` commits inside the NEXT `engine.step()` (waiting there for the
  write), and rank 0 writes `latest` as soon as its own writer process is done, before the
  other ranks' files exist or are checked (`engine._commit_decoupled_checkpoint`);
- it sends the live tensors through a `torch.multiprocessing` queue: on CPU that moves the
  optimizer's own fp32 partitions and Adam states into shared memory, and the writer process
  serialises them while the next steps update them in place (a torn snapshot);
- its `FastCheckpointEngine` writer wants DeepSpeed's AIO op (libaio; not buildable here).
Copying on `save` and writing from a thread avoids all three; the completeness check and
`latest` stay gigamim's (`checkpoint.save`), as for the synchronous save.

What is copied: every tensor DeepSpeed hands over (ZeRO-3: this rank's fp32 master partition,
its Adam states, the small model-states file), into host buffers kept for the next save (the
previous write has ended by then: one write in flight), pinned when the tensors are on a GPU;
every other object (param groups, the LR, the client state's RNG states) is deep-copied, as
the next step mutates them in place.
"""

from __future__ import annotations

import copy
import os
import threading
import time

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from gigamim.checkpoint.layout import atomic_file

# Debug knob for the fault tests: "SECONDS" (every rank) or "SECONDS@RANK" pauses the
# background writer before each file, so a test can kill a rank while a write is in flight.
WRITE_DELAY_ENV = "GIGAMIM_CKPT_WRITE_DELAY_S"


def write_delay(rank: int, environ=os.environ) -> float:
    raw = environ.get(WRITE_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    seconds, _, only = raw.partition("@")
    return float(seconds) if not only or int(only) == rank else 0.0


class SnapshotWriter(CheckpointEngine):
    """DeepSpeed's checkpoint-engine interface: snapshot on `save`, write in a thread after `commit`."""

    def __init__(self, rank: int, zipfile_serialization: bool = True):
        super().__init__(None)
        self.name = "gigamim.SnapshotWriter"
        self.rank, self.zipfile_serialization = rank, zipfile_serialization
        self._files: list[tuple[str, object]] = []  # (path, host copy) of the tag being saved
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}  # (file name, n-th tensor) -> host buffer
        self._on_gpu = False
        self.write: BackgroundWrite | None = None  # the last commit's write

    # -- DeepSpeed's CheckpointEngine ----------------------------------------------------------

    def create(self, info) -> None:
        if self.write is not None:
            self.write.wait()  # its buffers are reused below: never two writes in flight
        self._files, self._on_gpu, self.write = [], False, None

    def save(self, state_dict, path: str) -> None:
        name, count = os.path.basename(path), [0]
        memo: dict[int, object] = {}
        for t in _tensors(state_dict):
            if id(t) not in memo:
                memo[id(t)] = self._host_copy(t, name, count)
        # deepcopy with the tensors' copies pre-seeded: containers and plain objects copied,
        # every tensor replaced by its host copy (shared tensors stay shared)
        self._files.append((path, copy.deepcopy(state_dict, memo)))

    def commit(self, info) -> bool:
        if self._on_gpu:
            torch.cuda.current_stream().synchronize()  # the non-blocking device -> pinned copies
        files, self._files = self._files, []
        self.write = BackgroundWrite(files, self.zipfile_serialization, write_delay(self.rank))
        return True

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed's own clone of the model states is not needed: `save` copies

    # -- the snapshot --------------------------------------------------------------------------

    def _host_copy(self, t: torch.Tensor, name: str, count: list) -> torch.Tensor:
        key = (name, count[0])
        count[0] += 1
        src = t.detach()
        on_gpu = src.device.type == "cuda"
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=on_gpu)
            self._buffers[key] = buf
        self._on_gpu |= on_gpu
        buf.copy_(src, non_blocking=on_gpu)
        return buf


def _tensors(obj):
    """Every tensor in nested dicts / lists / tuples (what DeepSpeed's state dicts are made of)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class BackgroundWrite:
    """One rank's files of a tag, written by a daemon thread (a crash or kill -9 of the process
    ends it mid-file: only temp names are then left, and `latest` never named the tag).
    The handle `checkpoint.save.PendingSave` waits on: `done()`, `wait()`."""

    def __init__(self, files: list, zipfile_serialization: bool, delay_s: float = 0.0):
        self.files, self.zipfile_serialization, self.delay_s = files, zipfile_serialization, delay_s
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gigamim-ckpt-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for path, state in self.files:
                if self.delay_s:
                    time.sleep(self.delay_s)
                write_file(state, path, self.zipfile_serialization)
        except BaseException as e:  # handed to the main thread by wait()
            self.error = e
        finally:
            self.files = []  # the host copies are the writer's buffers: drop the references

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def write_file(state, path: str, zipfile_serialization: bool = True) -> None:
    """torch.save through `checkpoint.layout.atomic_file`: the final name exists only with all
    its bytes on disk (as DCP's writer syncs its files before `latest` can name them)."""
    atomic_file(path, lambda f: torch.save(state, f, _use_new_zipfile_serialization=zipfile_serialization))
