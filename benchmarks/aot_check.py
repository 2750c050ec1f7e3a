"""Compile the Triton kernels for a CUDA architecture ahead of time, without a GPU.

The CPU interpreter (TRITON_INTERPRET=1) checks the maths but not that a kernel lowers
to PTX: it is lax about types and never allocates registers. This compiles the same
specialisations the launches use (tile sizes from `tile_shape`) through Triton's real
pipeline and the ptxas it ships, and reports registers and spill bytes per kernel.

    python -m gigamim_benchmarks.aot_check --arch 90 --widths 96 4096

Must run without TRITON_INTERPRET set (the kernels are decorated at import time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gigamim.kernels import triton_cosine as C
from gigamim.kernels import triton_layernorm as L

CONSTEXPR = "constexpr"


def _ptxas() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ptxas at {path}: this triton wheel ships no CUDA toolchain")
    return path


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> dict:
    sig = {**signature, **{k: CONSTEXPR for k in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run([_ptxas(), f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {fn.__name__}: {proc.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return {"kernel": fn.__name__, "num_warps": num_warps, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else 0}


def check(widths=(96, 4096), head_dims=(32,), io="bf16", arch: int = 90) -> list[dict]:
    """Compile every kernel for each width / head dim with all optional inputs present."""
    p_io, p32 = f"*{io}", "*fp32"
    out = []
    for n in widths:
        bm, bn, warps = L.tile_shape(n, 4096, 16)
        sig = dict(Y=p_io, R=p_io, W=p32, B=p32, S=p32, OUT=p_io, MEAN=p32, RSTD=p32, M="i32", N="i32", eps="fp32")
        consts = dict(HAS_RES=True, HAS_W=True, HAS_B=True, HAS_S=True, BLOCK_M=bm, BLOCK_N=bn)
        out.append({"width": n, **_compile(L._ln_fwd_kernel, sig, consts, warps, arch)})
        bm, bn, warps = L.tile_shape(n, 2048, 8)
        sig = dict(DO=p_io, Y=p_io, W=p32, B=p32, S=p32, MEAN=p32, RSTD=p32, DY=p_io, DS=p32, PARTIAL=p32,
                   M="i32", N="i32")
        consts = dict(HAS_W=True, HAS_B=True, HAS_S=True, NEED_DS=True, NEED_DWB=True, BLOCK_M=bm, BLOCK_N=bn)
        out.append({"width": n, **_compile(L._ln_bwd_kernel, sig, consts, warps, arch)})
    out.append({"width": None, **_compile(L._sum_rows_kernel, dict(P=p32, OUT=p32, P_ROWS="i32", K="i32"),
                                          dict(BLOCK_P=L.SUM_BLOCK_P, BLOCK_K=L.SUM_BLOCK_K), 4, arch)})
    for d in head_dims:
        bm, bn, warps = C._tile(d)
        sig = dict(X=p_io, S=p32, OUT=p_io, M="i32", N="i32", eps="fp32")
        out.append({"width": d, **_compile(C._l2norm_fwd_kernel, sig, dict(HAS_S=True, BLOCK_M=bm, BLOCK_N=bn), warps, arch)})
        sig = dict(DO=p_io, X=p_io, S=p32, DX=p_io, DS=p32, M="i32", N="i32", eps="fp32")
        consts = dict(HAS_S=True, NEED_DS=True, BLOCK_M=bm, BLOCK_N=bn)
        out.append({"width": d, **_compile(C._l2norm_bwd_kernel, sig, consts, warps, arch)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (80, 90)")
    ap.add_argument("--widths", type=int, nargs="+", default=[96, 192, 384, 768, 1536, 3072, 4096])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[32])
    ap.add_argument("--io", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    for row in check(args.widths, args.head_dims, args.io, args.arch):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
