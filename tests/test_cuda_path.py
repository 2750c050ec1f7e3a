"""The CUDA path, proven without a GPU: every model size's SimMIM forward on fake CUDA tensors.

Each case builds the model on the meta device, turns it into fake CUDA tensors in bf16 (the
dtype DeepSpeed's bf16 mode trains in) and runs a training-mode forward with the default
kernel dispatch, SDPA dispatching as an H200 would (the fused kernel's own output strides:
the memory-efficient kernel's transposed buffer broke every GPU run once). It fails on:

* a device mix: the fake kernels refuse cuda/cpu operands, and any op that produces a CPU
  tensor inside the forward is listed (a host-to-device copy per call on a real GPU);
* a dtype mix or a silent promotion: the kernels refuse mixed GEMM operands, and an fp32
  tensor that grows with the batch inside the bf16 encoder is listed (the SimMIM loss after
  the decoder is fp32 by design and not audited);
* a layout assumption (a ``.view`` of a strided kernel output, say) or a shape error.

flex is not in this tier: on CUDA it runs compiled and its compile needs a driver ("torch
.compile ... hasPrimaryContext expects a valid device index" under FakeTensorMode), and its
eager fallback cannot be traced on fake tensors; the GPU script checks it. Backward is not
either: the autograd engine needs a real device. What fake tensors show is what a forward
builds and saves; benchmarks/activation_memory.py turns that into bytes per image.
"""

from __future__ import annotations

import collections

import pytest
import torch

from gigamim.models import SimMIM, create_model
from tests.helpers.fake_cuda import OpAudit, fake_mode, patch_sdpa, to_fake_cuda

FAST = ["swinv2_nano", "swinv2_tiny", "swinv2_small", "swinv2_base"]
SLOW = ["swinv2_large", "swinv2_huge", "swinv2_giant"]
SETTINGS = {
    "plain": {},
    "checkpointing": dict(grad_checkpointing=True),
    "sequential": dict(sequential_stages=(0, 1, 2, 3), attn_chunk=16),
}


def _fp32_elements(audit: OpAudit) -> collections.Counter:
    """Elements of every non-view fp32 output, by op."""
    out = collections.Counter()
    for op, shape in audit.floats(torch.float32):
        out[op] += torch.Size(shape).numel()
    return out


def _forward(build, batch: int, img: int, grid: int, monkeypatch, stop_at=lambda m: None):
    """Build on meta, go fake CUDA bf16, run a training-mode forward: (output, audit, model)."""
    patch_sdpa(monkeypatch)
    with torch.device("meta"):
        model = build()
    with fake_mode():
        model = to_fake_cuda(model).train()
        x = torch.randn(batch, 3, img, img, device="cuda", dtype=torch.bfloat16)
        mask = torch.rand(batch, grid, grid, device="cuda") > 0.4
        with OpAudit().until(stop_at(model)) as audit:
            out = model(x, mask) if grid else model(x)
    return out, audit, model


