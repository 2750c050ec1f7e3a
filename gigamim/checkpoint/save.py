"""Crash-safe save of a training engine's checkpoint tag, and pruning to the last K.

Every rank writes its files of the tag through the engine (`Engine.save`); `latest` is not
the engine's to write (DeepSpeed's own would name the tag on rank 0 without waiting for the
other ranks, so a crash mid-save could leave it naming a half-written tag). We wait for
every rank, then write the meta file and `latest` with
write-to-temp + rename. A half-written tag is never named by `latest`, is skipped by the
resolver (`layout.resolve`), and is removed by a later prune.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

from gigamim.checkpoint.layout import (CONFIG_FILE, LATEST_FILE, META_FILE, UNIVERSAL_SUFFIX, CheckpointError,
                                       atomic_write, complete_tags, is_complete, tag_for, tag_step)


def save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, meta: dict, config_yaml: str,
         keep_last: int, size_estimate: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the tag folder.

    A full disk is refused before anything is written when the previous tag's size does not
    fit (`space.check_free_space`); a write that fails anyway (the first save, a disk filled
    by someone else) removes the half-written tag and raises `NoSpaceError` on every rank
    (one line, "no space left on <dir>: need ~X GB, have Y GB"); other write errors raise a
    `CheckpointError` naming the rank. Earlier tags and `latest` are never touched then.
    `size_estimate` (bytes) is only used in that message when there is no previous tag."""
    import torch.distributed as dist

    from gigamim.runtime.dist import peer_lost

    root, tag = _prepare(ckpt_dir, step)
    failure = None
    try:
        engine.save(str(root), tag, client_state)
    except Exception as e:
        if peer_lost(e):
            raise
        failure = e
        # The ranks whose writes succeeded wait in the barrier that ends Engine.save: meet them.
        dist.barrier()
    # Engine.save ends with a barrier: every rank's files are on disk from here on.
    return _commit(failure, root, tag, meta, config_yaml, keep_last, size_estimate)


class PendingSave:
    """A tag being written in the background (`start_save`); `finish` marks it complete."""

    def __init__(self, handle, root: Path, tag: str, meta: dict, config_yaml: str, keep_last: int,
                 size_estimate: int | None, blocking_s: float, started: float):
        self.handle, self.root, self.tag = handle, root, tag
        self.meta, self.config_yaml, self.keep_last, self.size_estimate = meta, config_yaml, keep_last, size_estimate
        self.blocking_s, self.started = blocking_s, started

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag

    def done_everywhere(self) -> bool:
        """Collective: whether every rank's background write has ended (one tiny all-reduce)."""
        import torch
        import torch.distributed as dist

        # on the default group's device (NCCL reduces CUDA tensors only)
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.handle.done() else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def finish(self) -> float:
        """Collective: wait for every rank's write, check it, then (rank 0) the config, the
        meta and `latest`, and prune. Returns the write's wall time (start to all written).
        Raises as `save` does; `latest` then still names the previous tag."""
        import time

        from gigamim.runtime.dist import peer_lost

        failure = None
        try:
            self.handle.wait()
        except Exception as e:
            if peer_lost(e):
                raise
            failure = e
        write_s = time.perf_counter() - self.started
        _commit(failure, self.root, self.tag, self.meta, self.config_yaml, self.keep_last, self.size_estimate,
                background=True)
        return write_s


def start_save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, meta: dict, config_yaml: str,
               keep_last: int, size_estimate: int | None = None) -> PendingSave:
    """Collective: the tag's background write (`Engine.save_async`): returns once this rank's
    state is copied to host memory; `PendingSave.finish` marks the tag complete. Until then
    `latest` names the previous tag, so a crash, kill -9 or SIGTERM mid-write loses nothing."""
    import time

    t0 = time.perf_counter()
    root, tag = _prepare(ckpt_dir, step)
    handle = engine.save_async(str(root), tag, client_state)
    return PendingSave(handle, root, tag, meta, config_yaml, keep_last, size_estimate,
                       blocking_s=time.perf_counter() - t0, started=t0)


