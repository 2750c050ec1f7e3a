"""Activation memory per image: `gigamim plan`'s figure against the CUDA path, measured without a GPU.

    python -m gigamim_benchmarks.activation_memory --out benchmarks/results/activation_memory_<date>
    python -m gigamim_benchmarks.activation_memory --models B --settings explicit --batches 1 2

What is measured, per model (SwinV2 B, L, H, G at 192 px, window 12), per setting (explicit
attention, with / without activation checkpointing of every block, with / without sequential
attention in every stage at the planner's chunk of 64 windows), in bf16 weights and inputs
(DeepSpeed's bf16 mode; autocast does not act on fake tensors, so the weights are cast):

* ``saved``: the SimMIM forward on fake CUDA tensors (``FakeTensorMode``, device ``cuda``: the
  CUDA path's shapes, dtypes and kernel dispatch, no GPU) under torch's
  ``torch.distributed._tools.mem_tracker.MemTracker``; the activation bytes still alive when
  the forward returns (its ``ACT`` category: what autograd keeps for backward plus what the
  checkpoint frames hold, the blocks' inputs; plus the input batch, which the patch embedding
  keeps). MemTracker rounds every CUDA storage up to the
  caching allocator's 512-byte blocks. Next to it, ``hooks``: a second count by another
  mechanism, the unique storages (keyed by storage, fake tensors have no data pointers) packed
  by ``torch.autograd.graph.saved_tensors_hooks`` during the forward.
* ``block``: one block alone, forward on fake CUDA (same tracker): its full saved set, which is
  what exists again while a checkpointed block is recomputed in backward. The block with the
  planner's largest per-image set (stage 0 at 192 px), unshifted and shifted, the larger kept.
* ``peak``: forward + backward on the meta device under the same tracker, the high-water of
  activation + temporary bytes (parameters, gradients and buffers left out). The autograd engine
  cannot run backward on fake CUDA tensors; on meta it runs the same autograd formulas with the
  same torch kernels the fake-CUDA dispatch picks, and the forward's live bytes equal the fake
  CUDA ones (up to the 512-byte rounding). This is the recompute working set of checkpointing
  (the recomputed block's saved set + the gradients in flight through it) and the chunk working
  set of sequential attention, which no forward alone shows.

Per image = the slope between two micro-batch sizes (default 64 and 128), so parameters,
buffers and the per-micro-batch constants (the CPB tables, one layer's weight gradient in
backward) drop out. Large sizes on purpose: the sequential chunk (64 windows) grows with the
batch until every stage fills it (64 images for the one-window stages), and with small batches
the constants decide where the backward peak falls (measured: SwinV2-H with checkpointing peaks
in the last block at micro-batch 1-4, in the first block's recompute at 64). The planner's
side: `plan.activation_bytes` at the same batch sizes (saved / total) and the `gigamim plan`
figure itself (`make_plan`'s ``per_image_gb``). Ratio = planner / measured.

Analytic until a GPU measures it (no device capability under FakeTensorMode, so no fused SDPA
kernel is selected and nothing runs): the fused kernels' logsumexp instead of the probabilities
(the planner's 'fused' mode), the Triton kernels' saved sets (the same tensors as the torch
fallback here: input + fp32 mean/rstd for the LayerNorms, the raw q/k for the cosine
normalisation), cuBLAS / cuDNN workspaces, the caching allocator's fragmentation, NCCL and
DeepSpeed buffers: `gigamim plan` covers those with its margin and reserve.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

MiB = 2**20
IMG = 192
CHUNK = 64  # windows per sequential chunk: `gigamim plan`'s attn_chunk default
MODELS = {"B": "swinv2_base", "L": "swinv2_large", "H": "swinv2_huge", "G": "swinv2_giant"}
SEQ_ALL = (0, 1, 2, 3)
# setting -> (planner attention mode, checkpointing, model overrides)
SETTINGS = {
    "explicit": ("explicit", False, dict(grad_checkpointing=False, sequential_stages=())),
    "explicit+ckpt": ("explicit", True, dict(grad_checkpointing=True, sequential_stages=())),
    "sequential": ("sequential", False, dict(grad_checkpointing=False, sequential_stages=SEQ_ALL)),
    "sequential+ckpt": ("sequential", True, dict(grad_checkpointing=True, sequential_stages=SEQ_ALL)),
}


def _model_name(name: str) -> str:
    return MODELS.get(name, name)


def build_meta(name: str, setting: str, dtype=torch.bfloat16):
    """SimMIM(name) on the meta device in `dtype`, explicit attention, `setting`'s options."""
    from gigamim.models import SimMIM, create_model

    with torch.device("meta"):
        enc = create_model(_model_name(name), img_size=IMG, attn_impl="explicit", attn_chunk=CHUNK,
                           **SETTINGS[setting][2])
        return SimMIM(enc).to(dtype)


