"""One run on a lent GPU (one H200, ~8 minutes) that brings back everything it measured.

    OUT=out bash benchmarks/gpu_smoke.sh                 # on the GPU machine (carry .whl/)
    OUT=out bash benchmarks/gpu_smoke.sh --cpu-dry-run   # every step at tiny sizes on the CPU (CI)
    python -m gigamim_benchmarks.gpu_smoke --out OUT [--cpu-dry-run] [--budget S] [--only a,b]

Steps, cheap and decisive first; each runs in its own subprocess under its own timeout (a hang,
a crash or an OOM is contained: the next step always runs) and writes its JSON as it goes:

  env         versions (which packages were carried), nvidia-smi, torch.cuda
  attention   explicit / sdpa / flex against fp32 explicit, in bf16 and fp32, on tame random
              weights (bounds relative to explicit-bf16's own error); which SDPA backend ran
              (fused kernels only, and the profiler's op names)
  kernels     the Triton kernels against float64 formulas, and their speed (gpu_check --quick)
  throughput  SwinV2-B/L/H/G at 192 px in bf16 at the planner's micro-batch (G with its recipe's
              checkpointing): images/s, MFU, peak memory against the plan
  pretrain    FusedAdam JIT build (timed); the real `gigamim launch --nproc-per-node 1 pretrain`
              with zero3_bf16 for 30 steps, saves at 15 and 30; the step-30 save is taken away
              (as a kill before it would), `--resume auto` continues from 15: equal losses
  data        SimMIMLoader into the GPU (pinned memory, non-blocking copies) on synthetic JPEG
              shards: images/s against the model's
  max_batch   the largest micro-batch that fits per size (bisection on OOM, bounded time)
  compile     last: one block graph per size, drop_path_rate 0 (no float specialised per
              block), compiled against eager: compile time, speed, errors, graph breaks

After every step $OUT holds exactly two files: results.tar.gz (every step's JSON and log, the
throughput report and plots, the reconstruction picture) and summary.json; a kill leaves the
last pair. A compact summary (a few lines per step) is printed after each step and at the end.
In the dry run the same code runs on the CPU with swinv2_nano, tiny images and 2-3 steps; what
only a GPU can show (the fused SDPA backend, TFLOP/s expectations, FusedAdam, OOM, inductor)
is reported as skipped on cpu, with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .gpu_smoke_steps import (STEP_NAMES, Ctx, build_jit_op, kill_group, read_json, run_command, start_command,
                              tail_text, write_json_atomic)

MIN_STEP_S = 10  # a step offered less than this is skipped, not started


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float  # on the GPU; the defaults sum to the default --budget
    dry_budget_s: float  # CPU dry run: a generous ceiling (a loaded CI machine), not a target
    elastic: bool  # also gets what earlier steps left unused (bisection, compile: more sizes)
    what: str


STEPS = (
    Step("env", 20, 60, False, "versions, nvidia-smi, torch.cuda"),
    Step("attention", 65, 90, False, "attention paths vs fp32 explicit; the SDPA backend that ran"),
    Step("kernels", 35, 60, False, "Triton kernels vs float64, and their speed"),
    Step("throughput", 95, 90, False, "B/L/H/G bf16 at the planner's micro-batch: img/s, MFU, peak vs plan"),
    Step("pretrain", 165, 240, False, "FusedAdam build; gigamim pretrain zero3_bf16, save, --resume auto"),
    Step("data", 20, 60, False, "loader -> GPU (pinned, non-blocking) vs the model's images/s"),
    Step("max_batch", 38, 60, True, "largest micro-batch per size (bisection on OOM)"),
    Step("compile", 42, 90, True, "one block graph per size: compiled vs eager"),
)
DEFAULT_BUDGET_S = sum(s.budget_s for s in STEPS)
assert tuple(s.name for s in STEPS) == STEP_NAMES, "the step table and gpu_smoke_steps.STEP_FUNCS disagree"


def select_wheels(folder: str | Path) -> list[str]:
    """The carried wheels to install: those whose distribution this Python lacks or has at an
    older version (the image's own newer or equal copies win; timm is carried as the minimum
    gigamim needs). Only the standard library and `packaging` (in every pip image) are used."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    chosen = []
    for whl in sorted(Path(folder).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(whl.name)
        try:
            have = Version(md.version(canonicalize_name(name)))
        except md.PackageNotFoundError:
            have = None
        if have is None or have < version:
            chosen.append(str(whl))
    return chosen


# --------------------------------------------------------------------------- the orchestrator


def _summary_line(name: str, s: dict) -> list[str]:
    wall = f"{s['wall_s']:.0f}s/{s['timeout_s']:.0f}s" if "wall_s" in s else ""
    head = [h[:240] for h in s.get("headline") or []]
    first = head[0] if head else s.get("reason", "")
    lines = [f"[{s['status']:<7}] {name:<10} {wall:<10} {first}"]
    lines += [" " * 30 + h for h in head[1:6]]
    if s.get("reason") and head:
        lines.append(" " * 30 + f"reason: {s['reason']}")
    bad = s.get("failed_checks") or []
    if bad:
        lines.append(" " * 30 + "failed checks: " + "; ".join(bad)[:400])
    return lines


def compact(summary: dict) -> str:
    st = summary["steps"]
    done = [s for s in st.values() if s["status"] in ("ok", "failed", "timeout", "skipped")]
    ok = sum(s["status"] == "ok" for s in st.values())
    lines = [f"== gigamim gpu_smoke ({summary['mode']}) on {summary.get('device') or '?'}: {ok}/{len(st)} steps ok, "
             f"{len(done)}/{len(st)} done, {summary['elapsed_s']:.0f} s of {summary['budget_s']:.0f} s"]
    for name, s in st.items():
        lines += _summary_line(name, s)
    return "\n".join(lines)


def _pack(results: Path, out: Path, summary: dict) -> None:
    """$OUT/results.tar.gz (everything under results/) and $OUT/summary.json, each replaced
    atomically; nothing else is ever left in $OUT."""
    write_json_atomic(results / "summary.json", summary)
    tmp = out / ".results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(results, arcname="gpu_smoke")
    os.replace(tmp, out / "results.tar.gz")
    write_json_atomic(out / "summary.json", summary)


def _step_entry(step: Step, rc, wall: float, timeout: float, results: Path) -> dict:
    res = read_json(results / f"{step.name}.json")
    entry = {"status": res.get("status", "failed"), "wall_s": round(wall, 1), "timeout_s": round(timeout, 1),
             "headline": res.get("headline", []), "what": step.what}
    checks = res.get("checks", {})
    entry["checks"] = {k: (v["ok"] if v.get("ok") is not None else f"skipped: {v.get('skipped')}")
                       for k, v in checks.items()}
    entry["failed_checks"] = [f"{k}: {v.get('detail', '')}"[:160] for k, v in checks.items() if v.get("ok") is False]
    if rc is None:
        entry["status"] = "timeout"
        entry["reason"] = f"killed after {timeout:.0f} s; what it wrote before is kept"
    elif entry["status"] == "running" or (rc != 0 and entry["status"] == "ok"):
        entry["status"] = "failed"
        entry["reason"] = f"exit {rc}: " + tail_text(results / f"{step.name}.log", 400).strip().replace("\n", " | ")
    elif res.get("error"):
        entry["reason"] = res["error"][:400]
    return entry


def orchestrate(args) -> int:
    dry = args.cpu_dry_run
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gigamim_gpu_smoke_")).absolute()
    results, scratch = work / "results", work / "scratch"
    results.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s.name for s in STEPS}
    if unknown:
        print(f"gpu_smoke: unknown steps {sorted(unknown)}; known: {[s.name for s in STEPS]}", file=sys.stderr)
        return 2
    steps = [s for s in STEPS if not only or s.name in only]
    budget = {s.name: s.dry_budget_s if dry else s.budget_s for s in steps}
    total = args.budget or sum(budget.values())
    scale = min(1.0, total / sum(budget.values()))
    t0 = time.time()
    deadline = t0 + total
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would guess so anyway, with a warning per import
    summary = {"schema": 1, "mode": "cpu-dry-run" if dry else "gpu", "device": None, "budget_s": total,
               "started_unix": t0, "elapsed_s": 0.0, "command": " ".join(sys.argv),
               "archive": "results.tar.gz: gpu_smoke/<step>.json, <step>.log and each step's extra files",
               "steps": {s.name: {"status": "pending", "what": s.what} for s in steps}}
    _pack(results, out, summary)
    builder = None
    if "pretrain" in budget:
        # nvcc's FusedAdam build (minutes of CPU) runs beside the first steps, which use the GPU.
        builder = start_command([sys.executable, "-m", "gigamim_benchmarks.gpu_smoke", "--build-jit-op",
                                 results / "jit_op.json"], open(results / "jit_op_build.log", "w"),
                                dict(env, MAX_JOBS=str(max(1, (os.cpu_count() or 2) // 2))))
    for i, step in enumerate(steps):
        later = sum(budget[s.name] * scale for s in steps[i + 1:])
        room = deadline - time.time() - later
        timeout = room if step.elastic else min(budget[step.name] * scale, room)
        if timeout < MIN_STEP_S:
            entry = {"status": "skipped", "what": step.what,
                     "reason": f"not started: {max(0.0, room):.0f} s left for it (budget {total:.0f} s)"}
        else:
            summary["steps"][step.name] = {"status": "running", "what": step.what, "timeout_s": round(timeout, 1),
                                           "started_s": round(time.time() - t0, 1)}
            _pack(results, out, summary)  # a kill from outside then shows which step it hit
            print(f"[gpu_smoke {time.time() - t0:.0f}s] {step.name}: {step.what} (timeout {timeout:.0f} s)", flush=True)
            cmd = [sys.executable, "-m", "gigamim_benchmarks.gpu_smoke", "--step", step.name, "--work", str(work),
                   "--step-deadline", str(time.time() + timeout)] + (["--cpu-dry-run"] if dry else [])
            rc, wall = run_command(cmd, timeout, results / f"{step.name}.log", env)
            entry = _step_entry(step, rc, wall, timeout, results)
        summary["steps"][step.name] = entry
        if step.name == "env" and entry.get("headline"):
            summary["device"] = entry["headline"][0]
        summary["elapsed_s"] = round(time.time() - t0, 1)
        _pack(results, out, summary)
        print("\n".join(_summary_line(step.name, entry)), flush=True)
    if builder is not None and builder.poll() is None:
        kill_group(builder, grace=2.0)
    summary["elapsed_s"] = round(time.time() - t0, 1)
    _pack(results, out, summary)
    print(compact(summary), flush=True)
    if not args.keep_scratch:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)  # checkpoints and shards: never archived
    return 1 if any(s["status"] in ("failed", "timeout") for s in summary["steps"].values()) else 0


def run_step(args) -> int:
    ctx = Ctx(args.step, Path(args.work), args.cpu_dry_run, args.step_deadline or time.time() + 3600)
    if not ctx.dry and args.step != "env":
        import torch

        if not torch.cuda.is_available():
            ctx.res.update(status="failed", error="no CUDA device visible (use --cpu-dry-run without a GPU)")
            ctx.save()
            return 1
    ctx.save()
    try:
        from .gpu_smoke_steps import STEP_FUNCS

        STEP_FUNCS[args.step](ctx)
        ctx.finish()
    except Exception as e:  # noqa: BLE001  (the parent reads the reason from the JSON)
        traceback.print_exc()
        ctx.res.update(status="failed", error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:])
        ctx.save()
        return 1
    return 0 if ctx.res["status"] == "ok" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gigamim_benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_smoke_out", help="receives results.tar.gz and summary.json only")
    p.add_argument("--work", default=None, help="working folder (results/ is archived, scratch/ deleted at the end)")
    p.add_argument("--cpu-dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all steps (default {DEFAULT_BUDGET_S:.0f} on a GPU; the dry run's ceilings)")
    p.add_argument("--only", default=None, help="comma-separated steps: " + ",".join(s.name for s in STEPS))
    p.add_argument("--keep-scratch", action="store_true", help="keep checkpoints and shards (work/scratch)")
    p.add_argument("--select-wheels", metavar="DIR", help="print the wheels of DIR this Python lacks, and exit")
    p.add_argument("--step", choices=STEP_NAMES, help=argparse.SUPPRESS)  # one step, in this process
    p.add_argument("--step-deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--build-jit-op", metavar="JSON", help=argparse.SUPPRESS)  # the background build
    args = p.parse_args(argv)
    if args.build_jit_op:
        return build_jit_op(args.build_jit_op)
    if args.select_wheels:
        print(" ".join(select_wheels(args.select_wheels)))
        return 0
    if args.step:
        return run_step(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
