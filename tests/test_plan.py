"""`gigamim plan`: activation counts against saved-tensor bytes measured on CPU, checkpointed
peaks against the CPU allocator's high-water, ZeRO model states against the ZeRO paper's
published figures, parameter counts against timm's."""

from __future__ import annotations

import json

import pytest
import torch

from gigamim.tools import memory, plan
from gigamim.tools.model_facts import model_facts
from gigamim.models import SimMIM, create_model
from gigamim_benchmarks.memory import SavedTensorBytes, profiled_peak_bytes

GiB = 2**30


@pytest.mark.parametrize("name,size,window,batch,attn", [
    ("swinv2_nano", 96, 6, 2, "explicit"),
    ("swinv2_nano", 192, 6, 1, "explicit"),
    ("swinv2_tiny", 96, 6, 1, "explicit"),
    # Other families, counted by their specs, in the attention mode their CPU path runs: timm's
    # ViT SDPA's flash kernel (no mask), Swin V1 and the official SimMIM ViT SDPA's math kernel
    # (their position-bias mask requires grad). Batch 2: at batch 1 a (1, heads, N, D) view of
    # the qkv output needs no copy, so the math kernel keeps the whole qkv output instead.
    ("vit_small_patch16", 224, None, 2, "fused"),
    ("vit_nano_patch16_simmim", 64, None, 2, "explicit"),
    ("swin_tiny", 96, None, 2, "explicit"),
])
def test_activation_bytes_match_saved_tensors(name, size, window, batch, attn):
    from gigamim.models.build import build_simmim

    torch.manual_seed(0)
    model = build_simmim({"name": name, "img_size": size, "window_size": window, "drop_path_rate": 0.0}).train()
    side = size // model.encoder.patch_size
    x = torch.randn(batch, 3, size, size)
    mask = torch.rand(batch, side, side) > 0.4
    with SavedTensorBytes(model) as saved:
        model(x, mask)
    predicted = memory.activation_bytes(name, size, window_size=window, batch=batch, dtype_bytes=4, attn=attn)
    assert predicted["saved"] == pytest.approx(saved.total, rel=0.05)


@pytest.mark.parametrize("name,size", [("vit_base_patch16", 224), ("vit_base_patch16_simmim", 224),
                                       ("swin_large", 192), ("swinv2_tiny", 192)])
def test_forward_flops_match_torch_flop_counter(name, size):
    # torch's own FlopCounterMode over a meta-device SimMIM forward (batch 2) is the reference:
    # the planner's per-image FLOPs + its once-per-forward FLOPs (SwinV2's CPB MLP) / 2.
    from torch.utils.flop_counter import FlopCounterMode

    from gigamim.models.build import build_simmim

    with torch.device("meta"):
        model = build_simmim({"name": name, "img_size": size})
        side = size // model.encoder.patch_size
        with FlopCounterMode(display=False) as counter:
            model.reconstruct(torch.empty(2, 3, size, size), torch.zeros(2, side, side, dtype=torch.bool))
    facts = model_facts(name, size)
    assert facts.forward_flops + facts.cpb_flops / 2 == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)


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
    act = memory.activation_bytes(name, size, window_size=window, batch=batch, dtype_bytes=4, attn="sequential",
                                checkpointing=True, attn_chunk=8)
    grads = 4 * sum(p.numel() for p in model.parameters())
    assert act["total"] + grads == pytest.approx(measured, rel=0.15)


def test_zero_model_states_match_zero_paper():
    # ZeRO paper, Figure 1: 7.5B parameters, 64 GPUs, K=12 -> 120 GB baseline,
    # 31.4 GB (P_os), 16.6 GB (P_os+g), 1.9 GB (P_os+g+p), decimal GB.
    psi, n = 7.5e9, 64
    gb = {s: memory.model_state_bytes(psi, n, s, False)["gpu"]["total"] / 1e9 for s in (0, 1, 2, 3)}
    assert gb[0] == pytest.approx(120, abs=0.05)
    assert gb[1] == pytest.approx(31.4, abs=0.05)
    assert gb[2] == pytest.approx(16.6, abs=0.05)
    assert gb[3] == pytest.approx(1.9, abs=0.05)
    off = memory.model_state_bytes(psi, n, 2, True)
    assert off["gpu"]["total"] == pytest.approx(2 * psi)  # bf16 weights stay; grads + optimizer on the host
    assert off["host_per_gpu"] == pytest.approx(14 * psi / n)


