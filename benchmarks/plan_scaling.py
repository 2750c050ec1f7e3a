"""Scale by simulation: `gigamim plan`'s step-time model for SwinV2-B/L/H/G on 8..4096 GPUs.

    PYTHONPATH=$PWD python -m benchmarks.plan_scaling [--out DIR]

Global batch: the papers' (SimMIM: 2048 for B/L/H; SwinV2-G: 9216). Where the batch does
not split into whole images per GPU (9216 on 4096 GPUs; 2048 on 4096) the per-GPU batch is
rounded down, at least 1 (global batch shown). For each model, GPU count and ZeRO variant
the fastest plan that fits (checkpointing, sequential attention, micro-batch x
accumulation chosen by the planner, no offload). A stage "stops scaling" where its
communication time exceeds its compute time (comm/compute > 1: even perfect overlap cannot
hide it). Two side tables: SwinV2-G at 64 GPUs, ZeRO-3, micro-batch forced from 2 to 144
(what larger micro-batches buy), and hpZ / ZeRO++ with 4x400 vs 8x400 Gb/s IB.
Model only: no GPU was run for this table (see plan_calibration for the measured check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"swinv2_base": 2048, "swinv2_large": 2048, "swinv2_huge": 2048, "swinv2_giant": 9216}
GPUS = (8, 64, 512, 4096)
VARIANTS = ("ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 hpZ", "ZeRO-3 hpZ+qwZ+qgZ")


def _rows(model, gpus, batch, device, net, micro_batch=None, gpn=8):
    from gigamim.tools.candidates import enumerate_candidates

    gpn = min(gpn, gpus)
    per_gpu = max(1, batch // gpus)
    return per_gpu * gpus, enumerate_candidates(model, gpus, gpn, device.mem_gb, device, net,
                                                global_batch=per_gpu * gpus, micro_batch=micro_batch)


def simulate(gpu: str = "h100", ib: str = "8x400") -> dict:
    from gigamim.tools.hardware import DEVICES, Network, parse_ib

    device = DEVICES[gpu]
    net = Network(inter_bps=parse_ib(ib))
    table = []
    for model, batch in MODELS.items():
        for gpus in GPUS:
            glob, rows = _rows(model, gpus, batch, device, net)
            for v in VARIANTS:
                best = next((r for r in rows if r["plan"] == v), None)
                table.append({"model": model, "gpus": gpus, "paper_batch": batch, "global_batch": glob, "variant": v,
                              "fits": best is not None, **({k: best[k] for k in (
                                  "images_per_s", "mfu", "step_s", "micro_batch", "accumulation", "checkpointing",
                                  "sequential_stages", "mem_gb", "compute_s", "comm_s", "comm_exposed_s",
                                  "comm_over_compute", "data_bound")} if best else {})})
    return {"gpu": device.name, "ib": ib, "rows": table}


def micro_batch_sweep(gpu="h100", ib="8x400") -> list:
    from gigamim.tools.hardware import DEVICES, Network, parse_ib

    device, net = DEVICES[gpu], Network(inter_bps=parse_ib(ib))
    out = []
    for mb in (2, 4, 8, 16, 36, 72, 144):
        _, rows = _rows("swinv2_giant", 64, 9216, device, net, micro_batch=mb)
        for v in ("ZeRO-1", "ZeRO-3"):
            best = next((r for r in rows if r["plan"] == v), None)
            out.append({"micro_batch": mb, "variant": v, "fits": best is not None,
                        **({k: best[k] for k in ("accumulation", "checkpointing", "images_per_s", "mfu", "comm_s",
                                                 "compute_s", "comm_exposed_s")} if best else {})})
    return out


def hpz_table(gpu="h100") -> list:
    from gigamim.tools.hardware import DEVICES, Network, parse_ib

    device = DEVICES[gpu]
    out = []
    for ib in ("8x400", "4x400", "1x400"):
        net = Network(inter_bps=parse_ib(ib))
        for gpus in (64, 512, 4096):
            glob, rows = _rows("swinv2_giant", gpus, 9216, device, net)
            for v in ("ZeRO-1", "ZeRO-3", "ZeRO-3 hpZ", "ZeRO-3 hpZ+qwZ+qgZ"):
                best = next((r for r in rows if r["plan"] == v), None)
                out.append({"ib": ib, "gpus": gpus, "global_batch": glob, "variant": v,
                            **({k: best[k] for k in ("images_per_s", "mfu", "comm_s", "comm_over_compute",
                                                     "micro_batch", "accumulation")} if best else {})})
    return out


def markdown(sim: dict, sweep: list, hpz: list) -> str:
    lines = [f"# Scale simulation: `gigamim plan` step-time model, {sim['gpu']}, {sim['ib']} Gb/s IB per node",
             "", "images/s (MFU) of the fastest plan per ZeRO variant; `*` = communication > compute "
             "(that stage has stopped scaling); `d` = data-bound (2.5 ms/image/core x 11 loader cores per GPU); "
             "`-` = does not fit / not applicable (hpZ needs more than one node). Efficiency 0.50 of 989 TFLOP/s "
             "assumed for compute.", "",
             "| model | GPUs | global batch | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|" + "---|" * len(VARIANTS)]
    by = {}
    for r in sim["rows"]:
        by.setdefault((r["model"], r["gpus"]), {})[r["variant"]] = r
    for (model, gpus), vs in by.items():
        cells = []
        for v in VARIANTS:
            r = vs[v]
            cells.append("-" if not r["fits"] else f"{r['images_per_s']:,.0f} ({r['mfu']:.0%})"
                         + ("*" if r["comm_over_compute"] > 1 else "") + (" d" if r["data_bound"] else ""))
        glob = next(iter(vs.values()))["global_batch"]
        lines.append(f"| {model} | {gpus} | {glob} | " + " | ".join(cells) + " |")
    lines += ["", "SwinV2-G, 64 GPUs, global 9216: what the micro-batch buys (accumulation fills the rest)", "",
              "| micro-batch | ZeRO-1 img/s (MFU) | ZeRO-3 img/s (MFU) | ZeRO-3 comm s / compute s per step |",
              "|---|---|---|---|"]
    sw = {}
    for r in sweep:
        sw.setdefault(r["micro_batch"], {})[r["variant"]] = r

    def cell(r):
        return "-" if not r["fits"] else f"{r['images_per_s']:,.0f} ({r['mfu']:.0%}), {r['checkpointing']}"

    for mb, vs in sw.items():
        z3 = vs["ZeRO-3"]
        lines.append(f"| {mb} x {z3.get('accumulation', '-')} | {cell(vs['ZeRO-1'])} | {cell(z3)} | "
                     + (f"{z3['comm_s']:.3f} / {z3['compute_s']:.3f}" if z3["fits"] else "-") + " |")
    lines += ["", "SwinV2-G: hpZ and ZeRO++ vs the IB per node", "",
              "| IB | GPUs | ZeRO-1 | ZeRO-3 | ZeRO-3 hpZ | ZeRO-3 hpZ+qwZ+qgZ |", "|---|---|---|---|---|---|"]
    hz = {}
    for r in hpz:
        hz.setdefault((r["ib"], r["gpus"]), {})[r["variant"]] = r
    for (ib, gpus), vs in hz.items():
        cells = [("-" if "images_per_s" not in vs[v] else f"{vs[v]['images_per_s']:,.0f} (comm/compute "
                  f"{vs[v]['comm_over_compute']:.2f})") for v in ("ZeRO-1", "ZeRO-3", "ZeRO-3 hpZ", "ZeRO-3 hpZ+qwZ+qgZ")]
        lines.append(f"| {ib} | {gpus} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(sim: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for j, model in enumerate(MODELS):
        for v, style in zip(VARIANTS, ("o-", "s-", "^-", "v--", "d:")):
            rs = [r for r in sim["rows"] if r["model"] == model and r["variant"] == v and r["fits"]]
            if not rs:
                continue
            g = [r["gpus"] for r in rs]
            axes[0, j].plot(g, [r["images_per_s"] for r in rs], style, label=v)
            axes[1, j].plot(g, [r["mfu"] * 100 for r in rs], style, label=v)
        axes[0, j].set_title(model)
        axes[0, j].set_xscale("log", base=2)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("GPUs")
        axes[1, j].set_ylim(0, 60)
    axes[0, 0].set_ylabel("images/s")
    axes[1, 0].set_ylabel("MFU %")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"gigamim plan step-time model: {sim['gpu']}, {sim['ib']} IB (simulation, not measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--gpu", default="h100")
    p.add_argument("--ib", default="8x400")
    args = p.parse_args(argv)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"plan_scaling_{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.common import versions

    sim = simulate(args.gpu, args.ib)
    sweep = micro_batch_sweep(args.gpu, args.ib)
    hpz = hpz_table(args.gpu)
    meta = {"command": " ".join(["python -m benchmarks.plan_scaling"] + (argv if argv is not None else sys.argv[1:])),
            "versions": versions(), "note": "model output only; no GPU run"}
    (out / "scaling.json").write_text(json.dumps({"meta": meta, "scaling": sim, "micro_batch_sweep": sweep,
                                                  "hpz": hpz}, indent=1))
    md = markdown(sim, sweep, hpz)
    (out / "scaling.md").write_text(md)
    plot(sim, out / "scaling.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
