"""The calibration table: `gigamim.tools.step_model` predictions vs the measured 2-rank CPU runs.

Reads DIR/raw.json (written by benchmarks/plan_calibration.py), writes DIR/table.json and
DIR/table.md. The model gets only the measured inputs (GEMM peak, efficiency of a plain
swinv2_tiny forward + backward, gloo latency + bandwidth per collective kind, copy
bandwidth, AdamW seconds per parameter) and each run's shape; nothing from the run itself.

    python -m benchmarks.plan_calibration_report DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BYTES_TOL, TIME_TOL = 0.05, 0.25


def calibration_inputs(inputs: dict, zero_passes=(0.0, 0.0, 0.0, 0.0)):
    from gigamim.tools.hardware import Network, cpu_device
    from gigamim.tools.step_model import Costs, Precision

    device = cpu_device(inputs["gemm_tflops"], inputs["mem_gbps"])
    net = Network(per_kind_bps={k: v["bytes_per_s"] for k, v in inputs["gloo"].items()},
                  per_kind_latency_s={k: v["latency_s"] for k, v in inputs["gloo"].items()})
    fresh = inputs.get("fresh_gbps", inputs["mem_gbps"]) * 1e9
    costs = Costs(efficiency=inputs["efficiency"], overlap=0.0, optim_s_per_param=inputs["optim_s_per_param"],
                  cpu_ms_per_image=0.0, zero_passes=tuple(zero_passes), buffer_bps=fresh)  # random data: no loading
    return device, net, costs, Precision(param_bytes=4, grad_bytes=4, master_bytes=4)  # fp32 on CPU


def knobs_of(ds_zero: dict):
    from gigamim.tools.step_model import ZeroKnobs

    return ZeroKnobs(reduce_bucket=float(ds_zero.get("reduce_bucket_size", 5e8)),
                     allgather_bucket=float(ds_zero.get("allgather_bucket_size", 5e8)),
                     prefetch_bucket=float(ds_zero.get("stage3_prefetch_bucket_size", 5e7)),
                     max_live=float(ds_zero.get("stage3_max_live_parameters", 1e9)),
                     persistence_threshold=float(ds_zero.get("stage3_param_persistence_threshold", 1e5)))


def predict(run: dict, inputs: dict, img_size: int, window: int, zero_passes=(0.0, 0.0, 0.0, 0.0),
            fsdp_passes: float = 0.0) -> dict:
    from dataclasses import replace

    from gigamim.tools.model_facts import model_facts
    from gigamim.tools.step_model import Candidate, ZeroKnobs, step_time

    case = run["case"]
    device, net, costs, prec = calibration_inputs(inputs, zero_passes)
    costs = replace(costs, fsdp_passes=fsdp_passes, forward_efficiency=inputs.get("efficiency_forward"))
    facts = model_facts(case["model"], img_size, window)
    ckpt = 1 if case["ckpt"] else 0
    if is_fsdp2(run):
        cand = Candidate(zero_stage=3, micro_batch=case["micro_batch"], accumulation=case["accumulation"],
                         ckpt_every=ckpt, engine="fsdp2", reshard_after_forward=bool(case.get("reshard", True)))
        return step_time(facts, cand, run["world"], run["world"], device, net, ZeroKnobs(), prec, costs)
    cand = Candidate(zero_stage=case["stage"], micro_batch=case["micro_batch"], accumulation=case["accumulation"],
                     ckpt_every=ckpt)
    return step_time(facts, cand, run["world"], run["world"], device, net, knobs_of(run["ds_zero"]), prec, costs)


def is_fsdp2(run: dict) -> bool:
    return run["case"].get("engine") == "fsdp2"


def fit_zero_passes(raw: dict, model: str = "swinv2_tiny") -> tuple:
    """Passes per micro-step (over P x 4 bytes at the first-touch bandwidth) that close the gap
    between the first-principles prediction and the measurement, per ZeRO stage, from the
    `model` runs WITHOUT checkpointing only; every other run is predicted with them."""
    from gigamim.tools.model_facts import model_facts

    meta = raw["meta"]
    passes = [0.0, 0.0, 0.0, 0.0]
    for run in raw["runs"]:
        c = run["case"]
        if c["model"] != model or c["ckpt"] or is_fsdp2(run):
            continue
        inputs = inputs_of(raw, run)
        fresh = inputs.get("fresh_gbps", inputs["mem_gbps"]) * 1e9
        base = predict(run, inputs, meta["img_size"], meta["window_size"])["step_s"]
        P = model_facts(c["model"], meta["img_size"], meta["window_size"]).params
        reps = 1 if c["stage"] == 1 else c["accumulation"]  # as step_model counts them
        passes[c["stage"]] = max(0.0, (run["step_s"] - base) / (reps * P * 4 / fresh))
    return tuple(passes)


def is_fsdp2_fit_run(run: dict, model: str = "swinv2_tiny") -> bool:
    c = run["case"]
    return is_fsdp2(run) and c["model"] == model and not c["ckpt"] and c.get("reshard", True)


def fit_fsdp_passes(raw: dict, model: str = "swinv2_tiny") -> float:
    """FSDP2's copies around its collectives, passes per micro-step over P x 4 bytes at the
    first-touch bandwidth, from the ONE `model` FSDP2 run with reshard_after_forward and
    without checkpointing; every other FSDP2 run is predicted with it."""
    from gigamim.tools.model_facts import model_facts

    meta = raw["meta"]
    for run in raw["runs"]:
        if is_fsdp2_fit_run(run, model):
            c = run["case"]
            inputs = inputs_of(raw, run)
            fresh = inputs.get("fresh_gbps", inputs["mem_gbps"]) * 1e9
            base = predict(run, inputs, meta["img_size"], meta["window_size"])["step_s"]
            P = model_facts(c["model"], meta["img_size"], meta["window_size"]).params
            return max(0.0, (run["step_s"] - base) / (c["accumulation"] * P * 4 / fresh))
    return 0.0


def inputs_of(raw: dict, run: dict) -> dict:
    """The inputs measured right before this run (in its own processes) where the harness did
    that, else the ones measured once before all runs."""
    return run.get("inputs") or raw["inputs"]


def plan_label(run: dict) -> str:
    c = run["case"]
    if is_fsdp2(run):
        return "FSDP2" + ("" if c.get("reshard", True) else " no-reshard")
    return f"ZeRO-{c['stage']}"


def build_table(raw: dict) -> list:
    meta = raw["meta"]
    passes = fit_zero_passes(raw)
    fsdp_passes = fit_fsdp_passes(raw)
    rows = []
    for run in raw["runs"]:
        inputs = inputs_of(raw, run)
        first = predict(run, inputs, meta["img_size"], meta["window_size"])
        pred = predict(run, inputs, meta["img_size"], meta["window_size"], passes, fsdp_passes)
        measured_bytes = {k: v for k, v in run["bytes_per_step"].items() if v >= 1024}  # scalars (grad norm) aside
        kinds = sorted(set(measured_bytes) | set(pred["comm_bytes"]))
        byte_err = {k: pred["comm_bytes"].get(k, 0.0) / measured_bytes[k] - 1 if measured_bytes.get(k) else None
                    for k in kinds}
        total_m, total_p = sum(measured_bytes.values()), sum(pred["comm_bytes"].values())
        c = run["case"]
        rows.append({
            "model": c["model"], "plan": plan_label(run), "engine": "fsdp2" if is_fsdp2(run) else "deepspeed",
            "zero_stage": c.get("stage"), "ckpt": bool(c["ckpt"]), "micro_batch": c["micro_batch"],
            "accumulation": c["accumulation"], "steps": c["steps"],
            "measured_bytes": measured_bytes, "predicted_bytes": pred["comm_bytes"], "bytes_rel_err": byte_err,
            "bytes_total_rel_err": total_p / total_m - 1 if total_m else None,
            "measured_calls": run["calls_per_step"],
            "predicted_calls": {k: sum(x["calls"] for x in pred["comm"] if x["kind"] == k) for k in pred["comm_bytes"]},
            "measured_step_s": run["step_s"], "measured_step_times": run["step_times"],
            "calibration_run": is_fsdp2_fit_run(run) if is_fsdp2(run) else (c["model"] == "swinv2_tiny"
                                                                            and not c["ckpt"]),
            "first_principles_step_s": first["step_s"], "first_principles_rel_err": first["step_s"] / run["step_s"] - 1,
            "zero_passes": passes, "fsdp_passes": fsdp_passes,
            "predicted_step_s": pred["step_s"], "time_rel_err": pred["step_s"] / run["step_s"] - 1,
            "predicted_parts_s": {k: pred[k] for k in ("compute_s", "comm_exposed_s", "optimizer_s", "zero_copies_s",
                                                       "hooks_s")},
            "measured_comm_s": run["comm_s_per_step"], "measured_phase_s": run["phase_s_per_step"],
            "bytes_ok": all(abs(e) <= BYTES_TOL for e in byte_err.values() if e is not None)
            and all(k in measured_bytes for k in pred["comm_bytes"]),
            "time_ok": abs(pred["step_s"] / run["step_s"] - 1) <= TIME_TOL,
            "first_principles_time_ok": abs(first["step_s"] / run["step_s"] - 1) <= TIME_TOL,
        })
    return rows


def markdown(raw: dict, rows: list) -> str:
    meta, inp = raw["meta"], raw["inputs"]
    g = inp["gloo"]
    lines = [
        f"# `gigamim plan` step-time model vs 2-rank CPU runs ({meta['machine']['cpu_model']})",
        "",
        f"Command: `{meta['command']}` (under the shared heavy lock). Versions: torch {meta['versions'].get('torch')}, "
        f"deepspeed {meta['versions'].get('deepspeed')}, commit {meta['versions'].get('git_commit')}. "
        f"Load average at start {meta['machine']['load_avg_1_5_15']}, at end {meta.get('load_avg_end')}. "
        f"Wall {meta['wall_s']:.0f} s.",
        "",
        f"Runs: 2 ranks (gloo, one thread each), `deepspeed.initialize` directly, SimMIM + create_model, "
        f"{meta['img_size']} px, window {meta['window_size']}, fp32, random images; overlap_comm off; "
        f"stage 3 with persistence threshold 0, max_live 1e7, max_reuse_distance 0 (every parameter partitioned). "
        f"FSDP2 runs: gigamim's engine through the engine seam (meta build, one fully_shard unit per block + the root, "
        f"reduce in fp32, AdamW over the shards). "
        f"Bytes: logical buffer per collective, counted by wrapping torch.distributed (benchmarks/comm_count.py), "
        f"per step after {rows[0]['steps'] and raw['runs'][0]['case']['warmup']} warm-up step(s).",
        "",
        *([f"Clock: every time (steps and inputs) in each rank's {meta['clock']} seconds"
           + (" (user + sys; a step is the slower rank's, median over the timed steps)" if meta["clock"] == "cpu"
              else "") + (". Inputs measured again right before each run, in its own processes, and used for "
                          "that run; below: the ones measured once before all runs" if meta.get(
                              "inputs_before_each_case") else "") + ".", ""] if "clock" in meta else []),
        "Model inputs, all measured in the same 2-process harness before the runs: "
        f"fp32 GEMM {inp['gemm_tflops'] * 1e3:.1f} GFLOP/s per rank; efficiency {inp['efficiency']:.3f} "
        f"(plain swinv2_tiny forward + backward, no DeepSpeed); copy bandwidth {inp['mem_gbps']:.2f} GB/s; "
        f"AdamW {inp['optim_s_per_param'] * 1e9:.1f} ns/parameter; gloo latency + algorithm bandwidth: "
        + ", ".join(f"{k} {v['latency_s'] * 1e6:.0f} us + {v['bytes_per_s'] / 1e9:.2f} GB/s" for k, v in g.items()) + ".",
        "",
        f"Step time, two ways: *first principles* (compute at GEMM peak x efficiency, gloo collectives, AdamW; "
        f"nothing fitted) and *calibrated*: plus DeepSpeed's flat-buffer work, `zero_passes` per micro-step (ZeRO-1: per step) over "
        f"P x 4 bytes at the first-touch bandwidth (copy bandwidth where the run predates that input), fitted per stage on the swinv2_tiny runs without "
        f"checkpointing (marked `fit`) and applied unchanged to the others: passes "
        f"{', '.join(f'ZeRO-{i} {p:.2f}' for i, p in enumerate(rows[0]['zero_passes']) if i and p)}"
        + (f"; FSDP2's copies around its collectives, `fsdp_passes` {rows[0]['fsdp_passes']:.2f} per micro-step over "
           f"P x 4 bytes, fitted on the one swinv2_tiny FSDP2 run with reshard_after_forward and without "
           f"checkpointing, applied unchanged to the other FSDP2 runs" if any(r['engine'] == 'fsdp2' for r in rows)
           else "") + ".",
        "",
        "| model | plan | ckpt | mb x acc | kind | measured MB/step | predicted MB/step | error | measured s/step | "
        "first principles s/step (error) | calibrated s/step | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kinds = sorted(set(r["measured_bytes"]) | set(r["predicted_bytes"]))
        for i, k in enumerate(kinds):
            m, p = r["measured_bytes"].get(k, 0.0), r["predicted_bytes"].get(k, 0.0)
            e = r["bytes_rel_err"].get(k)
            head = (f"| {r['model']} | {r.get('plan', r['zero_stage'])} | {'on' if r['ckpt'] else 'off'} | "
                    f"{r['micro_batch']} x {r['accumulation']} |") if i == 0 else "| | | | |"
            tail = (f" {r['measured_step_s']:.3f} | {r['first_principles_step_s']:.3f} "
                    f"({r['first_principles_rel_err']:+.1%}) | {r['predicted_step_s']:.3f} | {r['time_rel_err']:+.1%}"
                    f"{' fit' if r['calibration_run'] else ''} |" if i == 0 else " | | | |")
            lines.append(f"{head} {k} | {m / 1e6:.2f} | {p / 1e6:.2f} | "
                         f"{'n/a' if e is None else f'{e:+.2%}'} |{tail}")
    nb = sum(r["bytes_ok"] for r in rows)
    held = [r for r in rows if not r["calibration_run"]]
    nt = sum(r["time_ok"] for r in held)
    nf = sum(r["first_principles_time_ok"] for r in rows)
    worst_b = max(abs(e) for r in rows for e in r["bytes_rel_err"].values() if e is not None)
    worst_t = max(abs(r["time_rel_err"]) for r in held)
    worst_f = max(abs(r["first_principles_rel_err"]) for r in rows)
    lines += ["", f"Bytes within {BYTES_TOL:.0%}: {nb}/{len(rows)} runs (worst {worst_b:.2%}). "
                  f"Step time within {TIME_TOL:.0%}: calibrated {nt}/{len(held)} held-out runs (worst {worst_t:.1%}); "
                  f"first principles {nf}/{len(rows)} (worst {worst_f:.1%}: the engines' own buffer work on CPU is "
                  f"what the first-principles terms leave out)."]
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> str:
    out = Path(out)
    raw = json.loads((out / "raw.json").read_text())
    rows = build_table(raw)
    (out / "table.json").write_text(json.dumps({"meta": raw["meta"], "inputs": raw["inputs"], "rows": rows}, indent=1))
    md = markdown(raw, rows)
    (out / "table.md").write_text(md)
    return md


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1])))
