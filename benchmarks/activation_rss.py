"""`gigamim plan`'s memory against a real CPU run's peak RSS, for any model family.

    python -m gigamim_benchmarks.activation_rss --out benchmarks/results/activation_rss_<date>
    python -m gigamim_benchmarks.activation_rss --model swinv2_tiny --batches 8 16 --setting ckpt
    python -m gigamim_benchmarks.activation_rss --model vit_small_patch16 swin_tiny --batches 4 8 --setting plain ckpt

The planner's per-image figures were checked against fake-CUDA / meta-device tracking
(`activation_memory.py`); this is the independent check on real memory: a SimMIM forward +
backward of real tensors on the CPU, fp32 (the planner at 4 bytes per element), plain or every
block checkpointed, in the attention path the family runs on CPU (`cpu_attention`), measured as
the process's resident set.

Each micro-batch size runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc serves
every allocation above 64 KiB with mmap and returns it on free, so the resident set follows the
live tensors) and one BLAS thread. In it: the resident set is read before the model is built
(torch and gigamim imported); the model is built as the trainer builds it, one warm-up step at
micro-batch 1 allocates the gradients and every lazily built table (index tables, masks,
BLAS/oneDNN state), one AdamW step its m and v; the gradients are zeroed in place (kept: they
are model states, like the parameters); then the resident set is read (``VmRSS``: the baseline,
model states included), the peak is reset (``/proc/self/clear_refs`` 5 resets ``VmHWM``), the
batch is made and one forward + backward runs.

Two comparisons. Activations: measured = ``VmHWM`` - baseline (the input batch, what autograd
saves, the recompute of one checkpointed block and the gradients in flight, whatever the kernels
allocate on top) against `memory.activation_bytes(..., dtype_bytes=4)` ``total`` at the same size;
per image = measured / micro-batch, and the slope between the two sizes (the per-micro-batch
constants drop out) against its ``per_image``. The rank's peak: measured = ``VmHWM`` - the
resident set before the build (model states, activations, and the libraries' lazily allocated
state) against the planner's fp32 model states for one rank (`memory.model_state_bytes` with
`FP32_STATE_BYTES`: weights, gradients, AdamW m and v, 16 bytes per parameter) + the activations.
Ratio = planner / measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20
SETTINGS = {"ckpt": dict(grad_checkpointing=True), "plain": {}}


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1))


def child(model: str, img: int, window: int | None, batch: int, setting: str) -> dict:
    """In this process: the resident set before the model is built, after the warm-up (model
    states in), and its peak over one forward + backward."""
    import torch

    from gigamim.models.build import build_simmim

    torch.manual_seed(0)
    before_build = _status_kib("VmRSS")
    # Built as the trainer builds it, for any family (its default attention path on CPU).
    net = build_simmim({"name": model, "img_size": img, "window_size": window, "drop_path_rate": 0.0}).train()
    if SETTINGS[setting].get("grad_checkpointing"):
        net.encoder.set_grad_checkpointing(True)  # every block (timm's and gigamim's encoders alike)
    side = img // net.encoder.patch_size  # the mask is one entry per patch
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=False)

    def step(b: int) -> float:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 3, img, img, generator=g)
        mask = torch.rand(b, side, side, generator=g) > 0.4
        loss = net(x, mask)
        loss.backward()
        return float(loss)

    step(1)  # warm-up: gradients, tables, library state
    opt.step()  # AdamW's m and v: model states, allocated once
    net.zero_grad(set_to_none=False)  # gradients stay allocated: model states, not activations
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    t0 = time.time()
    loss = step(batch)
    peak = _status_kib("VmHWM")
    tensors = [p for p in net.parameters()] + [p.grad for p in net.parameters()]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    states = sum(t.numel() * t.element_size() for t in tensors)  # weights + grads + AdamW m, v
    return {"model": model, "img_size": img, "window_size": window, "batch": batch, "setting": setting,
            "before_build_mib": before_build / 1024, "base_mib": base / 1024, "peak_mib": peak / 1024,
            "measured_mib": (peak - base) / 1024, "measured_peak_mib": (peak - before_build) / 1024,
            "model_states_mib": states / MiB, "params": sum(p.numel() for p in net.parameters()),
            "seconds": round(time.time() - t0, 1), "loss": loss, "threads": torch.get_num_threads()}


def measure(model: str, batch: int, setting: str = "ckpt", img: int = 192, window: int | None = None,
            timeout: int = 1800) -> dict:
    """`child` in a fresh process (see the module docstring for why)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "gigamim_benchmarks.activation_rss", "--child", "--model", model,
           "--batches", str(batch), "--setting", setting, "--img-size", str(img)]
    if window is not None:
        cmd += ["--window-size", str(window)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_attention(model: str) -> str:
    """The planner's attention mode for a CPU run of ``model``: ``explicit`` where the family
    runs it (gigamim's SwinV2 path; SDPA's math kernel for Swin V1 and the official SimMIM ViT,
    whose position-bias mask requires grad), else ``fused`` (timm's ViT: SDPA's flash kernel,
    which CPU runs when there is no mask)."""
    from gigamim.tools.model_facts import model_facts

    modes = model_facts(model).count.attention_modes
    return "explicit" if "explicit" in modes else "fused"


def planner(model: str, batch: int, setting: str, img: int, window: int | None) -> dict:
    """The planner at this size, fp32 (the CPU run): activations, and the rank's peak = model
    states (fp32 AdamW: weights, grads, m, v; one rank) + activations."""
    from gigamim.tools.memory import FP32_STATE_BYTES, activation_bytes, model_state_bytes
    from gigamim.tools.model_facts import model_facts

    a = activation_bytes(model, img, window_size=window, batch=batch, dtype_bytes=4, attn=cpu_attention(model),
                         checkpointing=setting == "ckpt")
    params = model_facts(model, img, window).params
    states = model_state_bytes(params, 1, 0, False, state_bytes=FP32_STATE_BYTES)["gpu"]["total"]
    return {"total_mib": a["total"] / MiB, "per_image_mib": a["per_image"] / MiB, "fixed_mib": a["fixed"] / MiB,
            "states_mib": states / MiB, "peak_mib": (states + a["total"]) / MiB, "attn": cpu_attention(model)}


def compare(model: str, batches, setting: str = "ckpt", img: int = 192, window: int | None = None) -> dict:
    """Measured and planned activation memory per image at each micro-batch size, and the slope."""
    rows = []
    for b in batches:
        m = measure(model, b, setting, img, window)
        p = planner(model, b, setting, img, window)
        rows.append({**m, "plan_total_mib": p["total_mib"], "plan_per_image_mib": p["per_image_mib"],
                     "measured_per_image_mib": m["measured_mib"] / b, "plan_at_batch_per_image_mib": p["total_mib"] / b,
                     "ratio": p["total_mib"] / m["measured_mib"], "plan_attn": p["attn"],
                     "plan_states_mib": p["states_mib"], "plan_peak_mib": p["peak_mib"],
                     "peak_ratio": p["peak_mib"] / m["measured_peak_mib"]})
    out = {"model": model, "setting": setting, "img_size": img, "window_size": window, "rows": rows}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        slope = (b["measured_mib"] - a["measured_mib"]) / (b["batch"] - a["batch"])
        out.update(measured_slope_mib=slope, plan_per_image_mib=a["plan_per_image_mib"],
                   slope_ratio=a["plan_per_image_mib"] / slope)
    return out


def markdown(res: dict) -> str:
    r0 = res["rows"][0]
    lines = [f"{res['model']} ({res['setting']}, {res['img_size']} px, planner attention '{r0['plan_attn']}'; model "
             f"states {r0['model_states_mib']:.0f} MiB measured as tensors, {r0['plan_states_mib']:.0f} MiB planned)", "",
             "| micro-batch | RSS before build | baseline RSS (states in) | peak RSS | activations measured (peak - baseline) "
             "| per image | `gigamim plan` | per image | planner / measured | rank peak measured (peak - before build) "
             "| `gigamim plan` states + activations | planner / measured |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['before_build_mib']:.0f} MiB | {r['base_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB "
                     f"| {r['measured_mib']:.1f} MiB | {r['measured_per_image_mib']:.2f} | {r['plan_total_mib']:.1f} MiB | "
                     f"{r['plan_at_batch_per_image_mib']:.2f} | {r['ratio']:.3f} | {r['measured_peak_mib']:.1f} MiB | "
                     f"{r['plan_peak_mib']:.1f} MiB | {r['peak_ratio']:.3f} |")
    if "slope_ratio" in res:
        lines.append(f"| slope {res['rows'][0]['batch']} -> {res['rows'][-1]['batch']} | | | | | "
                     f"{res['measured_slope_mib']:.2f} | | {res['plan_per_image_mib']:.2f} | {res['slope_ratio']:.3f} | | | |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gigamim_benchmarks.activation_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["swinv2_tiny"], help="one or more variants, any family")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=["ckpt"])
    p.add_argument("--img-size", type=int, default=None, help="default: each variant's own")
    p.add_argument("--window-size", type=int, default=None)
    p.add_argument("--out", help="folder for results.json (every case) and README-ready table.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model[0], args.img_size, args.window_size, args.batches[0], args.setting[0])))
        return 0
    from gigamim.tools.model_facts import model_facts

    from .common import machine_info, versions

    cases, tables = [], []
    for model in args.model:
        img = args.img_size or model_facts(model, None, args.window_size).img_size
        for setting in args.setting:
            res = compare(model, args.batches, setting, img, args.window_size)
            cases.append(res)
            tables.append(markdown(res))
            print(tables[-1] + "\n", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        argv = list(argv if argv is not None else sys.argv[1:])
        doc = {"cases": cases, "machine": machine_info(), "versions": versions(),
               "command": " ".join(["python", "-m", "gigamim_benchmarks.activation_rss", *argv])}
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "table.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
