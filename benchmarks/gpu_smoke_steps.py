"""The steps of benchmarks/gpu_smoke.py, each run in its own process (`--step NAME`), and the
helpers both sides share. Step functions take a `Ctx` and record checks and numbers in their
JSON as they go, so a step killed at its timeout still leaves what it measured.

Nothing here imports torch at module level: the driver imports this module for its helpers
before anything is installed (wheel selection) and must stay light.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_SIZES = ("swinv2_base", "swinv2_large", "swinv2_huge", "swinv2_giant")
# Packaged recipes whose model settings (checkpointing) the size runs follow.
RECIPES = {"swinv2_base": "simmim_swinv2_base_192", "swinv2_giant": "simmim_swinv2_giant_192"}


def write_json_atomic(path: Path, obj) -> None:
    """Atomic: a kill mid-write leaves the previous file, never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def tail_text(path: Path, chars: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group (DataLoader workers, compile workers, a launcher and its
    ranks die with it: the launcher's ranks by PDEATHSIG), SIGKILL what is left after grace."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# Exec'd in front of every command: it gets SIGKILL when its parent dies (the driver, or a step
# killed from outside), so nothing it started outlives the run and holds the GPU of a machine that
# a rerun may get back warm. prctl(PR_SET_PDEATHSIG) survives the exec; elsewhere a plain exec.
_PDEATHSIG_EXEC = ("import ctypes, os, signal, sys\n"
                   "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
                   "except Exception:\n    pass\n"
                   "os.execvp(sys.argv[1], sys.argv[1:])\n")


def start_command(cmd: list, log_file, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session (a timeout takes its whole tree down), tied to this process."""
    return subprocess.Popen([sys.executable, "-c", _PDEATHSIG_EXEC] + [str(c) for c in cmd], stdout=log_file,
                            stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)


def run_command(cmd: list, timeout: float, log: Path, env: dict | None = None) -> tuple[int | None, float]:
    """(exit code or None on timeout, wall seconds); output appended to `log`."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = start_command(cmd, f, env)
        try:
            rc = proc.wait(max(1.0, timeout))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = None
            f.write(f"\n[gpu_smoke] timed out after {timeout:.0f} s: killed\n")
    return rc, time.perf_counter() - t0


def build_jit_op(out_json: Path) -> int:
    """JIT-build (or load from torch's extension cache) the first DeepSpeed op the ranks load:
    FusedAdam on a GPU, the shared-memory all-reduce on CPU ranks. The driver runs this in the
    background from its start (nvcc on the CPU cores while the first steps use the GPU); the
    pretrain step waits for it and reports the time."""
    t0 = time.perf_counter()
    res = {"ok": False}
    try:
        # No TORCH_CUDA_ARCH_LIST: DeepSpeed's JIT builder then compiles for the visible GPU's
        # architecture, exactly as the ranks' builder will, so they find this build in the cache.
        from gigamim.train.engines.deepspeed import arch_list_for_deepspeed

        res["arch_list"] = {"was": os.environ.get("TORCH_CUDA_ARCH_LIST"), "fix": arch_list_for_deepspeed()}
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        builder = accel.create_op_builder("FusedAdamBuilder" if accel.device_name() == "cuda" else "ShareMemCommBuilder")
        builder.load()
        res = {**res, "ok": True, "op": builder.name, "accelerator": accel.device_name(), "max_jobs": os.environ.get("MAX_JOBS")}
    except Exception as e:  # noqa: BLE001  (the pretrain step reports it)
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:1000]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)
    write_json_atomic(Path(out_json), res)
    return 0 if res["ok"] else 1


# --------------------------------------------------------------------------- inside a step


class Ctx:
    """What a step function gets: device, folders, its deadline, and a result it saves as it goes."""

    def __init__(self, name: str, work: Path, dry: bool, deadline: float):
        import torch

        self.name, self.dry, self.deadline = name, dry, deadline
        self.results, self.scratch = work / "results", work / "scratch"
        self.device = torch.device("cpu" if dry else "cuda")
        self.res = {"step": name, "mode": "cpu-dry-run" if dry else "gpu", "status": "running", "checks": {},
                    "headline": [], "result": {}}

    @property
    def r(self) -> dict:
        return self.res["result"]

    def left(self) -> float:
        return self.deadline - time.time()

    def check(self, name: str, ok, detail: str = "") -> None:
        self.res["checks"][name] = {"ok": bool(ok), "detail": detail}

    def gpu_only(self, name: str, ok_fn, detail_fn=lambda: "") -> None:
        """A check that only a GPU can answer: evaluated there, reported as skipped on cpu."""
        if self.dry:
            self.res["checks"][name] = {"ok": None, "skipped": "on cpu"}
        else:
            self.check(name, ok_fn(), detail_fn())

    def skip(self, name: str, reason: str) -> None:
        self.res["checks"][name] = {"ok": None, "skipped": reason}

    def say(self, line: str) -> None:
        self.res["headline"].append(line)
        print(line, flush=True)

    def save(self) -> None:
        write_json_atomic(self.results / f"{self.name}.json", self.res)

    def finish(self) -> None:
        failed = any(c["ok"] is False for c in self.res["checks"].values())
        self.res["status"] = "failed" if failed else "ok"
        self.save()

    def earlier(self, step: str) -> dict:
        return read_json(self.results / f"{step}.json").get("result", {})

    def sizes(self) -> tuple:
        return ("swinv2_nano",) if self.dry else GPU_SIZES

    def geometry(self, name: str) -> dict:
        """img_size (and window) of the size runs: 192 px on the GPU, 64 px in the dry run."""
        return dict(img_size=64, window_size=4) if self.dry else dict(img_size=192, window_size=None)


def _short(name: str) -> str:
    return name.replace("swinv2_", "")


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _within(err: float, ref_err: float, factor: float = 3.0, floor: float = 1e-3) -> bool:
    """bf16 error bound relative to the explicit-bf16 path's own error against fp32."""
    return err <= max(factor * ref_err, floor)


def _recipe_checkpointing(name: str):
    if name not in RECIPES:
        return False
    from gigamim.config import load_config

    return load_config(RECIPES[name]).model.grad_checkpointing


def _oom(e: BaseException | str) -> bool:
    return "out of memory" in str(e).lower()


# --- env


def step_env(ctx: Ctx) -> None:
    import importlib
    import shutil

    import torch

    from .common import machine_info, versions

    mods = {}
    site = os.environ.get("GIGAMIM_SITE", "/tmp/gigamim_site")
    for mod in ("torch", "triton", "timm", "deepspeed", "webdataset", "pydantic", "hjson", "numpy", "torchvision",
                "gigamim"):
        t = time.perf_counter()
        try:
            m = importlib.import_module(mod)
            mods[mod] = {"version": getattr(m, "__version__", None), "import_s": round(time.perf_counter() - t, 2),
                         "carried": str(getattr(m, "__file__", "")).startswith(site), "file": getattr(m, "__file__", None)}
        except Exception as e:  # noqa: BLE001  (report every missing package, not the first)
            mods[mod] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ctx.r.update(modules=mods, machine=machine_info(), versions=versions(), python=sys.version,
                 executable=sys.executable, nvcc=shutil.which("nvcc"), pythonpath=os.environ.get("PYTHONPATH"),
                 cuda_env={k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "MAX_JOBS")})
    for mod in ("torch", "deepspeed", "webdataset", "timm", "pydantic", "gigamim"):
        ctx.check(f"import_{mod}", "error" not in mods[mod], mods[mod].get("error", ""))
    if "error" not in mods["timm"]:
        from packaging.version import Version

        ctx.check("timm_at_least_1.0.31", Version(mods["timm"]["version"]) >= Version("1.0.31"), mods["timm"]["version"])
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            ctx.r["nvidia_smi"] = (p.stdout + p.stderr).strip()
        except subprocess.TimeoutExpired:
            ctx.r["nvidia_smi"] = "timed out after 20 s"
    else:
        ctx.r["nvidia_smi"] = "not on PATH"
    cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        p = torch.cuda.get_device_properties(0)
        cuda.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count, count=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version(),
                    sdp={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: None)() for k in
                         ("flash", "mem_efficient", "cudnn", "math")})
    ctx.r["cuda"] = cuda
    ctx.gpu_only("cuda_available", lambda: cuda["available"], lambda: str(cuda))
    dev = (f"{cuda['name']} (sm {cuda['capability']}, {cuda['memory_gib']} GiB, {cuda['sms']} SMs)" if cuda["available"]
           else f"cpu ({os.cpu_count()} cores)")
    ctx.say(dev)
    vers = " ".join(f"{m} {mods[m].get('version', 'MISSING')}{' (carried)' if mods[m].get('carried') else ''}"
                    for m in ("torch", "triton", "deepspeed", "timm", "webdataset", "pydantic"))
    ctx.say(f"python {sys.version.split()[0]}; {vers}")
    ctx.say(f"nvidia-smi: {ctx.r['nvidia_smi'][:150]}")


