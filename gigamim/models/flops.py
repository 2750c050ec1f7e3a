"""Analytic FLOPs (multiply + add = 2) of SwinV2 / SimMIM, for MFU.

Counted: every matmul-like op — patch-embed conv, qkv/proj/MLP linears, attention QK^T and
AV, the CPB MLP (once per forward, amortised over ``batch_size``), patch merging, head and
the SimMIM decoder conv. Not counted (as in torch.utils.flop_counter and the usual MFU
convention): norms, softmax, GELU, cosine normalisation, adds. DeepSpeed's profiler
miscounts parameters under ZeRO-3, hence this module.

MFU vs HFU: ``model_and_hardware_flops`` gives both per image. MFU = model FLOPs (3x forward)
/ peak; HFU adds what checkpointed blocks (and sequential attention chunks) recompute in
backward. Logging the 4x-forward number as MFU would overstate it by up to 4/3.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from gigamim.models.family import encoder_of

# The count is SwinV2's (`models.swinv2.SwinV2Spec.flops` asks it): this module does not import
# that family's file (which imports it); it reads the encoder's own `stage_geometry`.


def _encoder(model: nn.Module) -> nn.Module:
    enc = encoder_of(model)
    if not callable(getattr(enc, "stage_geometry", None)):
        raise TypeError(f"forward_flops needs a SwinTransformerV2 or SimMIM, got {type(model).__name__}")
    return enc


def encoder_flops(enc: nn.Module, img_size: Optional[int] = None, batch_size: int = 1) -> int:
    size = img_size or enc.img_size
    # Same window/shrink rule (and same ValueError) as construction at that size.
    geometry = enc.stage_geometry(size)
    side0 = size // enc.patch_size
    flops = 2 * side0 * side0 * enc.embed_dim * enc.in_chans * enc.patch_size**2  # patch embed conv
    for i, ((side, ws, _), depth, heads) in enumerate(zip(geometry, enc.depths, enc.num_heads)):
        d = enc.embed_dim * 2**i
        tokens, win = side * side, ws * ws
        hidden = int(d * enc.mlp_ratio)
        if i > 0:
            flops += 2 * tokens * (2 * d) * d  # PatchMerging: 4*(d/2) -> d
        per_block = (
            2 * tokens * d * 3 * d  # qkv
            + 2 * 2 * tokens * win * d  # QK^T and AV: every token against its window's N tokens
            + 2 * tokens * d * d  # proj
            + 2 * 2 * tokens * d * hidden  # fc1 + fc2
        )
        cpb = 2 * (2 * ws - 1) ** 2 * (2 * 512 + 512 * heads)  # once per forward, not per image
        flops += depth * per_block + depth * cpb // batch_size
    if enc.num_classes > 0:
        flops += 2 * enc.num_features * enc.num_classes
    return flops


def forward_flops(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 1) -> int:
    """Forward FLOPs per image of a bare encoder or a SimMIM model (encoder + decoder)."""
    enc = _encoder(model)
    flops = encoder_flops(enc, img_size, batch_size)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        size = img_size or enc.img_size
        side = size // model.encoder_stride
        conv = decoder[0]
        flops += 2 * side * side * conv.in_channels * conv.out_channels
    return flops


def train_flops(model: nn.Module, img_size: Optional[int] = None, recompute: bool = False, batch_size: int = 1) -> int:
    """Forward + backward FLOPs per image: 3x forward (backward = 2x), 4x with full recompute."""
    return (4 if recompute else 3) * forward_flops(model, img_size, batch_size)


def _block_flops(enc: nn.Module, size: int, batch_size: int):
    """Per block, in forward order: (forward FLOPs per image, attention-core QK^T+AV FLOPs)."""
    geometry = enc.stage_geometry(size)
    out = []
    for i, ((side, ws, _), depth, heads) in enumerate(zip(geometry, enc.depths, enc.num_heads)):
        d, tokens, win = enc.embed_dim * 2**i, side * side, ws * ws
        core = 2 * 2 * tokens * win * d
        block = (2 * tokens * d * 3 * d + core + 2 * tokens * d * d + 2 * 2 * tokens * d * int(d * enc.mlp_ratio)
                 + 2 * (2 * ws - 1) ** 2 * (2 * 512 + 512 * heads) // batch_size)
        out += [(block, core)] * depth
    return out


def recompute_flops(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 1) -> int:
    """Forward FLOPs per image that backward runs a second time: the whole forward of every
    activation-checkpointed block, and the QK^T half of the attention core of sequential (chunk-recomputed)
    blocks that are not checkpointed already. Read from the model's own settings."""
    enc = _encoder(model)
    extra = 0
    for blk, (fwd, core) in zip(enc.blocks(), _block_flops(enc, img_size or enc.img_size, batch_size)):
        if blk.checkpointed:
            extra += fwd
        elif blk.attn.sequential:
            # Non-reentrant checkpoint stops recomputing once backward has what it needs: the
            # softmax output (for AV's backward), so only QK^T, half of the core, runs again.
            extra += core // 2
    return extra


def model_and_hardware_flops(model: nn.Module, img_size: Optional[int] = None, batch_size: int = 1):
    """(model FLOPs, hardware FLOPs) per image of one training step.

    MFU counts model FLOPs, 3x forward, whatever the step recomputes: it compares runs with
    and without checkpointing honestly. HFU counts what the hardware ran: + the recompute."""
    model_f = train_flops(model, img_size, recompute=False, batch_size=batch_size)
    return model_f, model_f + recompute_flops(model, img_size, batch_size)


def utilization(images_per_sec: float, flops_per_image: int, peak_tflops: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s over the peak (None when the peak is unknown)."""
    if not peak_tflops or not images_per_sec:
        return None
    return images_per_sec * flops_per_image / 1e12 / peak_tflops
