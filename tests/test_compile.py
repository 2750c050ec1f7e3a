"""Per-block torch.compile: no graph breaks (dynamo's own explain), and compiled numerics equal
the explicit eager path (fp64 through dynamo + AOT autograd; fp32 through inductor, slow)."""

from __future__ import annotations

import copy

import pytest
import torch

from gigamim.models import SimMIM, create_model
from gigamim.models.compile import compile_blocks, find_blocks, is_compiled
from tests.helpers.randomize import randomize_weights

# nano at 64 px / window 4: maps 16, 8, 4, 2 -> shifted windows in stages 0-1, shrunk after.
SMALL = dict(img_size=64, window_size=4, drop_path_rate=0.0)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(grad_checkpointing=True),  # cold model: the old lazy caches broke here (6 breaks)
    dict(grad_checkpointing=True, sequential_stages=(0, 1, 2, 3), attn_chunk=3),
    dict(attn_impl="sdpa"),
    dict(attn_impl="flex"),
], ids=["plain", "ckpt", "ckpt_seq", "sdpa", "flex"])
def test_no_graph_breaks(kw):
    model = create_model("swinv2_nano", **SMALL, **kw).train()
    x = torch.randn(2, 3, 64, 64)
    whole = torch._dynamo.explain(model.forward_features)(x)
    assert (whole.graph_count, whole.graph_break_count) == (1, 0), whole.break_reasons
    blk = model.blocks()[1]  # a shifted block: mask from the region buffer
    assert any(blk.shift_size)
    h = torch.randn(2, *blk.resolution, blk.attn.dim)
    one = torch._dynamo.explain(blk.forward)(h)
    assert (one.graph_count, one.graph_break_count) == (1, 0), one.break_reasons


def _step(model, x, mask):
    model.zero_grad(set_to_none=True)
    loss = model(x, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _simmim(dtype, **kw):
    torch.manual_seed(0)
    return randomize_weights(SimMIM(create_model("swinv2_nano", **SMALL, **kw)), seed=1).to(dtype).train()


def _batch(dtype):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 64, 64, generator=g, dtype=dtype), torch.rand(2, 16, 16, generator=g) > 0.4


@pytest.mark.parametrize("kw", [
    dict(grad_checkpointing=True),
    dict(grad_checkpointing=[0], sequential_stages=(0, 1), attn_chunk=5),
], ids=["ckpt", "ckpt_stage0_seq"])
def test_compiled_equals_eager_fp64_aot(kw):
    torch._dynamo.reset()
    eager = _simmim(torch.float64, **kw)
    compiled = copy.deepcopy(eager)
    blocks = compile_blocks(compiled, backend="aot_eager", fullgraph=True)
    assert len(blocks) == 8 and is_compiled(compiled) and not is_compiled(eager)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod. prefixes
    x, mask = _batch(torch.float64)
    a, b = _step(eager, x, mask), _step(compiled, x, mask)
    torch.testing.assert_close(b[0], a[0], rtol=1e-12, atol=1e-12)
    for n in a[1]:
        torch.testing.assert_close(b[1][n], a[1][n], rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_compile_blocks_finds_timm_blocks_and_rejects_bad_mode():
    import timm

    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=0)
    assert len(find_blocks(ref)) == 12
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_blocks(ref, mode="fast")
    with pytest.raises(ValueError, match="no SwinV2 block"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_inductor_fp32_with_checkpointing_and_drop_path():
    """Inductor kernels (fp32 rounding differs): outputs and gradients within 1e-3 of the
    largest gradient; drop path on, with inductor's RNG replaced by eager's so both draw alike."""
    torch._dynamo.reset()
    eager = _simmim(torch.float32, grad_checkpointing=True, sequential_stages=(0,), attn_chunk=5)
    for blk in eager.encoder.blocks():
        blk.drop_path = 0.2
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    x, mask = _batch(torch.float32)
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(7)
        a = _step(eager, x, mask)
        torch.manual_seed(7)
        b = _step(compiled, x, mask)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
    for n in a[1]:
        scale = a[1][n].abs().max().item() + 1e-12
        assert (b[1][n] - a[1][n]).abs().max().item() <= 1e-3 * scale, n
