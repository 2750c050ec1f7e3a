"""Initialise timm models inside each module's own ``__init__`` (safe under ZeRO-3).

timm's ViT and Swin initialise their Linear layers in the top-level model's ``init_weights``,
after the blocks have been built. Under ``deepspeed.zero.Init`` every submodule is
partitioned as soon as its own ``__init__`` returns, so that late pass would write into empty
placeholders and the model would silently keep PyTorch's default Linear init. Building with
``weight_init='skip'`` inside ``linear_init_in_place()`` gives every Linear timm's init
(trunc-normal std 0.02, zero bias; ``init_weights_vit_timm``) in its own ``__init__``, so a
partitioned build and a plain build with the same seed hold identical weights.

After a meta-device build (FSDP2) the same init is applied model-wide by the encoder's own
``reset_parameters()`` (`timm_linear_init_`), after timm's modules have reset themselves
(``models.init.reset_after_meta`` walks children first, as construction does).
"""

from __future__ import annotations

import contextlib
import threading

import torch.nn as nn
from timm.layers import trunc_normal_

_LOCK = threading.Lock()


def _timm_linear_reset(self: nn.Linear) -> None:
    trunc_normal_(self.weight, std=0.02)
    if self.bias is not None:
        nn.init.zeros_(self.bias)


@contextlib.contextmanager
def linear_init_in_place():
    """While active, ``nn.Linear(...)`` initialises as timm's ViT/Swin ``init_weights`` would."""
    with _LOCK:
        original = nn.Linear.reset_parameters
        nn.Linear.reset_parameters = _timm_linear_reset
        try:
            yield
        finally:
            nn.Linear.reset_parameters = original


def timm_linear_init_(model: nn.Module) -> None:
    """timm's ViT/Swin Linear init on every Linear of `model`, in place (their ``init_weights``
    pass, as `linear_init_in_place` gives it at construction)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _timm_linear_reset(m)
