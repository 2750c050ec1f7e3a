"""summary.json, report.md and PNG plots from the per-case results of one run."""

from __future__ import annotations

from pathlib import Path

from .common import median, write_json

GROUP_TITLES = {
    "ratio": "Training step vs the timm reference (same weights, batch, resolution)",
    "memory": "Peak memory: checkpointing + sequential attention vs the reference",
    "attention": "Attention path",
    "checkpointing": "Activation checkpointing",
    "resolution": "Resolution sweep",
    "micro_batch": "Micro-batch sweep",
    "gpu_sizes": "Model sizes on one GPU (bf16)",
    "compile": "Eager vs per-block torch.compile (gigamim and the timm reference compiled the same way)",
    "compile_model": "Eager vs whole-model torch.compile(model) (gigamim and the timm reference compiled the same way)",
    "zero": "ZeRO stages on 2 ranks (gigamim pretrain)",
    "zero_compile": "ZeRO-1 vs ZeRO-3, eager vs compiled, on 2 CPU ranks (collectives counted per step)",
    "engines": "DeepSpeed ZeRO-3 vs PyTorch FSDP2, eager and per-block compiled, on 2 CPU ranks",
    "smoke": "Smoke",
}


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _by_group(results):
    groups = {}
    for r in results:
        groups.setdefault(r["case"]["group"], []).append(r)
    order = list(GROUP_TITLES)
    return dict(sorted(groups.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _find(results, group, **match):
    for r in results:
        c = r["case"]
        if c["group"] == group and all(c.get(k) == v for k, v in match.items()) and "error" not in r:
            return r
    return None


def summarize(results: list[dict], meta: dict, data_bench: dict | None) -> dict:
    """Headline ratios. train_step_ratio: gigamim images/s / reference images/s (group 'ratio');
    peak_mem_ratio: gigamim checkpointing + sequential / reference peak (group 'memory')."""
    s = {"profile": meta["profile"], "command": meta["command"], "machine": meta["machine"],
         "versions": meta["versions"], "cpu_peak_tflops": meta.get("cpu_peak_tflops"),
         "wall_s": meta.get("wall_s"), "train_step_ratio": None, "peak_mem_ratio": None}
    g, ref = _find(results, "ratio", impl="gigamim"), _find(results, "ratio", impl="reference")
    if g and ref and g.get("images_per_sec") and ref.get("images_per_sec"):
        s["train_step_ratio"] = g["images_per_sec"] / ref["images_per_sec"]
        # ABAB pairs: round i of one side ran next to round i of the other.
        pairs = [b / a for a, b in zip(g["step_times_s"], ref["step_times_s"])]
        s["train_step_ratio_paired_median"] = median(pairs)
        if g.get("min_step_time_s") and ref.get("min_step_time_s"):
            s["train_step_ratio_best_of"] = ref["min_step_time_s"] / g["min_step_time_s"]
        if g.get("cpu_time_per_step_s") and ref.get("cpu_time_per_step_s"):
            s["train_step_ratio_cpu_time"] = ref["cpu_time_per_step_s"] / g["cpu_time_per_step_s"]
        s["train_step"] = {"model": g["case"]["model"], "img_size": g["case"]["img_size"], "batch": g["case"]["batch"],
                           "gigamim": g["label"], "gigamim_images_per_sec": g["images_per_sec"],
                           "reference_images_per_sec": ref["images_per_sec"], "gigamim_mfu": g.get("mfu"),
                           "reference_mfu": ref.get("mfu")}
        if g.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
            s["train_step"]["peak_mem_ratio"] = g["peak_mem_bytes"] / ref["peak_mem_bytes"]
    g = _find(results, "memory", impl="gigamim", checkpointing=True, sequential=True)
    ref = _find(results, "memory", impl="reference")
    if g and ref and g.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
        s["peak_mem_ratio"] = g["peak_mem_bytes"] / ref["peak_mem_bytes"]
        s["peak_mem"] = {"model": g["case"]["model"], "img_size": g["case"]["img_size"], "batch": g["case"]["batch"],
                         "gigamim_gb": g["peak_mem_gb"], "reference_gb": ref["peak_mem_gb"],
                         "method": g.get("peak_mem_method")}
        if g.get("resident_bytes") and ref.get("resident_bytes"):
            # The part checkpointing / sequential attention act on: peak minus resident states.
            s["activation_mem_ratio"] = ((g["peak_mem_bytes"] - g["resident_bytes"])
                                         / (ref["peak_mem_bytes"] - ref["resident_bytes"]))
            s["peak_mem"]["resident_gb"] = g["resident_bytes"] / 2**30
        plain = _find(results, "memory", impl="gigamim", checkpointing=False, sequential=False)
        if plain and plain.get("peak_mem_bytes"):
            s["peak_mem"]["gigamim_plain_gb"] = plain["peak_mem_gb"]
    checks = [r["plan_check"] for r in results if r.get("plan_check")]
    if checks:
        s["planner_check"] = {"cases": checks, "max_abs_error": max(abs(c["error"]) for c in checks)}
    mfu = {r["case"]["model"]: r.get("mfu") for r in results if r["case"]["group"] == "gpu_sizes" and "error" not in r}
    if mfu:
        s["mfu_by_model"] = mfu
    zero = {r["label"]: {"images_per_sec": r.get("images_per_sec"), "peak_mem_gb": r.get("peak_mem_gb")}
            for r in results if r["case"]["group"] == "zero"}
    if zero:
        s["zero"] = zero
    if data_bench:
        s["data_loader"] = {k: data_bench.get(k) for k in ("ratios",)} | {
            "images_per_sec": {w: v["images_per_sec"] for w, v in data_bench.get("pipeline", {}).items()}}
    for group in ("compile", "compile_model"):
        comp = _compile_summary(results, group)
        if comp:
            s[group] = comp
    zc = _zero_compile_summary(results)
    if zc:
        s["zero_compile"] = zc
    eng = _engines_summary(results)
    if eng:
        s["engines"] = eng
    s["failed_cases"] = [r["case"]["name"] for r in results if "error" in r]
    return s


def _speedup(fast, slow):
    """(throughput ratio fast/slow from medians, median of the paired per-round ratios, fastest
    step over fastest step, and process CPU time per step: the two least sensitive to other jobs)."""
    if not (fast and slow and fast.get("step_time_s") and slow.get("step_time_s")):
        return None
    pairs = [b / a for a, b in zip(fast["step_times_s"], slow["step_times_s"])]
    out = {"ratio": slow["step_time_s"] / fast["step_time_s"], "paired_median": median(pairs)}
    if fast.get("min_step_time_s") and slow.get("min_step_time_s"):
        out["best_of"] = slow["min_step_time_s"] / fast["min_step_time_s"]
    if fast.get("cpu_time_per_step_s") and slow.get("cpu_time_per_step_s"):
        out["cpu_time"] = slow["cpu_time_per_step_s"] / fast["cpu_time_per_step_s"]
    return out


def _compile_summary(results, group="compile"):
    """Throughput ratios of a compile group ('compile': per block; 'compile_model': whole model,
    with per-block cases beside it): X / Y = Y's step time / X's step time."""
    scope = {"compile_model": {"compile_scope": "model"}}.get(group, {})
    pick = {(impl, comp): _find(results, group, impl=impl, compile=comp, **(scope if comp else {}))
            for impl in ("gigamim", "reference") for comp in (False, True)}
    if not any(pick.values()):
        return None
    blocks = {impl: _find(results, group, impl=impl, compile=True, compile_scope="blocks")
              for impl in ("gigamim", "reference")} if scope else {}
    g_e, g_c, r_e, r_c = pick[("gigamim", False)], pick[("gigamim", True)], pick[("reference", False)], pick[("reference", True)]
    out = {"gigamim_compiled_over_reference_eager": _speedup(g_c, r_e),
           "gigamim_compiled_over_reference_compiled": _speedup(g_c, r_c),
           "gigamim_eager_over_reference_eager": _speedup(g_e, r_e),
           "gigamim_compiled_over_gigamim_eager": _speedup(g_c, g_e),
           "reference_compiled_over_reference_eager": _speedup(r_c, r_e),
           "images_per_sec": {f"{i}_{'compiled' if c else 'eager'}": (r or {}).get("images_per_sec")
                              for (i, c), r in pick.items()},
           "mfu": {f"{i}_{'compiled' if c else 'eager'}": (r or {}).get("mfu") for (i, c), r in pick.items()}}
    if blocks.get("gigamim"):
        out["gigamim_compiled_over_gigamim_compiled_per_block"] = _speedup(g_c, blocks["gigamim"])
        out["gigamim_compiled_per_block_over_reference_compiled_per_block"] = _speedup(blocks["gigamim"],
                                                                                        blocks["reference"])
    any_case = next(r for r in pick.values() if r)
    out["geometry"] = {k: any_case["case"][k] for k in ("model", "img_size", "batch", "precision")}
    return out


# (A, B): A's step time / B's, both from one ABAB run. The last two pairs move the same bytes.
ENGINE_RATIOS = (("fsdp2_eager", "zero3_eager"), ("fsdp2_compiled", "zero3_compiled"),
                 ("fsdp2_compiled", "zero3_eager"), ("zero3_compiled", "zero3_eager"),
                 ("fsdp2_compiled", "fsdp2_eager"), ("fsdp2_eager", "zero3_regather_eager"),
                 ("fsdp2_keep_eager", "zero3_eager"))


def _step_ratio(a, b):
    """A's step time / B's: from the medians, and the median of the per-round (ABAB) ratios;
    `cpu`: the same ratio of CPU seconds per step (both ranks), where the results have it."""
    pairs = [x / y for x, y in zip(a["step_times_s"], b["step_times_s"])]
    out = {"ratio": a["step_time_s"] / b["step_time_s"], "paired_median": median(pairs)}
    if a.get("cpu_time_per_step_s") and b.get("cpu_time_per_step_s"):
        out["cpu"] = a["cpu_time_per_step_s"] / b["cpu_time_per_step_s"]
    return out


def _engines_summary(results):
    """Per model: step time, bytes per step and peak RSS of each variant; the step-time ratios."""
    by_model = {}
    for r in results:
        if r["case"]["group"] == "engines" and "error" not in r:
            by_model.setdefault(f"{r['case']['model']}_b{r['case']['batch']}", {})[r["case"]["variant"]] = r
    if not by_model:
        return None
    out = {}
    for key, rs in by_model.items():
        m = {"step_time_s": {v: r["step_time_s"] for v, r in rs.items()},
             "collective_bytes_per_step": {v: r["collective_bytes_per_step"] for v, r in rs.items()},
             "peak_rss_gib_per_rank": {v: [x / 2**30 for x in (r.get("memory") or {}).get("peak_rss_bytes", [])]
                                       for v, r in rs.items()},
             "load_avg_timed": next(iter(rs.values()))["load_avg_timed"], "ratios": {}}
        for a, b in ENGINE_RATIOS:
            if a in rs and b in rs:
                m["ratios"][f"{a}_over_{b}_step_time"] = _step_ratio(rs[a], rs[b])
        out[key] = m
    return out


def _engines_table(rs: list) -> list:
    base = {r["case"]["variant"]: r for r in rs if "error" not in r}.get("zero3_eager")
    lines = ["| variant | step s (median) | / ZeRO-3 eager (paired) | CPU s/step (2 ranks) | / ZeRO-3 eager | "
             "fwd/bwd/opt s | s in collectives | all-gather calls / MiB | reduce-scatter calls / MiB | "
             "all-reduce calls | peak RSS GiB rank 0 / 1 (before build) | warm-up s | losses (first 3) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][-100:]!r} | | | | | | | | | | | |")
            continue
        c, b = r["collective_calls_per_step"], r["collective_bytes_per_step"]
        ph = r.get("phases_s_median") or {}
        rel = _step_ratio(r, base) if base else None
        mem = r.get("memory") or {}
        rss = (" / ".join(f"{x / 2**30:.2f}" for x in mem["peak_rss_bytes"])
               + f" ({mem['rss_before_build_bytes'][0] / 2**30:.2f})") if mem.get("peak_rss_bytes") else "-"
        lines.append(f"| {r['label']} | {_fmt(r['step_time_s'], 3)} | "
                     f"{_fmt(rel['ratio'], 3) if rel else '-'} ({_fmt(rel['paired_median'], 3) if rel else '-'}) | "
                     f"{_fmt(r.get('cpu_time_per_step_s'), 3)} | {_fmt((rel or {}).get('cpu'), 3)} | "
                     f"{'/'.join(_fmt(ph.get(k), 3) for k in ('forward', 'backward', 'step'))} | "
                     f"{_fmt(sum((r.get('collective_seconds_per_step_median') or {}).values()), 3)} | "
                     f"{c.get('all_gather', 0)} / {b.get('all_gather', 0) / 2**20:.1f} | "
                     f"{c.get('reduce_scatter', 0)} / {b.get('reduce_scatter', 0) / 2**20:.1f} | "
                     f"{c.get('all_reduce', 0)} | {rss} | {'/'.join(_fmt(x, 1) for x in r['warmup_s'])} | "
                     f"{', '.join(f'{x:.4f}' for x in r['loss'][:3])} |")
    return lines


def _zero_compile_summary(results):
    rs = {r["case"]["variant"]: r for r in results if r["case"]["group"] == "zero_compile" and "error" not in r}
    if not rs:
        return None
    t = {v: r["step_time_s"] for v, r in rs.items()}
    out = {"step_time_s": t, "collective_calls_per_step": {v: r["collective_calls_per_step"] for v, r in rs.items()},
           "collective_bytes_per_step": {v: r["collective_bytes_per_step"] for v, r in rs.items()}}
    for a, b in (("zero3_compiled", "zero3_eager"), ("zero3_ckpt_compiled", "zero3_ckpt_eager"),
                 ("zero3_eager", "zero1_eager"), ("zero3_compiled", "zero1_eager"),
                 ("zero3_leaf_eager", "zero3_eager"), ("zero1_compiled", "zero1_eager")):
        if a in t and b in t:
            out[f"{a}_over_{b}_step_time"] = t[a] / t[b]
    return out


def markdown(results: list[dict], summary: dict, plots: list[str], data_bench: dict | None) -> str:
    m = summary["machine"]
    lines = [f"# gigamim benchmark: profile `{summary['profile']}`", "",
             f"- command: `{summary['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}, "
             f"GPU {m['gpu']['name'] if m.get('gpu') else 'none'}",
             f"- load average at start (1/5/15 min): {m['load_avg_1_5_15']}; at end: {summary.get('load_end')}"
             " — a shared machine: absolute numbers are noisy, ratios come from alternated (ABAB) runs",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v),
             f"- CPU matmul peak (fp32 torch.mm, this run): {_fmt(summary.get('cpu_peak_tflops'), 3)} TFLOP/s"
             if summary.get("cpu_peak_tflops") else "- peak TFLOP/s: from gigamim.train.metrics.PEAK_TFLOPS",
             f"- wall time: {_fmt(summary.get('wall_s'), 0)} s", "", "## Headline", ""]
    ts = summary.get("train_step")
    if ts:
        lines.append(f"- **train_step_ratio = {summary['train_step_ratio']:.3f}** ({ts['model']} @ {ts['img_size']} px, "
                     f"batch {ts['batch']}: {ts['gigamim']} {ts['gigamim_images_per_sec']:.2f} img/s vs "
                     f"reference {ts['reference_images_per_sec']:.2f} img/s)")
        lines.append(f"- same comparison, other statistics: median of paired (ABAB) ratios "
                     f"{_fmt(summary.get('train_step_ratio_paired_median'), 3)}, best step vs best step "
                     f"{_fmt(summary.get('train_step_ratio_best_of'), 3)}, process CPU time per step "
                     f"{_fmt(summary.get('train_step_ratio_cpu_time'), 3)} (least sensitive to other jobs)")
    pm = summary.get("peak_mem")
    if pm:
        lines.append(f"- **peak_mem_ratio = {summary['peak_mem_ratio']:.3f}** ({pm['model']} @ {pm['img_size']} px, "
                     f"batch {pm['batch']}: gigamim checkpointing + sequential {pm['gigamim_gb']:.3f} GiB vs reference "
                     f"{pm['reference_gb']:.3f} GiB; gigamim without them {_fmt(pm.get('gigamim_plain_gb'), 3)} GiB)")
        if summary.get("activation_mem_ratio") is not None:
            lines.append(f"- of which model states (fp32 weights, AdamW m/v) + batch: {pm['resident_gb']:.3f} GiB on both "
                         f"sides; above them (activations, gradients, temporaries) gigamim/reference = "
                         f"**{summary['activation_mem_ratio']:.3f}**")
        lines.append(f"- peak memory method: {pm['method']}")
    pc = summary.get("planner_check")
    if pc:
        lines.append(f"- planner (gigamim plan) vs measured peak: max |error| {pc['max_abs_error']:.1%} over "
                     f"{len(pc['cases'])} cases")
    for group, what in (("compile", "per-block"), ("compile_model", "whole-model")):
        comp = summary.get(group)
        if not comp:
            continue
        g = comp["geometry"]
        lines.append(f"- {what} compile axis ({g['model']} @ {g['img_size']} px, batch {g['batch']}, {g['precision']}, "
                     "throughput ratios, median steps / median of paired ABAB rounds / fastest steps / "
                     "process CPU time per step):")
        for k, v in comp.items():
            if isinstance(v, dict) and "ratio" in v:
                lines.append(f"  - **{k.replace('_', ' ')} = {v['ratio']:.3f}** (paired {_fmt(v['paired_median'], 3)}, "
                             f"best-of {_fmt(v.get('best_of'), 3)}, CPU time {_fmt(v.get('cpu_time'), 3)})")
    zc = summary.get("zero_compile")
    if zc:
        lines.append("- ZeRO x compile on 2 CPU ranks (step-time ratios, lower is faster):")
        for k, v in zc.items():
            if k.endswith("_step_time") and isinstance(v, float):
                lines.append(f"  - **{k.replace('_', ' ')} = {v:.3f}**")
    eng = summary.get("engines")
    if eng:
        lines.append("- ZeRO-3 vs FSDP2 on 2 CPU ranks (step-time ratios, lower is faster; median of steps, paired ABAB "
                     "rounds in brackets):")
        for key, m in eng.items():
            lo = m["load_avg_timed"]
            lines.append(f"  - {key} (load average {lo['start'][0]:.1f} -> {lo['end'][0]:.1f} over the timed steps):")
            for k, v in m["ratios"].items():
                cpu = f"; CPU time {v['cpu']:.3f}" if v.get("cpu") else ""
                lines.append(f"    - **{k.replace('_', ' ')} = {v['ratio']:.3f}** ({v['paired_median']:.3f}{cpu})")
    if summary.get("skipped_groups"):
        lines.append(f"- skipped (time budget): {', '.join(summary['skipped_groups'])}")
    if summary.get("failed_cases"):
        lines.append(f"- failed cases: {', '.join(summary['failed_cases'])} (see their JSON)")
    lines.append("")
    for group, rs in _by_group(results).items():
        lines += [f"## {GROUP_TITLES.get(group, group)}", ""]
        if group == "zero_compile":
            lines += ["| variant | step s (median) | fwd/bwd/opt s | s in collectives | images/s | all-gather calls / MiB | "
                      "reduce-scatter calls / MiB | all-reduce calls | warm-up s (compile) | losses |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rs:
                if "error" in r:
                    lines.append(f"| {r['label']} | failed: {r['error'][-100:]!r} | | | | | | | | |")
                    continue
                c, b = r["collective_calls_per_step"], r["collective_bytes_per_step"]
                ph = r.get("phases_s_median") or {}
                lines.append(f"| {r['label']} | {_fmt(r['step_time_s'], 3)} | "
                             f"{'/'.join(_fmt(ph.get(k), 3) for k in ('forward', 'backward', 'step'))} | "
                             f"{_fmt(sum((r.get('collective_seconds_per_step_median') or {}).values()), 3)} | "
                             f"{_fmt(r['images_per_sec'])} | "
                             f"{c.get('all_gather', 0)} / {b.get('all_gather', 0) / 2**20:.1f} | "
                             f"{c.get('reduce_scatter', 0)} / {b.get('reduce_scatter', 0) / 2**20:.1f} | "
                             f"{c.get('all_reduce', 0)} | {'/'.join(_fmt(x, 1) for x in r['warmup_s'])} | "
                             f"{', '.join(f'{x:.4f}' for x in r['loss'][:3])} |")
            lines.append("")
            continue
        if group == "engines":
            by_model = {}
            for r in rs:
                by_model.setdefault((r["case"]["model"], r["case"]["batch"]), []).append(r)
            for (model, batch), mrs in by_model.items():
                ok = [r for r in mrs if "error" not in r]
                load = ok[0]["load_avg_timed"] if ok else None
                lines += [f"### {model}, {mrs[0]['case']['img_size']} px, micro-batch {batch} per rank x "
                          f"{mrs[0]['case']['ranks']} ranks"
                          + (f" (load average {load['start']} -> {load['end']} over the timed steps)" if load else ""),
                          ""] + _engines_table(mrs) + [""]
                for r in ok:
                    mem = r.get("memory") or {}
                    extra = f"; memory run load {mem['load_avg']['start'][0]:.1f}" if mem.get("load_avg") else ""
                    lines.append(f"- {r['label']}: {r['case']['what']}; dynamo graphs compiled in warm-up "
                                 f"{r.get('dynamo_graphs_compiled')}, in timed steps {r.get('dynamo_graphs_in_timed_steps')}"
                                 f"{extra}")
                lines.append("")
            continue
        if group == "zero":
            lines += ["| case | images/s | peak mem GB | wall s | note |", "|---|---|---|---|---|"]
            for r in rs:
                lines.append(f"| {r['label']} | {_fmt(r.get('images_per_sec'))} | {_fmt(r.get('peak_mem_gb'), 3)} | "
                             f"{_fmt(r.get('wall_s'), 0)} | {r.get('error', '')[:80]} |")
            lines.append("")
            continue
        lines += ["| case | model | px | batch | images/s | step s (data/fwd/bwd/opt) | CPU s/step | TFLOP/s | MFU | "
                  "peak GiB | plan GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            c = r["case"]
            if "error" in r:
                lines.append(f"| {r['label']} | {c['model']} | {c['img_size']} | {c['batch']} | failed: "
                             f"{r['error'][:60]} | | | | | | |")
                continue
            b = r["breakdown_s"]
            bd = "/".join(_fmt(b[k], 3) for k in ("data", "forward", "backward", "optimizer"))
            plan = r.get("plan_check", {}).get("predicted_gb")
            lines.append(f"| {r['label']} | {c['model']} | {c['img_size']} | {c['batch']} | {_fmt(r['images_per_sec'])} | "
                         f"{_fmt(r['step_time_s'], 3)} ({bd}) | {_fmt(r.get('cpu_time_per_step_s'), 3)} | "
                         f"{_fmt(r.get('tflops_per_sec'), 3)} | "
                         f"{_fmt(r.get('mfu'), 3)} | {_fmt(r.get('peak_mem_gb'), 3)} | {_fmt(plan, 3)} |")
        lines.append("")
    if data_bench:
        lines += ["## Data loader (benchmarks/data_bench.py)", "", "| workers | images/s | CPU ms/image |", "|---|---|---|"]
        for w, v in data_bench.get("pipeline", {}).items():
            lines.append(f"| {w} | {_fmt(v['images_per_sec'], 1)} | {_fmt(v['cpu_ms_per_image'])} |")
        for k, v in data_bench.get("floor", {}).items():
            lines.append(f"| {k} | {_fmt(v['images_per_sec'], 1)} | {_fmt(v['cpu_ms_per_image'])} |")
        lines.append("")
    elif summary.get("data_bench_error"):
        lines += ["## Data loader", "", f"not run: {summary['data_bench_error']}", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Notes", "",
              "- Each case's JSON holds the per-step times, the breakdown and how memory was measured.",
              "- MFU counts model FLOPs (3x forward per image); HFU in the JSON adds what backward recomputes "
              "(checkpointed blocks' forward, sequential attention's QK^T).",
              "- CPU peak memory: resident tensors (parameters, optimizer states, batch) + the CPU allocator's "
              "high-water over one extra, untimed step, from torch.profiler(profile_memory=True) allocation events "
              "(benchmarks/memory.py)."]
    if summary.get("engines"):
        lines += ["- ZeRO-3 vs FSDP2: peak RSS per rank is the process's VmHWM in a 2-rank run of that variant alone "
                  "(1 warm-up + 2 steps; interpreter, torch, deepspeed and the process group included: the RSS before "
                  "the engine was built is in brackets); bytes are the logical buffers of the counted torch.distributed "
                  "collectives of one timed step on rank 0 (benchmarks/engine_sweep.py)."]
    lines.append("")
    return "\n".join(lines)


def _bar_pair(out: Path, fname: str, names: list, left: list, right: list, labels: tuple, *,
              colors=None, title: str | None = None, horizontal: bool = True, size=None) -> str:
    """Two bar panels over the same cases (e.g. speed | memory), saved as ``out/fname``: the shape
    of most of the report's figures, written once."""
    import matplotlib.pyplot as plt

    if size is None:
        size = (12, 0.5 * len(names) + 2) if horizontal else (10, 3.5)
    fig, axes = plt.subplots(1, 2, figsize=size)
    for ax, vals, label in zip(axes, (left, right), labels):
        if horizontal:
            ax.barh(names, vals, color=colors)
            ax.set_xlabel(label)
            ax.invert_yaxis()
        else:
            ax.bar(names, vals, color=colors)
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=20)
    if horizontal:
        axes[1].set_yticklabels([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=90)
    plt.close(fig)
    return fname


def plots(results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = [r for r in results if "error" not in r and (r.get("images_per_sec") or r.get("peak_mem_gb"))]
    bars = [r for r in ok if r["case"]["group"] in ("ratio", "attention", "checkpointing", "memory", "smoke", "compile",
                                                   "compile_model")]
    if bars:
        names = [f"{r['case']['group']}: {r['label']} ({r['case']['model'].replace('swinv2_', '')} "
                 f"{r['case']['img_size']}px b{r['case']['batch']})" for r in bars]
        colors = ["tab:gray" if r["case"].get("impl") == "reference" else "tab:blue" for r in bars]
        made.append(_bar_pair(out, "cases.png", names, [r.get("images_per_sec") or 0 for r in bars],
                              [r.get("peak_mem_gb") or 0 for r in bars], ("images/s", "peak memory (GiB)"),
                              colors=colors, title="gigamim (blue) vs timm reference (gray)"))
        fig, ax = plt.subplots(figsize=(10, 0.5 * len(bars) + 2))
        left = [0.0] * len(bars)
        for k, col in zip(("data", "forward", "backward", "optimizer"), ("tab:green", "tab:blue", "tab:orange", "tab:red")):
            vals = [r["breakdown_s"].get(k) or 0 for r in bars]
            ax.barh(names, vals, left=left, color=col, label=k)
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_xlabel("median step time (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "breakdown.png", dpi=90)
        plt.close(fig)
        made.append("breakdown.png")
    for group, xkey, fname in (("resolution", "img_size", "resolution.png"), ("micro_batch", "batch", "micro_batch.png")):
        rs = [r for r in ok if r["case"]["group"] == group]
        if not rs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label in sorted({r["label"] for r in rs}):
            pts = sorted((r["case"][xkey], r) for r in rs if r["label"] == label)
            xs = [x for x, _ in pts]
            axes[0].plot(xs, [(r["step_time_s"] or float("nan")) / r["case"]["batch"] for _, r in pts], "o-", label=label)
            axes[1].plot(xs, [r.get("peak_mem_gb") or float("nan") for _, r in pts], "o-", label=label)
        axes[0].set_ylabel("step time per image (s)")
        axes[1].set_ylabel("peak memory (GiB)")
        for ax in axes:
            ax.set_xlabel(xkey)
            ax.legend()
            if group == "resolution":
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
        fig.suptitle(GROUP_TITLES[group])
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        made.append(fname)
    gpu = [r for r in ok if r["case"]["group"] == "gpu_sizes" and r["case"]["impl"] == "gigamim"]
    if gpu:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([r["case"]["model"].replace("swinv2_", "") for r in gpu], [100 * (r.get("mfu") or 0) for r in gpu])
        ax.set_ylabel("MFU (%)")
        ax.set_title("SimMIM train step MFU by model size")
        fig.tight_layout()
        fig.savefig(out / "mfu.png", dpi=90)
        plt.close(fig)
        made.append("mfu.png")
    zc = [r for r in results if r["case"]["group"] == "zero_compile" and "error" not in r]
    if zc:
        made.append(_bar_pair(out, "zero_compile.png", [r["label"] for r in zc], [r["step_time_s"] for r in zc],
                              [r["collective_calls_per_step"].get("all_gather", 0) for r in zc],
                              ("step time (s), 2 CPU ranks", "all-gather calls per step"), horizontal=False))
    eng = [r for r in results if r["case"]["group"] == "engines" and "error" not in r]
    if eng:
        made.append(_bar_pair(
            out, "engines.png", [f"{r['case']['model'].replace('swinv2_', '')}: {r['label']}" for r in eng],
            [r["step_time_s"] for r in eng],
            [max((r.get("memory") or {}).get("peak_rss_bytes") or [0]) / 2**30 for r in eng],
            ("step time (s), 2 CPU ranks", "peak RSS per rank (GiB, the larger rank)"),
            colors=["tab:blue" if r["case"]["engine"] == "deepspeed" else "tab:orange" for r in eng],
            title="DeepSpeed ZeRO-3 (blue) vs PyTorch FSDP2 (orange)", size=(12, 4)))
    zero = [r for r in results if r["case"]["group"] == "zero" and "error" not in r]
    if zero:
        made.append(_bar_pair(out, "zero.png", [r["label"] for r in zero], [r["images_per_sec"] for r in zero],
                              [r["peak_mem_gb"] for r in zero], ("images/s (2 ranks)", "peak memory GB (rank 0)"),
                              horizontal=False, size=(9, 3.5)))
    return made


def write_report(out: Path, results: list[dict], meta: dict, data_bench: dict | None) -> dict:
    summary = summarize(results, meta, data_bench)
    summary["load_end"] = meta.get("load_end")
    summary["skipped_groups"] = meta.get("skipped_groups", [])
    if meta.get("data_bench_error"):
        summary["data_bench_error"] = meta["data_bench_error"]
    made = plots(results, out)
    summary["plots"] = made
    write_json(out / "summary.json", summary)
    text = markdown(results, summary, made, data_bench)
    notes = out / "analysis.md"  # written by hand after a run: kept when the report is rebuilt
    if notes.exists():
        text += "\n" + notes.read_text()
    (out / "report.md").write_text(text)
    return summary
