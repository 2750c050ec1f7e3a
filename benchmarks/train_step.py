"""One SimMIM training step, timed phase by phase, for gigamim or the timm reference.

A `Case` says what to build (model, resolution, window, batch, attention path,
checkpointing, precision, gigamim or reference); a `StepRunner` builds it once and runs
steps. `run_group` builds the cases of a group side by side and alternates them step by
step (ABAB...), so a load spike on a shared machine hits both sides alike; medians are
reported. The reference gets a copy of gigamim's weights (same seed, strict load).

Phases of a step: data (uint8 batch -> normalised float on the device, mask copy: the
part of data handling that is inside the step; the loader itself is data_bench's),
forward (loss), backward, optimizer (AdamW step + zero_grad).
FLOPs are analytic (gigamim.models.flops), identical for both sides: MFU counts model FLOPs
(3x forward); HFU adds what backward recomputes (checkpointed blocks, sequential chunks).
`compile=True` compiles every SwinV2 block's forward (gigamim's or timm's) the same way;
with `compile_scope="model"` it is `torch.compile(model)` instead, the whole SimMIM module as a
library user compiles it (one graph each side; the optimizer step stays eager on both).
"""

from __future__ import annotations

import gc
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from .common import Clock, median
from .memory import resident_bytes, step_peak_bytes


@dataclass
class Case:
    name: str
    group: str
    model: str = "swinv2_tiny"
    img_size: int = 192
    window_size: int | None = None
    batch: int = 8
    impl: str = "gigamim"  # "gigamim" | "reference"
    attn_impl: str = "auto"  # gigamim: "explicit" | "sdpa" | "auto" (the faster one for the device)
    sequential: bool = False  # gigamim: every stage's attention in recomputed chunks
    attn_chunk: int = 16
    checkpointing: bool = False
    compile: bool = False  # torch.compile, both impls alike; what is compiled: compile_scope
    compile_scope: str = "blocks"  # "blocks": each block's forward (models.compile); "model": torch.compile(model)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, fp32 master weights)
    steps: int = 3  # timed steps (0: memory only)
    warmup: int = 1
    memory: bool = True
    drop_path_rate: float = 0.1
    label: str = ""
    extra: dict = field(default_factory=dict)

    def resolve(self, device) -> "Case":
        """'auto' attention: SDPA on GPUs (fused kernels); explicit on CPU, where SwinV2's
        learned bias (a mask that needs a gradient) sends SDPA down its slower math path."""
        if self.attn_impl == "auto":
            self.attn_impl = "sdpa" if torch.device(device).type == "cuda" else "explicit"
        return self

    def describe(self) -> str:
        if self.impl == "reference":
            bits = ["timm reference"]
        else:
            bits = ["gigamim", "sequential" if self.sequential else self.attn_impl]
        if self.checkpointing:
            bits.append("ckpt")
        if self.compile:
            bits.append("compiled" if self.compile_scope == "blocks" else "compiled (whole model)")
        return " ".join(bits)


def _model_kwargs(case: Case) -> dict:
    kw = dict(img_size=case.img_size, drop_path_rate=case.drop_path_rate, num_classes=0)
    if case.window_size is not None:
        kw["window_size"] = case.window_size
    if case.impl == "gigamim":
        from gigamim.models import model_defaults

        n = len(model_defaults(case.model)["depths"])
        kw.update(attn_impl=case.attn_impl, grad_checkpointing=case.checkpointing, attn_chunk=case.attn_chunk,
                  sequential_stages=tuple(range(n)) if case.sequential else ())
    return kw


def build_simmim(case: Case, device, seed: int = 0):
    """gigamim's SimMIM for the case (fp32 parameters), or the reference with the same weights."""
    from gigamim.models import SimMIM, create_model

    if case.impl not in ("gigamim", "reference"):
        raise ValueError(f"case {case.name}: impl must be 'gigamim' or 'reference', got {case.impl!r}")
    torch.manual_seed(seed)
    kw = _model_kwargs(case)
    # Built on the device directly: initialising 3B parameters on the host first is minutes.
    with torch.device(device):
        model = SimMIM(create_model(case.model, **kw))
        if case.impl == "gigamim":
            return model
        from .reference import reference_for

        return reference_for(model, grad_checkpointing=case.checkpointing)  # a copy of these weights


