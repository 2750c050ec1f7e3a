"""The FSDP2 engine (`train.engine: fsdp2`) on 2 CPU ranks (gloo), real `fully_shard`.

The test functions launch this very file with torchrun; the ``__main__`` block is the
per-rank worker, which builds SimMIM swinv2_nano through the engine seam and writes what it
holds to ``<out>``. References are independent of the engine: a plain single-process CPU
build (deterministic parameters and buffers exactly; the random ones by their statistics),
and a plain single-process AdamW run on the same global batches (the step: accumulation,
averaging over ranks, clipping, the LR schedule).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from tests.launch import run_rank_script

HERE = os.path.abspath(__file__)
IMG = 96
SETS = [f"model.img_size={IMG}", "train.engine=fsdp2", "train.micro_batch_size=2", "train.global_batch_size=8",
        "optim.warmup_steps=1", "optim.lr=2e-3", "train.max_steps=4"]


def _config(*extra):
    from gigamim.config import load_config

    return load_config("demo", [*SETS, *extra])


def _plain(seed: int, **model):
    from gigamim.models.build import build_simmim

    torch.manual_seed(seed)
    return build_simmim({**dataclasses.asdict(_config().model), **model})


def _launch(tmp_path, mode, timeout=600):
    return run_rank_script(HERE, 2, mode, str(tmp_path), out=tmp_path, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    results = _launch(out, "init")
    return out, results


def test_materialised_sharded_equals_plain_build(built):
    """Deterministic parameters (norms, biases, logit scales, q/v biases) and every buffer
    (index tables, shift regions) exactly as a plain CPU build; no rank held the model."""
    out, results = built
    full = torch.load(out / "full.pt")
    buffers = torch.load(out / "buffers.pt")
    a, b = _plain(0), _plain(1)
    ref = dict(a.state_dict())
    deterministic = [k for k, v in ref.items() if torch.equal(v, b.state_dict()[k])]
    assert sorted(full) == sorted(ref)
    names = " ".join(deterministic)
    for needed in ("norm1.weight", "norm2.bias", "attn.logit_scale", "attn.q_bias", "attn.v_bias",
                   "patch_embed.norm.weight", "downsample.norm.bias", "encoder.norm.weight", "fc1.bias"):
        assert needed in names, needed
    for k in deterministic:
        assert torch.equal(full[k], ref[k]), k
    ref_buffers = dict(a.named_buffers())
    assert any("shift_regions" in k for k in ref_buffers) and any("relative_position_index" in k for k in ref_buffers)
    assert sorted(buffers) == sorted(ref_buffers)
    for k, v in ref_buffers.items():
        assert torch.equal(buffers[k], v), k
    total = sum(p.numel() for p in a.parameters())
    for r in results:
        assert r["numel_full"] == total
        assert abs(r["numel_local"] - total / 2) < 0.01 * total  # each rank allocated half, never the whole
        assert r["fsdp_blocks"] == r["blocks"] == 8  # every SwinV2 block its own fully_shard unit


TIMM_FAMILIES = {"vit_nano_patch16": dict(img_size=64), "swin_nano": dict(img_size=96, window_size=6)}


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_vit_and_swin_v1_materialise_like_a_plain_build(built, name):
    """The timm-based encoders: every block a fully_shard unit; deterministic parameters and
    the buffers (Swin V1's index tables and shift masks) as a plain build; timm's Linear init
    (trunc normal .02) on the sharded weights."""
    from gigamim.models.build import build_simmim

    out, results = built
    got = torch.load(out / f"{name}.pt")
    plain = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        plain.append(build_simmim({"name": name, **TIMM_FAMILIES[name]}))
    ref, other = plain[0].state_dict(), plain[1].state_dict()
    assert sorted(got["full"]) == sorted(ref)
    for k, v in ref.items():
        if torch.equal(v, other[k]):
            assert torch.equal(got["full"][k], v), k
        elif k.endswith("weight") and ("attn.qkv" in k or "mlp.fc" in k) and v.numel() >= 4096:
            assert abs(got["full"][k].std().item() / 0.02 - 1) < 0.05, k
    ref_buffers = dict(plain[0].named_buffers())
    assert sorted(got["buffers"]) == sorted(ref_buffers)
    for k, v in ref_buffers.items():
        assert torch.equal(got["buffers"][k], v), k
    depth = sum(1 for k in ref if k.endswith("norm1.weight"))
    assert all(r[f"{name}_fsdp_blocks"] == depth for r in results)


def test_random_parameters_have_the_init_distribution(built):
    """Trunc-normal weights: std within a few % of 0.02; the two ranks' shards of one
    parameter are different draws (a CPU mesh has no DTensor RNG tracker)."""
    out, _ = built
    full = torch.load(out / "full.pt")
    shards = [torch.load(out / f"local{r}.pt") for r in range(2)]
    ref0, ref1 = _plain(0).state_dict(), _plain(1).state_dict()
    random = [k for k in ref0 if not torch.equal(ref0[k], ref1[k])]
    trunc = [k for k in random if k.endswith("weight") and ("attn." in k or "mlp." in k or "reduction" in k)]
    assert len(trunc) >= 30
    for k in trunc:
        n = full[k].numel()
        tol = 0.05 if n >= 4096 else 0.12  # sampling error of a std: ~1/sqrt(2n)
        assert abs(full[k].std().item() / 0.02 - 1) < tol, (k, n, full[k].std().item())
        assert abs(full[k].mean().item()) < 4 * 0.02 / n ** 0.5, k
    for k in random:  # the conv weights / biases (kaiming uniform) and the mask token: as the plain build's
        if full[k].numel() >= 1000 and k not in trunc:
            assert abs(full[k].std().item() / ref0[k].std().item() - 1) < 0.12, k
    for k in random:
        s0, s1 = shards[0][k].flatten(), shards[1][k].flatten()
        n = min(s0.numel(), s1.numel())
        if n:
            assert not torch.equal(s0[:n], s1[:n]), f"{k}: the ranks drew the same shard"


def test_step_equals_plain_adamw_and_checkpointing_composes(tmp_path):
    """2 optimizer steps, accumulation 2, clipping active: the sharded run's weights and grad
    norms equal a plain single-process AdamW on the same global batches; with
    grad_checkpointing=True (the model's own checkpoint around each fully_shard block) too."""
    results = _launch(tmp_path, "step", timeout=900)
    r = results[0]
    ref = r["reference"]
    assert ref["norms"][0] > 0.05  # the clip (0.05) acted
    assert ref["max_update"] > 1e-5  # the weights moved (2 AdamW steps at lr ~3e-5)
    for key in ("plain", "checkpointed"):
        assert r[key]["norms"] == pytest.approx(ref["norms"], rel=1e-4), key
        assert r[key]["losses"] == pytest.approx(ref["losses"], rel=1e-5), key
        assert r[key]["max_param_diff"] < 1e-3 * ref["max_update"], (key, r[key], ref)


# ----------------------------------------------------------------------------- worker


def _batches(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, IMG, IMG, generator=g), torch.rand(2, IMG // 4, IMG // 4, generator=g) < 0.6)
            for _ in range(n)]


def _engine(cfg, dist, model=None):
    from gigamim.models.build import build_simmim
    from gigamim.models.param_groups import param_groups
    from gigamim.train.engines import create_engine

    engine = create_engine(cfg, dist, "fp32")
    engine.build(lambda: build_simmim(model or dataclasses.asdict(cfg.model)),
                 lambda m: param_groups(m, cfg.optim.weight_decay))
    return engine


def _worker(mode, out):
    from pathlib import Path

    from torch.distributed.fsdp import FSDPModule

    from gigamim.models.compile import find_blocks
    from gigamim.runtime.dist import init_distributed

    dist = init_distributed()
    rank, out = dist.rank, Path(out)
    result = {}
    if mode == "init":
        engine = _engine(_config(), dist)
        model = engine.module
        blocks = find_blocks(model)
        result.update(blocks=len(blocks), fsdp_blocks=sum(isinstance(b, FSDPModule) for b in blocks),
                      numel_full=engine.num_parameters(), numel_local=sum(t.numel() for t in engine.local_shards()))
        torch.save({n: p.to_local().detach().clone() for n, p in model.named_parameters()}, out / f"local{rank}.pt")
        full = engine.full_state_dict(model)
        if rank == 0:
            torch.save(full, out / "full.pt")
            torch.save({n: b.clone() for n, b in model.named_buffers()}, out / "buffers.pt")
        for name, kw in TIMM_FAMILIES.items():  # timm's ViT / Swin V1 blocks, their own resets
            engine = _engine(_config(), dist, {"name": name, **kw})
            result[f"{name}_fsdp_blocks"] = sum(isinstance(b, FSDPModule) for b in find_blocks(engine.module))
            full = engine.full_state_dict(engine.module)
            if rank == 0:
                torch.save({"full": full, "buffers": {n: b.clone() for n, b in engine.module.named_buffers()}},
                           out / f"{name}.pt")
    elif mode == "step":
        result = _step_worker(dist)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def _step_worker(dist):
    """Both FSDP2 models start from the plain model's weights (load_weights), then 2 steps."""
    from gigamim.models.param_groups import param_groups
    from gigamim.train.optim import make_lr_scheduler, peak_lr

    world, accum, steps = dist.world_size, 2, 2
    batches = _batches(world * accum * steps)
    cfg = _config("train.grad_clip=0.05")
    plain = _plain(3)
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    result = {}
    for key, extra in (("plain", ()), ("checkpointed", ("model.grad_checkpointing=true",))):
        engine = _engine(_config("train.grad_clip=0.05", *extra), dist)
        engine.load_weights(engine.module, start if dist.rank == 0 else None, list(start))
        losses, norms = [], []
        for s in range(steps):
            total = 0.0
            for m in range(accum):
                x, mask = batches[(s * accum + m) * world + dist.rank]
                loss = engine(x, mask)
                engine.backward(loss)
                engine.step()
                t = loss.detach().clone()
                torch.distributed.all_reduce(t)
                total += t.item() / world / accum
            losses.append(total)
            norms.append(engine.grad_norm())
        full = engine.full_state_dict(engine.module)
        result[key] = {"losses": losses, "norms": norms, "full": full}
    if dist.rank != 0:
        return {}
    # The reference: one process, the whole global batch, the mean of the micro-batch losses.
    opt = torch.optim.AdamW(param_groups(plain, cfg.optim.weight_decay), lr=peak_lr(cfg), betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    sched = make_lr_scheduler(cfg)(opt)
    losses, norms = [], []
    per_step = world * accum
    for s in range(steps):
        parts = [plain(*b) for b in batches[s * per_step:(s + 1) * per_step]]
        loss = sum(parts) / per_step
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)))
        losses.append(loss.item())
        opt.step()
        sched.step()
        opt.zero_grad()
    ref = plain.state_dict()
    out = {"reference": {"losses": losses, "norms": norms,
                         "max_update": max((ref[k] - start[k]).abs().max().item() for k in ref)}}
    for key in ("plain", "checkpointed"):
        r = result[key]
        out[key] = {"losses": r["losses"], "norms": r["norms"],
                    "max_param_diff": max((r["full"][k] - ref[k]).abs().max().item() for k in ref)}
    return out


