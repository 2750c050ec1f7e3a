"""attn_impl="flex": FlexAttention (CPB bias in a score_mod, shift regions as a mask) equals
the explicit path. CPU has no flex backward in this torch (checked below): forward is tested
here in fp64 and fp32; gradients run on the GPU script (benchmarks/gpu_smoke.sh)."""

from __future__ import annotations

import pytest
import torch

from gigamim.models import create_model
from tests.helpers.randomize import randomize_weights


def _pair(dtype, **kw):
    base = dict(img_size=64, window_size=4, drop_path_rate=0.0, **kw)
    explicit = randomize_weights(create_model("swinv2_nano", attn_impl="explicit", **base), seed=2).to(dtype).eval()
    flex = create_model("swinv2_nano", attn_impl="flex", **base).to(dtype).eval()
    flex.load_state_dict(explicit.state_dict())
    return explicit, flex


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_flex_forward_equals_explicit(dtype, tol):
    explicit, flex = _pair(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = explicit.forward_features(x), flex.forward_features(x)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_cpu_has_no_flex_backward_so_training_uses_explicit_core():
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q)
    # So on CPU, a flex model that needs gradients takes the explicit core: same grads.
    explicit, flex = _pair(torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    grads = []
    for m in (explicit, flex):
        m.forward_features(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-12, atol=1e-12)