def fake_cuda_mode():
    """A FakeTensorMode whose `cuda` tensors need no GPU. The meta model is moved in with
    `to_empty` while non-fake inputs are allowed; afterwards they are refused again, so a real
    (CPU) tensor made inside the forward would raise instead of being silently faked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _to_fake_cuda(module, mode):
    with mode:
        module = module.to_empty(device="cuda")
    mode.allow_non_fake_inputs = False
    return module


def _inputs(batch: int, device, dtype=torch.bfloat16):
    x = torch.randn(batch, 3, IMG, IMG, dtype=dtype, device=device)
    mask = torch.rand(batch, IMG // 4, IMG // 4, device=device) > 0.4
    return x, mask


class SavedStorages:
    """Unique storages autograd saves for backward (saved_tensors_hooks), parameters excluded.
    Keyed by the storage itself (StorageWeakRef): fake tensors have no data pointers."""

    def __init__(self, skip=()):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.skip = {StorageWeakRef(t.untyped_storage()) for t in skip}
        self.seen = {}

    def _pack(self, t):
        key = self._ref(t.untyped_storage())
        if key not in self.skip:
            self.seen[key] = max(self.seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _tracker():
    """MemTracker that also keeps the high-water of activation + temporary bytes (the snapshot's
    own peak is of the total, where gradients growing through backward would hide it). It reads
    the running snapshot after each update (`_update_snap`, private in torch 2.14): without that
    method only the forward-end numbers are available and `act_peak` stays None."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class ActPeakTracker(MemTracker):
        act_peak = None

        def _update_snap(self, *args, **kwargs):
            super()._update_snap(*args, **kwargs)
            for snap in self._curr_mem_snap.values():
                act = snap[_MemRefType.ACT] + snap[_MemRefType.TEMP]
                self.act_peak = act if self.act_peak is None else max(self.act_peak, act)

    return ActPeakTracker(), _MemRefType


def measure_forward(name: str, setting: str, batch: int) -> dict:
    """SimMIM forward on fake CUDA: activation bytes alive at its end (MemTracker) and the unique
    storages saved by autograd (hooks), bytes."""
    model = build_meta(name, setting)
    mode = fake_cuda_mode()
    model = _to_fake_cuda(model, mode)
    mt, kinds = _tracker()
    with mode:
        x, mask = _inputs(batch, "cuda")
        mt.track_external(model, x, mask)
        saved = SavedStorages(skip=list(model.parameters()) + list(model.buffers()))
        with mt, saved:
            loss = model(x, mask)
            snap = mt.get_tracker_snapshot("current")
        assert loss.device.type == "cuda", loss.device
    (dev, s), = ((d, s) for d, s in snap.items() if d.type == "cuda")
    # OTH: the tracked inputs (image batch, mask): the patch embedding's conv keeps the images for
    # backward, and the planner counts them.
    out = {"saved": s[kinds.ACT] + s[kinds.TEMP] + s[kinds.OTH], "hooks": saved.total, "forward_peak": mt.act_peak}
    del loss, model, mt, saved
    gc.collect()
    return out


def _largest_block(name: str, attn: str = "explicit"):
    """(stage, the planner's bytes) for `measure_block`: the stage whose blocks' per-image saved
    set the planner counts largest (explicit attention), and the larger count of its first two
    blocks in mode `attn` (the shifted one also keeps its mask)."""
    from gigamim.tools.model_facts import model_facts

    count = model_facts(_model_name(name), IMG).count
    stage = max(count.blocks, key=lambda b: b.saved("explicit").bytes(2)).stage
    first_two = [b for b in count.blocks if b.stage == stage][:2]
    return stage, max(b.saved(attn).bytes(2) for b in first_two)


def largest_block(name: str):
    """The stage of the block whose per-image saved set the planner counts largest."""
    return _largest_block(name)[0]