def make_optimizer(model, impl: str, device):
    """gigamim: its parameter groups (no decay on norms/biases/...) and fused AdamW;
    reference: torch's default AdamW over all parameters, as a plain script would."""
    if impl == "reference":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    from gigamim.models.param_groups import param_groups

    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in param_groups(model, 0.05)]
    try:
        return torch.optim.AdamW(groups, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, lr=1e-4, foreach=True)


def synthetic_batches(case: Case, n: int = 2, seed: int = 0) -> list[dict]:
    """uint8 images and SimMIM masks (gigamim's mask generator), as the loader yields them."""
    from gigamim.data.masking import MaskGenerator

    gen = torch.Generator().manual_seed(seed)
    masks = MaskGenerator(case.img_size, 32, 4, 0.6)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (case.batch, 3, case.img_size, case.img_size), dtype=torch.uint8, generator=gen)
        mask = torch.from_numpy(__import__("numpy").stack([masks(rng) for _ in range(case.batch)]))
        out.append({"image": img, "mask": mask})
    return out


class StepRunner:
    def __init__(self, case: Case, device, seed: int = 0):
        self.case = case.resolve(device)
        self.device = torch.device(device)
        self.model = build_simmim(case, self.device, seed).train()
        self.call = self.model  # what a step calls: the model, or its whole-model compiled wrapper
        if case.compile_scope not in ("blocks", "model"):
            raise ValueError(f"case {case.name}: compile_scope must be 'blocks' or 'model', got {case.compile_scope!r}")
        # The compile itself happens in the warm-up steps, which are not timed.
        if case.compile and case.compile_scope == "model":
            # As a library user compiles: the whole SimMIM module, default options, one graph.
            # The optimizer and the parameter names (no _orig_mod. prefix) stay the module's.
            self.call = torch.compile(self.model)
        elif case.compile:
            # The same per-block compile for both sides (it finds gigamim's and timm's blocks).
            from gigamim.models.compile import compile_blocks

            compile_blocks(self.model)
        self.opt = make_optimizer(self.model, case.impl, self.device)
        self.batches = synthetic_batches(case)
        if self.device.type == "cuda":
            # As the loader hands them over (pin_memory): the step's non-blocking copy is then
            # truly asynchronous, so the data phase times the copy, not a pageable staging pass.
            self.batches = [{k: v.pin_memory() for k, v in b.items()} for b in self.batches]
        self.clock = Clock(self.device)
        self.times: list[dict] = []
        self.i = 0
        if case.precision == "bf16":
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        elif case.precision == "fp32":
            self.autocast = nullcontext
        else:
            raise ValueError(f"case {case.name}: precision must be fp32 or bf16, got {case.precision!r}")

    def _step(self) -> dict:
        from gigamim.data.transforms import normalize_on_device

        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        c0 = time.process_time()
        t0 = self.clock()
        images = normalize_on_device(b["image"], self.device)
        mask = b["mask"].to(self.device, non_blocking=True)
        t1 = self.clock()
        with self.autocast():
            loss = self.call(images, mask)
        t2 = self.clock()
        loss.backward()
        t3 = self.clock()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t4 = self.clock()
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"case {self.case.name}: non-finite loss {loss.item()}")
        # CPU seconds of this process: on a shared machine, time other jobs take from us
        # inflates wall time but not this (with one thread it is close to the work done).
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0,
                "cpu": time.process_time() - c0, "loss": float(loss.detach())}

    def warmup(self) -> None:
        for _ in range(self.case.warmup):
            self._step()

    def timed_step(self) -> None:
        self.times.append(self._step())

    def peak_memory(self) -> tuple[int, str]:
        """Peak bytes of one (untimed) step: resident states + the step's high-water."""
        gc.collect()
        extra = [self.batches[0]["image"]]
        resident = resident_bytes(self.model, self.opt, extra)
        self.resident = resident
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
            peak, how = step_peak_bytes(self._step, self.device, 0)
            # Other runners of the group are resident too: count this one's share only.
            return peak - before + resident, how + " (minus other models' resident bytes)"
        return step_peak_bytes(self._step, self.device, resident)

    def result(self, flops_per_image: int, flops_recompute: int, peak_tflops: float | None, peak_src: str) -> dict:
        case = self.case
        phases = {k: median([t[k] for t in self.times]) for k in ("data", "forward", "backward", "optimizer", "total")}
        step_s = phases["total"]
        ips = case.batch / step_s if step_s else None
        if not self.times:
            phases = {k: None for k in phases}
        tflops = ips * flops_per_image / 1e12 if ips else None
        hw_tflops = ips * flops_recompute / 1e12 if ips else None
        return {
            "case": asdict(case),
            "label": case.label or case.describe(),
            "params": sum(p.numel() for p in self.model.parameters()),
            "images_per_sec": ips,
            "step_time_s": step_s,
            "breakdown_s": {k: phases[k] for k in ("data", "forward", "backward", "optimizer")},
            "step_times_s": [t["total"] for t in self.times],
            "step_cpu_times_s": [t["cpu"] for t in self.times],
            "cpu_time_per_step_s": median([t["cpu"] for t in self.times]),
            "min_step_time_s": min((t["total"] for t in self.times), default=None),
            "loss_last": self.times[-1]["loss"] if self.times else None,
            "flops_per_image_train": flops_per_image,
            "tflops_per_sec": tflops,
            "peak_tflops": peak_tflops,
            "peak_tflops_source": peak_src,
            "mfu": tflops / peak_tflops if tflops and peak_tflops else None,
            "hfu": hw_tflops / peak_tflops if hw_tflops and peak_tflops else None,
        }