# --- attention


def step_attention(ctx: Ctx) -> None:
    from contextlib import nullcontext

    import torch

    from gigamim.models import SimMIM, create_model
    from tests.helpers.randomize import randomize_weights

    dev = ctx.device
    if dev.type == "cuda":
        # The fp32 reference must be fp32: no TF32 in matmuls or in the patch-embedding conv.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name, batch = ("swinv2_nano", 2) if ctx.dry else ("swinv2_base", 8)
    geo = ctx.geometry(name)
    kw = dict(img_size=geo["img_size"], depths=(2, 2, 2, 2), drop_path_rate=0.0)
    if geo["window_size"]:
        kw["window_size"] = geo["window_size"]
    s = geo["img_size"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, s, s, generator=gen).to(dev)
    mask = (torch.rand(batch, s // 4, s // 4, generator=gen) > 0.4).to(dev)

    def build(impl):
        with torch.device(dev):
            return SimMIM(create_model(name, attn_impl=impl, **kw)).train()

    # Tame random weights (tests/helpers/randomize.py): every branch matters, and bf16 stays
    # comparable with fp32 (logit scales up to 100 would make correct bf16 gradients chaotic).
    base = randomize_weights(build("explicit"), seed=1, tame=True)
    state = base.state_dict()

    def run(m, prec, backward=True):
        m.zero_grad(set_to_none=True)
        ac = torch.autocast(dev.type, dtype=torch.bfloat16) if prec == "bf16" else nullcontext()
        t = time.perf_counter()
        with ac, torch.set_grad_enabled(backward):
            loss = m(x, mask)
        if not backward:
            return loss.detach().double(), None, time.perf_counter() - t
        loss.backward()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in m.parameters()])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach().double(), g, time.perf_counter() - t

    ref_loss, ref_grad, _ = run(base, "fp32")
    nonzero = float((ref_grad != 0).double().mean())
    ctx.r.update(model=name, batch=batch, kw={k: v for k, v in kw.items()}, ref_loss=float(ref_loss),
                 ref_nonzero_grad_fraction=nonzero, paths={})
    ctx.check("weights_make_every_branch_matter", nonzero > 0.9, f"non-zero gradient fraction {nonzero:.3f}")
    ref_err = None
    models = {"explicit": base}
    # SDPA (the GPU default) and its backend before flex, whose first calls compile kernels.
    order = [("explicit", "bf16"), ("sdpa", "bf16"), ("sdpa", "fp32"), ("backend", None), ("flex", "bf16"),
             ("flex", "fp32")]
    for impl, prec in order:
        if impl == "backend":
            ctx.r["sdpa_backend"] = _sdpa_backend(ctx, models.get("sdpa"), lambda m: run(m, "bf16"))
            ctx.save()
            continue
        key = f"{impl}_{prec}"
        if ctx.left() < (25 if impl == "flex" else 8):
            ctx.skip(key, f"not started: {ctx.left():.0f} s left")
            continue
        if impl not in models:
            models[impl] = build(impl)
            models[impl].load_state_dict(state)
        m = models[impl]
        # CPU has no flex backward (torch raises; gigamim then runs the explicit core), so
        # on the CPU the flex path is checked in forward only.
        backward = not (impl == "flex" and dev.type == "cpu")
        try:
            loss, grad, secs = run(m, prec, backward)
        except Exception as e:  # noqa: BLE001  (one path failing must not hide the others)
            ctx.r["paths"][key] = {"error": f"{type(e).__name__}: {e}"[:600]}
            ctx.check(key, False, ctx.r["paths"][key]["error"])
            ctx.save()
            continue
        row = {"loss_rel": abs(float((loss - ref_loss) / ref_loss)), "seconds_first_call": secs}
        if grad is not None:
            row.update(grad_rel=_rel(grad, ref_grad),
                       grad_cos=float(torch.nn.functional.cosine_similarity(grad.double(), ref_grad.double(), dim=0)))
        ctx.r["paths"][key] = row
        if key == "explicit_bf16":
            ref_err = row
            ctx.check(key, row["grad_cos"] > 0.99, f"explicit bf16 vs fp32: grad cosine {row['grad_cos']:.4f}")
        elif prec == "bf16":
            # Without an explicit-bf16 figure (it failed) only the floors remain as bounds.
            ref = ref_err if ref_err and "grad_rel" in ref_err else {"loss_rel": 0.0, "grad_rel": 0.0}
            ok = _within(row["loss_rel"], ref["loss_rel"], floor=4e-3)
            if grad is not None:
                ok = ok and _within(row["grad_rel"], ref["grad_rel"], floor=1e-2)
            ctx.check(key, ok, f"{row} vs explicit_bf16 {ref_err}")
        else:  # fp32, TF32 off: same maths in another order
            ok = row["loss_rel"] <= 1e-4 and (grad is None or row["grad_rel"] <= 1e-3)
            ctx.check(key, ok, str(row))
        if grad is None:
            ctx.skip(f"{key}_backward", "on cpu: torch has no flex backward there (the explicit core trains)")
        ctx.save()
    p = ctx.r["paths"]

    def fmt(k):
        v = p.get(k)
        if not v:
            return f"{k} -"
        if "error" in v:
            return f"{k} ERROR"
        return f"{k} {v['loss_rel']:.1e}/{v['grad_rel']:.1e}" if "grad_rel" in v else f"{k} {v['loss_rel']:.1e}/fwd-only"

    ctx.say(f"{name} b{batch}, tame weights; loss_rel/grad_rel vs fp32 explicit:")
    ctx.say(", ".join(fmt(k) for k in ("explicit_bf16", "sdpa_bf16", "flex_bf16")))
    ctx.say(", ".join(fmt(k) for k in ("sdpa_fp32", "flex_fp32")))
    sb = ctx.r.get("sdpa_backend", {})
    ctx.say(f"sdpa backend: {sb.get('summary', sb.get('skipped'))}")


