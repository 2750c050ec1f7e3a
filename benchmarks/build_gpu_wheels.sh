#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, into .whl/ (git-ignored), for benchmarks/gpu_smoke.sh.
#
#   bash benchmarks/build_gpu_wheels.sh          # run here, in the repository root, with network
#
# That machine has Python 3.12 (x86-64, manylinux), torch, triton, timm, numpy, pyyaml, ninja,
# msgpack, psutil, py-cpuinfo, einops, ... but no deepspeed, webdataset, hjson or pydantic, and it
# cannot reach any registry. Versions are the ones installed here, so the GPU runs what the tests
# here ran. gpu_smoke.sh installs only those the image lacks or has older (timm, typing-extensions).
#
# deepspeed is published as an sdist only: built here with DS_BUILD_OPS=0 (no compiled ops, a
# pure wheel; FusedAdam is JIT-built on the GPU, which gpu_smoke times). pydantic_core is the one
# compiled dependency: downloaded for cp312 manylinux. The rest are pure wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${DEST:-.whl}

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$DEST" && mkdir -p "$DEST"
DS=$(version deepspeed)
echo "building deepspeed $DS (DS_BUILD_OPS=0: no compiled ops)"
# --no-build-isolation: its setup.py imports torch, which a fresh build env would download again.
DS_BUILD_OPS=0 timeout 900 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed --no-cache-dir \
  -w "$DEST" "deepspeed==$DS"

PURE=()
for pkg in webdataset braceexpand hjson pydantic annotated-types typing-inspection typing-extensions timm; do
  PURE+=("$pkg==$(version "$pkg")")
done
# pydantic pins its core exactly; ask it rather than the environment.
CORE=$("$PY" - <<'PY'
import importlib.metadata as m, re
req = [r for r in m.requires("pydantic") if r.startswith("pydantic-core") or r.startswith("pydantic_core")][0]
print("pydantic-core==" + re.search(r"==\s*([\w.]+)", req).group(1))
PY
)
echo "downloading ${PURE[*]} $CORE (cp312 manylinux x86-64)"
timeout 600 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PURE[@]}" "$CORE"

# Checks: deepspeed must be pure (a compiled op built here would be for the wrong Python/CUDA)
# and nothing may be there twice (two versions of one package stop the whole pip install).
ls "$DEST"/deepspeed-*-py3-none-any.whl > /dev/null || { echo "deepspeed wheel is not pure: $(ls "$DEST")"; exit 1; }
if unzip -l "$DEST"/deepspeed-*.whl | grep -E '\.so$'; then echo "deepspeed wheel holds compiled ops"; exit 1; fi
dups=$(ls "$DEST" | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "more than one wheel of: $dups"; exit 1; }
ls -l "$DEST"
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}') in $(ls "$DEST" | wc -l) wheels"
