"""Which cases each `--profile` runs. A profile is a list of groups; the cases of a group are
built side by side and their steps alternated (ABAB), so each group's ratios are paired.

smoke  seconds: swinv2_nano at 64 px, every code path of the harness (tests use it).
quick  < 3 min on a 2-core CPU: SwinV2-T 192 px batch 8 vs the reference (train_step_ratio);
       SwinV2-B 512 px batch 1 checkpointing + sequential vs the reference (peak_mem_ratio).
gpu    one H200, < 8 min: SwinV2-B/L/H/G SimMIM steps at 192 px in bf16 (MFU per size), the
       reference for B and L, attention paths and a resolution sweep for B.
compile CPU, ~10 min: eager vs per-block compiled (gigamim and reference), and ZeRO-1 vs
       ZeRO-3 eager/compiled on 2 CPU ranks with collectives counted (the issue-15 numbers).
engines CPU, ~30 min: DeepSpeed ZeRO-3 vs PyTorch FSDP2 on 2 CPU ranks, eager and per-block
       compiled, SwinV2-T and SwinV2-S at 192 px (issue 20): step time (ABAB), bytes per step
       (counted collectives), peak RSS per rank (one short run per variant).
compile_model  CPU, ~10-20 min: eager vs whole-model `torch.compile(model)` (gigamim and
       reference, ABAB), the way a library user compiles (issue 20).
full   CPU, tens of minutes: quick + attention paths, checkpointing, resolution 192->768,
       micro-batch sweep, ZeRO 0/1/2/3 on 2 ranks, the data loader.
"""

from __future__ import annotations

from .train_step import Case


def _pair(group, model, img, batch, *, window=None, steps=3, warmup=1, precision="fp32", attn="auto", **gig):
    """gigamim (best settings unless overridden) and the reference on the same geometry."""
    common = dict(group=group, model=model, img_size=img, window_size=window, batch=batch, steps=steps,
                  warmup=warmup, precision=precision)
    tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
    return [Case(name=f"{group}_{tag}_gigamim", impl="gigamim", attn_impl=attn, **common, **gig),
            Case(name=f"{group}_{tag}_reference", impl="reference", **common)]


def _memory_group(model, img, window, batch, steps, warmup, plain=True, chunk=16, precision="fp32"):
    common = dict(group="memory", model=model, img_size=img, window_size=window, batch=batch, steps=steps,
                  warmup=warmup, precision=precision)
    tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
    cases = [Case(name=f"memory_{tag}_gigamim_ckpt_seq", impl="gigamim", checkpointing=True, sequential=True,
                  attn_impl="auto", attn_chunk=chunk, **common),
             Case(name=f"memory_{tag}_reference", impl="reference", **common)]
    if plain:
        cases.append(Case(name=f"memory_{tag}_gigamim_plain", impl="gigamim", attn_impl="explicit", **common))
    return cases


def smoke():
    return {"groups": [
        _pair("ratio", "swinv2_nano", 64, 2, window=4, steps=2),
        _memory_group("swinv2_nano", 64, 4, 1, steps=1, warmup=1, chunk=4),
    ], "zero": None, "data": None}


def quick():
    return {"groups": [
        _pair("ratio", "swinv2_tiny", 192, 8, steps=3),
        _memory_group("swinv2_base", 512, 16, 1, steps=0, warmup=1, plain=False),
    ], "zero": None, "data": None}


def _attention(model, img, batch, steps, precision="fp32", window=None, with_flex=False):
    """Attention paths side by side. flex only where it trains (CUDA; CPU has no flex backward)."""
    base = dict(group="attention", model=model, img_size=img, batch=batch, steps=steps, precision=precision,
                window_size=window)
    tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
    flex = [Case(name=f"attention_{tag}_flex", attn_impl="flex", **base)] if with_flex else []
    return [Case(name=f"attention_{tag}_explicit", attn_impl="explicit", **base),
            Case(name=f"attention_{tag}_sdpa", attn_impl="sdpa", **base), *flex,
            Case(name=f"attention_{tag}_sequential", attn_impl="explicit", sequential=True, **base),
            Case(name=f"attention_{tag}_reference", impl="reference", **base)]


def _checkpointing(model, img, batch, steps, precision="fp32"):
    base = dict(group="checkpointing", model=model, img_size=img, batch=batch, steps=steps, precision=precision)
    tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
    return [Case(name=f"checkpointing_{tag}_off", **base),
            Case(name=f"checkpointing_{tag}_on", checkpointing=True, **base),
            Case(name=f"checkpointing_{tag}_on_seq", checkpointing=True, sequential=True, **base)]


