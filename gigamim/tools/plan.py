"""`gigamim plan`: what fits on a GPU, before a job is queued.

    gigamim plan --model swinv2_giant --gpus 64 --gpu-mem 80 [--img-size 192] [--micro-batch N]
    gigamim plan --model vit_base_patch16 --gpus 16        (any registered family)

Per GPU: model-state memory for ZeRO 1/2/3 with and without offload, activation memory per
image with and without checkpointing / sequential attention, the largest micro-batch that
fits under a safety margin, and the resulting global batch. All of it is arithmetic on the
architecture, no model is run (parameters are counted on the meta device).

What the model is (parameters, its blocks as its family counts them) is
`gigamim.tools.model_facts`, from one meta build; the memory model is `gigamim.tools.memory`;
the step-time model `gigamim.tools.step_model`. Nothing here knows a model family.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from gigamim.tools.memory import (FSDP2_LABELS, FSDP2_STATE_BYTES, GiB, activation_per_image, fit_micro_batch,
                                  fsdp2_buffer_bytes, model_state_bytes)
from gigamim.tools.model_facts import model_facts


def make_plan(name: str, gpus: int, gpu_mem_gb: float, img_size: int | None = None, micro_batch: int | None = None,
              window_size=None, margin: float = 0.1, reserved_gb: float = 2.0, attn_chunk: int = 64,
              global_batch: int | None = None, speed: dict | None = None) -> dict:
    """The whole plan as a JSON-able dict (what `gigamim plan --json` prints).

    `speed` (gpus_per_node, device, net, costs, knobs) adds the step-time candidates
    (`gigamim.tools.candidates`) and the recommendation; without it, memory only."""
    facts = model_facts(name, img_size, window_size)  # one meta build: parameters and the family's count
    size, count = facts.img_size, facts.count
    params, largest = facts.params, facts.largest_block_params
    # Safety: a fraction for fragmentation / allocator rounding + a fixed reserve for the CUDA
    # context, NCCL and DeepSpeed's communication buckets.
    budget = gpu_mem_gb * GiB * (1 - margin) - reserved_gb * GiB
    act = {}
    for attn in count.attention_modes:  # the modes this family's models run
        for ckpt in (False, True):
            per_image, fixed = activation_per_image(name, img_size, window_size=window_size, attn=attn,
                                                    checkpointing=ckpt, attn_chunk=attn_chunk)
            act[f"{attn}{'+ckpt' if ckpt else ''}"] = {"per_image_gb": per_image / GiB, "fixed_gb": fixed / GiB}
    rows = []
    plans = [("deepspeed", stage, offload, None) for stage in (1, 2, 3) for offload in (False, True)]
    plans += [("fsdp2", None, False, reshard) for reshard in (True, False)]
    root, block = facts.root_params, largest
    for engine, stage, offload, reshard in plans:
        if engine == "fsdp2":
            st = model_state_bytes(params, gpus, 3, False, 0, state_bytes=FSDP2_STATE_BYTES)
            buffers = fsdp2_buffer_bytes(params, root, block, reshard)["total"]
            # gradient sync off until the accumulation boundary: unsharded fp32 gradients meanwhile
            accum_extra = fsdp2_buffer_bytes(params, root, block, reshard, accumulation=2)["total"] - buffers
            st["gpu"]["total"] += buffers
            label = FSDP2_LABELS[reshard]
        else:
            st = model_state_bytes(params, gpus, stage, offload, largest)
            accum_extra, label = 0.0, f"ZeRO-{stage}" + (" offload" if offload else "")
        for key, a in act.items():
            per, fixed = a["per_image_gb"] * GiB, a["fixed_gb"] * GiB
            mb = fit_micro_batch(budget, st["gpu"]["total"], per, fixed)
            row = {"plan": label, "engine": engine, "zero_stage": stage, "offload": offload, "activations": key,
                   "model_states_gb": st["gpu"]["total"] / GiB, "host_gb_per_gpu": st["host_per_gpu"] / GiB,
                   "max_micro_batch": mb, "global_batch": mb * gpus}
            if engine == "fsdp2":
                row["reshard_after_forward"] = reshard
                row["accumulation_extra_gb"] = accum_extra / GiB
            if global_batch and mb:
                # Reach the recipe's global batch with the fewest accumulation steps.
                accum = math.ceil(global_batch / (gpus * mb))
                if accum > 1 and accum_extra:
                    # FSDP2 accumulating: the unsharded gradients take room from the micro-batch
                    mb_acc = fit_micro_batch(budget, st["gpu"]["total"] + accum_extra, per, fixed)
                    accum = math.ceil(global_batch / (gpus * mb_acc)) if mb_acc else 0
                if accum:
                    row["accumulation"] = accum
                    row["micro_batch_for_global"] = math.ceil(global_batch / (gpus * accum))
            if micro_batch:
                need = st["gpu"]["total"] + fixed + micro_batch * per
                if global_batch and accum_extra and global_batch > gpus * micro_batch:
                    need += accum_extra
                row["mem_at_micro_batch_gb"] = need / GiB
                row["fits_micro_batch"] = need <= budget
            rows.append(row)
    out = {"model": name, "img_size": size, "window_size": count.window_size, "params": params,
           "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "budget_gb": budget / GiB, "margin": margin,
           "reserved_gb": reserved_gb, "micro_batch": micro_batch, "global_batch": global_batch,
           "activations_per_image": act, "rows": rows}
    if speed is not None:
        from dataclasses import asdict

        from gigamim.tools.candidates import enumerate_candidates, recommend

        cands = enumerate_candidates(name, gpus, speed["gpus_per_node"], gpu_mem_gb, speed["device"], speed["net"],
                                     img_size=img_size, window_size=window_size, global_batch=global_batch,
                                     micro_batch=micro_batch, knobs=speed["knobs"], costs=speed["costs"],
                                     margin=margin, reserved_gb=reserved_gb, attn_chunk=attn_chunk)
        out["speed_inputs"] = {"gpus_per_node": speed["gpus_per_node"], "device": asdict(speed["device"]),
                               "network": speed["net"].as_dict(), "costs": asdict(speed["costs"]),
                               "zero_knobs": asdict(speed["knobs"]), "ib": speed.get("ib")}
        out["candidates"] = cands
        out["recommended"] = recommend(cands)
    return out


def _best(plan: dict) -> dict | None:
    """Fewest moving parts that fit: no offload before offload, lower stage first, then the
    largest micro-batch; checkpointing only when it buys a bigger batch."""
    fits = [r for r in plan["rows"] if r["max_micro_batch"] > 0 and (not plan["micro_batch"] or r["fits_micro_batch"])
            and (not plan.get("global_batch") or "micro_batch_for_global" in r)]
    if not fits:
        return None
    # FSDP2 shards like ZeRO-3; on a tie the default engine (DeepSpeed) is suggested.
    return max(fits, key=lambda r: (not r["offload"], r["max_micro_batch"] >= 8, -(r["zero_stage"] or 3),
                                    r["engine"] == "deepspeed", r["max_micro_batch"]))


def format_speed(plan: dict, top: int = 14) -> list:
    """The step-time table: the `top` fastest plans, plus the fastest of each ZeRO stage."""
    cands, best = plan["candidates"], plan["recommended"]
    si = plan["speed_inputs"]
    dev, net, costs = si["device"], si["network"], si["costs"]
    given = set(plan.get("given") or ())
    lines = ["", f"step time on {plan['gpus']} x {dev['name']} ({si['gpus_per_node']} per node; peak "
             f"{dev['peak_tflops']:g} TFLOP/s (data sheet) x efficiency {costs['efficiency']:.2f}"
             f"{'' if 'efficiency' in given else ' (assumed)'}; busbw intra "
             f"{net['intra_bps'] / 1e9:.0f} GB/s, inter {net['inter_bps'] / 1e9:.0f} GB/s"
             f"{' (' + si['ib'] + ' IB)' if si.get('ib') else ''}; overlap {costs['overlap']:.0%}; data "
             f"{costs['cpu_ms_per_image']:g} ms/img/core x {costs['host_cores_per_gpu']:g} cores/GPU):"]
    shown = cands[:top]
    for stage in (1, 2, 3, None):  # the fastest of each ZeRO stage and of FSDP2
        first = next((r for r in cands if r["zero_stage"] == stage), None)
        if first is not None and first not in shown:
            shown.append(first)
    if best is not None and best not in shown:
        shown.append(best)
    lines.append("  predicted from the figures marked assumed (listed at the end), not measured:")
    lines.append(f"  {'plan':<22} {'checkpointing':<16} {'seq':<4} {'mb x acc':>9} {'GiB':>6} {'step s':>7} "
                 f"{'img/s':>8} {'MFU':>6} {'comm s':>7} {'exposed':>7}")
    for r in shown:
        mark = " <- recommended" if r is best else ""
        seq = ",".join(str(i) for i in r["sequential_stages"]) or "-"
        lines.append(f"  {r['plan']:<22} {r['checkpointing']:<16} {seq:<4} {r['micro_batch']:>4} x {r['accumulation']:<3}"
                     f" {r['mem_gb']:>6.1f} {r['step_s']:>7.3f} {r['images_per_s']:>8.0f} {r['mfu']:>6.1%} "
                     f"{r['comm_s']:>7.3f} {r['comm_exposed_s']:>7.3f}{' data-bound' if r['data_bound'] else ''}{mark}")
    lines.append(f"  ({len(cands)} plans fit; --json lists them all with every term)")
    if best is not None:
        seq = f", sequential attention in stage(s) {best['sequential_stages']}" if best["sequential_stages"] else ""
        asked = plan.get("global_batch")
        lines.append(f"recommended: {best['plan']}, checkpointing {best['checkpointing']}{seq}, micro-batch "
                     f"{best['micro_batch']} x {best['accumulation']} accumulation x {plan['gpus']} GPUs = global "
                     f"{best['global_batch']}" + (f" (the requested {asked})" if asked == best["global_batch"] else
                                                 " (no --global-batch: the largest micro-batch, no accumulation)")
                     + f": {best['mem_gb']:.1f} GiB/GPU; predicted {best['step_s']:.3f} s/step, "
                     f"{best['images_per_s']:.0f} img/s, MFU {best['mfu']:.1%}")
        eff = costs["efficiency"]
        share = best["compute_s"] / best["step_s"]
        recompute = best["mfu"] / (eff * share) if share > 0 else 1.0  # model / executed FLOPs
        lines.append(f"  MFU {best['mfu']:.1%} = the assumed efficiency {eff:.2f} x compute {best['compute_s']:.3f} s "
                     f"/ step {best['step_s']:.3f} s" + (f" x model / executed FLOPs {recompute:.2f} (recompute)"
                                                         if recompute < 0.995 else "")
                     + f" (the rest: exposed communication {best['comm_exposed_s']:.3f} s, optimizer "
                     f"{best['optimizer_s']:.3f} s"
                     + (f", DeepSpeed's buffer copies {best['zero_copies_s']:.3f} s" if "zero_copies_s" in best else "")
                     + (f", ZeRO-3 hooks {best['hooks_s']:.3f} s" if best.get("hooks_s") else "")
                     + ("; data-bound" if best["data_bound"] else "")
                     + "): a prediction from the assumptions below, not a measurement")
        lines.append("  " + grad_accumulation_text(best["accumulation"], best["zero_stage"], plan["params"], best))
    return lines


def grad_accumulation_text(accumulation: int, stage, params: int, row: dict | None = None) -> str:
    """Which dtype gradients accumulate in across micro-steps, as DeepSpeed 0.19 does it with
    gigamim's bf16 templates: the model's (bf16) unless the template sets data_types.grad_accum_dtype
    (`engine.get_data_types`; ZeRO-1 with fp32 accumulation runs DeepSpeed's BF16_Optimizer, which
    keeps an fp32 gradient copy: +4 bytes per parameter, not in the memory above). An FSDP2 row
    (``row["engine"] == "fsdp2"``) keeps its unsharded gradients until the boundary instead."""
    if accumulation <= 1:
        return ("gradient accumulation: none (one micro-step per step); the bf16 gradients are reduced once "
                "per step")
    if row is not None and row.get("engine") == "fsdp2":
        return (f"gradient accumulation: {accumulation} micro-steps with FSDP2's gradient sync off until the "
                f"boundary: unsharded gradients on every GPU, +{row.get('accumulation_extra_gb', 0.0):.1f} GiB "
                "(counted in the memory above), reduce-scattered in fsdp.reduce_dtype at the boundary")
    fp32_copy = f"; ZeRO-1 then keeps an fp32 gradient copy, +{4 * params / 1e9:.1f} GB per GPU" if stage == 1 else ""
    return (f"gradient accumulation: {accumulation} micro-steps summed in bf16 (DeepSpeed accumulates in the model "
            "dtype under bf16; a precision choice: fp32 accumulation with \"data_types\": {\"grad_accum_dtype\": "
            f"\"fp32\"}} in the DeepSpeed template{fp32_copy})")


# What the step-time model assumes when no flag says otherwise, and how to measure it instead.
ASSUMPTIONS = (
    ("efficiency", "--efficiency", "fraction of peak a plain forward + backward reaches",
     "`gigamim bench --profile gpu` on one GPU reports the MFU of each size's step: pass it as --efficiency"),
    ("overlap", "--overlap", "fraction of compute that communication hides behind", "a profiler trace of a real step"),
    ("intra", "--intra-node-gbps", "NVLink bus bandwidth inside a node (GB/s)",
     "`gigamim launch --nproc-per-node 8 doctor` measures the all-reduce busbw"),
    ("inter", "--inter-node-gbps", "bus bandwidth across nodes (GB/s), from --ib",
     "`gigamim launch --nproc-per-node 8 --nnodes 2 --node-rank I --master-addr HOST0 doctor` on each of two nodes"),
    ("cpu_ms", "--cpu-ms-per-image", "data loading CPU time per image per core (ms)",
     "`gigamim bench --profile full --only data`"),
    ("cores", "--host-cores-per-gpu", "loader cores per GPU", "the node's cores / GPUs"),
    ("margin", "--margin", "GPU memory kept free for fragmentation", "peak_mem_gb in a real run's metrics.jsonl"),
    ("reserved", "--reserved", "GiB reserved for the CUDA context, NCCL and buffers", "the same"),
)


def assumption_lines(plan: dict) -> list:
    """The assumed figures (at their defaults: no flag given), each with its flag and how to measure it."""
    given = set(plan.get("given") or ())
    si = plan.get("speed_inputs") or {}
    costs, net = si.get("costs", {}), si.get("network", {})
    # written as the flag takes them, so each line is a working command-line fragment
    values = {"efficiency": f"{costs.get('efficiency', 0):.2f}", "overlap": f"{costs.get('overlap', 0):.2f}",
              "intra": f"{net.get('intra_bps', 0) / 1e9:.0f}", "inter": f"{net.get('inter_bps', 0) / 1e9:.0f}",
              "cpu_ms": f"{costs.get('cpu_ms_per_image', 0):g}", "cores": f"{costs.get('host_cores_per_gpu', 0):g}",
              "margin": f"{plan['margin']:.2f}", "reserved": f"{plan['reserved_gb']:g}"}
    rows = [(k, flag, what, how) for k, flag, what, how in ASSUMPTIONS
            if k not in given and (si or k in ("margin", "reserved"))]
    if not rows:
        return []
    out = ["assumed (not measured; pass the flag to use a measurement):"]
    out += [f"  {flag} {values[k]:<6} {what}; calibrate: {how}" for k, flag, what, how in rows]
    return out


def format_plan(plan: dict) -> str:
    lines = [
        f"{plan['model']} @ {plan['img_size']} px"
        + (f" (window {plan['window_size']})" if plan["window_size"] is not None else "")
        + f": {plan['params'] / 1e6:,.1f}M parameters "
        f"(SimMIM: encoder + mask token + decoder)",
        f"{plan['gpus']} GPUs x {plan['gpu_mem_gb']:g} GB; usable per GPU {plan['budget_gb']:.1f} GiB "
        f"({plan['margin']:.0%} margin + {plan['reserved_gb']:g} GiB reserved for context/buffers)",
        "",
        "activation memory per image (bf16, GiB; counted from what autograd saves, checked against a fake-CUDA "
        "measurement and a CPU run; the fused kernels' own memory is analytic):",
    ]
    for key, a in plan["activations_per_image"].items():
        lines.append(f"  {key:<20} {a['per_image_gb']:8.3f}   (+{a['fixed_gb']:.3f} once per micro-batch)")
    gb = plan.get("global_batch")
    # The last column is the requested global batch as micro-batch x accumulation (what the run
    # would use), or, without --global-batch, what the largest micro-batch gives on these GPUs.
    last = f"global {gb}: mb x acc" if gb else "max mb x GPUs"
    lines += ["", f"{'plan':<16} {'activations':<20} {'states GiB':>10} {'host GiB':>8} "
                  f"{'max mb':>6} {last:>{max(len(last), 13)}}" + ("  at --micro-batch" if plan["micro_batch"] else "")]
    for r in plan["rows"]:
        extra = ""
        if plan["micro_batch"]:
            extra = f"  {r['mem_at_micro_batch_gb']:.1f} GiB {'fits' if r['fits_micro_batch'] else 'OOM'}"
        if gb:
            split = f"{r['micro_batch_for_global']} x {r['accumulation']}" if "micro_batch_for_global" in r else "-"
        else:
            split = str(r["global_batch"])
        lines.append(f"{r['plan']:<16} {r['activations']:<20} {r['model_states_gb']:>10.2f} "
                     f"{r['host_gb_per_gpu']:>8.2f} {r['max_micro_batch']:>6} {split:>{max(len(last), 13)}}{extra}")
    if any(r["engine"] == "fsdp2" for r in plan["rows"]):
        extra = next(r["accumulation_extra_gb"] for r in plan["rows"] if r["engine"] == "fsdp2")
        lines.append(f"(FSDP2 states include its gathered bf16 units and gradients in flight; with gradient "
                     f"accumulation +{extra:.1f} GiB of unsharded fp32 gradients until the boundary)")
    best = _best(plan)
    lines.append("")
    if plan.get("candidates") is not None:
        return "\n".join(lines + format_speed(plan)[1:] + [""] + assumption_lines(plan))
    if best is None:
        lines.append("nothing fits: more GPUs, offload, or a smaller image")
    else:
        lines.append(f"suggested: {best['plan'].replace(' offload', ' + offload')}, "
                     f"{best['activations']}, micro-batch {best['max_micro_batch']} -> global batch "
                     f"{best['global_batch']} per step without accumulation")
        if plan.get("global_batch"):
            lines.append(f"for global batch {plan['global_batch']}: micro-batch {best['micro_batch_for_global']} x "
                         f"{plan['gpus']} GPUs x {best['accumulation']} accumulation step(s)")
            lines.append(grad_accumulation_text(best["accumulation"], best["zero_stage"], plan["params"], best))
    return "\n".join(lines + [""] + assumption_lines(plan))


def _fail(msg: str) -> int:
    print(f"gigamim plan: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    from gigamim.tools.hardware import DEVICES

    p = argparse.ArgumentParser(prog="gigamim plan",
                                description="Per-GPU memory and step-time plan for SimMIM pretraining.")
    p.add_argument("--model", default="swinv2_giant")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", choices=sorted(DEVICES), help="peak bf16 TFLOP/s and memory bandwidth")
    p.add_argument("--gpu-mem", type=float, default=None, help="GB of memory per GPU (default: the --gpu's)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--window-size", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="check / plan at this micro-batch")
    p.add_argument("--global-batch", type=int, default=None,
                   help="target global batch (e.g. 9216 for SwinV2-G SimMIM): micro-batch x accumulation to reach it")
    p.add_argument("--margin", type=float, default=None, help="fraction of GPU memory kept free (fragmentation; "
                   "default 0.1)")
    p.add_argument("--reserved", type=float, default=None, help="GiB reserved for CUDA context and buffers "
                   "(default 2)")
    p.add_argument("--ib", default=None, help="InfiniBand per node: NICs x Gb/s (8x400, 4x400, ...; default 8x400)")
    p.add_argument("--intra-node-gbps", type=float, default=None, help="busbw inside a node, GB/s (default 360)")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="busbw across nodes, GB/s (default from --ib)")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of peak a plain forward+backward reaches (default 0.50, assumed; measure it with "
                        "`gigamim bench --profile gpu` on one GPU and pass its MFU)")
    p.add_argument("--overlap", type=float, default=None, help="fraction of compute communication can hide behind")
    p.add_argument("--cpu-ms-per-image", type=float, default=None, help="data loading CPU ms per image per core")
    p.add_argument("--host-cores-per-gpu", type=float, default=None, help="loader cores per GPU")
    p.add_argument("--max-live", type=float, default=None, help="stage3_max_live_parameters (default 1e9)")
    p.add_argument("--memory-only", action="store_true", help="no step-time model")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (same numbers as the text)")
    return p


def main(argv=None) -> int:
    from gigamim.tools.hardware import DEVICES, Network, parse_ib
    from gigamim.tools.step_model import Costs, ZeroKnobs

    args = build_parser().parse_args(argv)
    if args.gpus < 1 or (args.gpu_mem is not None and args.gpu_mem <= 0):
        return _fail(f"--gpus ({args.gpus}) and --gpu-mem ({args.gpu_mem}) must be positive")
    if args.gpus_per_node < 1:
        return _fail(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.gpus_per_node > args.gpus:
        return _fail(f"--gpus-per-node ({args.gpus_per_node}) is more than --gpus ({args.gpus}); "
                     f"for one partly used node pass --gpus-per-node {args.gpus}")
    if args.gpus % args.gpus_per_node:
        return _fail(f"--gpus {args.gpus} is not a whole number of nodes of {args.gpus_per_node} GPUs")
    if args.global_batch is not None and args.global_batch < 1:
        return _fail(f"--global-batch must be >= 1, got {args.global_batch}")
    if args.micro_batch is not None and args.micro_batch < 1:
        return _fail(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if args.global_batch is not None and args.global_batch % args.gpus:
        return _fail(f"--global-batch {args.global_batch} cannot be split over {args.gpus} GPUs "
                     f"({args.global_batch} / {args.gpus} is not a whole number of images per GPU)")
    if args.global_batch and args.micro_batch and (args.global_batch // args.gpus) % args.micro_batch:
        return _fail(f"--global-batch {args.global_batch} cannot be split into micro-batches of {args.micro_batch} "
                     f"on {args.gpus} GPUs ({args.global_batch // args.gpus} images per GPU)")
    for name in ("efficiency", "overlap"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1 and not (name == "overlap" and v == 0):
            return _fail(f"--{name} must be in (0, 1], got {v}")
    device = DEVICES[args.gpu]
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else device.mem_gb
    given = {k for k, v in (("efficiency", args.efficiency), ("overlap", args.overlap),
                            ("intra", args.intra_node_gbps), ("inter", args.inter_node_gbps),
                            ("cpu_ms", args.cpu_ms_per_image), ("cores", args.host_cores_per_gpu),
                            ("margin", args.margin), ("reserved", args.reserved)) if v is not None}
    margin = 0.1 if args.margin is None else args.margin
    reserved = 2.0 if args.reserved is None else args.reserved
    ib = args.ib or "8x400"
    try:
        inter = parse_ib(ib)
        net = Network(intra_bps=(args.intra_node_gbps or 360.0) * 1e9,
                      inter_bps=args.inter_node_gbps * 1e9 if args.inter_node_gbps else inter)
        costs = Costs()
        costs = Costs(**{**costs.__dict__, **{k: v for k, v in (
            ("efficiency", args.efficiency), ("overlap", args.overlap), ("cpu_ms_per_image", args.cpu_ms_per_image),
            ("host_cores_per_gpu", args.host_cores_per_gpu)) if v is not None}})
        knobs = ZeroKnobs(max_live=args.max_live) if args.max_live is not None else ZeroKnobs()
        speed = None if args.memory_only else {"gpus_per_node": args.gpus_per_node, "device": device, "net": net,
                                               "costs": costs, "knobs": knobs, "ib": ib}
        plan = make_plan(args.model, args.gpus, gpu_mem, args.img_size, args.micro_batch, args.window_size,
                         margin, reserved, global_batch=args.global_batch, speed=speed)
        plan["given"] = sorted(given)
        plan["assumed"] = [{"flag": flag, "what": what, "calibrate": how} for k, flag, what, how in ASSUMPTIONS
                           if k not in given and (speed is not None or k in ("margin", "reserved"))]
    except ValueError as e:
        return _fail(str(e))
    if speed is not None and plan["recommended"] is None:
        return _fail(f"nothing fits {args.model} on {args.gpus} x {gpu_mem:g} GB"
                     + (f" at micro-batch {args.micro_batch}" if args.micro_batch else "")
                     + (f" for global batch {args.global_batch}" if args.global_batch else "")
                     + ": more GPUs, more memory per GPU, a smaller image, or a smaller --micro-batch")
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