def test_parameter_count_matches_timm():
    # DESIGN.md: timm's encoder-only count for T; SimMIM adds the mask token and the 1x1 decoder.
    expected = 27_578_154 + 96 + (768 * 32 * 32 * 3 + 32 * 32 * 3)
    assert model_facts("swinv2_tiny").params == expected


def test_plan_cli(capsys):
    argv = ["--model", "swinv2_tiny", "--gpus", "8", "--gpu-mem", "80", "--micro-batch", "16"]
    assert plan.main(argv + ["--memory-only"]) == 0
    out = capsys.readouterr().out
    assert "swinv2_tiny @ 192 px" in out and "suggested:" in out and "fits" in out
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended: ZeRO-" in out and "micro-batch 16 x 1" in out


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


def _timm_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_plan_vit_b_and_swin_l_through_their_specs(capsys):
    """`gigamim plan` for ViT-B/16 SimMIM on 16 GPUs and a Swin-L: parameters against timm's own
    models (+ the mask token and SimMIM's 1x1 decoder), rows only for the attention modes each
    family runs (timm's ViT: SDPA's fused kernel; Swin V1: the math kernel on CPU and the fused
    one on GPU; no sequential attention), checkpointing of every block only (timm's checkpoint_seq)."""
    import timm
    from timm.models.swin_transformer import SwinTransformer

    with torch.device("meta"):
        vit = _timm_params(timm.create_model("vit_base_patch16_224", num_classes=0))
        swin = _timm_params(SwinTransformer(img_size=192, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
                                            num_heads=(6, 12, 24, 48), num_classes=0))
    # (name, timm's encoder, mask token width (the embedding's), decoder input width, stride, modes)
    for name, enc, e, c, stride, modes in (("vit_base_patch16", vit, 768, 768, 16, ["fused"]),
                                           ("swin_large", swin, 192, 1536, 32, ["explicit", "fused"])):
        argv = ["--model", name, "--gpus", "16", "--gpu-mem", "80"]
        assert plan.main(argv) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"{name} @ ") and "recommended:" in text and "sequential" not in text
        assert plan.main(argv + ["--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["params"] == enc + e + c * stride * stride * 3 + stride * stride * 3
        assert sorted(data["activations_per_image"]) == sorted(modes + [m + "+ckpt" for m in modes])
        assert {r["ckpt_every"] for r in data["candidates"]} == {0, 1}
        assert data["recommended"]["mem_gb"] <= data["budget_gb"]
    assert plan.main(["--model", "vit_base_patch16_simmim", "--gpus", "16", "--memory-only"]) == 0
    assert "suggested:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--model", "vit_base_patch16", "--window-size", "7"], "vit_base_patch16 (vit) takes no 'window_size'"),
    (["--model", "vit_base_patch16", "--img-size", "200"], "img_size=200 must be divisible by patch_size=16"),
    (["--gpus", "0"], "--gpus"),
    (["--model", "swinv2_enormous"], "unknown model"),
    (["--img-size", "200"], "img_size"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--gpus", "4", "--gpus-per-node", "8"], "--gpus-per-node (8) is more than --gpus (4)"),
    (["--gpus", "12", "--gpus-per-node", "8"], "not a whole number of nodes"),
    (["--gpus", "64", "--global-batch", "1000"], "cannot be split over 64 GPUs"),
    (["--gpus", "8", "--global-batch", "64", "--micro-batch", "3"], "cannot be split into micro-batches of 3"),
    (["--gpus", "1", "--gpus-per-node", "1", "--gpu-mem", "2"], "nothing fits swinv2_giant on 1 x 2 GB"),
    (["--ib", "lots"], "--ib 'lots'"),
])
def test_plan_cli_bad_input(argv, msg, capsys):
    assert plan.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert captured.out == ""


# ---------------------------------------------------------------------------- step-time model


from gigamim.tools import hardware, step_model  # noqa: E402
from gigamim.tools.step_model import Candidate, Precision, ZeroKnobs  # noqa: E402

