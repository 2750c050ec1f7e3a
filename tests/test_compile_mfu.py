"""MFU vs HFU FLOPs: the hardware count (recompute included) against torch's FlopCounterMode,
which sees checkpointed blocks run their forward a second time in backward."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from gigamim.models import SimMIM, create_model
from gigamim.models.flops import model_and_hardware_flops, train_flops, utilization


def _counted_step(model, x, mask):
    with FlopCounterMode(display=False) as fc:
        model(x, mask).backward()
    return fc.get_total_flops()


def test_hardware_flops_count_the_recompute():
    x, mask = torch.randn(1, 3, 192, 192), torch.rand(1, 48, 48) > 0.5
    plain = SimMIM(create_model("swinv2_nano"))
    ckpt = SimMIM(create_model("swinv2_nano", grad_checkpointing=[1, 2]))
    ckpt.load_state_dict(plain.state_dict())
    mf, hf = model_and_hardware_flops(ckpt)
    assert mf == train_flops(plain) == model_and_hardware_flops(plain)[1]
    c_plain, c_ckpt = _counted_step(plain, x, mask), _counted_step(ckpt, x, mask)
    # The counter's extra FLOPs are exactly the checkpointed stages' forward, recomputed.
    assert c_ckpt - c_plain == hf - mf > 0
    assert utilization(2.0, mf, 1e-3) == 2.0 * mf / 1e12 / 1e-3
    assert utilization(2.0, mf, None) is None


def test_sequential_attention_recompute_counted():
    x, mask = torch.randn(1, 3, 192, 192), torch.rand(1, 48, 48) > 0.5
    plain = SimMIM(create_model("swinv2_nano"))
    seq = SimMIM(create_model("swinv2_nano", sequential_stages=(0,), attn_chunk=8))
    seq.load_state_dict(plain.state_dict())
    mf, hf = model_and_hardware_flops(seq)
    assert _counted_step(seq, x, mask) - _counted_step(plain, x, mask) == hf - mf > 0
