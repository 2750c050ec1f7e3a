"""`gigamim plan`: activation counts against saved-tensor bytes measured on CPU, checkpointed
peaks against the CPU allocator's high-water, ZeRO model states against the ZeRO paper's
published figures, parameter counts against timm's."""

from __future__ import annotations

import pytest
import torch

from gigamim.tools import plan
from gigamim.models import SimMIM, create_model
from gigamim_benchmarks.memory import SavedTensorBytes, profiled_peak_bytes

GiB = 2**30


@pytest.mark.parametrize("name,size,window,batch", [
    ("swinv2_nano", 96, 6, 2),
    ("swinv2_nano", 192, 6, 1),
    ("swinv2_tiny", 96, 6, 1),
])
def test_activation_bytes_match_saved_tensors(name, size, window, batch):
    torch.manual_seed(0)
    model = SimMIM(create_model(name, img_size=size, window_size=window, drop_path_rate=0.0, attn_impl="explicit"))
    x = torch.randn(batch, 3, size, size)
    mask = torch.rand(batch, size // 4, size // 4) > 0.4
    with SavedTensorBytes(model) as saved:
        model(x, mask)
    predicted = plan.activation_bytes(name, size, window_size=window, batch=batch, dtype_bytes=4, attn="explicit")
    assert predicted["saved"] == pytest.approx(saved.total, rel=0.05)


def test_checkpointed_sequential_peak_matches_allocator_high_water():
    # Peak of forward + backward with every block checkpointed and chunked attention:
    # planner (saved + one recomputed block + one chunk) vs the profiler's high-water.
    torch.manual_seed(0)
    name, size, window, batch = "swinv2_nano", 128, 4, 4
    model = SimMIM(create_model(name, img_size=size, window_size=window, drop_path_rate=0.0, attn_impl="explicit",
                                grad_checkpointing=True, sequential_stages=(0, 1, 2, 3), attn_chunk=8))
    x = torch.randn(batch, 3, size, size)
    mask = torch.rand(batch, size // 4, size // 4) > 0.4
    model(x, mask).backward()  # caches (index tables, masks) exist before the measured step

    def step():
        model.zero_grad(set_to_none=True)
        model(x, mask).backward()

    model.zero_grad(set_to_none=True)
    measured = profiled_peak_bytes(step)  # activations + gradients (allocated during backward)
    act = plan.activation_bytes(name, size, window_size=window, batch=batch, dtype_bytes=4, attn="sequential",
                                checkpointing=True, attn_chunk=8)
    grads = 4 * sum(p.numel() for p in model.parameters())
    assert act["total"] + grads == pytest.approx(measured, rel=0.15)


def test_zero_model_states_match_zero_paper():
    # ZeRO paper, Figure 1: 7.5B parameters, 64 GPUs, K=12 -> 120 GB baseline,
    # 31.4 GB (P_os), 16.6 GB (P_os+g), 1.9 GB (P_os+g+p), decimal GB.
    psi, n = 7.5e9, 64
    gb = {s: plan.model_state_bytes(psi, n, s, False)["gpu"]["total"] / 1e9 for s in (0, 1, 2, 3)}
    assert gb[0] == pytest.approx(120, abs=0.05)
    assert gb[1] == pytest.approx(31.4, abs=0.05)
    assert gb[2] == pytest.approx(16.6, abs=0.05)
    assert gb[3] == pytest.approx(1.9, abs=0.05)
    off = plan.model_state_bytes(psi, n, 2, True)
    assert off["gpu"]["total"] == pytest.approx(2 * psi)  # bf16 weights stay; grads + optimizer on the host
    assert off["host_per_gpu"] == pytest.approx(14 * psi / n)


def test_parameter_count_matches_timm():
    # DESIGN.md: timm's encoder-only count for T; SimMIM adds the mask token and the 1x1 decoder.
    expected = 27_578_154 + 96 + (768 * 32 * 32 * 3 + 32 * 32 * 3)
    assert plan.count_parameters("swinv2_tiny") == expected


def test_plan_cli(capsys):
    assert plan.main(["--model", "swinv2_tiny", "--gpus", "8", "--gpu-mem", "80", "--micro-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "swinv2_tiny @ 192 px" in out and "suggested:" in out and "fits" in out


def test_plan_giant():
    p = plan.make_plan("swinv2_giant", 64, 80, micro_batch=16, global_batch=9216)
    text = plan.format_plan(p)
    assert "suggested:" in text and "for global batch 9216" in text
    for r in p["rows"]:
        if r["max_micro_batch"]:
            # micro x GPUs x accumulation covers the global batch with a micro-batch that fits.
            assert r["micro_batch_for_global"] <= r["max_micro_batch"]
            assert r["micro_batch_for_global"] * 64 * r["accumulation"] >= 9216
    assert 2.9e9 < p["params"] < 3.1e9
    rows = {(r["zero_stage"], r["offload"], r["activations"]): r for r in p["rows"]}
    # ZeRO-1 keeps 4 bytes/param of bf16 weights + grads: ~12 GB for 3B; ZeRO-3 shards them.
    assert rows[(1, False, "fused")]["model_states_gb"] > 4 * p["params"] / GiB
    assert rows[(3, False, "fused")]["model_states_gb"] < 16 * p["params"] / 64 / GiB + 1
    # Checkpointing and sequential attention only ever raise the micro-batch that fits.
    z3 = {k[2]: r["max_micro_batch"] for k, r in rows.items() if k[:2] == (3, False)}
    assert z3["explicit+ckpt"] >= z3["explicit"] and z3["sequential"] >= z3["explicit"]
    assert all(r["global_batch"] == 64 * r["max_micro_batch"] for r in p["rows"])


@pytest.mark.parametrize("argv,msg", [
    (["--gpus", "0"], "--gpus"),
    (["--model", "swinv2_enormous"], "unknown model"),
    (["--img-size", "200"], "img_size"),
    (["--micro-batch", "0"], "--micro-batch"),
])
def test_plan_cli_bad_input(argv, msg, capsys):
    assert plan.main(argv) == 2
    assert msg in capsys.readouterr().err