TINY_SIMMIM = 27_578_154 + 96 + (768 * 32 * 32 * 3 + 32 * 32 * 3)  # timm encoder + mask token + decoder


@pytest.mark.parametrize("stage,acc", [(1, 1), (1, 4), (2, 4), (3, 1), (3, 3)])
def test_zero_bytes_per_step_match_arithmetic(stage, acc):
    # Independent arithmetic from the parameter count: what DeepSpeed moves per optimizer step.
    facts = model_facts("swinv2_tiny")
    assert facts.params == TINY_SIMMIM
    knobs = ZeroKnobs(max_live=1e7, persistence_threshold=0)
    prec = Precision(param_bytes=2, grad_bytes=2)
    got = step_model.comm_bytes_by_kind(step_model.comm_plan(facts, Candidate(stage, 8, acc), 16, 8, knobs, prec))
    P = TINY_SIMMIM
    if stage == 1:  # one gradient all-reduce per step, one parameter all-gather per step
        assert got == {"all_reduce": 2 * P, "all_gather": 2 * P}
    elif stage == 2:  # the gradient all-reduce on every micro-step
        assert got == {"all_reduce": acc * 2 * P, "all_gather": 2 * P}
    else:  # forward gather of P, backward gather of what max_live did not keep, reduce-scatter of P
        # Kept: the decoder (768 x 3072 conv + bias), the final norm and the last block's
        # norm2, fc2, fc1, norm1, proj, qkv, ... as long as they fit in 1e7 (written out here).
        c, h = 768, 3072
        tail = [c * 3072 + 3072, 2 * c, 2 * c, h * c + c, c * h + h, 2 * c, c * c + c]
        kept, i = 0, 0
        while i < len(tail) and kept + tail[i] <= 1e7:
            kept += tail[i]
            i += 1
        assert i == len(tail)  # all of these fit; qkv (+ biases) may or may not: bounded below
        ag = got["all_gather"] / (acc * 2)
        assert P + P - 1e7 <= ag <= P + P - kept
        assert got["reduce_scatter"] == acc * 2 * P


def test_zero3_persistent_params_and_checkpointing_gathers():
    facts = model_facts("swinv2_tiny")
    prec = Precision()
    small = sum(n for n in (p.numel() for p in SimMIM(create_model("swinv2_tiny")).parameters()) if n < 1e5)
    # Parameters below the persistence threshold are never gathered; max_live above P keeps all.
    knobs = ZeroKnobs(max_live=1e9, persistence_threshold=1e5)
    got = step_model.comm_bytes_by_kind(step_model.comm_plan(facts, Candidate(3, 4, 1), 8, 8, knobs, prec))
    assert got["all_gather"] == 2 * (TINY_SIMMIM - small)
    # Checkpointing adds gathers only when max_live cannot hold one block (the recompute's
    # gather serves the block's backward otherwise): every 2nd block re-gathered here.
    blocks = [sum(p.numel() for p in b.parameters()) for b in create_model("swinv2_tiny").blocks()]
    knobs = ZeroKnobs(max_live=1e6, persistence_threshold=0)
    plain = step_model.comm_bytes_by_kind(step_model.comm_plan(facts, Candidate(3, 4, 1), 8, 8, knobs, prec))
    ck = step_model.comm_bytes_by_kind(step_model.comm_plan(facts, Candidate(3, 4, 1, ckpt_every=2), 8, 8, knobs, prec))
    assert ck["all_gather"] - plain["all_gather"] == 2 * sum(blocks[0::2])
    knobs = ZeroKnobs(max_live=1e8, persistence_threshold=0)
    a = step_model.comm_plan(facts, Candidate(3, 4, 1), 8, 8, knobs, prec)
    b = step_model.comm_plan(facts, Candidate(3, 4, 1, ckpt_every=1), 8, 8, knobs, prec)
    assert step_model.comm_bytes_by_kind(a) == step_model.comm_bytes_by_kind(b)