def measure_block(name: str, setting: str, batch: int) -> dict:
    """The largest stage's first two blocks, each alone on fake CUDA: their saved bytes (the
    recompute working set of a checkpointed block, without the gradients in flight)."""
    model = build_meta(name, setting)
    stage = largest_block(name)
    enc = model.encoder
    side, dim = IMG // 4 // 2**stage, enc.embed_dim * 2**stage
    out = {}
    for j, blk in enumerate(enc.layers[stage].blocks[:2]):
        mode = fake_cuda_mode()
        blk = _to_fake_cuda(blk, mode)
        mt, kinds = _tracker()
        with mode:
            x = torch.randn(batch, side, side, dim, dtype=torch.bfloat16, device="cuda", requires_grad=True)
            mt.track_external(blk, x)
            with mt:
                y = blk(x)  # the block as the recompute runs it: not checkpointed itself
                snap = mt.get_tracker_snapshot("current")
        (s,) = (s for d, s in snap.items() if d.type == "cuda")
        out[f"stage{stage}.block{j}"] = s[kinds.ACT] + s[kinds.TEMP]
        del y, blk, mt
    return {"stage": stage, "blocks": out, "block": max(out.values())}


def measure_backward(name: str, setting: str, batch: int) -> dict:
    """Forward + backward on the meta device: activation bytes at the end of the forward and the
    activation + temporary high-water over forward and backward."""
    model = build_meta(name, setting)
    with torch.device("meta"):
        x, mask = _inputs(batch, "meta")
    mt, kinds = _tracker()
    mt.track_external(model, x, mask)
    with mt:
        loss = model(x, mask)
        snap = mt.get_tracker_snapshot("current")
        loss.backward()
    (s,) = (s for d, s in snap.items() if d.type == "meta")
    inputs = s[kinds.OTH]  # the image batch and the mask, alive throughout (see measure_forward)
    out = {"saved_meta": s[kinds.ACT] + s[kinds.TEMP] + inputs,
           "peak": None if mt.act_peak is None else mt.act_peak + inputs}
    del loss, model, mt
    gc.collect()
    return out


def planner(name: str, setting: str, batches) -> dict:
    """The planner's side at the same batch sizes: saved and total per image (slopes), its block
    count for the measured block, and `gigamim plan`'s printed per-image figure."""
    from gigamim.tools import plan
    from gigamim.tools.memory import activation_bytes

    attn, ckpt, _ = SETTINGS[setting]
    full = _model_name(name)
    a = [activation_bytes(full, IMG, batch=b, attn=attn, checkpointing=ckpt, attn_chunk=CHUNK)
         for b in batches]
    db = batches[1] - batches[0]
    block = _largest_block(name, attn)[1]
    key = f"{attn}{'+ckpt' if ckpt else ''}"
    plan_figure = plan.make_plan(full, 8, 80.0, IMG)["activations_per_image"][key]["per_image_gb"] * 2**30
    return {"saved": (a[1]["saved"] - a[0]["saved"]) / db, "total": (a[1]["total"] - a[0]["total"]) / db,
            "block": block, "plan": plan_figure}


MEASURED = ("model", "setting", "batches", "saved_mib", "hooks_mib", "block_mib", "block_where", "saved_meta_mib",
            "peak_mib", "seconds")


def measure(name: str, setting: str, batches=(64, 128), backward: bool = True, block: bool = True) -> dict:
    """The measured half of one table row: MiB per image (slopes over `batches`)."""
    b0, b1 = batches
    t0 = time.time()
    fw = [measure_forward(name, setting, b) for b in batches]
    row = {"model": _model_name(name), "setting": setting, "batches": list(batches)}
    slope = lambda lo, hi: (hi - lo) / (b1 - b0) / MiB  # noqa: E731
    row["saved_mib"] = slope(fw[0]["saved"], fw[1]["saved"])
    row["hooks_mib"] = slope(fw[0]["hooks"], fw[1]["hooks"])
    if block and SETTINGS[setting][1]:
        bl = [measure_block(name, setting, b) for b in batches]
        row["block_mib"] = slope(bl[0]["block"], bl[1]["block"])
        row["block_where"] = list(bl[0]["blocks"])
    if backward:
        bw = [measure_backward(name, setting, b) for b in batches]
        row["saved_meta_mib"] = slope(bw[0]["saved_meta"], bw[1]["saved_meta"])
        row["peak_mib"] = slope(bw[0]["peak"], bw[1]["peak"]) if bw[0]["peak"] is not None else None
    row["seconds"] = round(time.time() - t0, 1)
    return row


