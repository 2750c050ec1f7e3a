"""Helpers for checks that need a model whose every weight matters.

The official SwinV2 init zeroes every block's norm1/norm2, so at init each residual branch
outputs exactly 0 and most equivalence checks would pass vacuously. ``randomize_weights``
gives every parameter a non-trivial value (norm weights around 1, some logit scales above
the log(100) clamp so the clamp is exercised).

``tame=True`` is for checks in bf16: logit scales up to 100 make the softmax so peaked that
bf16 rounding changes which key wins, and the gradients of a correct bf16 model then differ
from fp32 by chance (measured: cosine 0.48-0.64). Tame weights keep the logit scales near
their init (log 10) and the residual branches small, as in a model early in training, while
every branch still outputs something and receives a gradient (the official init would leave
attention without any gradient, so its backward would go unchecked).

Values are always drawn on the CPU from a seeded CPU generator and copied to each
parameter's device: the same weights on every device, and no clash with a default device
set by ``with torch.device("cuda")`` (a CPU generator cannot draw CUDA tensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0, tame: bool = False) -> nn.Module:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64, device="cpu")
        if name.endswith("logit_scale"):
            u = torch.rand(p.shape, generator=g, dtype=torch.float64, device="cpu")
            # default: uniform in [log 2, log 200] (heads above log(100) test the clamp);
            # tame: uniform in [log 5, log 20], around the init value log(10).
            lo, hi = (5.0, 20.0) if tame else (2.0, 200.0)
            r = math.log(lo) + u * (math.log(hi) - math.log(lo))
        elif "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
            r = (0.3 + 0.05 * r) if tame else (1.0 + 0.2 * r)
        elif "cpb_mlp" in name:
            r = 0.5 * r  # a bias that varies visibly with the offset
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            r = r * (0.1 if p.ndim <= 1 else 1.0 / math.sqrt(fan_in))
        p.copy_(r.to(p.dtype))
    return model