def _sdpa_backend(ctx: Ctx, model, run) -> dict:
    """Which SDPA kernel trained: fused-only selection must work, and the profiler's op names
    must show a fused kernel (never the math path)."""
    if ctx.dry:
        ctx.skip("sdpa_fused_backend", "on cpu: no fused SDPA kernels (the math path runs)")
        return {"skipped": "on cpu"}
    if model is None or ctx.left() < 5:
        ctx.skip("sdpa_fused_backend", "sdpa model not built (time)")
        return {"skipped": "not run"}
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    out = {}
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            run(model)
        out["fused_only_runs"] = True
    except RuntimeError as e:  # "No available kernel": only the math path would take these inputs
        out["fused_only_runs"], out["fused_only_error"] = False, str(e)[:500]
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(model)
            torch.cuda.synchronize()
        keys = sorted({e.key for e in prof.key_averages()})
    except Exception as e:  # noqa: BLE001  (the restricted run above still answers)
        out["profiler_error"] = f"{type(e).__name__}: {e}"[:300]
        keys = []
    out["aten_ops"] = [k for k in keys if "scaled_dot_product" in k]
    out["kernels"] = [k for k in keys if any(w in k.lower() for w in ("fmha", "flash", "attention", "sdpa", "cudnn"))
                      and not k.startswith("aten::")][:12]
    fused = [k for k in out["aten_ops"] if any(w in k for w in ("efficient", "flash", "cudnn"))]
    math = [k for k in out["aten_ops"] if "math" in k]
    out["summary"] = (f"{', '.join(fused) or 'NO fused op seen'}{'; math path too: ' + ', '.join(math) if math else ''}"
                      f"; fused-only selection {'runs' if out['fused_only_runs'] else 'FAILS'}")
    ctx.check("sdpa_fused_backend", out["fused_only_runs"] and fused and not math, out["summary"])
    return out


# --- kernels


