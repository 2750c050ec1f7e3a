"""Run metrics: `<log.dir>/metrics.jsonl` (one JSON object per logged step) + TensorBoard,
the window of steps a record averages (`Meter`), device peak FLOP/s for MFU, peak memory.

A record has: step, loss (mean over the window's applied micro-batches, all ranks), lr (the
one the last step applied), grad_norm, steps_averaged, images_per_sec, tflops_per_sec, mfu
(model FLOPs: 3x forward) and hfu (hardware FLOPs: + the recomputed forwards of activation
checkpointing), peak_mem_gb, data_wait_frac, data_skipped, nonfinite_skipped, epoch and
data_digest (CRC32 of rank 0's sample keys in the window: which data the steps saw).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import zlib
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s per GPU by precision, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() by substring, most specific first.
PEAK_TFLOPS = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak TFLOP/s of a GPU from the table; None where unknown (CPU: measure it instead,
    see the benchmarks)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """GPU: the caching allocator's peak. CPU: this process's peak RSS (ru_maxrss), a
    high-water mark of the whole process (model, optimizer, activations, libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


class MetricsLogger:
    """Rank 0 only: appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True, after_step: int = 0):
        """after_step: a resumed run continues the file from that step; records beyond it
        (a crashed run's steps after its last checkpoint) are dropped, so steps stay unique."""
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= after_step]
            path.write_text("".join(f"{line}\n" for line in kept))
        self.file = open(path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Meter:
    """Sums over the steps since the last record; `record()` turns them into one."""

    def __init__(self):
        self.steps = 0
        self.micro_batches = 0
        self.loss_sum = None  # a device tensor: read back only when a record is written
        self.data_s = 0.0
        self.digest = 0
        self.lr = None
        self.t0 = time.perf_counter()

    def add(self, result) -> None:
        """One `step.StepResult`."""
        self.steps += 1
        self.micro_batches += result.micro_batches
        if result.loss_sum is not None:
            self.loss_sum = result.loss_sum if self.loss_sum is None else self.loss_sum + result.loss_sum
        self.data_s += result.data_s
        for keys in result.keys:
            self.digest = zlib.crc32(keys.encode(), self.digest)
        if result.lr is not None:
            self.lr = result.lr

    def record(self, step: int, *, global_batch: int, world_size: int, model_flops: float | None, hardware_flops: float | None,
               peak_tflops: float | None, sum_over_ranks, **extra) -> dict:
        """Collective (`sum_over_ranks` all-reduces a few floats): every rank calls it."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        loss_local = float(self.loss_sum) if self.loss_sum is not None else 0.0
        loss_sum, n, data_s = sum_over_ranks([loss_local, float(self.micro_batches), self.data_s])
        images_per_sec = self.steps * global_batch / elapsed
        # No analytic FLOP count for the model (a ViT / Swin V1 classifier): TFLOP/s, MFU null.
        tflops = images_per_sec * model_flops / 1e12 if model_flops else None
        htflops = images_per_sec * hardware_flops / 1e12 if hardware_flops else None
        return {
            "step": step,
            "loss": loss_sum / max(n, 1.0),
            "lr": self.lr,
            "steps_averaged": self.steps,
            "images_per_sec": images_per_sec,
            "tflops_per_sec": tflops,
            "mfu": tflops / peak_tflops if peak_tflops and tflops is not None else None,
            "hfu": htflops / peak_tflops if peak_tflops and htflops is not None else None,
            "data_wait_frac": data_s / world_size / elapsed,
            "data_digest": self.digest,
            **extra,
        }


def data_counters(loader) -> dict:
    """This rank's cumulative data counters: skipped samples and fixed-up images by reason,
    bytes read from shards."""
    return {"skipped": dict(getattr(loader, "skip_counts", {}) or {}),
            "fixed": dict(getattr(loader, "fix_counts", {}) or {}),
            "bytes_read": int(getattr(loader, "bytes_read", 0) or 0)}


def merge_counters(per_rank: list[dict]) -> dict:
    """Metrics keys from every rank's `data_counters`: `data_skipped` (total) and
    `data_skipped_<reason>`, `data_fixed_<reason>`, `data_bytes_read`, summed over ranks."""
    out: dict = {"data_skipped": 0, "data_bytes_read": 0}
    for c in per_rank:
        out["data_bytes_read"] += c["bytes_read"]
        for kind in ("skipped", "fixed"):
            for reason, n in sorted(c[kind].items()):
                key = f"data_{kind}_{reason}"
                out[key] = out.get(key, 0) + int(n)
                if kind == "skipped":
                    out["data_skipped"] += int(n)
    return out