def _resolution(model, sizes, batch, steps, precision="fp32", with_reference=True, window=12):
    groups = []
    for img in sizes:
        base = dict(group="resolution", model=model, img_size=img, window_size=window, batch=batch, steps=steps,
                    precision=precision)
        tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
        g = [Case(name=f"resolution_{tag}_gigamim", label="gigamim", **base),
             Case(name=f"resolution_{tag}_gigamim_ckpt_seq", label="gigamim ckpt+sequential", checkpointing=True,
                  sequential=True, **base)]
        if with_reference:
            g.append(Case(name=f"resolution_{tag}_reference", label="timm reference", impl="reference", **base))
        groups.append(g)
    return groups


def _micro_batch(model, img, batches, steps, precision="fp32"):
    out = []
    for b in batches:
        base = dict(group="micro_batch", model=model, img_size=img, batch=b, steps=steps, precision=precision)
        tag = f"{model.replace('swinv2_', '')}_{img}_b{b}"
        out.append([Case(name=f"micro_batch_{tag}_gigamim", label="gigamim", **base),
                    Case(name=f"micro_batch_{tag}_reference", label="timm reference", impl="reference", **base)])
    return out


def _compile_group(model, img, batch, steps, warmup=2, precision="fp32", attn="explicit"):
    """Eager vs per-block compiled, gigamim and the timm reference alike, ABAB in one group."""
    base = dict(group="compile", model=model, img_size=img, batch=batch, steps=steps, warmup=warmup,
                precision=precision, memory=False)
    tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
    return [Case(name=f"compile_{tag}_gigamim_eager", impl="gigamim", attn_impl=attn, **base),
            Case(name=f"compile_{tag}_gigamim_compiled", impl="gigamim", attn_impl=attn, compile=True, **base),
            Case(name=f"compile_{tag}_reference_eager", impl="reference", **base),
            Case(name=f"compile_{tag}_reference_compiled", impl="reference", compile=True, **base)]


def _compile_model_group(model, img, batch, steps, warmup=2, precision="fp32", attn="explicit"):
    """Eager vs whole-model ``torch.compile(model)``, gigamim and the timm reference alike, ABAB;
    with both compiled per block beside them (the trainer's way), so one run says whether the
    whole graph still does worse than the blocks compiled one by one."""
    base = dict(group="compile_model", model=model, img_size=img, batch=batch, steps=steps, warmup=warmup,
                precision=precision, memory=False)
    tag = f"{model.replace('swinv2_', '')}_{img}_b{batch}"
    cases = []
    for impl in ("gigamim", "reference"):
        kw = dict(impl=impl, **base) | (dict(attn_impl=attn) if impl == "gigamim" else {})
        cases += [Case(name=f"compile_model_{tag}_{impl}_eager", **kw),
                  Case(name=f"compile_model_{tag}_{impl}_compiled", compile=True, compile_scope="model", **kw),
                  Case(name=f"compile_model_{tag}_{impl}_compiled_blocks", compile=True, compile_scope="blocks", **kw)]
    return cases


def compile_model_profile():
    """CPU: the whole-model compile axis alone (SwinV2-T 192 px batch 8 fp32, both sides eager,
    ``torch.compile(model)`` and compiled per block); the compiles take minutes each on a 2-core
    machine."""
    return {"groups": [_compile_model_group("swinv2_tiny", 192, 8, steps=8)], "zero": None, "data": None}


def compile_profile():
    """CPU, ~10 min: the compile axis (SwinV2-T 192 px batch 8, both sides eager and compiled),
    then the ZeRO x compile axis on 2 CPU ranks (ZeRO-1 vs ZeRO-3, eager vs compiled)."""
    return {"groups": [_compile_group("swinv2_tiny", 192, 8, steps=4)], "zero": None, "data": None,
            "zero_compile": dict(variants=("zero1_eager", "zero3_eager", "zero3_leaf_eager", "zero3_compiled",
                                               "zero3_ckpt_eager", "zero3_ckpt_compiled"),
                                 model="swinv2_tiny", img_size=192, micro_batch=4, warmup=2, steps=4)}


def engines_profile():
    """CPU, ~30 min: ZeRO-3 vs FSDP2 through the engine seam (benchmarks/engine_sweep.py).
    Micro-batch 4 per rank for both models: SwinV2-S's fp32 step at 192 px stays well under
    2 GiB per rank, so the 2 ranks fit a 24 GiB machine shared with other jobs."""
    from .engine_sweep import DEFAULT_VARIANTS

    return {"groups": [], "zero": None, "data": None,
            "engines": dict(models=(("swinv2_tiny", 4), ("swinv2_small", 4)), variants=DEFAULT_VARIANTS,
                            img_size=192, warmup=2, steps=8, memory=True, memory_steps=2)}


