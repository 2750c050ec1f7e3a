"""`gigamim doctor`: check an allocation before spending it on a 3B run.

Prints (rank 0) the versions that decide whether a run works at all — python, torch, CUDA,
cuDNN, NCCL, DeepSpeed and which of its C++/CUDA ops can be built here, timm, webdataset,
triton, NVIDIA apex — the devices, and how the process was launched. Under a launcher with
more than one rank it also checks that every rank runs the same stack (a node with another
torch build is the classic multi-node hang) and measures all-reduce bus bandwidth the way
nccl-tests does: algbw = bytes / time, busbw = algbw * 2(n-1)/n, the ring all-reduce's
per-link traffic, comparable to the link speed. One process alone reports the test skipped.

    gigamim doctor
    gigamim launch --nproc-per-node 8 doctor --bandwidth-mb 256      # one node (CPU ranks too)
    deepspeed --hostfile hosts --no_local_rank --module gigamim doctor   # across nodes
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import sys
import time

from gigamim.runtime.dist import destroy_distributed, detect_launch, init_distributed

# Packages whose version is reported; looked up in the installed metadata, not imported.
_PACKAGES = ("torch", "deepspeed", "timm", "webdataset", "triton", "torchvision", "safetensors", "numpy")


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _apex_status() -> str:
    # PyPI's `apex` is an unrelated package; NVIDIA apex has apex/normalization. Look at the
    # files instead of importing, so a broken apex build cannot crash the doctor.
    spec = importlib.util.find_spec("apex")
    if spec is None or not spec.submodule_search_locations:
        return "not installed (optional; PyTorch fallbacks are used)"
    folders = list(spec.submodule_search_locations)
    if any(os.path.isdir(os.path.join(f, "normalization")) for f in folders):
        return f"NVIDIA apex at {folders[0]}"
    return f"an 'apex' package that is not NVIDIA apex ({folders[0]}); it is ignored"


def _torch_stack() -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": None,
        "nccl": None,
    }
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as err:  # a torch build without NCCL
            info["nccl"] = f"unavailable ({type(err).__name__})"
    return info


def _devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"no CUDA device; CPU: {os.cpu_count()} logical cores ({platform.processor() or platform.machine()})"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    return lines


def _deepspeed_ops() -> dict:
    """ds_report's op table, summarised: which ops are prebuilt, which could be JIT-built."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from deepspeed.ops.op_builder.builder import probe_is_compatible
        from torch.utils.cpp_extension import is_ninja_available
    except Exception as err:  # deepspeed missing or broken: say so, do not crash
        return {"error": f"{type(err).__name__}: {err}"}
    compatible, incompatible, installed = [], [], []
    for name, builder in ALL_OPS.items():
        try:
            ok = probe_is_compatible(builder, False)
        except Exception:
            ok = False
        (compatible if ok else incompatible).append(name)
        if installed_ops.get(name, False):
            installed.append(name)
    return {
        "accelerator": get_accelerator().device_name(),
        "ninja": bool(is_ninja_available()),
        "compatible": compatible,
        "incompatible": incompatible,
        "prebuilt": installed,
    }


def _shm_gib() -> float | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_blocks * st.f_frsize / 2**30


def collect_report(with_ops: bool = True) -> dict:
    """Everything about this process's software and hardware (no communication)."""
    report = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "gigamim": _version("gigamim"),
        "apex": _apex_status(),
        "torch_stack": _torch_stack(),
        "devices": _devices(),
        "shm_gib": _shm_gib(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "OMP_NUM_THREADS", "CUDA_VISIBLE", "DS_ACCELERATOR", "MASTER_"))},
    }
    if with_ops:
        report["deepspeed_ops"] = _deepspeed_ops()
    return report