def _prepare(ckpt_dir, step: int) -> tuple[Path, str]:
    """Collective: rank 0 clears a crashed save's remnants of this tag and checks the free
    space; nobody writes before that (the broadcast is the barrier)."""
    import torch.distributed as dist

    from gigamim.checkpoint import space

    root = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    refused = [None]
    if dist.get_rank() == 0:
        wait_for_prune()  # the free space counts only after the last background save's prune
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # remnants of a save that crashed at this step
            shutil.rmtree(tag_dir)
        try:
            space.check_free_space(root)
        except space.NoSpaceError as e:
            refused = [str(e)]
    # Also the barrier that keeps the others from writing before rank 0 cleared the folder.
    dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise space.NoSpaceError(refused[0])
    return root, tag


def _commit(failure, root: Path, tag: str, meta: dict, config_yaml: str, keep_last: int,
            size_estimate: int | None, background: bool = False) -> Path:
    """Collective, once every rank's files are written (or failed): agree on how it went,
    then rank 0 marks the tag complete (config, meta, `latest` last) and prunes. background
    (a background write, marked at a step boundary): rank 0 first runs the completeness check
    of the tag's format on the written files, and prunes in a thread of its own (the older
    tags' deletion is no reason to hold up the training; `wait_for_prune`)."""
    import torch.distributed as dist

    from gigamim.checkpoint import space

    tag_dir = root / tag
    rank0 = dist.get_rank() == 0
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, _report(failure, root))
    if not any(reports):
        final = [None]
        if rank0:
            try:
                if background:  # its files were not checked by the engine's save
                    from gigamim.checkpoint.check import check_written

                    check_written(tag_dir)
                atomic_write(tag_dir / CONFIG_FILE, config_yaml)
                atomic_write(tag_dir / META_FILE, json.dumps(meta, indent=1))
                atomic_write(root / LATEST_FILE, tag)
            except (OSError, CheckpointError) as e:
                final = [_report(e, root)]
                # `latest` is written last: if it was that write, the old `latest` is intact.
                (tag_dir / META_FILE).unlink(missing_ok=True)
        dist.broadcast_object_list(final, src=0)
        reports[0] = final[0]
    if any(reports):
        if rank0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # half-written, never named by `latest`
        dist.barrier()
        if any(r and r[0] for r in reports):
            need = space.previous_tag_bytes(root) or size_estimate
            raise space.NoSpaceError(space.no_space_message(root, need, space.free_bytes(root)))
        rank, (_, what) = next((r, rep) for r, rep in enumerate(reports) if rep)
        raise CheckpointError(f"rank {rank} could not write checkpoint {tag_dir} ({what}); "
                              "earlier checkpoints are kept")
    if rank0 and background:
        global _pruning
        _pruning = threading.Thread(target=prune, args=(root, keep_last, tag), name="gigamim-ckpt-prune")
        _pruning.start()
    elif rank0:
        prune(root, keep_last, current=tag)
    dist.barrier()
    return tag_dir


_pruning: threading.Thread | None = None  # rank 0's prune after a background save, while it runs


def wait_for_prune() -> None:
    """Rank 0: let the prune of the last background save end (before a save touches the folder,
    and before the run lock is released). A no-op elsewhere."""
    global _pruning
    if _pruning is not None:
        _pruning.join()
        _pruning = None


def _report(failure: BaseException | None, root: Path):
    """(is it a full disk, one line) of a rank's failed write, or None."""
    from gigamim.checkpoint import space

    if failure is None:
        return None
    return space.is_space_error(failure, root), f"{type(failure).__name__}: {failure}".splitlines()[0][:300]


def prune(root: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` complete tags; drop older ones and older crash remnants."""
    if keep_last <= 0:
        return
    current_step = tag_step(current)
    # Only this run's history counts: tags past the current step (left by an earlier run
    # that went further before this one resumed from an older tag) are kept, not counted.
    complete = [t for t in complete_tags(root)
                if not t.endswith(UNIVERSAL_SUFFIX) and tag_step(t) is not None and tag_step(t) <= current_step]
    doomed = complete[:-keep_last]
    for p in root.iterdir():
        step = tag_step(p.name)
        if (p.is_dir() and step is not None and not p.name.endswith(UNIVERSAL_SUFFIX) and not is_complete(p)
                and step < current_step):
            doomed.append(p.name)
    for tag in doomed:
        if tag != current:
            try:
                # unmarked first: a prune cut short (kill -9) leaves an incomplete tag, never a
                # "complete" tag with files missing
                (root / tag / META_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            shutil.rmtree(root / tag, ignore_errors=True)