def step_kernels(ctx: Ctx) -> None:
    # Forced: the default (auto) is torch, and this step measures the Triton kernels against it.
    os.environ["GIGAMIM_KERNELS"] = "triton"
    if ctx.dry:
        # The same Triton kernels through Triton's CPU interpreter (set before triton is imported).
        os.environ["TRITON_INTERPRET"] = "1"
    from . import gpu_check

    path = ctx.results / "kernels.json"
    argv = ["--out", str(path)] + (["--device", "cpu", "--tiny"] if ctx.dry else ["--quick"])
    rc = gpu_check.main(argv)
    rows = read_json(path).get("rows", [])
    checks = [r for r in rows if r.get("check") != "bench"]
    bad = [f"{r['check']} {r.get('shape', '')} {r.get('dtype', '')}: {r['errs']}" for r in checks if not r["ok"]]
    impls = sorted({r.get("impl") for r in checks})
    ctx.r.update(exit_code=rc, impls=impls, checks=len(checks), failed=bad)
    ctx.check("kernels_vs_float64", rc == 0 and not bad and checks, "; ".join(bad)[:500])
    ctx.check("triton_ran", impls == ["triton"], f"dispatched to {impls}" + (" (interpreter)" if ctx.dry else ""))
    worst = {}
    for r in checks:
        for k, v in r["errs"].items():
            key = f"{r['check']} {r.get('dtype', 'float32').replace('torch.', '')}"
            worst[key] = max(worst.get(key, 0.0), v)
    ctx.say(f"{len(checks) - len(bad)}/{len(checks)} checks ok, impl {','.join(map(str, impls))}; worst rel err: "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    bench = [r for r in rows if r.get("check") == "bench"]
    ctx.r["bench"] = bench
    ctx.say("residual_post_norm fwd+bwd speedup vs torch: " + (", ".join(
        f"{tuple(r['shape'])} {r['dtype']} x{r['speedup_fwd_bwd']:.2f}" for r in bench if r.get("speedup_fwd_bwd"))
        or "- (timed on a GPU only)"))


# --- throughput


def _plan(ctx: Ctx, name: str, mb: int | None, ckpt, attn: str) -> dict:
    """`gigamim plan`'s figures for one GPU with this device's memory: ZeRO-1 row (on one GPU
    the same states as plain mixed-precision AdamW: 16 B/param), this attention path."""
    import torch

    from gigamim.tools.plan import make_plan

    geo = ctx.geometry(name)
    mem_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if not ctx.dry else 16.0
    plan = make_plan(name, 1, mem_gib, geo["img_size"], micro_batch=mb, window_size=geo["window_size"])
    key = ("fused" if attn == "sdpa" else "explicit") + ("+ckpt" if ckpt else "")
    row = next(r for r in plan["rows"] if r["zero_stage"] == 1 and not r["offload"] and r["activations"] == key)
    out = {"activations": key, "gpu_mem_gib": mem_gib, "budget_gib": plan["budget_gb"], "params": plan["params"],
           "max_micro_batch": row["max_micro_batch"], "states_gib": row["model_states_gb"],
           "per_image_gib": plan["activations_per_image"][key]["per_image_gb"]}
    if mb:
        out["peak_gib_at_mb"] = row["mem_at_micro_batch_gb"]
        out["fits_at_mb"] = row["fits_micro_batch"]
    if ckpt not in (True, False):
        out["note"] = f"recipe checkpoints every {ckpt}th block; the plan row is for every block"
    return out


def step_throughput(ctx: Ctx) -> None:
    import torch

    from gigamim.train.metrics import device_peak_tflops

    from .common import cpu_matmul_peak_tflops, machine_info, versions
    from .report import write_report
    from .train_step import Case, run_group

    dev = ctx.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `gigamim bench` runs: fp32 leftovers in TF32
        torch.backends.cudnn.allow_tf32 = True
        peak, src = device_peak_tflops(dev, "bf16"), "gigamim.train.metrics.PEAK_TFLOPS (bf16 dense)"
    else:
        peak, src = cpu_matmul_peak_tflops(n=512, repeats=3), "fp32 torch.mm 512^3 measured (cpu)"
    ctx.r.update(peak_tflops=peak, peak_source=src, sizes={})
    est = {"swinv2_base": 15, "swinv2_large": 20, "swinv2_huge": 25, "swinv2_giant": 45, "swinv2_nano": 5}
    results = []
    for name in ctx.sizes():
        if ctx.left() < est[name]:
            ctx.skip(f"{_short(name)}_ran", f"not started: {ctx.left():.0f} s left")
            continue
        ckpt = _recipe_checkpointing(name)
        geo = ctx.geometry(name)
        attn = "sdpa" if dev.type == "cuda" else "explicit"
        plan = _plan(ctx, name, None, ckpt, attn)
        mb = 2 if ctx.dry else plan["max_micro_batch"]
        entry = {"planner_micro_batch": plan["max_micro_batch"], "checkpointing": ckpt, "attempts": []}
        res = None
        for attempt in range(2):
            case = Case(name=f"gpu_{_short(name)}_{geo['img_size']}_b{mb}", group="gpu_sizes", model=name,
                        img_size=geo["img_size"], window_size=geo["window_size"], batch=mb, precision="bf16",
                        steps=2 if ctx.dry else 4, warmup=1 if ctx.dry else 2, checkpointing=ckpt)
            res = run_group([case], dev, peak, src)[0]
            entry["attempts"].append({"micro_batch": mb, "error": res.get("error")})
            if "error" in res and _oom(res["error"]) and attempt == 0:
                mb = max(1, int(mb * 0.7))  # the planner's figure did not fit: measure below it
                continue
            break
        entry["result"] = res
        if "error" not in res:
            entry["plan"] = p = _plan(ctx, name, mb, ckpt, attn)
            cache = 2 * res["params"]  # autocast's bf16 copies of the weights, held through backward
            pred = p["peak_gib_at_mb"] + cache / 2**30
            entry["memory"] = {"measured_peak_gib": res.get("peak_mem_gb"), "plan_peak_gib": p["peak_gib_at_mb"],
                               "autocast_weight_cache_gib": cache / 2**30, "predicted_peak_gib": pred,
                               "measured_over_predicted": (res["peak_mem_gb"] / pred) if res.get("peak_mem_gb") else None,
                               "how": "predicted = plan (16 B/param states + activations at this micro-batch) + "
                                      "2 B/param bf16 weight copies autocast keeps; measured = max_memory_allocated"}
            results.append(res)
        ctx.r["sizes"][name] = entry
        _throughput_checks(ctx, name, entry)
        ctx.save()
    if results:
        try:
            meta = {"profile": "gpu_smoke throughput", "command": "python -m gigamim_benchmarks.gpu_smoke --step throughput",
                    "machine": machine_info(), "versions": versions(), "wall_s": None}
            (ctx.results / "throughput").mkdir(exist_ok=True)
            write_report(ctx.results / "throughput", results, meta, None)
        except Exception as e:  # noqa: BLE001  (the numbers are in the JSON already)
            ctx.r["report_error"] = f"{type(e).__name__}: {e}"
    ctx.save()


def _throughput_checks(ctx: Ctx, name: str, entry: dict) -> None:
    s, res = _short(name), entry["result"]
    if "error" in res:
        ctx.check(f"{s}_ran", False, res["error"][:300])
        ctx.say(f"{s}: FAILED {res['error'][:150]}")
        return
    ctx.check(f"{s}_ran", True)
    mem = entry["memory"]
    ratio = mem["measured_over_predicted"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    ctx.gpu_only(f"{s}_planner_micro_batch_fits", lambda: len(entry["attempts"]) == 1,
                 lambda: f"planner {entry['planner_micro_batch']} -> ran at {res['case']['batch']}")
    ctx.gpu_only(f"{s}_mfu_at_least_20pct", lambda: (res.get("mfu") or 0) >= 0.20, lambda: f"mfu {res.get('mfu')}")
    ctx.gpu_only(f"{s}_peak_within_15pct_of_plan", lambda: ratio is not None and abs(ratio - 1) <= 0.15,
                 lambda: f"measured/predicted {ratio}")
    ctx.say(f"{s} b{res['case']['batch']}{' ckpt' if entry['checkpointing'] else ''}: "
            f"{fmt(res.get('images_per_sec'), '.1f')} img/s, MFU {fmt(res.get('mfu'), '.1%')}, peak "
            f"{fmt(mem['measured_peak_gib'], '.2f')} GiB vs plan+cache {fmt(mem['predicted_peak_gib'], '.2f')} "
            f"(x{fmt(ratio, '.2f')})")


# --- pretrain


def _pretrain_sets(ctx: Ctx, shards: Path, ck: Path, log: Path) -> tuple[str, list[str], int, int]:
    if ctx.dry:
        cfg, steps, every = "demo", 4, 2
        sets = ["model.img_size=96", "train.micro_batch_size=4", "train.global_batch_size=4", "data.num_workers=1",
                "data.shuffle_buffer=16", "optim.warmup_steps=2", "deepspeed.config=cpu"]
    else:
        cfg, steps, every = "simmim_swinv2_base_192", 30, 15
        sets = ["train.micro_batch_size=32", "train.global_batch_size=32", "data.num_workers=6",
                "data.shuffle_buffer=256", "optim.warmup_steps=5", "deepspeed.config=zero3_bf16"]
    sets += [f"data.shards={shards}", f"train.max_steps={steps}", f"checkpoint.every_steps={every}",
             "checkpoint.keep_last=2", f"checkpoint.dir={ck}", f"log.dir={log}", "log.every_steps=1",
             "log.tensorboard=false", "log.progress_bar=false", "log.image_every_steps=0", "log.num_images=2"]
    args = ["pretrain", "--config", cfg]
    for s in sets:
        args += ["--set", s]
    return cfg, args, steps, every


def _make_shards(ctx: Ctx, py: str, env: dict, log: Path) -> Path | None:
    """Synthetic JPEG shards through the verb (`gigamim make-shards --synthetic N`), shared
    by the pretrain and data steps."""
    folder = ctx.scratch / "shards"
    if (folder / "index.json").exists():
        return folder / "index.json"
    n, size, per = (64, 112, 16) if ctx.dry else (8192, 256, 512)
    workers = 1 if ctx.dry else max(1, min(12, (os.cpu_count() or 2) - 2))
    rc, wall = run_command([py, "-m", "gigamim", "make-shards", "--synthetic", n, "--image-size", size, "--max-count",
                            per, "--workers", workers, "--no-progress", folder], min(120, ctx.left()), log, env)
    ctx.r["shards"] = {"images": n, "image_size": size, "exit": rc, "seconds": round(wall, 1)}
    ok = rc == 0 and (folder / "index.json").exists()
    ctx.check("make_shards", ok, f"exit {rc}")
    return folder / "index.json" if ok else None


def _deepspeed_config(ctx: Ctx, verb_args: list[str]) -> dict:
    """What the ranks hand DeepSpeed, from gigamim's own builder and the same arguments. DeepSpeed
    0.19 logs nothing below WARNING, so its optimizer choice is read from its rule: AdamW on CUDA
    without torch_adam and without offload is FusedAdam (the op the build above made)."""
    from gigamim.config import load_config
    from gigamim.train.engines.deepspeed import build_ds_config, offloads_optimizer, zero_stage

    sets = [verb_args[i + 1] for i, a in enumerate(verb_args) if a == "--set"]
    cfg = load_config(verb_args[verb_args.index("--config") + 1], sets)
    ds = build_ds_config(cfg, 1, on_gpu=not ctx.dry, peak_lr=1.0)
    torch_adam = ds["optimizer"]["params"].get("torch_adam", False)
    optimizer = ("DeepSpeedCPUAdam" if offloads_optimizer(ds) else "torch AdamW" if torch_adam or ctx.dry
                 else "FusedAdam")
    precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
    out = {"template": cfg.deepspeed.config, "zero_stage": zero_stage(ds), "precision": precision, "optimizer": optimizer}
    want = ("cpu", 3, "fp32") if ctx.dry else ("zero3_bf16", 3, "bf16")
    ctx.check("deepspeed_config", (out["template"], out["zero_stage"], precision) == want, str(out))
    return out


def _wait_for_jit_op(ctx: Ctx) -> dict | None:
    """The background build's result (see build_jit_op); None if it is still running when the
    runs must start, or was not started (--only without pretrain first)."""
    path = ctx.results / "jit_op.json"
    until = time.time() + max(0.0, ctx.left() - (60 if ctx.dry else 100))
    while not path.exists() and time.time() < until and (ctx.results / "jit_op_build.log").exists():
        time.sleep(1.0)
    res = read_json(path) or None
    ctx.r["jit_op"] = res or {"still_building": (ctx.results / "jit_op_build.log").exists()}
    op = (res or {}).get("op", "fused_adam" if not ctx.dry else "deepspeed_shm_comm")
    if res is None:
        ctx.check(f"{op}_build", False, "not finished when the runs had to start (see jit_op_build.log)")
    else:
        ctx.check(f"{op}_build", res["ok"], f"{res.get('error', 'ok')} after {res['seconds']} s (jit_op_build.log)")
    ctx.say(f"JIT build of {op}: {'ok' if res and res['ok'] else 'FAILED' if res else 'not finished'}"
            + (f" in {res['seconds']:.0f} s (in the background, from the start of the run)" if res else ""))
    ctx.save()
    return res


def step_pretrain(ctx: Ctx) -> None:
    import shutil

    from gigamim.checkpoint.layout import tag_for
    from gigamim.train.metrics import read_metrics

    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    work = ctx.scratch / "pretrain"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = ctx.results / "pretrain_commands.log"
    if ctx.dry:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        ctx.skip("fused_adam_build", "on cpu: FusedAdam is a CUDA op (the cpu template trains with torch's AdamW; "
                                     "the CPU ranks' shared-memory op is built in its place)")
    build = _wait_for_jit_op(ctx)
    if build is not None and not build.get("ok"):
        # Each run would try the same build again and fail the same way. (Still building is
        # different: the first run waits on torch's build lock and loads the result.)
        ctx.say("pretrain runs not started: the JIT op build failed (jit_op_build.log)")
        return
    shards = _make_shards(ctx, py, env, log)
    if shards is None:
        ctx.say("make-shards failed: no pretrain")
        return
    ck = work / "ck"
    cfg, args_a, steps, every = _pretrain_sets(ctx, shards, ck, work / "log_a")
    ctx.r["deepspeed"] = ds = _deepspeed_config(ctx, args_a)
    launch = [py, "-m", "gigamim", "launch", "--nproc-per-node", "1"]
    # Run A saves twice and may finish a JIT build; run B saves once.
    rc_a, wall_a = run_command(launch + args_a, max(20.0, 0.55 * (ctx.left() - 5)), ctx.results / "pretrain_run_a.log",
                               env)
    metrics_a = work / "log_a" / "metrics.jsonl"
    ma = read_metrics(metrics_a) if metrics_a.exists() else []
    tags = sorted(p.name for p in ck.glob("step_*")) if ck.exists() else []
    ctx.r["run_a"] = {"config": cfg, "exit": rc_a, "seconds": round(wall_a, 1), "steps_logged": len(ma), "tags": tags,
                      "command": " ".join(map(str, launch + args_a))}
    ctx.check("run_a", rc_a == 0 and len(ma) == steps, f"exit {rc_a}, {len(ma)}/{steps} steps logged")
    ctx.check("saved", {tag_for(every), tag_for(steps)} <= set(tags), f"tags {tags}")
    ctx.save()
    if rc_a != 0 or not (ck / tag_for(steps)).is_dir():
        ctx.say(f"run A failed (exit {rc_a}, {len(ma)} steps): see pretrain_run_a.log")
        return
    # As if the run had been killed before its last save: the step-`steps` tag is gone (moved
    # away), so `latest` names a missing tag and --resume auto must fall back to step `every`.
    shutil.move(str(ck / tag_for(steps)), str(work / "taken_away"))
    _, args_b, _, _ = _pretrain_sets(ctx, shards, ck, work / "log_b")
    rc_b, wall_b = run_command(launch + args_b + ["--resume", "auto"], max(20.0, ctx.left() - 5),
                               ctx.results / "pretrain_run_b.log", env)
    metrics_b = work / "log_b" / "metrics.jsonl"
    mb = read_metrics(metrics_b) if metrics_b.exists() else []
    la = {r["step"]: r["loss"] for r in ma}
    lb = {r["step"]: r["loss"] for r in mb}
    want = list(range(every + 1, steps + 1))
    rel = {s: abs(lb[s] - la[s]) / max(abs(la[s]), 1e-12) for s in want if s in lb and s in la}
    first = rel.get(every + 1)
    worst = max(rel.values()) if rel else None
    ctx.r["run_b"] = {"exit": rc_b, "seconds": round(wall_b, 1), "steps_logged": sorted(lb),
                      "loss_rel_diff": rel, "first_resumed_rel": first, "max_rel": worst}
    ctx.check("resumed_from_save", rc_b == 0 and sorted(lb) == want, f"exit {rc_b}, steps {sorted(lb)[:3]}..")
    # CPU fp32 is deterministic: exactly equal. On the GPU the first resumed step repeats a
    # deterministic forward on the same weights and batch; later ones may drift by the
    # non-deterministic atomics of attention backward kernels (tiny, but not zero).
    bound_first, bound_all = (0.0, 0.0) if ctx.dry else (1e-5, 2e-2)
    ctx.check("losses_equal_after_resume", first is not None and first <= bound_first and worst <= bound_all,
              f"first resumed step rel {first}, max rel {worst}")
    later = [r["images_per_sec"] for r in ma[min(5, len(ma) - 1):] if r.get("images_per_sec")]
    ips = sorted(later)[len(later) // 2] if later else None
    peak = max((r.get("peak_mem_gb") or 0) for r in ma) if ma else None
    ctx.r.update(images_per_sec_median=ips, peak_mem_gb=peak)
    for png in (work / "log_b").rglob("*.png"):
        shutil.copy(png, ctx.results / f"pretrain_{png.name}")
        break
    ctx.say(f"{cfg} on 1 {'GPU' if not ctx.dry else 'CPU rank'}, ZeRO-{ds['zero_stage']} {ds['precision']} "
            f"{ds['optimizer']}: {len(ma)} steps in {wall_a:.0f} s, {ips or 0:.1f} img/s, peak {peak or 0:.2f} GB")
    ctx.say(f"--resume auto from {tag_for(every)}: steps {every + 1}..{steps} in {wall_b:.0f} s, loss rel diff "
            f"first {first}, max {worst}")


# --- data


def step_data(ctx: Ctx) -> None:
    import torch

    from gigamim.data.loader import SimMIMLoader
    from gigamim.data.transforms import normalize_on_device

    dev = ctx.device
    env = dict(os.environ)
    shards = _make_shards(ctx, sys.executable, env, ctx.results / "data_commands.log")
    if shards is None:
        return
    mb, workers, img = (4, 1, 64) if ctx.dry else (128, max(1, min(12, (os.cpu_count() or 2) - 2)), 192)
    pin = dev.type == "cuda"
    loader = SimMIMLoader(str(shards), mb, num_workers=workers, img_size=img, seed=0, pin_memory=pin)
    n = len(loader)  # one epoch: a new epoch restarts the workers, which is not steady state
    # The workers' first batches are decoded while the first one is awaited: timing starts after
    # them (2 per worker, the prefetch), so the rate is the steady one.
    skip = min(max(1, n // 2), 2 * workers)
    measure = min(20.0, max(2.0, ctx.left() - 10))
    it = iter(loader)
    t0 = time.perf_counter()
    t_first = t_start = None
    images, pinned = 0, []
    for i in range(n):
        b = next(it)
        pinned.append(b["image"].is_pinned() if pin else False)
        x = normalize_on_device(b["image"], dev, dtype=torch.bfloat16)
        m = b["mask"].to(dev, non_blocking=True)
        if i == 0:
            t_first = time.perf_counter()
        if i == skip - 1:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        elif i >= skip:
            images += x.shape[0]
            if time.perf_counter() - t_start > measure:
                break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    it.close()
    del it, x, m
    first = t_first
    ips = images / wall if wall > 0 and images else None
    tp = ctx.earlier("throughput").get("sizes", {})
    model = "swinv2_nano" if ctx.dry else "swinv2_base"
    model_ips = ((tp.get(model) or {}).get("result") or {}).get("images_per_sec")
    pre = ctx.earlier("pretrain").get("images_per_sec_median")
    ctx.r.update(micro_batch=mb, workers=workers, img_size=img, pin_memory=pin, batches_per_epoch=n,
                 first_batch_s=first - t0, batches_skipped=skip, images=images, seconds=wall, images_per_sec=ips,
                 all_batches_pinned=all(pinned) if pin else None, model=model, model_images_per_sec=model_ips,
                 pretrain_images_per_sec=pre, ratio=(ips / model_ips) if ips and model_ips else None)
    ctx.check("loader_ran", images > 0, f"{images} images")
    ctx.gpu_only("batches_pinned", lambda: all(pinned), lambda: f"{sum(pinned)}/{len(pinned)} pinned")
    ctx.gpu_only("loader_feeds_model", lambda: bool(ctx.r["ratio"]) and ctx.r["ratio"] >= 1.0,
                 lambda: f"loader {ips} img/s vs {model} {model_ips} img/s")
    ctx.say(f"{workers} workers, mb {mb}, {img} px, pin_memory={pin}: {ips or 0:.0f} img/s into the "
            f"{dev.type} (first batch {first - t0:.1f} s)")
    ctx.say(f"vs {_short(model)} train step {model_ips or 0:.0f} img/s (x{ctx.r['ratio'] or 0:.2f}); "
            f"pretrain {pre or 0:.0f} img/s")


# --- max_batch


def step_max_batch(ctx: Ctx) -> None:
    import gc

    import torch

    from .memory import step_peak_bytes
    from .train_step import Case, StepRunner

    dev = ctx.device
    tp = ctx.earlier("throughput").get("sizes", {})
    sizes = ctx.sizes()
    ctx.r["sizes"] = {}
    if ctx.dry:
        ctx.skip("oom_handling", "on cpu: no OOM; a byte cap on the measured peak stands in for the GPU's memory")
    for i, name in enumerate(sizes):
        share = ctx.left() / (len(sizes) - i)
        if share < (3 if ctx.dry else 12):
            ctx.skip(f"{_short(name)}_searched", f"not started: {ctx.left():.0f} s left")
            continue
        t_end = time.time() + share
        ckpt = _recipe_checkpointing(name)
        geo = ctx.geometry(name)
        attn = "sdpa" if dev.type == "cuda" else "explicit"
        plan = _plan(ctx, name, None, ckpt, attn)
        prior = (tp.get(name) or {}).get("attempts") or []
        start = prior[-1]["micro_batch"] if prior and not prior[-1].get("error") else plan["max_micro_batch"]
        if ctx.dry:
            start = 2
        case = Case(name=f"max_batch_{_short(name)}", group="max_batch", model=name, img_size=geo["img_size"],
                    window_size=geo["window_size"], batch=1, precision="bf16", steps=0, warmup=0, checkpointing=ckpt)
        runner = StepRunner(case, dev)
        s = geo["img_size"]
        cap = None
        probes = []

        def fits(b: int):
            runner.batches = [{"image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=dev),
                               "mask": torch.rand(b, s // 4, s // 4, device=dev) > 0.4}]
            t = time.perf_counter()
            try:
                peak, _ = step_peak_bytes(runner._step, dev, 0)
                ok = cap is None or peak <= cap
            except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS failing to get its workspace
                if not (_oom(e) or "ALLOC_FAILED" in str(e)):
                    raise
                peak, ok = None, False
            runner.opt.zero_grad(set_to_none=True)
            runner.batches = []
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            probes.append({"micro_batch": b, "fits": ok, "peak_gib": peak / 2**30 if peak else None,
                           "seconds": round(time.perf_counter() - t, 2)})
            return ok

        fits(1)  # the optimizer's states exist from here on, as in training
        lo = 1
        if ctx.dry:
            # A cap on the measured peak stands in for the GPU's memory: the peak of 3 images, so
            # the search (4 does not fit, 3 does) ends after 3 probes of the CPU profiler.
            lo = 3 if fits(3) else 1
            cap = probes[-1]["peak_gib"] * 2**30 * 1.001
            start = 4
        # Grow from the planner's figure (or what throughput ran) until OOM, then bisect; stop
        # within 2% or when this size's share of the time is spent (the bracket is reported).
        hi, b = None, max(lo + 1, start)
        grow_cap = max(4 * start, 64)
        while time.time() < t_end and (hi is None or hi - lo > max(1, lo // 50)):
            if fits(b):
                lo = b
            else:
                hi = b
            if hi is None:
                b = 2 * b if ctx.dry else int(1.3 * b) + 1
                if b > grow_cap:
                    break
            else:
                b = (lo + hi) // 2
                if b <= lo:
                    break
        runner = None  # frees the model and its optimizer before the next size
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        entry = {"max_fits": lo, "first_oom": hi, "planner_max": plan["max_micro_batch"], "start": start,
                 "probes": probes, "converged": hi is not None and hi - lo <= max(1, lo // 50),
                 "measured_over_planner": lo / plan["max_micro_batch"] if plan["max_micro_batch"] else None}
        ctx.r["sizes"][name] = entry
        ctx.check(f"{_short(name)}_searched", lo >= 1, f"{len(probes)} probes")
        ctx.gpu_only(f"{_short(name)}_planner_max_fits", lambda: lo >= plan["max_micro_batch"],
                     lambda: f"max fits {lo}, planner {plan['max_micro_batch']}")
        ctx.say(f"{_short(name)}: fits {lo}, OOM at {hi if hi else '?'} "
                f"({'converged' if entry['converged'] else 'bracket, time up'}; planner {plan['max_micro_batch']}, "
                f"x{entry['measured_over_planner'] or 0:.2f}) in {len(probes)} probes")
        ctx.save()


# --- compile


def step_compile(ctx: Ctx) -> None:
    import torch
    from torch._dynamo.utils import counters

    from gigamim.models import create_model
    from gigamim.models.compile import compile_blocks
    from tests.helpers.randomize import randomize_weights

    dev = ctx.device
    # inductor's C++ compile of a block takes minutes on a 2-core CPU: the dry run traces the
    # same graphs through dynamo + AOT autograd and runs them eagerly (aot_eager).
    backend = "aot_eager" if ctx.dry else "inductor"
    if ctx.dry:
        ctx.skip("inductor", "on cpu: aot_eager backend (same dynamo graphs, no code generation)")
    tp = ctx.earlier("throughput").get("sizes", {})
    order = ("swinv2_nano",) if ctx.dry else ("swinv2_base", "swinv2_giant", "swinv2_large", "swinv2_huge")
    ctx.r.update(backend=backend, sizes={})
    for name in order:
        if ctx.left() < (5 if ctx.dry else 20):
            ctx.skip(f"{_short(name)}_compiled", f"not started: {ctx.left():.0f} s left")
            continue
        geo = ctx.geometry(name)
        kw = dict(img_size=geo["img_size"], depths=(2, 2, 2, 2), drop_path_rate=0.0,
                  attn_impl="sdpa" if dev.type == "cuda" else "explicit")
        if geo["window_size"]:
            kw["window_size"] = geo["window_size"]
        with torch.device(dev):
            enc = create_model(name, **kw)
        blk = enc.layers[2].blocks[1]  # the stage where the depth (and the time) is
        del enc
        randomize_weights(blk, seed=1, tame=True)
        blk.train()
        prior = ((tp.get(name) or {}).get("result") or {}).get("case", {}).get("batch")
        b = 2 if ctx.dry else min(prior or 64, 512)
        h, w = blk.resolution
        x = torch.randn(b, h, w, blk.mlp.fc1.in_features, generator=torch.Generator().manual_seed(0)).to(dev)
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dev)

        def fwd_bwd(prec):
            xi = x.clone().requires_grad_(True)
            ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")
            with ac:
                y = blk(xi)
            y.backward(grad_out.to(y.dtype))
            blk.zero_grad(set_to_none=True)
            return y.detach().float(), xi.grad.float()

        def timed(n):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fwd_bwd("bf16")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t) / n

        y32, g32 = fwd_bwd("fp32")
        ye, ge = fwd_bwd("bf16")
        n = 2 if ctx.dry else 10
        eager_s = timed(n)
        graphs0 = counters["stats"]["unique_graphs"]
        breaks0 = sum(counters["graph_break"].values())
        compile_blocks(blk, backend=backend)
        t = time.perf_counter()
        try:
            yc, gc_ = fwd_bwd("bf16")
        except Exception as e:  # noqa: BLE001  (report, next size)
            ctx.r["sizes"][name] = {"error": f"{type(e).__name__}: {e}"[:600]}
            ctx.check(f"{_short(name)}_compiled", False, ctx.r["sizes"][name]["error"])
            ctx.save()
            continue
        compile_s = time.perf_counter() - t
        compiled_s = timed(n)
        errs = {"eager_out": _rel(ye, y32), "eager_grad": _rel(ge, g32), "compiled_out": _rel(yc, y32),
                "compiled_grad": _rel(gc_, g32)}
        entry = {"block": "layers[2].blocks[1]", "micro_batch": b, "input": list(x.shape), "compile_s": compile_s,
                 "eager_step_s": eager_s, "compiled_step_s": compiled_s, "speedup": eager_s / compiled_s,
                 "rel_err_vs_fp32_eager": errs, "graphs": counters["stats"]["unique_graphs"] - graphs0,
                 "graph_breaks": sum(counters["graph_break"].values()) - breaks0}
        ctx.r["sizes"][name] = entry
        s = _short(name)
        ctx.check(f"{s}_compiled", True)
        ctx.check(f"{s}_matches_eager", _within(errs["compiled_out"], errs["eager_out"])
                  and _within(errs["compiled_grad"], errs["eager_grad"]), str(errs))
        ctx.check(f"{s}_one_graph_no_break", entry["graphs"] == 1 and entry["graph_breaks"] == 0,
                  f"{entry['graphs']} graphs, {entry['graph_breaks']} breaks")
        ctx.say(f"{s} block {tuple(x.shape)}: compile {compile_s:.1f} s, eager {eager_s * 1e3:.1f} ms -> "
                f"{compiled_s * 1e3:.1f} ms (x{entry['speedup']:.2f}), {entry['graphs']} graph, "
                f"{entry['graph_breaks']} breaks, out err {errs['compiled_out']:.1e} (eager {errs['eager_out']:.1e})")
        blk = x = grad_out = None  # before the next size's block
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ctx.save()


STEP_FUNCS = {"env": step_env, "attention": step_attention, "kernels": step_kernels, "throughput": step_throughput,
              "pretrain": step_pretrain, "data": step_data, "max_batch": step_max_batch, "compile": step_compile}
STEP_NAMES = tuple(STEP_FUNCS)
