"""Plain-PyTorch versions of every kernel: the fallback on CPU, for float64, and where
no fused backend is present. Same maths as the fused kernels, eager ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def residual_post_norm(shortcut, y, weight, bias, eps, drop_path_scale):
    normed = layer_norm(y, weight, bias, eps)
    if drop_path_scale is not None:
        normed = normed * drop_path_scale
    return shortcut + normed


def cosine_normalize(q, k, logit_scale, max_logit_scale):
    # The temperature in q's dtype: an fp32 scale times bf16 q would promote q (and the
    # scores after it) to fp32 under autocast.
    scale = torch.clamp(logit_scale, max=max_logit_scale).exp().to(q.dtype)
    return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
