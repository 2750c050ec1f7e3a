"""Count the bytes every `torch.distributed` collective moves, by wrapping the functions.

Install BEFORE DeepSpeed sets up its communication backend: `deepspeed.comm.TorchBackend`
captures `torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor` at its
construction, and its coalesced all-gather calls `distributed_c10d.all_gather_into_tensor`,
so both the `torch.distributed` names and the `distributed_c10d` ones are wrapped.
PyTorch FSDP2 calls `all_gather_single` / `reduce_scatter_single` on torch >= 2.12 (and
`all_gather_into_tensor` / `reduce_scatter_tensor` before): all four are wrapped. Collectives
issued as functional ops (`torch.ops._c10d_functional`, e.g. DTensor's `full_tensor()` of the
grad norm, a 4-byte all-reduce) do not go through these functions and are not counted.

Convention (the one `gigamim.tools.comm_model` predicts, and nccl-tests' "size"): the
logical buffer of the collective, i.e. the full tensor an all-reduce / reduce / broadcast
works on, the gathered OUTPUT of an all-gather, the INPUT of a reduce-scatter. A wrapped
function that calls another wrapped one is counted once (the outer call).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


# name -> (kind, bytes of the call from its bound arguments)
_SIZES = {
    "all_reduce": ("all_reduce", lambda a: _nbytes(a["tensor"])),
    "reduce": ("reduce", lambda a: _nbytes(a["tensor"])),
    "broadcast": ("broadcast", lambda a: _nbytes(a["tensor"])),
    # torch >= 2.12's names (FSDP2 calls these; all_gather_into_tensor / reduce_scatter_tensor
    # forward to them there, counted once as the outer call)
    "all_gather_single": ("all_gather", lambda a: _nbytes(a["output_tensor"])),
    "reduce_scatter_single": ("reduce_scatter", lambda a: _nbytes(a["input"])),
    "all_gather_into_tensor": ("all_gather", lambda a: _nbytes(a["output_tensor"])),
    "_all_gather_base": ("all_gather", lambda a: _nbytes(a["output_tensor"])),
    "all_gather": ("all_gather", lambda a: _nbytes(a["tensor_list"])),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: _nbytes(a["input"])),
    "_reduce_scatter_base": ("reduce_scatter", lambda a: _nbytes(a["input"])),
    "reduce_scatter": ("reduce_scatter", lambda a: _nbytes(a["input_list"])),
    "all_to_all_single": ("all_to_all", lambda a: _nbytes(a["input"])),
    "all_reduce_coalesced": ("all_reduce", lambda a: _nbytes(a["tensors"])),
}


class CollectiveCounter:
    """Bytes, calls, wall seconds and CPU seconds per collective kind since the last `reset()`.

    Seconds are host wall time inside the call (gloo collectives are synchronous on CPU;
    an async handle's wait is not included, which is why the CPU harness turns overlap off).
    Wall time includes waiting for the slower rank (and, on a shared machine, for the core);
    CPU seconds (this process, all threads: gloo's worker thread does the copies) do not,
    so on a busy machine they are the measure of what the collective itself costs.
    """

    def __init__(self):
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)
        self.seconds = defaultdict(float)
        self.cpu_seconds = defaultdict(float)
        self.enabled = True
        self._depth = threading.local()
        self._originals = []

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.seconds.clear()
        self.cpu_seconds.clear()

    def snapshot(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls), "seconds": dict(self.seconds),
                "cpu_seconds": dict(self.cpu_seconds)}

    def _wrap(self, name, fn):
        import inspect

        kind, size = _SIZES[name]
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth or not self.enabled:
                return fn(*args, **kwargs)
            self._depth.n = 1
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(*args, **kwargs)
                self.seconds[kind] += time.perf_counter() - t0
                self.cpu_seconds[kind] += time.process_time() - c0
                self.bytes[kind] += size(bound)
                self.calls[kind] += 1
                return out
            finally:
                self._depth.n = 0

        wrapper.__gigamim_counted__ = True
        return wrapper

    def install(self) -> "CollectiveCounter":
        for mod in (dist, c10d):
            for name in _SIZES:
                fn = getattr(mod, name, None)
                if fn is None or getattr(fn, "__gigamim_counted__", False):
                    continue
                self._originals.append((mod, name, fn))
                setattr(mod, name, self._wrap(name, fn))
        return self

    def uninstall(self) -> None:
        for mod, name, fn in reversed(self._originals):
            setattr(mod, name, fn)
        self._originals.clear()
