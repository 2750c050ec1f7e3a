"""The CUDA path without a GPU: models as fake CUDA tensors, SDPA as an H200 would pick it, and
an audit of every op a forward runs.

``FakeTensorMode`` gives tensors a device, dtype, shape and strides but no storage, and runs
each op's meta kernel, so a forward on ``cuda`` fake tensors checks what the first GPU run
would hit: device mixes (a CPU tensor made inside a forward: the fake kernels refuse to mix
devices, and ``OpAudit`` reports any CPU output), dtype mixes (the kernels refuse them; a
silent promotion to fp32 shows as a batch-sized fp32 tensor in the audit) and layout
assumptions (every output has the strides the CUDA kernel gives it).

What it cannot do (measured on torch 2.14.1): select a fused SDPA kernel (no device
capability, so SDPA falls back to its math path, which upcasts bf16 to fp32 and returns a
contiguous tensor) -- ``h200_sdpa`` calls the fused kernel the GPU would pick instead, whose
meta kernel returns the real output layout; run backward (the autograd engine needs a
device); apply autocast (saved tensors stay fp32), so the models run in bf16 weights, the
dtype DeepSpeed's bf16 mode trains in; launch Triton or touch the driver.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_TORCH_SDPA = F.scaled_dot_product_attention  # before patch_sdpa replaces it


def to_fake_cuda(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A module built on the meta device, as fake CUDA tensors (floating ones in ``dtype``).

    Call inside the FakeTensorMode the forward will run in. One ``_apply``: a second one on
    fake parameters cannot swap them (they hold weak references)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cuda")
    return module._apply(convert)


def h200_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as it dispatches on an H100/H200 in training: flash
    when there is no mask (bf16/fp16, head dim <= 256), else memory-efficient (the one fused
    kernel that takes a float mask; cuDNN refuses a mask that requires grad). Returns the fused
    kernel's output with that kernel's strides, e.g. a transposed (B, N, H, D) buffer for
    memory-efficient attention.

    Like torch's selection (``sdp_utils_cpp.h``: ``check_last_dim_stride_equals_1``), an input
    or float mask whose last dim is not at stride 1 rules out every fused kernel: the call then
    takes SDPA's math path (softmax and all, what the GPU ran for a permuted CPB bias)."""
    if any(t is not None and t.stride(-1) != 1 for t in (query, key, value, attn_mask)):
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    half = query.dtype in (torch.bfloat16, torch.float16)
    if attn_mask is None and half and query.shape[-1] <= 256 and not enable_gqa:
        out = aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)
        return out[0]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)
    return out[0]


@dataclass
class OpAudit(TorchDispatchMode):
    """Records every op's outputs (device, dtype, shape) while active.

    ``stop_at`` (a module): recording ends when it starts (e.g. SimMIM's decoder, after which
    the loss runs in fp32 by design)."""

    rows: list = field(default_factory=list)
    recording: bool = True

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.recording:
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            for i, t in enumerate(tensors):
                self.rows.append((str(func.overloadpacket.__name__), t.device.type, t.dtype, tuple(t.shape), i))
        return out

    @contextlib.contextmanager
    def until(self, module: nn.Module | None):
        handle = None
        if module is not None:
            handle = module.register_forward_pre_hook(lambda *_: setattr(self, "recording", False))
        try:
            with self:
                yield self
        finally:
            if handle is not None:
                handle.remove()

    def cpu_ops(self) -> list[str]:
        """Ops that produced a CPU tensor (other than a 0-d scalar or an empty one) inside a
        CUDA forward. Empty ones hold nothing to copy: torch 2.11's non-reentrant checkpoint
        makes a (0,) CPU ``dummy`` per call as an autograd anchor (2.14 does not)."""
        return sorted({f for f, dev, _, shape, _ in self.rows
                       if dev != "cuda" and len(shape) > 0 and torch.Size(shape).numel() > 0})

    def floats(self, dtype: torch.dtype) -> list[tuple[str, tuple]]:
        """(op, shape) of every non-view op's main output in ``dtype``. Later outputs are the
        fp32 statistics kernels keep by design (LayerNorm's mean/rstd, attention's logsumexp)."""
        views = {"view", "_unsafe_view", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
                 "select", "unbind", "split", "split_with_sizes", "alias", "detach", "as_strided", "unflatten"}
        return [(f, shape) for f, _, dt, shape, i in self.rows if dt == dtype and i == 0 and f not in views]


def patch_sdpa(monkeypatch) -> None:
    """Make every ``F.scaled_dot_product_attention`` call (gigamim's and timm's) dispatch as on
    an H200 (see ``h200_sdpa``)."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", h200_sdpa)


def fake_mode() -> FakeTensorMode:
    # Strict: a real tensor reaching an op inside the forward (one made at build time outside
    # the mode and kept as a plain attribute) is an error, not silently converted.
    return FakeTensorMode(allow_non_fake_inputs=False)
