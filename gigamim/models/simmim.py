"""SimMIM (Xie et al. 2022): masked image modelling with a linear pixel decoder.

The mask token replaces masked patch embeddings right after patch embedding + norm; the
decoder is a 1x1 conv to stride^2*3 channels + PixelShuffle(stride); the loss is the L1
error over masked pixels, divided by the number of masked pixels and by the channel count:
``sum(|x - x_rec| * m) / (sum(m) + 1e-5) / C`` with ``m`` the mask at pixel resolution
(one channel, so the division by C turns the channel sum into a mean).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class SimMIM(nn.Module):
    """``SimMIM(encoder, encoder_stride=32)``; state dict ``encoder.*`` (+ ``encoder.mask_token``)
    and ``decoder.0.{weight,bias}``. ``forward(images, mask) -> loss``;
    ``reconstruct(images, mask) -> (B, C, H, W)`` in the (normalised) input space."""

    def __init__(self, encoder: nn.Module, encoder_stride: int = 32):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size
        reduction = encoder.patch_size * 2 ** (len(encoder.depths) - 1)
        if encoder_stride != reduction:
            raise ValueError(f"encoder_stride={encoder_stride} must equal the encoder's total reduction {reduction}")
        # The token belongs to the encoder (key encoder.mask_token, as in the official code) but
        # is created here so that a bare encoder still loads strictly into timm.
        token = torch.zeros(1, 1, 1, encoder.embed_dim)
        trunc_normal_(token, std=0.02)
        encoder.mask_token = nn.Parameter(token)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    def _check(self, images: torch.Tensor, mask: torch.Tensor) -> None:
        size = self.encoder.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_chans, size, size):
            raise ValueError(f"images must be (B, {self.in_chans}, {size}, {size}), got {tuple(images.shape)}")
        grid = size // self.patch_size
        want = (images.shape[0], grid, grid)
        if mask is None or tuple(mask.shape) != want:
            got = None if mask is None else tuple(mask.shape)
            raise ValueError(
                f"mask must be bool of shape (B, H/{self.patch_size}, W/{self.patch_size}) = {want} "
                f"(one entry per {self.patch_size}-px patch), got {got}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(images, mask)
        z = self.encoder(images, mask=mask, features_only=True)  # B, h, w, C (called as a module: ZeRO-3)
        return self.decoder(z.permute(0, 3, 1, 2))

    def loss(self, images: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the model's dtype (as autocast does for l1_loss in the official
        # code): in bf16 a count of ~1.4M masked pixels is off by ~0.4% and so is the loss.
        dtype = torch.promote_types(rec.dtype, torch.float32)  # fp32 or better (fp64 in tests)
        rec = rec.to(dtype)
        m = mask.to(dtype).repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        m = m.unsqueeze(1)  # B, 1, H, W
        err = F.l1_loss(images.to(dtype), rec, reduction="none")
        return (err * m).sum() / (m.sum() + 1e-5) / self.in_chans

    def forward(self, images: torch.Tensor, mask: torch.Tensor, return_reconstruction: bool = False) -> torch.Tensor:
        # return_reconstruction: pictures from a ZeRO-3 engine must come through the module's
        # __call__ (its hooks gather the partitioned parameters); calling .reconstruct() on a
        # partitioned model directly would see empty parameters.
        rec = self.reconstruct(images, mask)
        return rec if return_reconstruction else self.loss(images, rec, mask)