def _stack_signature(report: dict) -> dict:
    """The parts that must agree on every rank of one job."""
    ts = report["torch_stack"]
    return {
        "python": report["python"],
        "torch": ts["torch"],
        "cuda_build": ts["cuda_build"],
        "nccl": ts["nccl"],
        "deepspeed": report["packages"]["deepspeed"],
        "gigamim": report["gigamim"],
    }


def allreduce_bandwidth(info, size_mb: float, iters: int, warmup: int) -> dict:
    """Time an in-place float32 SUM all-reduce of `size_mb` MiB over the whole group.

    The slowest rank's time counts (as in nccl-tests). busbw = algbw * 2(n-1)/n.
    """
    import torch
    import torch.distributed as tdist

    n = info.world_size
    numel = max(1, int(size_mb * 2**20) // 4)
    buf = torch.zeros(numel, dtype=torch.float32, device=info.device)

    # Correctness first: a wrong sum means a broken transport, whatever its speed.
    probe = torch.full((1024,), float(info.rank + 1), device=info.device)
    tdist.all_reduce(probe)
    expected = n * (n + 1) / 2
    correct = bool(torch.all(probe == expected).item())

    def sync():
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)

    for _ in range(warmup):
        tdist.all_reduce(buf)
    sync()
    tdist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        tdist.all_reduce(buf)
    sync()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=info.device)
    tdist.all_reduce(elapsed, op=tdist.ReduceOp.MAX)
    seconds = elapsed.item() / iters
    nbytes = numel * 4
    algbw = nbytes / seconds / 1e9
    return {
        "ranks": n,
        "bytes": nbytes,
        "iters": iters,
        "seconds_per_iter": seconds,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2 * (n - 1) / n,
        "correct": correct,
    }


def _format(report: dict, launch: dict, ranks: list[dict] | None, bw: dict | None, skipped: str | None) -> str:
    pk, ts = report["packages"], report["torch_stack"]
    lines = ["gigamim doctor", "", "versions"]
    lines.append(f"  python       {report['python']} ({sys.executable})")
    cuda = f"CUDA {ts['cuda_build']}" if ts["cuda_build"] else "CPU-only build"
    lines.append(f"  torch        {ts['torch']} ({cuda}, cuDNN {ts['cudnn'] or '-'}, NCCL {ts['nccl'] or '-'})")
    ops = report.get("deepspeed_ops") or {}
    if "error" in ops:
        lines.append(f"  deepspeed    {pk['deepspeed'] or 'not installed'}: {ops['error']}")
    elif ops:
        lines.append(
            f"  deepspeed    {pk['deepspeed']} (accelerator {ops['accelerator']}; ninja {'yes' if ops['ninja'] else 'NO'}; "
            f"ops: {len(ops['compatible'])}/{len(ops['compatible']) + len(ops['incompatible'])} can be built, "
            f"{len(ops['prebuilt'])} prebuilt)"
        )
        if ops["incompatible"]:
            lines.append(f"               not buildable here: {', '.join(ops['incompatible'])}")
    else:
        lines.append(f"  deepspeed    {pk['deepspeed'] or 'not installed'}")
    for name in ("timm", "webdataset", "triton", "torchvision", "safetensors", "numpy"):
        lines.append(f"  {name:<12} {pk[name] or 'not installed'}")
    lines.append(f"  apex         {report['apex']}")
    lines.append(f"  gigamim      {report['gigamim']}")
    lines += ["", "devices"] + [f"  {d}" for d in report["devices"]]
    if report["shm_gib"] is not None:
        lines.append(f"  /dev/shm     {report['shm_gib']:.1f} GiB")
    if report["env"]:
        lines += ["", "environment"] + [f"  {k}={v}" for k, v in report["env"].items()]
    lines += ["", "launch"]
    lines.append(
        f"  launcher {launch['launcher']}, {launch['world_size']} rank(s), {launch['local_world_size']} per node"
        + (f", backend {launch['backend']}" if launch.get("backend") else "")
        + (f", master {launch['master_addr']}:{launch['master_port']}" if launch["world_size"] > 1 else "")
    )
    if ranks:
        hosts: dict[str, int] = {}
        for r in ranks:
            hosts[r["host"]] = hosts.get(r["host"], 0) + 1
        lines.append("  nodes    " + ", ".join(f"{h} ({c} ranks)" for h, c in hosts.items()))
        sig0 = ranks[0]["stack"]
        bad = [r for r in ranks if r["stack"] != sig0]
        if bad:
            lines.append("  MISMATCH: ranks run different software stacks:")
            for r in bad:
                diff = {k: (sig0[k], v) for k, v in r["stack"].items() if sig0[k] != v}
                lines.append(f"    rank {r['rank']} on {r['host']}: {diff} (rank 0, this rank)")
        else:
            lines.append("  every rank runs the same python/torch/CUDA/NCCL/deepspeed/gigamim")
    lines += ["", "all-reduce bandwidth"]
    if bw is None:
        lines.append(f"  skipped: {skipped}")
    else:
        lines.append(
            f"  {launch['backend']}, {bw['ranks']} ranks, {bw['bytes'] / 2**20:.1f} MiB float32 sum, {bw['iters']} iters: "
            f"{bw['seconds_per_iter'] * 1e3:.2f} ms/iter"
        )
        lines.append(f"  algbw {bw['algbw_gbps']:.3f} GB/s   busbw {bw['busbw_gbps']:.3f} GB/s   (busbw = algbw * 2(n-1)/n)")
        lines.append(f"  result {'correct' if bw['correct'] else 'WRONG: the transport corrupts data'}")
    return "\n".join(lines)


