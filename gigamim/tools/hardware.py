"""What the step-time model assumes about a device and its network (every number stated, all overridable).

GPU peaks are the data-sheet dense bf16 figures (no sparsity). Network figures are bus
bandwidths in the nccl-tests sense (busbw): a ring all-gather / reduce-scatter of a
logical buffer S over n ranks takes (n-1)/n * S / busbw, an all-reduce twice that.

- Inside a node (NVLink 4 + NVSwitch, H100/H200): 360 GB/s busbw for all-gather /
  reduce-scatter (NVLink 4 is 450 GB/s per direction per GPU; NCCL reaches ~80% of it with
  rings; NVLS all-reduce goes higher, ~476 GB/s reported, which is ignored here).
- Across nodes: NCCL runs one ring per NIC, so a multi-node collective's busbw is the
  node's NIC total, not one NIC's (nccl-tests: 24 GB/s for 8 GPUs behind one 200 Gb/s NIC;
  ~46 GB/s per 400 Gb/s NDR NIC): 8 x 400 Gb/s -> 8 x 46 = 368 GB/s, 4 x 400 Gb/s -> 184 GB/s,
  capped by the NVLink figure.
- Latency per collective call: 10 us plus, for ring all-gather / reduce-scatter, one hop per
  rank in the ring (1 us per NVLink hop, 6 us per IB hop); all-reduce across nodes uses a
  tree (2 log2(nodes) IB hops). This is what makes many small gathers expensive at scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

NIC_GBPS_EFFECTIVE = {100: 11.5, 200: 23.5, 400: 46.0, 800: 92.0}  # GB/s per NIC as NCCL reaches it


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16 (GPU) or measured fp32 GEMM (CPU), per device
    mem_gb: float
    mem_bw_gbps: float  # device memory bandwidth (optimizer step, ZeRO's flat-buffer copies)


DEVICES = {
    "h100": Device("H100 SXM 80GB", 989.0, 80.0, 3350.0),
    "h200": Device("H200 SXM 141GB", 989.0, 141.0, 4800.0),
    "a100": Device("A100 SXM 80GB", 312.0, 80.0, 2039.0),
    "a100-40": Device("A100 SXM 40GB", 312.0, 40.0, 1555.0),
}


@dataclass(frozen=True)
class Network:
    """Bus bandwidths (bytes/s) and per-call latencies; per collective kind where they differ."""

    intra_bps: float = 360e9
    inter_bps: float = 368e9
    base_latency_s: float = 10e-6
    intra_hop_s: float = 1e-6
    inter_hop_s: float = 6e-6
    # A measured network (the CPU calibration) gives its own busbw per kind; None = the above.
    per_kind_bps: dict | None = None
    per_kind_latency_s: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_ib(spec: str) -> float:
    """'8x400' (NICs per node x Gb/s each) -> the node's effective busbw in bytes/s."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec or "")
    if not m:
        raise ValueError(f"--ib {spec!r}: expected NICs x Gb/s per NIC, e.g. 8x400 or 4x400")
    nics, gbit = int(m.group(1)), int(m.group(2))
    if nics < 1 or gbit < 1:
        raise ValueError(f"--ib {spec!r}: NIC count and speed must be positive")
    per_nic = NIC_GBPS_EFFECTIVE.get(gbit, gbit / 8 * 0.92)
    return nics * per_nic * 1e9


def collective_seconds(kind: str, nbytes: float, ranks: int, gpus_per_node: int, net: Network,
                       calls: float = 1.0) -> float:
    """Time of `calls` collectives of one kind moving `nbytes` (logical buffer, all calls together)
    over `ranks` ranks with `gpus_per_node` of them per node."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    nodes = math.ceil(ranks / gpus_per_node)
    if net.per_kind_bps and kind in net.per_kind_bps:
        bw = net.per_kind_bps[kind]
        lat = (net.per_kind_latency_s or {}).get(kind, net.base_latency_s)
        # A measured figure is algorithm bandwidth (logical bytes / s) for this world size.
        return calls * lat + nbytes / bw
    bw = net.intra_bps if nodes == 1 else min(net.intra_bps, net.inter_bps)
    wire = (ranks - 1) / ranks * (2.0 if kind == "all_reduce" else 1.0)
    if kind == "all_reduce" and nodes > 1:
        hops = 2 * math.log2(nodes) * net.inter_hop_s + 2 * (gpus_per_node - 1) * net.intra_hop_s
    else:
        hops = (nodes - 1) * net.inter_hop_s + (ranks - nodes) * net.intra_hop_s
        if kind == "all_reduce":
            hops *= 2
    return calls * (net.base_latency_s + hops) + wire * nbytes / bw


def cpu_device(gemm_tflops: float, mem_gbps: float, mem_gb: float = 64.0) -> Device:
    return Device("CPU (measured GEMM)", gemm_tflops, mem_gb, mem_gbps)


def with_overrides(net: Network, **kw) -> Network:
    return replace(net, **{k: v for k, v in kw.items() if v is not None})
