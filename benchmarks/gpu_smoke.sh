#!/usr/bin/env bash
# One script for a lent GPU (H100/H200), run from the repository root; < 8 minutes.
#
#   OUT=/some/folder bash benchmarks/gpu_smoke.sh
#
# 1. installs carried wheels (.whl/*.whl) without touching the network, then gigamim (editable);
# 2. smoke test: swinv2_base SimMIM forward/backward in bf16 on the GPU, loss and gradients
#    against the timm reference on identical weights, peak memory;
# 3. the fused kernels' GPU check (python -m gigamim_benchmarks.gpu_check --quick);
# 4. gigamim bench --profile gpu (SwinV2-B/L/H/G at 192 px in bf16, MFU per size, ratios
#    against the reference), under a time budget so the whole script ends in time.
# Everything lands in $OUT: smoke.json, kernels.json, gpu/ (report.md, summary.json, PNGs), logs.
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
timeout 120 python - "$OUT/smoke.json" <<'PY' 2>&1 | tee -a "$OUT/gpu_smoke.log"
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
timeout 150 python -m gigamim_benchmarks.gpu_check --quick --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
log "kernels exit $? (see kernels.log)"

ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( 390 - ELAPSED ))   # groups not started after this many seconds are skipped
log "gigamim bench --profile gpu (time budget ${BUDGET}s)"
timeout $(( BUDGET + 80 )) python -m gigamim bench --profile gpu --out "$OUT/gpu" --time-budget "$BUDGET" \
  > "$OUT/bench.log" 2>&1
log "bench exit $? (see bench.log, gpu/report.md)"
tail -n 5 "$OUT/bench.log"
log "done"
