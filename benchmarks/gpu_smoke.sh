#!/usr/bin/env bash
# One run on a lent GPU (one H200, ~8.5 minutes) that brings back all it measured; or its CPU
# dry run, which CI runs (tests/test_gpu_smoke.py) so that this script never rots.
#
#   bash benchmarks/build_gpu_wheels.sh                  # here, once: .whl/ (git-ignored)
#   OUT=out bash benchmarks/gpu_smoke.sh                 # on the GPU machine, .whl carried along
#   OUT=out bash benchmarks/gpu_smoke.sh --cpu-dry-run   # anywhere: every step, tiny, on the CPU
#   OUT=out bash benchmarks/gpu_smoke.sh --only pretrain,compile --budget 300   # a partial rerun
#
# 1. The carried wheels (.whl/) that this Python lacks or has older are installed offline into
#    $GIGAMIM_SITE (default /tmp/gigamim_site) and put on PYTHONPATH; the checkout itself is
#    imported from here (gigamim, and benchmarks/ as gigamim_benchmarks, as setup.py names it).
# 2. python3 -m gigamim_benchmarks.gpu_smoke runs the steps (see benchmarks/gpu_smoke.py): each in
#    its own process under its own timeout, cheap and decisive first.
# $OUT then holds exactly two files, rewritten after every step: results.tar.gz (every step's
# JSON and log, plots) and summary.json. A compact summary is printed after each step and at the
# end. Every external command runs under `timeout`; python is the image's python3.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_smoke_out}
SITE=${GIGAMIM_SITE:-/tmp/gigamim_site}
export GIGAMIM_SITE=$SITE
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gigamim_gpu_smoke.XXXXXX") || exit 2
mkdir -p "$WORK/results" "$WORK/pypath"
ln -s "$REPO/benchmarks" "$WORK/pypath/gigamim_benchmarks"
export PYTHONPATH="$REPO:$WORK/pypath${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DRY=0
for a in "$@"; do [ "$a" = --cpu-dry-run ] && DRY=1; done
INSTALL_LOG="$WORK/results/install.log"

if compgen -G ".whl/*.whl" > /dev/null; then
  WHEELS=$(timeout 60 "$PY" -m gigamim_benchmarks.gpu_smoke --select-wheels .whl 2>> "$INSTALL_LOG")
  echo "carried wheels this python lacks or has older: ${WHEELS:-none}" | tee -a "$INSTALL_LOG"
  if [ -n "$WHEELS" ] && [ "$DRY" = 0 ]; then
    # shellcheck disable=SC2086  (one path per word)
    if timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" $WHEELS >> "$INSTALL_LOG" 2>&1; then
      echo "installed into $SITE" | tee -a "$INSTALL_LOG"
    else
      echo "pip install of the carried wheels FAILED (install.log in the archive); going on" | tee -a "$INSTALL_LOG"
    fi
  fi
else
  echo "no carried wheels (.whl/): using what this python has" | tee -a "$INSTALL_LOG"
fi
[ "$DRY" = 0 ] && [ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH"

# The driver bounds every step itself; this outer timeout only guards the driver.
timeout --kill-after=20 "${GPU_SMOKE_TIMEOUT:-1500}" "$PY" -m gigamim_benchmarks.gpu_smoke \
  --out "$OUT" --work "$WORK" "$@"
rc=$?
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
exit $rc