def full():
    # Sized for a shared 2-core CPU: the sweeps use small batches (resolution and micro-batch
    # on nano, whose geometry scales the same way); the GPU profile runs them on SwinV2-B.
    groups = quick()["groups"]
    groups += [_attention("swinv2_tiny", 192, 2, 2), _checkpointing("swinv2_tiny", 192, 2, 2)]
    groups += [_compile_group("swinv2_tiny", 192, 8, steps=3)]
    groups += _resolution("swinv2_nano", (192, 384, 768), 1, 2)
    groups += _micro_batch("swinv2_nano", 192, (1, 4, 16), 2)
    return {"groups": groups, "zero": dict(stages=(0, 1, 2, 3), model="swinv2_tiny", img_size=96, micro_batch=4, steps=4),
            "data": dict(num_images=256, repeats=2), "zero_compile": compile_profile()["zero_compile"]}


# One H200 (141 GB): batches sized so that model states (16 B/param with fp32 master weights
# and AdamW) plus bf16 activations stay well inside; G needs checkpointing at any useful batch.
GPU_SIZES = (
    ("swinv2_base", 256, False),
    ("swinv2_large", 256, False),
    ("swinv2_huge", 128, False),
    ("swinv2_giant", 128, True),
)


def gpu():
    groups = []
    # The compile axis first among the comparisons (B at 192 px, bf16): both sides compiled alike,
    # plus gigamim's flex path compiled.
    cg = _compile_group("swinv2_base", 192, 64, steps=5, warmup=2, precision="bf16", attn="sdpa")
    cg.insert(2, Case(name="compile_base_192_b64_gigamim_flex_compiled", group="compile", model="swinv2_base",
                      img_size=192, batch=64, steps=5, warmup=2, precision="bf16", memory=False, attn_impl="flex",
                      compile=True, label="gigamim flex compiled"))
    for model, batch, ckpt in GPU_SIZES:
        common = dict(group="gpu_sizes", model=model, img_size=192, batch=batch, precision="bf16", steps=6, warmup=2,
                      checkpointing=ckpt)
        g = [Case(name=f"gpu_{model.replace('swinv2_', '')}_192_b{batch}", **common)]
        if model in ("swinv2_base", "swinv2_large"):  # timm has no main-branch norms (huge/giant)
            g.append(Case(name=f"gpu_{model.replace('swinv2_', '')}_192_b{batch}_reference", impl="reference", **common))
        groups.append(g)
    groups.append(cg)
    # The attention paths (eager model; flex runs its compiled kernel) before the longer sweeps.
    groups.append(_attention("swinv2_base", 192, 64, 5, precision="bf16", with_flex=True))
    # train_step_ratio / peak_mem_ratio on the GPU as well.
    groups.append(_pair("ratio", "swinv2_base", 192, 64, steps=6, warmup=2, precision="bf16"))
    groups.append(_memory_group("swinv2_base", 512, 16, 8, steps=3, warmup=1, precision="bf16", chunk=64))
    groups += _resolution("swinv2_base", (192, 384, 768), 8, 3, precision="bf16")
    return {"groups": groups, "zero": None, "data": None}


PROFILES = {"smoke": smoke, "quick": quick, "gpu": gpu, "full": full, "compile": compile_profile,
            "engines": engines_profile, "compile_model": compile_model_profile}

# One line each, for `gigamim bench --help` (the module docstring says the same at length).
DESCRIPTIONS = {
    "smoke": "seconds: swinv2_nano at 64 px through every code path of the harness (what the tests run)",
    "quick": "< 3 min on a 2-core CPU: SwinV2-T step vs the timm reference, SwinV2-B 512 px peak memory",
    "gpu": "one H200, < 8 min: SwinV2-B/L/H/G bf16 steps at 192 px (MFU per size: what gigamim plan "
           "--efficiency takes), attention paths, a resolution sweep",
    "compile": "CPU, ~10 min: eager vs per-block torch.compile, ZeRO-1 vs ZeRO-3 on 2 CPU ranks",
    "compile_model": "CPU, 10-20 min: eager vs whole-model torch.compile(model), gigamim and the reference (ABAB)",
    "full": "CPU, tens of minutes: quick + attention, checkpointing, resolution and micro-batch sweeps, "
            "ZeRO 0-3 on 2 ranks, the data loader",
    "engines": "CPU, 15-30 min: DeepSpeed ZeRO-3 vs PyTorch FSDP2 on 2 ranks (swinv2_tiny/small, eager and "
               "per-block compiled): step time, bytes per step, peak RSS",
}