def _check_simmim(build, img: int, monkeypatch, impl: str):
    runs = {}
    for batch in (2, 4):
        loss, audit, model = _forward(build, batch, img, img // 4, monkeypatch, stop_at=lambda m: m.decoder)
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.shape == ()
        assert audit.cpu_ops() == [], f"CPU tensors made inside the CUDA forward by {audit.cpu_ops()}"
        runs[batch] = audit
    ops = {row[0] for row in runs[4].rows}
    if impl == "sdpa":
        # Every window attention ran the memory-efficient kernel (the float mask requires grad).
        # (per chunk for sequential stages); no softmax outside it (SDPA's math fallback).
        calls = sum(1 for row in runs[4].rows if row[0] == "_scaled_dot_product_efficient_attention" and row[4] == 0)
        assert calls >= len(model.encoder.blocks()), calls
        assert not ops & {"_softmax", "_safe_softmax"}, ops & {"_softmax", "_safe_softmax"}
    else:
        assert not any(op.startswith("_scaled_dot_product") for op in ops)
    # Nothing fp32 grows with the batch inside the bf16 encoder (only the CPB tables, per block).
    small, large = _fp32_elements(runs[2]), _fp32_elements(runs[4])
    grew = {op: large[op] - small[op] for op in large if large[op] != small[op]}
    assert not grew, f"fp32 tensors that grow with the batch inside the bf16 encoder: {grew}"


def _variant(name, impl, setting, img=192):
    return lambda: SimMIM(create_model(name, img_size=img, attn_impl=impl, **SETTINGS[setting]))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("name", FAST)
def test_swinv2_simmim_forward_on_fake_cuda(name, impl, setting, monkeypatch):
    _check_simmim(_variant(name, impl, setting), 192, monkeypatch, impl)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("name", SLOW)
def test_big_swinv2_simmim_forward_on_fake_cuda(name, impl, setting, monkeypatch):
    _check_simmim(_variant(name, impl, setting), 192, monkeypatch, impl)


@pytest.mark.parametrize("config", ["simmim_swinv2_giant_192", "simmim_swinv2_base_192"])
def test_recipe_forward_on_fake_cuda(config, monkeypatch):
    """The packaged recipes (SwinV2-G, the model every GPU user trains, and B) built as the
    trainer builds them on a GPU (the section as written, attn_impl resolved for cuda)."""
    import dataclasses

    from gigamim.config import ModelConfig, load_config
    from gigamim.models.attention import resolve_attn_impl
    from gigamim.models.build import build_simmim

    cfg = load_config(config)
    impl = resolve_attn_impl(cfg.model.attn_impl, "cuda")
    section = dict(dataclasses.asdict(cfg.model), attn_impl=impl)
    build = lambda: build_simmim(section, defaults=dataclasses.asdict(ModelConfig()),  # noqa: E731
                                 norm_target=cfg.data.norm_target, norm_target_patch=cfg.data.norm_target_patch)
    _check_simmim(build, cfg.model.img_size, monkeypatch, impl)


@pytest.mark.parametrize("name,img", [("vit_base_patch16", 224), ("swin_base", 192)])
def test_vit_and_swin_v1_simmim_forward_on_fake_cuda(name, img, monkeypatch):
    kw = dict(img_size=img) if name.startswith("vit") else dict(img_size=img, window_size=6)
    loss, audit, model = _forward(lambda: SimMIM(create_model(name, **kw)), 2, img, img // model_patch(name),
                                  monkeypatch, stop_at=lambda m: m.decoder)
    assert loss.device.type == "cuda" and loss.dtype == torch.float32
    assert audit.cpu_ops() == [], audit.cpu_ops()


def model_patch(name: str) -> int:
    with torch.device("meta"):
        return create_model(name).patch_size


@pytest.mark.parametrize("config", ["finetune_swinv2_base", "finetune_swin_base", "finetune_vit_base"])
def test_finetune_classifier_step_on_fake_cuda(config, monkeypatch):
    """The fine-tune task's forward as the packaged recipe builds it: the classifier from the
    config, timm Mixup/CutMix on the GPU batch, the task's criterion on fp32 logits."""
    from gigamim.config import load_config
    from gigamim.train.classifier import build_classifier
    from gigamim.train.tasks import FinetuneTask

    cfg = load_config(config)
    cfg.finetune.weights = None  # random init: the shapes are the recipe's, the values don't matter here
    patch_sdpa(monkeypatch)
    with torch.device("meta"):
        encoder, _ = build_classifier(cfg)
    task = FinetuneTask(cfg)
    with fake_mode():
        encoder = to_fake_cuda(encoder).train()
        img = cfg.model.img_size
        x = torch.randn(4, 3, img, img, device="cuda", dtype=torch.bfloat16)
        y = torch.randint(0, cfg.finetune.num_classes, (4,), device="cuda")
        with OpAudit() as audit:
            if task.mixup is not None:
                x, y = task.mixup(x, y)
            loss = task.criterion(encoder(x).float(), y)
    assert loss.device.type == "cuda" and loss.shape == ()
    assert audit.cpu_ops() == [], audit.cpu_ops()