def _flops(case: Case) -> tuple[int, int]:
    """(model FLOPs, hardware FLOPs with recompute) per image for a training step: the same
    count for gigamim and the reference; the hardware count follows the case's checkpointing
    and sequential attention (gigamim.models.flops.model_and_hardware_flops)."""
    from gigamim.models import SimMIM, create_model
    from gigamim.models.flops import model_and_hardware_flops

    kw = _model_kwargs(Case(**{**asdict(case), "impl": "gigamim", "attn_impl": "explicit"}))
    kw["drop_path_rate"] = 0.0
    with torch.device("meta"):
        m = SimMIM(create_model(case.model, **kw))
    return model_and_hardware_flops(m, case.img_size, batch_size=case.batch)


def run_group(cases: list[Case], device, peak_tflops: float | None, peak_src: str, log=print) -> list[dict]:
    """Build all cases of a group, warm them up, alternate their timed steps (ABAB), then
    measure each one's peak memory in an extra step. A case that fails is reported as such."""
    runners, results = [], {}
    for c in cases:
        try:
            runners.append(StepRunner(c, device))
        except Exception as e:  # noqa: BLE001  (report and go on: one OOM must not end the run)
            results[c.name] = _failed(c, e)
            log(f"  {c.name}: build failed: {type(e).__name__}: {e}")
    live = []
    for r in runners:
        try:
            r.warmup()
            live.append(r)
        except Exception as e:  # noqa: BLE001
            results[r.case.name] = _failed(r.case, e)
            log(f"  {r.case.name}: failed: {type(e).__name__}: {e}")
    rounds = max((r.case.steps for r in live), default=0)
    for i in range(rounds):
        for r in list(live):
            if i < r.case.steps:
                try:
                    r.timed_step()
                except Exception as e:  # noqa: BLE001
                    results[r.case.name] = _failed(r.case, e)
                    live.remove(r)
                    log(f"  {r.case.name}: failed: {type(e).__name__}: {e}")
    for r in live:
        fl, fl_hw = _flops(r.case)
        res = r.result(fl, fl_hw, peak_tflops, peak_src)
        if r.case.memory:
            try:
                peak, how = r.peak_memory()
                res["peak_mem_bytes"], res["peak_mem_gb"], res["peak_mem_method"] = peak, peak / 2**30, how
                # Parameters + optimizer states + batch: what no activation trick can remove.
                res["resident_bytes"] = r.resident
            except Exception as e:  # noqa: BLE001
                res["peak_mem_error"] = f"{type(e).__name__}: {e}"
        results[r.case.name] = res
        ips, mem = res["images_per_sec"], res.get("peak_mem_gb")
        log(f"  {r.case.name:<40}" + (f" {ips:8.2f} img/s" if ips else " (memory only)")
            + (f"  peak {mem:7.3f} GiB" if mem is not None else ""))
    del runners, live
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [results[c.name] for c in cases]


def _failed(case: Case, e: Exception) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"case": asdict(case), "label": case.label or case.describe(), "error": f"{type(e).__name__}: {e}"}
