"""One short GPU run: fused kernels vs a float64 formula on CUDA, then timings.

    python -m gigamim_benchmarks.gpu_check [--out results.json] [--quick | --tiny] [--device cuda]

Checks forward and every gradient of residual_post_norm (fp32 and bf16 io) and of
cosine_normalize against float64 references at SwinV2 shapes, then times eager torch vs
the fused path with `bench_residual_post_norm`. Prints one JSON object per line and exits
non-zero when an error bound is exceeded. Written for a device session of a few minutes:
the full run is well under two minutes on an H100/H200 after Triton's first compile.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from gigamim.kernels import cosine_normalize, implementation_for, residual_post_norm
from .kernel_bench import bench_residual_post_norm

# (rows, width) of SwinV2-B/G stages at 192 px for a micro-batch of 8 / 2.
CHECK_SHAPES = [(8, 2304, 128), (8, 576, 256), (8, 144, 512), (8, 36, 1024), (2, 576, 1024), (2, 36, 4096), (3, 7, 100)]
BENCH_SHAPES = [(64, 2304, 128), (64, 144, 512), (32, 576, 1024), (16, 144, 2048), (16, 36, 4096)]
# --tiny (the CPU dry run of benchmarks/gpu_smoke.py, Triton's interpreter): every code path,
# seconds on a CPU.
TINY_CHECK_SHAPES = [(3, 7, 100)]
TINY_BENCH_SHAPES = [(2, 36, 128)]
TINY_COSINE_SHAPE = (2, 2, 16, 8)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a, e):
    return ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def check_residual_post_norm(shape, dtype, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = shape[-1]
    x, y, dout = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
    w = (torch.randn(n, generator=g) * 0.5 + 1).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    s = (torch.rand(shape[0], generator=g) > 0.2).to(device, dtype).view(-1, *[1] * (len(shape) - 1)) / 0.8
    mine = [t.clone().requires_grad_() for t in (x, y, w, b, s)]
    ref = [t.double().requires_grad_() for t in (x, y, w, b, s)]
    out = residual_post_norm(*mine[:4], 1e-5, mine[4])
    mean = ref[1].mean(-1, keepdim=True)
    var = ((ref[1] - mean) ** 2).mean(-1, keepdim=True)
    want = ref[0] + ref[4] * ((ref[1] - mean) / torch.sqrt(var + 1e-5) * ref[2] + ref[3])
    got = torch.autograd.grad(out, mine, dout)
    exp = torch.autograd.grad(want, ref, dout.double())
    errs = {"out": _rel(out, want)}
    errs.update({k: _rel(a, e) for k, a, e in zip(("dshortcut", "dy", "dweight", "dbias", "dscale"), got, exp)})
    return {"check": "residual_post_norm", "shape": list(shape), "dtype": str(dtype), "impl": implementation_for(y, w, b),
            "errs": errs, "ok": all(v <= TOL[dtype] for v in errs.values())}


def check_cosine(device, shape=(64, 8, 144, 32)) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k = (torch.randn(*shape, generator=g).to(device) for _ in range(2))
    heads = shape[1]
    ls = torch.tensor([math.log(10.0 * (i + 1)) for i in range(heads)]).view(heads, 1, 1).to(device)
    mine, ref = [t.clone().requires_grad_() for t in (q, k, ls)], [t.double().requires_grad_() for t in (q, k, ls)]
    qo, ko = cosine_normalize(*mine)
    scores = qo @ ko.transpose(-2, -1)
    nq = ref[0] / torch.linalg.vector_norm(ref[0], dim=-1, keepdim=True).clamp_min(1e-12)
    nk = ref[1] / torch.linalg.vector_norm(ref[1], dim=-1, keepdim=True).clamp_min(1e-12)
    want = (nq @ nk.transpose(-2, -1)) * torch.clamp(ref[2], max=math.log(100.0)).exp()
    dout = torch.randn(scores.shape, generator=g).to(device)
    got, exp = torch.autograd.grad(scores, mine, dout), torch.autograd.grad(want, ref, dout.double())
    errs = {"out": _rel(scores, want), **{k: _rel(a, e) for k, a, e in zip(("dq", "dk", "dlogit_scale"), got, exp)}}
    # matmul in fp32 (TF32 off by default for matmul) accumulates over 144 keys: allow 1e-4.
    return {"check": "cosine_normalize", "impl": implementation_for(q), "errs": errs, "ok": all(v <= 1e-4 for v in errs.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write all rows to this JSON file")
    ap.add_argument("--quick", action="store_true", help="two bench shapes, shorter timing")
    ap.add_argument("--tiny", action="store_true", help="two small check shapes, one bench shape (CPU dry runs)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU tests cover the interpreter)", file=sys.stderr)
        return 2
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in TINY_CHECK_SHAPES if args.tiny else CHECK_SHAPES:
            rows.append(check_residual_post_norm(shape, dtype, device))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(check_cosine(device, TINY_COSINE_SHAPE) if args.tiny else check_cosine(device))
    print(json.dumps(rows[-1]), flush=True)
    bench = TINY_BENCH_SHAPES if args.tiny else BENCH_SHAPES[:2] if args.quick else BENCH_SHAPES
    for shape in bench:
        for dtype in (torch.bfloat16, torch.float32):
            r = bench_residual_post_norm(shape, dtype, device, min_run_time=0.05 if args.tiny else 0.2 if args.quick else 0.5)
            rows.append({"check": "bench", **r})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    failed = [r for r in rows if r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