def score(row: dict) -> dict:
    """The planner's half of the row (at the row's batch sizes) and the ratios planner / measured."""
    row = {k: row[k] for k in MEASURED if k in row}
    p = planner(row["model"], row["setting"], row["batches"])
    row["plan_saved_mib"] = p["saved"] / MiB
    row["plan_total_mib"] = p["total"] / MiB
    row["plan_block_mib"] = p["block"] / MiB
    row["plan_figure_mib"] = p["plan"] / MiB
    row["ratio_saved"] = row["plan_saved_mib"] / row["saved_mib"]
    if row.get("block_mib"):
        row["ratio_block"] = row["plan_block_mib"] / row["block_mib"]
    # The figure `gigamim plan` fits micro-batches with is its peak per image: against the
    # measured forward + backward high-water where there is one, else against the forward's.
    # Without a backward, a checkpointed setting has nothing to compare its figure with.
    ref = row.get("peak_mib") or (None if SETTINGS[row["setting"]][1] else row["saved_mib"])
    row["ratio_plan"] = None if ref is None else row["plan_figure_mib"] / ref
    return row


def markdown(rows: list) -> str:
    def f(x):
        return "-" if x is None else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"

    def r3(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| model | setting | measured saved | plan saved | ratio | measured peak (fwd+bwd) | `gigamim plan` "
             "| ratio | measured block | plan block | ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        blk = r.get("block_mib")
        lines.append(f"| {r['model']} | {r['setting']} | {f(r['saved_mib'])} | {f(r['plan_saved_mib'])} | "
                     f"{r3(r['ratio_saved'])} | {f(r.get('peak_mib'))} | {f(r['plan_figure_mib'])} | "
                     f"{r3(r['ratio_plan'])} | {f(blk)} | {f(r['plan_block_mib']) if blk else '-'} | "
                     f"{r3(r.get('ratio_block'))} |")
    lines.append("")
    lines.append("MiB per image (slope over micro-batches %s), bf16, 192 px, window 12, explicit attention, "
                 "sequential chunk %d windows; ratio = planner / measured. 'saved': alive at the end of the "
                 "fake-CUDA forward; 'peak': forward + backward high-water on the meta device; 'block': the "
                 "largest block alone (the recompute set of a checkpointed block)." % (
                     rows[0]["batches"] if rows else "-", CHUNK))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gigamim_benchmarks.activation_memory",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="B L H G (or full names)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--batches", nargs=2, type=int, default=[64, 128], metavar=("B0", "B1"))
    p.add_argument("--no-backward", action="store_true", help="skip the meta-device forward + backward peak")
    p.add_argument("--no-block", action="store_true", help="skip the one-block recompute set")
    p.add_argument("--out", default=None, help="folder for activation_memory.json / .md")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="re-score the planner against the measurements in FILE (an earlier activation_memory.json) "
                        "instead of measuring again")
    args = p.parse_args(argv)
    if args.batches[0] >= args.batches[1] or args.batches[0] < 1:
        print(f"--batches must be two sizes, smallest first, got {args.batches}", file=sys.stderr)
        return 2
    from gigamim_benchmarks.common import machine_info, versions

    command = "python -m gigamim_benchmarks.activation_memory " + " ".join(sys.argv[1:] if argv is None else argv)

    from gigamim.tools import plan  # noqa: F401  (the planner as it is now, before minutes of measuring)

    rows = []
    measured_meta = None
    if args.from_json:
        src = json.loads(Path(args.from_json).read_text())
        measured_meta = src["meta"].get("measured", src["meta"])
        rows = [score(r) for r in src["rows"] if r["model"] in [_model_name(m) for m in args.models]
                and r["setting"] in args.settings]
    else:
        for m in args.models:
            for s in args.settings:
                row = score(measure(m, s, tuple(args.batches), backward=not args.no_backward, block=not args.no_block))
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        here = {"machine": machine_info(), "versions": versions(), "command": command}
        # Re-scored: the measurement's own record stays, the planner's version is this run's.
        meta = here if measured_meta is None else {"measured": measured_meta, "scored": here}
        (out / "activation_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (out / "activation_memory.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
