"""Peak memory of one training step, on GPU and on CPU.

GPU: the caching allocator's ``torch.cuda.max_memory_allocated`` over the step (reset before).

CPU has no allocator statistics, so the step runs once under ``torch.profiler`` with
``profile_memory=True``: every allocation and free of the CPU allocator is an event with a
signed byte count. Their running sum, in time order, is the live-tensor bytes the step adds;
its maximum plus the bytes alive when the step starts (parameters, optimizer states, the
batch) is the high-water mark — the same quantity max_memory_allocated reports on a GPU,
without the caching allocator's rounding. It sees everything the allocator serves:
activations saved for backward, recomputation inside checkpointed blocks and attention
chunks, gradients, optimizer temporaries. That is why it responds to checkpointing and
sequential attention, which peak RSS (dominated by the interpreter and libraries, and
blurred by malloc's caching) barely does. The profiled step is never a timed step.

``saved_tensor_bytes`` counts, separately, the unique storages autograd saves for backward
(``saved_tensors_hooks``), the planner's independent check.
"""

from __future__ import annotations

import torch


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def resident_bytes(model, optimizer=None, extra=()) -> int:
    """Bytes alive between steps: parameters, their gradients, optimizer states, ``extra``."""
    ts = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            ts += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(ts + list(extra))


def profiled_peak_bytes(fn) -> int:
    """Run ``fn()`` under the CPU profiler; return the maximum of the running sum of the
    allocator's byte counts (live bytes added by fn at its high-water point)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def step_peak_bytes(fn, device: torch.device, resident: int) -> tuple[int, str]:
    """(peak bytes of one call of fn, how it was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resident + profiled_peak_bytes(fn), "cpu: resident tensors + torch.profiler allocator high-water"


class SavedTensorBytes:
    """Context manager: unique bytes of the tensors autograd saves for backward, parameters
    excluded (they are model states, not activations). Sees what the forward under it saves;
    code inside non-reentrant checkpoints installs its own hooks and is not seen."""

    def __init__(self, model=None):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.seen = {}

    def _pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in self.skip and t.device.type != "meta":
            self.seen[ptr] = max(self.seen.get(ptr, 0), s.nbytes())
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())
