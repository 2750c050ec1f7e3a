"""gigamim.kernels: dispatch rules, torch fallback, and the Triton kernels run on CPU
through the Triton interpreter, all checked against a float64 formula written here
(mean/variance by hand, L2 norm with an explicit clamp), never against the code's own output.

TRITON_INTERPRET must be set before triton is imported, so the Triton checks run in one
subprocess (module-scoped fixture) that writes its measured errors to a JSON file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gigamim.kernels as K
from gigamim_benchmarks.kernel_bench import bench_residual_post_norm


# --- independent float64 references -------------------------------------------------

def ref_residual_post_norm(shortcut, y, w, b, eps, scale):
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    normed = (y - mean) / torch.sqrt(var + eps)
    if w is not None:
        normed = normed * w
    if b is not None:
        normed = normed + b
    if scale is not None:
        normed = normed * scale
    return normed if shortcut is None else shortcut + normed


def ref_cosine_scores(q, k, logit_scale):
    # vector_norm, not sqrt(sum(x*x)): its gradient at a zero row is 0 rather than NaN,
    # so a zero row's gradient is the 1/eps of the clamp, as in F.normalize.
    qn = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
    kn = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
    return (qn @ kn.transpose(-2, -1)) * torch.clamp(logit_scale, max=math.log(100.0)).exp()


# --- dispatch rules (in-process; this process never sets TRITON_INTERPRET) ----------

@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("GIGAMIM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_default_backend_on_cpu_is_torch(clean_env):
    assert K.backend("cpu") == "torch"
    assert K.backend(torch.zeros(2)) == "torch"
    assert K.available_backends("cpu") == ["torch"]
    assert K.implementation_for(torch.zeros(2, 96)) == "torch"


def test_apex_reported_unavailable_here(clean_env):
    # No NVIDIA apex on this machine (and PyPI's `apex` must never count as it).
    assert "apex" not in K.available_backends("cuda")
    clean_env.setenv("GIGAMIM_KERNELS", "apex")
    with pytest.raises(RuntimeError, match="apex"):
        K.backend("cpu")


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(clean_env):
    clean_env.setenv("GIGAMIM_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.layer_norm(torch.randn(2, 8), None, None)


def test_bad_env_value_names_it(clean_env):
    clean_env.setenv("GIGAMIM_KERNELS", "cudnn")
    with pytest.raises(ValueError, match="GIGAMIM_KERNELS='cudnn'"):
        K.backend("cpu")


def test_forced_torch_and_auto_agree_on_cpu(clean_env):
    clean_env.setenv("GIGAMIM_KERNELS", "torch")
    assert K.backend("cuda") == "torch"
    clean_env.setenv("GIGAMIM_KERNELS", " AUTO ")
    assert K.backend("cpu") == "torch"


def test_fake_cuda_tensors_run_torch_and_forced_triton_says_why(clean_env):
    """FakeTensorMode makes CUDA tensors without a GPU (how the CUDA path is tested here): auto
    must not pick a hand-launched kernel for them (its launch touches the driver), and a forced
    triton names the reason instead of failing inside the driver."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.randn(4, 96, device="cuda")
        w, b = torch.ones(96, device="cuda"), torch.zeros(96, device="cuda")
        assert K.backend(y) == "torch" and K.implementation_for(y, w, b) == "torch"
        out = K.residual_post_norm(y, y, w, b)
        qo, ko = K.cosine_normalize(y.view(1, 1, 4, 96), y.view(1, 1, 4, 96), torch.zeros(1, 1, 1, device="cuda"))
        assert out.device.type == qo.device.type == "cuda"
        clean_env.setenv("GIGAMIM_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="real CUDA device"):
            K.layer_norm(y, w, b)
    assert "triton" not in K.available_backends("cuda")  # no driver here


def test_bad_shapes_name_the_argument():
    x = torch.randn(2, 3, 96)
    with pytest.raises(ValueError, match=r"weight has shape \(95,\)"):
        K.residual_post_norm(x, x, torch.ones(95), torch.zeros(96))
    with pytest.raises(ValueError, match="shortcut has shape"):
        K.residual_post_norm(x[:1], x, torch.ones(96), torch.zeros(96))


# --- torch fallback against the formula ---------------------------------------------

@pytest.mark.parametrize("shape", [(2, 5, 96), (3, 4, 4, 100)])
def test_torch_path_matches_formula_with_grads(clean_env, shape):
    g = torch.Generator().manual_seed(1)
    n = shape[-1]
    x, y, dout = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    w, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.0, 1 / 0.9, 1 / 0.9][: shape[0]], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
    leaves = [t.clone().requires_grad_() for t in (x, y, w, b, scale)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, y, w, b, scale)]
    out = K.residual_post_norm(*leaves[:4], 1e-5, leaves[4])
    ref = ref_residual_post_norm(*ref_leaves[:4], 1e-5, ref_leaves[4])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, ref_leaves, dout)
    for name, a, e in zip(("shortcut", "y", "weight", "bias", "drop_path_scale"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_torch_cosine_normalize_matches_formula(clean_env):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64)
    ls = torch.tensor([math.log(10.0), math.log(200.0), 0.5], dtype=torch.float64).view(3, 1, 1)
    qo, ko = K.cosine_normalize(q, k, ls)
    torch.testing.assert_close(qo @ ko.transpose(-2, -1), ref_cosine_scores(q, k, ls))


def test_module_is_a_layernorm_drop_in(clean_env):
    g = torch.Generator().manual_seed(3)
    plain = torch.nn.LayerNorm(96, eps=1e-6)
    with torch.no_grad():  # SwinV2 zero-inits these; random values make the check mean something
        plain.weight.copy_(torch.randn(96, generator=g))
        plain.bias.copy_(torch.randn(96, generator=g))
    fused = K.ResPostLayerNorm(96, eps=1e-6)
    fused.load_state_dict(plain.state_dict())  # strict: same keys and shapes
    assert isinstance(fused, torch.nn.LayerNorm)
    x, y = torch.randn(2, 5, 96, generator=g), torch.randn(2, 5, 96, generator=g)
    scale = torch.tensor([0.0, 1 / 0.9]).view(2, 1, 1)
    w, b = plain.weight.detach(), plain.bias.detach()
    torch.testing.assert_close(fused(y), ref_residual_post_norm(None, y, w, b, 1e-6, None))
    torch.testing.assert_close(fused(y, shortcut=x, drop_path_scale=scale), ref_residual_post_norm(x, y, w, b, 1e-6, scale))
    with pytest.raises(ValueError, match="drop_path_scale needs a shortcut"):
        fused(y, drop_path_scale=scale)


@pytest.mark.parametrize("p,training", [(0.3, True), (1.0, True), (0.3, False), (0.0, True)])
def test_drop_path_scale_draws_what_timm_draws(p, training):
    from timm.layers import drop_path

    x = torch.randn(6, 4, 8)
    torch.manual_seed(7)
    want = drop_path(x, p, training)
    torch.manual_seed(7)
    scale = K.drop_path_scale(x, p, training)
    if p == 0.0 or not training:
        assert scale is None
    else:
        assert scale.shape == (6, 1, 1)
        torch.testing.assert_close(x * scale, want, rtol=0, atol=0)


def test_bench_on_cpu_times_torch_only(clean_env):
    r = bench_residual_post_norm((2, 16, 96), torch.float32, "cpu", min_run_time=0.01)
    assert r["backend"] == "torch" and r["device"] == "cpu" and r["shape"] == [2, 16, 96]
    assert r["torch_fwd_ms"] > 0 and r["torch_fwd_bwd_ms"] > 0
    assert r["fused_fwd_ms"] is None and r["speedup_fwd"] is None
    json.dumps(r)  # the benchmark harness writes it as JSON


# --- Triton kernels, interpreted on CPU in a subprocess -----------------------------

# Shapes: SwinV2 widths incl. non-powers of 2 (96, 100, 352, 1408) and the widest stage of
# SwinV2-G (4096); (5, 37, 96) makes more row tiles than backward programs (grid stride).
WORKER = textwrap.dedent(r"""
    import json, math, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_kernels import ref_residual_post_norm, ref_cosine_scores
    import gigamim.kernels as K

    def rel_err(a, e):
        a, e = a.double(), e.double()
        return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()

    def leafs(ts):
        return [None if t is None else t.detach().clone().requires_grad_() for t in ts]

    results = {}
    g = torch.Generator().manual_seed(0)

    def rpn_case(name, shape, dtype, *, affine=True, scale=True, shortcut=True, permute=False, grad_scale=False):
        n = shape[-1]
        x, y, dout = (torch.randn(*shape, generator=g).to(dtype) for _ in range(3))
        if permute:  # non-contiguous y: build transposed then swap back
            y = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(dtype).transpose(-1, -2)
        w = (torch.randn(n, generator=g) * 0.5 + 1).to(dtype) if affine else None
        b = torch.randn(n, generator=g).to(dtype) if affine else None
        s = None
        if scale:
            keep = torch.tensor([0.0] + [1.0] * (shape[0] - 1)) / 0.9
            s = keep.view(-1, *[1] * (len(shape) - 1)).to(dtype)
        ins = [x if shortcut else None, y, w, b, s]
        mine, ref = leafs(ins), [None if t is None else t.detach().double().requires_grad_() for t in ins]
        if s is not None and not grad_scale:
            mine[4].requires_grad_(False); ref[4].requires_grad_(False)
        impl = K.implementation_for(mine[1], mine[2], mine[3])
        if shortcut:
            out = K.residual_post_norm(mine[0], mine[1], mine[2], mine[3], 1e-5, mine[4])
        else:
            out = K.layer_norm(mine[1], mine[2], mine[3], 1e-5)
        want = ref_residual_post_norm(ref[0], ref[1], ref[2], ref[3], 1e-5, ref[4] if shortcut else None)
        pairs = [(k, a, e) for k, a, e in zip(("shortcut", "y", "weight", "bias", "scale"), mine, ref)
                 if a is not None and a.requires_grad]
        got = torch.autograd.grad(out, [a for _, a, _ in pairs], dout)
        exp = torch.autograd.grad(want, [e for _, _, e in pairs], dout.double())
        errs = {"out": rel_err(out, want)}
        errs.update({"d" + k: rel_err(a, e) for (k, _, _), a, e in zip(pairs, got, exp)})
        results[name] = {"impl": impl, "dtype": str(dtype), "out_dtype": str(out.dtype), "errs": errs}

    f32 = torch.float32
    rpn_case("rpn_96", (2, 5, 96), f32, grad_scale=True)
    rpn_case("rpn_96_many_tiles", (5, 37, 96), f32)
    rpn_case("rpn_100_noncontig", (3, 8, 100), f32, permute=True)
    rpn_case("rpn_352", (4, 352), f32, scale=False)
    rpn_case("rpn_1408", (2, 3, 1408), f32, grad_scale=True)
    rpn_case("rpn_4096", (3, 4096), f32)
    rpn_case("ln_affine_192", (6, 192), f32, shortcut=False, scale=False)
    rpn_case("ln_plain_130", (2, 3, 130), f32, affine=False, shortcut=False, scale=False)
    rpn_case("rpn_bf16_192", (4, 6, 192), torch.bfloat16)
    rpn_case("rpn_fp16_192", (4, 6, 192), torch.float16)
    rpn_case("fallback_f64", (2, 3, 96), torch.float64)

    # the nn.Module form dispatches to the same kernel
    m = K.ResPostLayerNorm(200)
    with torch.no_grad():
        m.weight.normal_(generator=g); m.bias.normal_(generator=g)
    x, y = torch.randn(3, 4, 200, generator=g), torch.randn(3, 4, 200, generator=g)
    out = m(y, shortcut=x)
    want = ref_residual_post_norm(x.double(), y.double(), m.weight.double(), m.bias.double(), 1e-5, None)
    results["module_200"] = {"impl": K.implementation_for(y, m.weight, m.bias), "errs": {"out": rel_err(out, want)}}

    # cosine attention operands; one all-zero q row exercises the eps clamp.
    q, k = torch.randn(2, 3, 10, 24, generator=g), torch.randn(2, 3, 10, 24, generator=g)
    q[0, 0, 0] = 0
    ls = torch.tensor([math.log(10.0), math.log(200.0), 1.0]).view(3, 1, 1)
    mine, ref = leafs([q, k, ls]), [t.double().requires_grad_() for t in (q, k, ls)]
    qo, ko = K.cosine_normalize(*mine)
    scores, want = qo @ ko.transpose(-2, -1), ref_cosine_scores(*ref)
    dout = torch.randn(*scores.shape, generator=g)
    got, exp = torch.autograd.grad(scores, mine, dout), torch.autograd.grad(want, ref, dout.double())
    # The zero row's gradient is ~1/eps = 1e12: compare it relatively, the rest as usual.
    dq_rest = rel_err(got[0][0, 0, 1:], exp[0][0, 0, 1:])
    dq_zero = rel_err(got[0][0, 0, 0], exp[0][0, 0, 0])
    results["cosine_24"] = {"impl": K.backend(q), "errs": {
        "out": rel_err(scores, want), "dq": max(dq_rest, rel_err(got[0][1:], exp[0][1:])), "dq_zero_row": dq_zero,
        "dk": rel_err(got[1], exp[1]), "dlogit_scale": rel_err(got[2], exp[2])}}
    results["clamped_scale_grad_is_zero"] = got[2][1].abs().item()

    json.dump(results, open(sys.argv[1], "w"), indent=1)
""")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "results.json"
    script = out.with_name("worker.py")
    script.write_text(WORKER)
    env = {**os.environ, "TRITON_INTERPRET": "1", "GIGAMIM_KERNELS": "triton", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), os.path.dirname(__file__)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr:
        # Seen with torch 2.11's triton 3.6 + numpy 2.5: the interpreter turns a program id (a
        # 1-element array) into an index with int(), which numpy >= 2.4 refuses. A test-environment
        # problem, not a kernel bug: compiled GPU kernels never go through numpy.
        import numpy
        import triton

        pytest.fail(f"triton {triton.__version__}'s CPU interpreter cannot run a grid-stride loop with numpy "
                    f"{numpy.__version__} (numpy >= 2.4 refuses int() of a 1-element array; triton-lang/triton#9171, "
                    "fixed in later triton, e.g. 3.8): run the interpreted kernel tests with numpy<2.4 or a newer "
                    f"triton.\n{proc.stderr[-1500:]}")
    assert proc.returncode == 0, f"interpreted Triton worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


FP32_CASES = ["module_200", "rpn_96", "rpn_96_many_tiles", "rpn_100_noncontig", "rpn_352", "rpn_1408", "rpn_4096",
              "ln_affine_192", "ln_plain_130"]


@pytest.mark.parametrize("case", FP32_CASES)
def test_triton_fp32_matches_float64_formula(interpreted, case):
    r = interpreted[case]
    assert r["impl"] == "triton", r
    # fp32 accumulation over rows of <= 4096 values: ~1e-6 relative; 1e-5 leaves headroom.
    bad = {k: v for k, v in r["errs"].items() if not v <= 1e-5}  # NaN fails too
    assert not bad, f"{case}: relative errors above 1e-5: {bad}"


def test_triton_checked_every_gradient(interpreted):
    assert set(interpreted["rpn_96"]["errs"]) == {"out", "dshortcut", "dy", "dweight", "dbias", "dscale"}
    assert set(interpreted["ln_plain_130"]["errs"]) == {"out", "dy"}


@pytest.mark.parametrize("case,tol", [("rpn_bf16_192", 1.6e-2), ("rpn_fp16_192", 2e-3)])
def test_triton_low_precision_io(interpreted, case, tol):
    r = interpreted[case]
    assert r["impl"] == "triton" and r["out_dtype"] == r["dtype"], r
    # Errors are the io rounding (bf16 eps 2**-8, fp16 2**-11), not the fp32 arithmetic.
    bad = {k: v for k, v in r["errs"].items() if not v <= tol}
    assert not bad, f"{case}: relative errors above {tol}: {bad}"


def test_float64_falls_back_to_torch_under_forced_triton(interpreted):
    r = interpreted["fallback_f64"]
    assert r["impl"] == "torch"
    assert all(v <= 1e-12 for v in r["errs"].values()), r


def test_triton_cosine_normalize(interpreted):
    r = interpreted["cosine_24"]
    assert r["impl"] == "triton"
    bad = {k: v for k, v in r["errs"].items() if not v <= 1e-5}  # NaN fails too
    assert not bad, f"cosine: relative errors above 1e-5: {bad}"
    # head 1's logit_scale sits above the log(100) clamp: no gradient may reach it.
    assert interpreted["clamped_scale_grad_is_zero"] == 0.0


# --- the same kernels compile for an H100/H200 (sm_90) through the real pipeline ----

def test_kernels_compile_for_sm90_without_spills():
    """The interpreter never lowers to PTX; this compiles the launched specialisations
    with triton's own ptxas (no GPU needed) and checks none spills registers."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GIGAMIM_KERNELS")}
    proc = subprocess.run(
        [sys.executable, "-m", "gigamim_benchmarks.aot_check", "--arch", "90", "--widths", "96", "4096", "--head-dims", "32"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_ln_fwd_kernel", "_ln_bwd_kernel", "_sum_rows_kernel", "_l2norm_fwd_kernel", "_l2norm_bwd_kernel"}
    assert len(rows) == 7
    spilled = [r for r in rows if r["spill_bytes"] != 0 or not r["registers"] or r["registers"] > 255]
    assert not spilled, spilled


def test_gpu_check_without_cuda_says_so(capsys):
    from gigamim_benchmarks import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run `python -m gigamim_benchmarks.gpu_check` instead")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
