"""The reference the benchmarks compare against: timm's SwinTransformerV2 plus a SimMIM head
and loss written the plain way the official SimMIM code writes them.

Same geometry and, after ``load_from(gigamim_simmim)``, the same weights as a gigamim
``SimMIM(create_model(...))`` (the encoder keys are timm's, plus ``encoder.mask_token`` and
``decoder.0.*``), so a step of one and a step of the other do identical work.
Nothing here is tuned: explicit attention, timm's defaults, torch's default AdamW.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def timm_encoder_for(encoder) -> nn.Module:
    """A timm ``SwinTransformerV2`` with the geometry of a gigamim encoder (num_classes=0).

    huge/giant add main-branch norms that timm does not have: no reference exists for them.
    """
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    if getattr(encoder, "extra_norm_period", 0):
        raise ValueError("timm's SwinTransformerV2 has no main-branch norms (huge/giant): no timm reference")
    # The last block has the full rate (both draw rates linearly over depth, timm per stage).
    drop_path = max([_drop_rate(b) for b in encoder.blocks()] or [0.0])
    return SwinTransformerV2(
        img_size=encoder.img_size,
        patch_size=encoder.patch_size,
        in_chans=encoder.in_chans,
        num_classes=0,
        embed_dim=encoder.embed_dim,
        depths=encoder.depths,
        num_heads=encoder.num_heads,
        window_size=encoder.target_window_sizes,
        mlp_ratio=encoder.mlp_ratio,
        drop_path_rate=drop_path,
        pretrained_window_sizes=tuple(blk.attn.pretrained_window_size[0] for blk in _first_blocks(encoder)),
    )


def _drop_rate(block) -> float:
    """A gigamim block's drop-path rate (a float attribute, or a timm DropPath module)."""
    dp = getattr(block, "drop_path", None)
    if isinstance(dp, (int, float)):
        return float(dp)
    return float(getattr(getattr(block, "drop_path1", None), "drop_prob", 0.0) or 0.0)


def _first_blocks(encoder):
    return [stage.blocks[0] for stage in encoder.layers]


class ReferenceSimMIM(nn.Module):
    """SimMIM as in the official code: mask token after patch embedding, 1x1 conv + PixelShuffle
    decoder, L1 loss over masked pixels / (masked pixels + 1e-5) / channels."""

    def __init__(self, encoder: nn.Module, encoder_stride: int = 32, grad_checkpointing: bool = False):
        super().__init__()
        self.encoder = encoder
        self.encoder.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.embed_dim))
        self.encoder_stride = encoder_stride
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.patch_size = encoder.patch_embed.proj.kernel_size[0]
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )
        if grad_checkpointing:
            encoder.set_grad_checkpointing(True)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.patch_embed(x)  # B, H/4, W/4, C (timm's NHWC patch embedding, normed)
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1.0 - w) + enc.mask_token.expand_as(x) * w
        x = enc.layers(x)
        return enc.norm(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.encode(x, mask).permute(0, 3, 1, 2)
        x_rec = self.decoder(z)
        m = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1).type_as(x)
        loss = F.l1_loss(x, x_rec, reduction="none")
        return (loss * m).sum() / (m.sum() + 1e-5) / self.in_chans


def reference_for(simmim, grad_checkpointing: bool = False) -> ReferenceSimMIM:
    """The reference with ``simmim``'s geometry and a copy of its weights (strict load)."""
    ref = ReferenceSimMIM(timm_encoder_for(simmim.encoder), simmim.encoder_stride, grad_checkpointing)
    ref.load_state_dict(simmim.state_dict(), strict=True)
    p = next(simmim.parameters())
    return ref.to(device=p.device, dtype=p.dtype)
