"""Run metrics: `<log.dir>/metrics.jsonl` (one JSON object per logged step) + TensorBoard,
device peak FLOP/s for MFU, and peak memory."""

from __future__ import annotations

import json
import resource
import sys
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
