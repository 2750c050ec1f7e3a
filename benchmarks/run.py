"""`gigamim bench`: gigamim's SimMIM training step against a timm reference, sweeps, reports.

    gigamim bench --profile quick --out bench_out          # < 3 min on a 2-core CPU
    gigamim bench --profile gpu --out bench_gpu            # one H200, < 8 min
    gigamim bench --profile full --out bench_full          # CPU sweeps + ZeRO 0-3 + data loader
    gigamim bench --profile full --only zero,data --out o  # some parts of a profile
    gigamim bench --profile engines --out bench_engines    # ZeRO-3 vs FSDP2, 2 CPU ranks

Writes one JSON per case, summary.json (train_step_ratio, peak_mem_ratio, ...), report.md
and PNG plots into --out. Profiles are described in benchmarks/profiles.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _plan_check(res: dict) -> dict | None:
    """`gigamim plan`'s prediction of this case's peak (CPU fp32 cases), and its error."""
    from gigamim.tools.memory import FP32_STATE_BYTES, activation_bytes, model_state_bytes

    c = res["case"]
    if c.get("impl") != "gigamim" or c.get("precision") != "fp32" or not res.get("peak_mem_bytes"):
        return None
    if c["attn_impl"] == "sdpa" and not c["sequential"]:
        return None  # SDPA's CPU math path saves its own set of tensors: not modelled
    attn = "sequential" if c["sequential"] else "explicit"
    act = activation_bytes(c["model"], c["img_size"], window_size=c["window_size"], batch=c["batch"], dtype_bytes=4,
                           attn=attn, checkpointing=c["checkpointing"], attn_chunk=c["attn_chunk"])
    states = model_state_bytes(res["params"], 1, 0, False, state_bytes=FP32_STATE_BYTES)["gpu"]["total"]
    batch_bytes = c["batch"] * 3 * c["img_size"] ** 2 * (1 + 4)  # uint8 batch + its float copy
    pred = states + act["total"] + batch_bytes
    return {"case": c["name"], "predicted_gb": pred / 2**30, "measured_gb": res["peak_mem_bytes"] / 2**30,
            "error": pred / res["peak_mem_bytes"] - 1, "attn_mode": attn, "checkpointing": c["checkpointing"]}


def _run_data_bench(out: Path, kwargs: dict, log):
    try:
        from . import data_bench
    except ImportError as e:
        return None, f"benchmarks/data_bench.py not importable: {e}"
    fn = getattr(data_bench, "run_data_bench", None)
    if fn is None:
        return None, "benchmarks/data_bench.py has no run_data_bench()"
    try:
        log("data loader benchmark ...")
        return fn(str(out), **kwargs), None
    except Exception as e:  # noqa: BLE001  (the data bench is optional for the report)
        return None, f"{type(e).__name__}: {e}"


def _rebuild(dirs, out: Path, command: str) -> int:
    import json

    from .report import write_report

    results, data, meta = [], None, None
    for d in map(Path, dirs):
        summary = d / "summary.json"
        if meta is None and summary.exists():
            s = json.loads(summary.read_text())
            meta = {k: s.get(k) for k in ("profile", "machine", "versions", "cpu_peak_tflops", "wall_s", "load_end")}
            meta["command"] = s.get("command")
        for f in sorted(d.glob("*.json")):
            if f.name == "summary.json":
                continue
            if f.name == "data_bench.json":
                data = json.loads(f.read_text())
                continue
            res = json.loads(f.read_text())
            if "error" not in res and res.get("device", "cpu") == "cpu" and "breakdown_s" in res:
                check = _plan_check(res)  # with the planner as it is now
                if check:
                    res["plan_check"] = check
            results.append(res)
    if meta is None:
        print(f"gigamim bench: no summary.json in {dirs}", file=sys.stderr)
        return 2
    meta["command"] = f"{meta['command']}  (report rebuilt: {command})"
    out.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (out / "data_bench.json").write_text(json.dumps(data, indent=1) + "\n")
    for r in results:
        (out / f"{r['case']['name']}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    summary = write_report(out, results, meta, data)
    print(f"rebuilt {out}/report.md from {len(results)} cases; plots: {', '.join(summary['plots'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .profiles import DESCRIPTIONS, PROFILES

    p = argparse.ArgumentParser(prog="gigamim bench", description=__doc__.split("\n\n")[0],
                                epilog="profiles:\n" + "\n".join(f"  {name:<13} {DESCRIPTIONS[name]}"
                                                                  for name in sorted(PROFILES)),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="which cases to run (default quick; each is described below)")
    p.add_argument("--out", default="bench_out", help="output folder (created)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores; on a loaded shared machine 1 avoids OpenMP thrashing)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="override every case's precision")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: groups not started by then are skipped (the report is still written)")
    p.add_argument("--report-from", nargs="+", default=None, metavar="DIR",
                   help="run nothing: rebuild report.md/summary.json/plots in --out from the case JSONs of "
                        "earlier runs (machine and command taken from the first DIR's summary.json)")
    p.add_argument("--list", action="store_true", help="print the profile's cases and exit (nothing is built)")
    p.add_argument("--only", default=None, help="comma-separated groups to run (ratio, memory, attention, "
                                                "checkpointing, resolution, micro_batch, gpu_sizes, compile, compile_model, zero, "
                                                "zero_compile, engines, data)")
    return p


def main(argv=None) -> int:
    from .profiles import PROFILES

    args = build_parser().parse_args(argv)

    import torch

    from .common import command_line, cpu_matmul_peak_tflops, machine_info, versions, write_json
    from .report import write_report
    from .train_step import run_group

    if args.report_from:
        return _rebuild(args.report_from, Path(args.out), command_line(argv))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gigamim bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        # Other jobs hold the cores: several OpenMP threads per op then spin against each
        # other and a step gets many times slower. One thread keeps the comparison fair.
        torch.set_num_threads(1)
        print(f"gigamim bench: load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: using 1 torch "
              f"thread (--threads to override)", flush=True)
    if device.type == "cuda":
        # Both sides alike: TF32 for whatever runs in fp32 outside autocast.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    profile = PROFILES[args.profile]()
    for group in profile["groups"]:
        for c in group:
            c.resolve(device)
            if args.precision:
                c.precision = args.precision
    if args.list:
        for group in profile["groups"]:
            for c in group:
                print(f"{c.group:<14} {c.name:<44} {c.describe():<32} {c.precision} steps={c.steps}")
        if profile.get("zero"):
            print(f"zero           {profile['zero']}")
        if profile.get("data"):
            print(f"data           {profile['data']}")
        if profile.get("engines"):
            print(f"engines        {profile['engines']}")
        return 0
    meta = {"profile": args.profile, "command": command_line(argv), "machine": machine_info(), "versions": versions(),
            "device": str(device)}
    if device.type == "cuda":
        from gigamim.train.metrics import device_peak_tflops

        peak, peak_src = device_peak_tflops(device, "bf16"), "gigamim.train.metrics.PEAK_TFLOPS (bf16 dense)"
        peak_fp32 = device_peak_tflops(device, "fp32")
    else:
        peak = cpu_matmul_peak_tflops()
        peak_src, peak_fp32 = "fp32 torch.mm 2048^3, measured in this run", None
        meta["cpu_peak_tflops"] = peak
        log(f"CPU matmul peak: {peak:.3f} TFLOP/s ({torch.get_num_threads()} threads)")
    results = []
    for group in profile["groups"]:
        name = group[0].group
        if only and name not in only:
            continue
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            log(f"[{name}] skipped: --time-budget {args.time_budget:.0f} s spent")
            meta.setdefault("skipped_groups", []).append(name)
            continue
        log(f"[{name}] " + ", ".join(c.name for c in group))
        fp32 = all(c.precision == "fp32" for c in group)
        pk = peak_fp32 if (device.type == "cuda" and fp32) else peak
        for res in run_group(group, device, pk, peak_src, log=log):
            if device.type == "cpu" and "error" not in res:
                check = _plan_check(res)
                if check:
                    res["plan_check"] = check
            res["device"] = str(device)
            write_json(out / f"{res['case']['name']}.json", res)
            results.append(res)
    if profile.get("zero") and (not only or "zero" in only):
        from .zero_sweep import run_zero_sweep

        log("[zero] gigamim pretrain on 2 ranks, ZeRO " + ", ".join(map(str, profile["zero"]["stages"])))
        for res in run_zero_sweep(out, log=log, **profile["zero"]):
            write_json(out / f"{res['case']['name']}.json", res)
            results.append(res)
    if profile.get("zero_compile") and (not only or "zero_compile" in only):
        from .zero_sweep import run_zero_compile

        log("[zero_compile] 2 ranks, " + ", ".join(profile["zero_compile"]["variants"]))
        for res in run_zero_compile(out, log=log, **profile["zero_compile"]):
            write_json(out / f"{res['case']['name']}.json", res)
            results.append(res)
    if profile.get("engines") and (not only or "engines" in only):
        from .engine_sweep import run_engine_sweep

        log("[engines] ZeRO-3 vs FSDP2 on 2 ranks, " + ", ".join(profile["engines"]["variants"]))
        for res in run_engine_sweep(out, log=log, **profile["engines"]):
            write_json(out / f"{res['case']['name']}.json", res)
            results.append(res)
    data = None
    if profile.get("data") and (not only or "data" in only):
        data, err = _run_data_bench(out, profile["data"], log)
        if err:
            meta["data_bench_error"] = err
            log(f"data loader benchmark skipped: {err}")
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = write_report(out, results, meta, data)
    log(f"wrote {out}/report.md, summary.json, {len(results)} case JSONs, plots: {', '.join(summary['plots'])}")
    if summary.get("train_step_ratio") is not None:
        log(f"train_step_ratio = {summary['train_step_ratio']:.3f}")
    if summary.get("peak_mem_ratio") is not None:
        log(f"peak_mem_ratio = {summary['peak_mem_ratio']:.3f}")
    return 1 if summary["failed_cases"] and len(summary["failed_cases"]) == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
