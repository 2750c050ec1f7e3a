#!/usr/bin/env bash
# One script for a lent GPU (H100/H200), run from the repository root; < 8 minutes.
#
#   OUT=/some/folder bash benchmarks/gpu_smoke.sh
#
# 1. installs carried wheels (.whl/*.whl) without touching the network, then gigamim (editable);
# 2. smoke test: swinv2_base SimMIM forward/backward in bf16 on the GPU, loss and gradients
#    against the timm reference on identical weights, peak memory;
# 3. the fused kernels' GPU check (python -m gigamim_benchmarks.gpu_check --quick);
# 4. numerics of the new paths on the GPU (flex forward AND backward vs explicit, per-block
#    compile vs eager, bf16 dtypes) -> numerics.json;
# 5. ZeRO-1 vs ZeRO-3 (eager, per-block compiled with leaf blocks) on this 1 GPU -> zero_1gpu/;
# 6. gigamim bench --profile gpu (SwinV2-B/L/H/G at 192 px in bf16, MFU/HFU per size, the
#    compile axis for B with both sides compiled, attention paths incl. flex, ratios against
#    the reference), under a time budget so the whole script ends in time (< 8 min in all).
# Every step has its own timeout and a failing step never stops the next one.
# Everything lands in $OUT: smoke.json, kernels.json, numerics.json, zero_1gpu/, gpu/ (report.md,
# summary.json, PNGs), logs.
set -uo pipefail
OUT=${OUT:-gpu_smoke_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
log() { echo "[gpu_smoke $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_smoke.log"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  log "installing carried wheels"
  pip install --no-deps --no-index -q .whl/*.whl >> "$OUT/pip.log" 2>&1 || log "some wheels failed (see pip.log)"
fi
pip install -e . --no-deps --no-build-isolation -q >> "$OUT/pip.log" 2>&1 || log "pip install -e . failed (see pip.log)"
if ! python -c "import gigamim, gigamim_benchmarks" 2>/dev/null; then
  # Not installed (no network for build deps?): import both from the checkout instead.
  log "gigamim not importable after install: using the checkout via PYTHONPATH"
  mkdir -p "$OUT/pypath" && ln -sfn "$PWD/benchmarks" "$OUT/pypath/gigamim_benchmarks"
  export PYTHONPATH="$PWD:$OUT/pypath:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  2>&1 | tee -a "$OUT/gpu_smoke.log"

log "smoke: swinv2_base SimMIM bf16 forward/backward vs timm reference"
timeout 75 python - "$OUT/smoke.json" <<'PY' 2>&1 | tee -a "$OUT/gpu_smoke.log"
import json, sys, time
import torch
from gigamim.models import SimMIM, create_model
from tests.helpers.randomize import randomize_weights
from gigamim_benchmarks.reference import reference_for

dev = torch.device("cuda")
torch.manual_seed(0)
with torch.device(dev):
    model = randomize_weights(SimMIM(create_model("swinv2_base", attn_impl="sdpa", drop_path_rate=0.0)), seed=1)
    ref = reference_for(model)
x = torch.randn(16, 3, 192, 192, device=dev)
mask = torch.rand(16, 48, 48, device=dev) > 0.4
out = {}
for name, m in (("gigamim", model), ("reference", ref)):
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(x, mask)
    loss.backward()
    torch.cuda.synchronize()
    out[name] = {"loss": loss.item(), "seconds_first_step": time.perf_counter() - t,
                 "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
ga = torch.cat([p.grad.float().flatten() for p in model.parameters()])
gb = torch.cat([dict(ref.named_parameters())[n].grad.float().flatten() for n, _ in model.named_parameters()])
out["loss_rel_diff"] = abs(out["gigamim"]["loss"] - out["reference"]["loss"]) / abs(out["reference"]["loss"])
out["grad_cosine"] = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
out["ok"] = bool(out["loss_rel_diff"] < 2e-2 and out["grad_cosine"] > 0.99 and torch.isfinite(ga).all())
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
sys.exit(0 if out["ok"] else 1)
PY
log "smoke exit ${PIPESTATUS[0]}"

log "fused kernels GPU check"
timeout 75 python -m gigamim_benchmarks.gpu_check --quick --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
log "kernels exit $? (see kernels.log)"

log "numerics: flex fwd+bwd vs explicit, compiled vs eager, bf16 dtypes (GPU)"
timeout 100 python - "$OUT/numerics.json" <<'PY' > "$OUT/numerics.log" 2>&1
import copy, json, sys, traceback
import torch
from gigamim.models import SimMIM, create_model
from gigamim.models.compile import compile_blocks
from tests.helpers.randomize import randomize_weights

dev = torch.device("cuda")
out = {}
def step(m, x, mask):
    m.zero_grad(set_to_none=True)
    loss = m(x, mask); loss.backward()
    return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in m.parameters()])
def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
kw = dict(img_size=192, depths=(2, 2, 2, 2), drop_path_rate=0.0)
x = torch.randn(8, 3, 192, 192, device=dev); mask = torch.rand(8, 48, 48, device=dev) > 0.4
with torch.device(dev):
    base = randomize_weights(SimMIM(create_model("swinv2_base", attn_impl="explicit", **kw)), seed=1)
for impl, comp in (("flex", False), ("sdpa", False), ("explicit", True), ("sdpa", True), ("flex", True)):
    name = f"{impl}{'_compiled' if comp else ''}"
    try:
        with torch.device(dev):
            m = SimMIM(create_model("swinv2_base", attn_impl=impl, **kw))
        m.load_state_dict(base.state_dict())
        if comp:
            compile_blocks(m)
        for prec in ("fp32", "bf16"):
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if prec == "bf16" else torch.autocast("cuda", enabled=False)
            with ctx:
                la, ga = step(base, x, mask)
                lb, gb = step(m, x, mask)
            out[f"{name}_{prec}"] = {"loss_rel": abs((la - lb) / la).item(), "grad_rel": rel(gb, ga)}
    except Exception as e:  # report and go on
        out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
# TF32 is off here (torch default for matmul): fp32 bounds are tight, bf16 loose.
out["ok"] = all(("error" not in v) and v["grad_rel"] < (1e-3 if k.endswith("fp32") else 5e-2)
                for k, v in out.items() if isinstance(v, dict))
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
PY
log "numerics exit $? (see numerics.log, numerics.json)"

ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( 330 - ELAPSED ))   # groups not started after this many seconds are skipped
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
log "gigamim bench --profile gpu (time budget ${BUDGET}s)"
timeout $(( BUDGET + 60 )) python -m gigamim bench --profile gpu --out "$OUT/gpu" --time-budget "$BUDGET" \
  > "$OUT/bench.log" 2>&1
log "bench exit $? (see bench.log, gpu/report.md)"
tail -n 5 "$OUT/bench.log"

# What is left of the 8 minutes (minus a margin) goes to the 1-GPU ZeRO comparison.
ZT=$(( 470 - ($(date +%s) - START) ))
if [ "$ZT" -ge 60 ]; then
  log "ZeRO-1 vs ZeRO-3 (eager / compiled) on 1 GPU (timeout ${ZT}s)"
  timeout "$ZT" python - "$OUT/zero_1gpu" "$(( ZT - 10 ))" <<'PY' > "$OUT/zero_1gpu.log" 2>&1
import json, sys
from gigamim_benchmarks.zero_sweep import run_zero_compile
res = run_zero_compile(sys.argv[1], variants=("zero1_eager", "zero3_eager", "zero3_compiled"), model="swinv2_base",
                       img_size=192, micro_batch=32, warmup=2, steps=4, nproc=1, timeout=int(sys.argv[2]))
json.dump(res, open(sys.argv[1] + ".json", "w"), indent=1, default=str)
PY
  log "zero_1gpu exit $? (see zero_1gpu.log)"
else
  log "zero_1gpu skipped: only ${ZT}s left"
fi
log "done"