if __name__ == "__main__":
    from gigamim.runtime.dist import destroy_distributed
    from tests.launch import exit_now

    _worker(sys.argv[1], sys.argv[2])
    destroy_distributed()
    exit_now()


def test_config_refusals_are_one_line():
    from gigamim.config import ConfigError, validate
    from gigamim.train.engines import check_engine_config

    with pytest.raises(ConfigError, match="fsdp.reduce_dtype' must be one of fp32, bf16; got 'fp16'"):
        validate(_config("fsdp.reduce_dtype=fp16"), world_size=2, check_files=False)
    with pytest.raises(ConfigError, match="config key 'fsdp.cpu_offload' expects true/false"):
        _config("fsdp.cpu_offload=maybe")
    with pytest.raises(ConfigError, match="no fp16 loss scaler: use train.precision=bf16"):
        check_engine_config(_config("train.precision=fp16"))
    for name in ("swinv2_nano", "vit_nano_patch16", "swin_nano"):  # each re-initialises after a meta build
        check_engine_config(_config(f"model.name={name}"))


def test_a_module_without_reset_is_named():
    from gigamim.models.init import meta_init_problem

    class Scale(torch.nn.Module):  # a parameter of its own, no reset_parameters
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(3))

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Scale())
    assert meta_init_problem(model) == ("module 1 (Scale) holds gain but has no reset_parameters() to "
                                        "re-initialise them after a meta-device build")
    assert meta_init_problem(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))) is None