def launch_suggestion(report: dict) -> str:
    """The command that runs doctor on this machine's ranks: gigamim's own launcher (it works
    on CPU ranks too, where `deepspeed --num_gpus` would look for GPUs), every local GPU or 2
    CPU ranks."""
    gpus = sum(1 for d in report.get("devices") or [] if d.startswith("cuda:"))
    return f"gigamim launch --nproc-per-node {gpus if gpus > 1 else 2} doctor"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigamim doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth-mb", type=float, default=64.0, help="all-reduce message size in MiB (default 64)")
    parser.add_argument("--iters", type=int, default=10, help="timed all-reduce iterations (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (default 2)")
    parser.add_argument("--no-ops", action="store_true", help="skip DeepSpeed's op compatibility probe")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON (rank 0)")
    parser.add_argument("--timeout-s", type=float, default=300, help="process-group timeout (default 300 s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bandwidth_mb <= 0 or args.iters < 1 or args.warmup < 0:
        parser.error("--bandwidth-mb must be > 0, --iters >= 1 and --warmup >= 0")

    launch = detect_launch()
    report = collect_report(with_ops=not args.no_ops and launch.rank == 0)
    launch_info = {
        "launcher": launch.launcher,
        "world_size": launch.world_size,
        "local_world_size": launch.local_world_size,
        "master_addr": launch.master_addr,
        "master_port": launch.master_port,
    }
    ranks, bw, skipped, rc = None, None, None, 0
    if launch.world_size > 1:
        import torch.distributed as tdist

        info = init_distributed(timeout_s=args.timeout_s)
        launch_info["backend"] = info.backend
        mine = {"rank": info.rank, "host": report["host"], "stack": _stack_signature(report)}
        ranks = [None] * info.world_size
        tdist.all_gather_object(ranks, mine)
        bw = allreduce_bandwidth(info, args.bandwidth_mb, args.iters, args.warmup)
        if not bw["correct"] or any(r["stack"] != ranks[0]["stack"] for r in ranks):
            rc = 1
        destroy_distributed()
    else:
        skipped = f"one process; for the all-reduce run it on >1 rank: `{launch_suggestion(report)}`"

    if launch.rank == 0:
        print(_format(report, launch_info, ranks, bw, skipped), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"report": report, "launch": launch_info, "ranks": ranks, "allreduce": bw}, fh, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
