"""Built partitioned: real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo).

The test functions launch this very file with torchrun; the ``__main__`` block is the
per-rank worker, which writes its measurements to ``<out>/rank{r}.json``. References: an
unpartitioned model with the same weights (forward), the model's known size (memory).
"""

import json
import os
import sys

import pytest

from tests.launch import run_rank_script

HERE = os.path.abspath(__file__)


def _launch(tmp_path, mode, timeout):
    return run_rank_script(HERE, 2, mode, str(tmp_path), out=tmp_path, timeout=timeout)


def test_partitioned_tiny_forward_equals_unpartitioned(tmp_path):
    results = _launch(tmp_path, "forward", timeout=600)
    for r in results:
        # each rank holds about half of every parameter, never the whole model
        assert r["numel_full"] == 27_578_154
        assert abs(r["numel_local"] - r["numel_full"] / 2) < 0.01 * r["numel_full"]
        assert r["buffers"] == []
        # DeepSpeed's ZeRO-3 linear (matmul, then bias add) rounds differently from F.linear:
        # fp32 agrees to ~1e-5 relative on this (deliberately sensitive) randomised model.
        assert r["fp32_rel_err"] < 1e-4, r
        assert r["bf16_rel_err"] < 0.02, r
        assert r["no_decay_equal"]


@pytest.mark.slow
def test_simmim_train_step_under_zero3_with_checkpointing(tmp_path):
    for r in _launch(tmp_path, "train", timeout=900):
        assert r["loss_finite"] and r["param_changed"]


@pytest.mark.slow
def test_giant_under_zero_init_bf16_holds_half_per_rank(tmp_path):
    results = _launch(tmp_path, "giant", timeout=3000)
    for r in results:
        half = r["numel_full"] * 2 / 2  # bf16 bytes / 2 ranks
        assert 2.99e9 <= r["numel_full"] <= 3.01e9
        assert abs(r["local_bytes"] - half) < 0.01 * half
        # resident growth while building: the local half plus transient full copies of single
        # modules (largest: a 4096x16384 bf16 fc1 = 134 MB), well below the 6 GB whole model
        assert r["rss_growth_bytes"] < half + 1.0e9, r


# ----------------------------------------------------------------------------- worker
def _worker(mode, out):
    import copy
    import resource
    import time

    import deepspeed
    import psutil
    import torch

    from gigamim.models import SimMIM, create_model
    from gigamim.models.param_groups import no_weight_decay_names, param_groups
    from tests.helpers.randomize import randomize_weights

    t0 = time.time()
    from gigamim.runtime.dist import init_distributed
    from gigamim.train.engines.deepspeed import init_comm  # DeepSpeed's comm layer; unlinks its CPU shm buffers

    init_distributed("gloo")
    init_comm()
    rank = torch.distributed.get_rank()
    result = {}

    def zero3_config(bf16):
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": bf16},
            "gradient_clipping": 0.0,
        }

    if mode in ("forward", "train"):
        kw = dict(img_size=128, window_size=4, drop_path_rate=0.0)
        reference = randomize_weights(create_model("swinv2_tiny", **kw), seed=7).eval()
        weights = reference.state_dict()
        x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = reference.forward_features(x)

        def build(dtype, simmim=False, **extra):
            # dtype comes from the config: DeepSpeed 0.19.8's Init(dtype=...) ignores an explicit
            # dtype on accelerators without fp16 (CPU) and silently uses bf16 (operator precedence).
            with deepspeed.zero.Init(config_dict_or_path=zero3_config(dtype == torch.bfloat16)):
                model = create_model("swinv2_tiny", **kw, **extra)
                if simmim:
                    model = SimMIM(model)
            params = dict(model.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if rank == 0:
                    for name, p in params.items():
                        if name in weights:  # SimMIM's mask token / decoder keep their init
                            p.data.copy_(weights[name].to(p.dtype))
            return model

        weights = {**weights, **{"encoder." + k: v for k, v in weights.items()}}

    if mode == "forward":
        model = build(torch.float32)
        result["numel_full"] = sum(p.ds_numel for p in model.parameters())
        result["numel_local"] = sum(p.ds_tensor.numel() for p in model.parameters())
        # Only the integer geometry buffers (relative index/offsets, shift regions) may exist.
        result["buffers"] = [n for n, b in model.named_buffers() if b.is_floating_point()]
        result["no_decay_equal"] = no_weight_decay_names(model) == no_weight_decay_names(reference)
        engine, *_ = deepspeed.initialize(model=model, config=zero3_config(False))
        engine.eval()
        with torch.no_grad():
            got = engine.module.forward_features(x)
        result["t_fp32"] = time.time() - t0
        result["fp32_rel_err"] = ((got - want).norm() / want.norm()).item()

        # bf16 construction (the zero.Init dtype trap): geometry still fp32/int64 inside.
        model16 = build(torch.bfloat16)
        engine16, *_ = deepspeed.initialize(model=model16, config=zero3_config(True))
        engine16.eval()
        with torch.no_grad():
            got16 = engine16.module.forward_features(x.bfloat16()).float()
            # reference: the same weights, unpartitioned, cast to bf16 after construction
            want16 = copy.deepcopy(reference).bfloat16().forward_features(x.bfloat16()).float()
        result["t_bf16"] = time.time() - t0
        result["bf16_rel_err"] = ((got16 - want16).norm() / want16.norm()).item()

    if mode == "train":
        # one SimMIM training step under ZeRO-3 with checkpointing + sequential attention:
        # the mask token (an encoder-level parameter) and nested checkpoints under ZeRO-3 hooks
        model_t = build(torch.float32, simmim=True, grad_checkpointing=True, sequential_stages=(0, 1), attn_chunk=8)
        opt = torch.optim.AdamW(param_groups(model_t, 0.05), lr=1e-3)
        engine_t, *_ = deepspeed.initialize(model=model_t, optimizer=opt, config=zero3_config(False))
        engine_t.train()
        probe = next(engine_t.module.parameters())
        before = probe.ds_tensor.clone()
        mask = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.4
        loss = engine_t(x, mask)
        engine_t.backward(loss)
        engine_t.step()
        result["t_train"] = time.time() - t0
        result["loss_finite"] = bool(torch.isfinite(loss).item())
        result["param_changed"] = bool((probe.ds_tensor - before).abs().max().item() > 0)

    elif mode == "giant":
        proc = psutil.Process()
        base = proc.memory_info().rss
        with deepspeed.zero.Init(config_dict_or_path=zero3_config(True)):
            model = create_model("swinv2_giant")
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["numel_full"] = sum(p.ds_numel for p in model.parameters())
        result["local_bytes"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
        result["rss_base_bytes"] = base
        result["rss_now_bytes"] = proc.memory_info().rss
        result["rss_peak_bytes"] = peak_kb * 1024
        result["rss_growth_bytes"] = peak_kb * 1024 - base
        result["dtypes"] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})

    (out_dir := __import__("pathlib").Path(out)).mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    from gigamim.runtime.dist import destroy_distributed
    from tests.launch import exit_now

    _worker(sys.argv[1], sys.argv[2])
    destroy_distributed()
    exit_now()