def test_zeropp_factors_and_hpz_scope():
    facts = model_facts("swinv2_tiny")
    knobs, prec = ZeroKnobs(max_live=0, persistence_threshold=0), Precision()
    P = TINY_SIMMIM
    base = step_model.comm_plan(facts, Candidate(3, 4, 1), 64, 8, knobs, prec)
    zpp = step_model.comm_plan(facts, Candidate(3, 4, 1, hpz=True, qwz=True, qgz=True), 64, 8, knobs, prec)
    fwd = [c for c in zpp if c["what"] == "parameters, forward"][0]
    assert fwd["bytes"] == pytest.approx(2 * P * (0.5 + 1 / 256))  # int8 + fp32 scales
    bwd = [c for c in zpp if c["what"].startswith("parameters, backward")][0]
    assert bwd["scope"] == "node" and bwd["bytes"] == 2 * P
    grads = [c for c in zpp if c["what"].startswith("gradients")]
    assert [c["bytes"] for c in grads] == pytest.approx([2 * P / 4, 2 * P / 4 / 8])  # int4, 2nd hop 1/8 of it
    assert {c["kind"] for c in base} == {"all_gather", "reduce_scatter"}
    # With a slow inter-node network, hpZ's intra-node backward gather is faster.
    net = hardware.Network(intra_bps=360e9, inter_bps=46e9)
    dev = hardware.DEVICES["h100"]
    t0 = step_model.step_time(facts, Candidate(3, 4, 1), 64, 8, dev, net, knobs, prec)["comm_s"]
    t1 = step_model.step_time(facts, Candidate(3, 4, 1, hpz=True), 64, 8, dev, net, knobs, prec)["comm_s"]
    assert t1 < t0


def test_collective_time_is_ring_busbw_plus_latency():
    net = hardware.Network(intra_bps=360e9, inter_bps=184e9, base_latency_s=10e-6, intra_hop_s=1e-6, inter_hop_s=6e-6)
    S = 3e9
    # all-gather of S over 64 ranks on 8 nodes: (n-1)/n S at the inter-node busbw, plus
    # 10 us + 7 IB hops + 56 NVLink hops of latency per call.
    want = 2 * (10e-6 + 7 * 6e-6 + 56 * 1e-6) + 63 / 64 * S / 184e9
    assert hardware.collective_seconds("all_gather", S, 64, 8, net, calls=2) == pytest.approx(want)
    # all-reduce inside one node moves twice the bytes of an all-gather.
    want = 10e-6 + 2 * 7 * 1e-6 + 2 * 7 / 8 * S / 360e9
    assert hardware.collective_seconds("all_reduce", S, 8, 8, net) == pytest.approx(want)
    assert hardware.parse_ib("4x400") == pytest.approx(4 * 46e9)


