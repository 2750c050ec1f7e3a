"""Helpers for checks that need a model whose every weight matters.

The official SwinV2 init zeroes every block's norm1/norm2, so at init each residual branch
outputs exactly 0 and most equivalence checks would pass vacuously. ``randomize_weights``
gives every parameter a non-trivial value (norm weights around 1, some logit scales above
the log(100) clamp so the clamp is exercised).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name.endswith("logit_scale"):
            # uniform in [log 2, log 200]: heads above log(100) test the clamp.
            u = torch.rand(p.shape, generator=g, dtype=torch.float64)
            r = math.log(2) + u * (math.log(200) - math.log(2))
        elif "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
            r = 1.0 + 0.2 * r
        elif "cpb_mlp" in name:
            r = 0.5 * r  # a bias that varies visibly with the offset
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            r = r * (0.1 if p.ndim <= 1 else 1.0 / math.sqrt(fan_in))
        p.copy_(r.to(p.dtype))
    return model