def test_train_flops_count_recompute_of_checkpointed_blocks():
    from gigamim.models.flops import forward_flops

    facts = model_facts("swinv2_tiny")
    model = SimMIM(create_model("swinv2_tiny"))
    mb = 8
    f = forward_flops(model, 192, batch_size=mb)
    # Non-block FLOPs written out here: patch embed, 3 merges, decoder, CPB (per forward / mb).
    side, c = 48, 96
    non_block = 2 * side**2 * c * 3 * 16
    for i in range(1, 4):
        non_block += 2 * (side // 2**i) ** 2 * (2 * c * 2**i) * (c * 2**i)
    non_block += 2 * 6 * 6 * 768 * 3072
    depths, heads = (2, 2, 6, 2), (3, 6, 12, 24)
    windows = (12, 12, 12, 6)  # stage 3 (6x6 map) shrinks its window to the map
    non_block += sum(d * 2 * (2 * w - 1) ** 2 * (2 * 512 + 512 * h) for d, h, w in zip(depths, heads, windows)) / mb
    blocks = f - non_block
    assert step_model.train_flops_per_image(facts, Candidate(1, mb)) == pytest.approx(3 * f)
    assert step_model.train_flops_per_image(facts, Candidate(1, mb, ckpt_every=1)) == pytest.approx(3 * f + blocks)
    # A recompute is a forward: at forward_efficiency, the rest at efficiency (compute_s, one
    # micro-step, one rank, no communication: written out from the FLOPs above).
    device = hardware.Device("test", 100.0, 80.0, 2000.0)
    costs = step_model.Costs(efficiency=0.5, forward_efficiency=0.25)
    got = step_model.step_time(facts, Candidate(1, mb, ckpt_every=1), 1, 1, device, hardware.Network(),
                               costs=costs)["compute_s"]
    assert got == pytest.approx(mb * 3 * f / (100e12 * 0.5) + mb * blocks / (100e12 * 0.25), rel=1e-9)


def test_plan_giant_64_gpus_table_and_json_agree(capsys):
    argv = ["--model", "swinv2_giant", "--gpus", "64", "--gpus-per-node", "8", "--gpu-mem", "80"]
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    assert plan.main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    best = data["recommended"]
    assert "<- recommended" in text
    line = [ln for ln in text.splitlines() if ln.startswith("recommended:")][0]
    assert f"{best['step_s']:.3f} s/step" in line and f"{best['images_per_s']:.0f} img/s" in line
    assert f"MFU {best['mfu']:.1%}" in line and f"{best['mem_gb']:.1f} GiB/GPU" in line
    assert best["mem_gb"] <= data["budget_gb"]
    # images/s and MFU follow from the step time: independent arithmetic.
    images = best["micro_batch"] * best["accumulation"] * 64
    assert best["images_per_s"] == pytest.approx(images / best["step_s"])
    f = model_facts("swinv2_giant").forward_flops
    assert best["mfu"] == pytest.approx(3 * f * images / best["step_s"] / (64 * 989e12))
    assert all(r["images_per_s"] <= data["candidates"][0]["images_per_s"] for r in data["candidates"])


# ---------------------------------------------------------------------------- against a real 2-rank run


def _counted_vs_predicted(stage: int, ckpt: int, tmp_path):
    """A real 2-rank DeepSpeed run (gloo, deepspeed.initialize, SimMIM(create_model)) with every
    torch.distributed collective wrapped and counted; the model's bytes for the same shape."""
    from gigamim_benchmarks.plan_calibration import run_case
    from gigamim_benchmarks.plan_calibration_report import predict

    # max_live 1e6 of nano's 2.1M: backward re-gathers all but the decoder (what forward keeps).
    case = {"model": "swinv2_nano", "stage": stage, "ckpt": ckpt, "micro_batch": 2, "accumulation": 2, "steps": 1,
            "warmup": 1, "max_live": 1e6}
    run = run_case(case, tmp_path, timeout=300)
    counted = {k: v for k, v in run["bytes_per_step"].items() if v >= 1024}  # grad-norm scalars aside
    predicted = predict(run, {"gemm_tflops": 1.0, "mem_gbps": 1.0, "efficiency": 0.5, "optim_s_per_param": 1e-9,
                              "gloo": {}}, 96, 6)["comm_bytes"]
    assert set(counted) == set(predicted), (counted, predicted)
    for kind, n in counted.items():
        assert predicted[kind] == pytest.approx(n, rel=0.05), (kind, counted, predicted)


def test_calibration_ranks_output_does_not_block_the_pair(tmp_path):
    # A rank that writes more than a pipe holds (DeepSpeed's deprecation warnings did, on
    # swinv2_small) before a collective: with the ranks' output on pipes read one rank at a
    # time, it blocked on the write while its peer waited in the collective, until the timeout.
    from gigamim_benchmarks.plan_calibration import run_case

    run = run_case({"chatter": 1 << 20}, tmp_path, timeout=90)
    assert run["world"] == 2


def test_zero3_bytes_match_counted_collectives(tmp_path):
    _counted_vs_predicted(3, 1, tmp_path)


@pytest.mark.parametrize("stage", [1, 2])  # ~7 s each on 2 cores
def test_zero12_bytes_match_counted_collectives(stage, tmp_path):
    _counted_vs_predicted(stage, 0, tmp_path)


def test_fsdp2_memory_rows_and_candidates():
    # FSDP2 rows beside ZeRO's: fp32 shards of parameters, gradients, m and v (16 B / param / GPU),
    # bf16 copies of the root unit + the current and the prefetched block, the gradients in flight
    # (bf16 + the fp32 reduce-scatter copy of one block, the root's bf16), written out here for
    # swinv2_tiny: the largest block is stage 3's (C = 768, 24 heads, CPB MLP 2 -> 512 -> 24).
    P, c = TINY_SIMMIM, 768
    block = 4 * c + (3 * c * c + 2 * c) + 24 + (2 * 512 + 512) + 24 * 512 + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    blocks = sum(sum(p.numel() for p in b.parameters()) for b in create_model("swinv2_tiny").blocks())
    root = P - blocks
    p = plan.make_plan("swinv2_tiny", 8, 80, global_batch=8 * 64)
    rows = {(r["plan"], r["activations"]): r for r in p["rows"]}
    reshard, keep = rows[("FSDP2", "fused")], rows[("FSDP2 no-reshard", "fused")]
    grads = 2 * root + 6 * block
    assert reshard["model_states_gb"] * GiB == pytest.approx(16 * P / 8 + 2 * (root + 2 * block) + grads)
    assert keep["model_states_gb"] * GiB == pytest.approx(16 * P / 8 + 2 * P + grads)
    assert reshard["accumulation_extra_gb"] * GiB == pytest.approx(4 * P)  # unsharded fp32 gradients
    assert reshard["engine"] == "fsdp2" and reshard["zero_stage"] is None
    text = plan.format_plan(p)
    assert "FSDP2 no-reshard" in text and "unsharded fp32 gradients" in text
    # the step-time candidates: FSDP2 rows with the communication of the model above
    net, dev = hardware.Network(), hardware.DEVICES["h100"]
    from gigamim.tools.candidates import enumerate_candidates

    cands = enumerate_candidates("swinv2_tiny", 8, 8, 80, dev, net, global_batch=8 * 64)
    f = [r for r in cands if r["plan"] == "FSDP2"]
    assert f and all(r["engine"] == "fsdp2" and r["zero_stage"] is None for r in f)
    r = f[0]
    gb = r["comm_gb_per_step"]
    padded = gb["reduce_scatter"] * 1e9 / 4  # fp32 reduce-scatter of every (padded) parameter, once per step
    assert P <= padded < P * 1.01
    assert gb["all_gather"] * 1e9 == pytest.approx(r["accumulation"] * 2 * 2 * padded)  # bf16, forward + backward


def _fsdp2_counted_vs_predicted(reshard: bool, ckpt: int, accumulation: int, tmp_path):
    """gigamim's FSDP2 engine on 2 real ranks (gloo, fully_shard per block + root), every
    torch.distributed collective wrapped and counted; the planner's bytes and calls for the
    same shape must be those, to the byte (FSDP2's dim-0 padding included)."""
    from gigamim_benchmarks.plan_calibration import run_case
    from gigamim_benchmarks.plan_calibration_report import predict

    case = {"model": "swinv2_nano", "engine": "fsdp2", "reshard": reshard, "ckpt": ckpt, "micro_batch": 2,
            "accumulation": accumulation, "steps": 1, "warmup": 1}
    run = run_case(case, tmp_path, timeout=300)
    counted = {k: v for k, v in run["bytes_per_step"].items() if v >= 1024}
    pred = predict(run, {"gemm_tflops": 1.0, "mem_gbps": 1.0, "efficiency": 0.5, "optim_s_per_param": 1e-9,
                         "gloo": {}}, 96, 6)
    assert counted == pred["comm_bytes"], (counted, pred["comm_bytes"])
    calls = {}
    for c in pred["comm"]:
        calls[c["kind"]] = calls.get(c["kind"], 0) + c["calls"]
    assert {k: run["calls_per_step"][k] for k in counted} == calls


def test_fsdp2_bytes_match_counted_collectives(tmp_path):
    # reshard after forward (a second gather in backward, the root's too), accumulation 2
    # (the reduce-scatter only at the boundary), nano's odd dim-0 parameters (padding).
    _fsdp2_counted_vs_predicted(True, 0, 2, tmp_path)


@pytest.mark.slow
def test_fsdp2_no_reshard_checkpointed_bytes_match_counted_collectives(tmp_path):
    # one gather per micro-step; checkpointed blocks recompute without gathering again
    _fsdp2_counted_vs_predicted(False, 1, 3, tmp_path)


def test_plan_cli_non_default_window(capsys):
    # 512 px needs a window dividing 128: the override must reach every part of the plan.
    assert plan.main(["--model", "swinv2_nano", "--img-size", "512", "--window-size", "16", "--gpus", "8"]) == 0
    assert "recommended:" in capsys.readouterr().out
