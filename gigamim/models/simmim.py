"""SimMIM (Xie et al. 2022): masked image modelling with a linear pixel decoder.

The mask token replaces masked patch embeddings right after patch embedding + norm; the
decoder is a 1x1 conv to stride^2*3 channels + PixelShuffle(stride); the loss is the L1
error over masked pixels, divided by the number of masked pixels and by the channel count:
``sum(|x - x_rec| * m) / (sum(m) + 1e-5) / C`` with ``m`` the mask at pixel resolution
(one channel, so the division by C turns the channel sum into a mean).

``norm_target=True`` (the official SwinV2 SimMIM config: ``NORM_TARGET.ENABLE``, patch 47)
first normalises the target image per pixel by the mean and unbiased variance of its
``norm_target_patch`` x ``norm_target_patch`` neighbourhood (windows cut by the image border
count only the pixels inside): ``(x - mean) / sqrt(var + 1e-6)``.

The encoder's family says its total reduction (`models.family.encoder_stride`: 32 for Swin,
16 for ViT-B/16); the encoder says ``encoder.patch_size`` (the mask grid), ``encoder.img_size``,
``encoder.in_chans``, ``encoder.num_features``, has ``add_mask_token()``, and accepts
``encoder(images, mask=..., features_only=True) -> (B, H/stride, W/stride, C)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gigamim.models.family import encoder_stride
from gigamim.models.patch_conv import PatchConv2d


def norm_targets(targets: torch.Tensor, patch_size: int = 47) -> torch.Tensor:
    """Local normalisation of the target image (official SimMIM ``norm_targets``): per pixel
    and channel, subtract the mean and divide by sqrt(unbiased variance + 1e-6) over the
    ``patch_size``^2 window centred on it (only pixels inside the image count)."""
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"norm_target_patch must be an odd positive number, got {patch_size}")
    pad = patch_size // 2
    pool = dict(kernel_size=patch_size, stride=1, padding=pad)
    mean = F.avg_pool2d(targets, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(targets**2, count_include_pad=False, **pool)
    # Pixels inside each window (fewer at the border): the unbiased-variance correction.
    count = F.avg_pool2d(torch.ones_like(targets[:1, :1]), count_include_pad=True, **pool) * patch_size**2
    var = ((mean_sq - mean**2) * (count / (count - 1))).clamp(min=0.0)
    return (targets - mean) / (var + 1.0e-6) ** 0.5


encoder_stride_of = encoder_stride  # the one definition is the family's (`models.family.encoder_stride`)


class SimMIM(nn.Module):
    """``SimMIM(encoder, encoder_stride=32)``; state dict ``encoder.*`` (+ ``encoder.mask_token``)
    and ``decoder.0.{weight,bias}``. ``forward(images, mask) -> loss``;
    ``reconstruct(images, mask) -> (B, C, H, W)`` in the (normalised) input space."""

    def __init__(self, encoder: nn.Module, encoder_stride: int | None = None, norm_target: bool = False,
                 norm_target_patch: int = 47):
        super().__init__()
        reduction = encoder_stride_of(encoder)
        if encoder_stride is None:
            encoder_stride = reduction
        if encoder_stride != reduction:
            raise ValueError(f"encoder_stride={encoder_stride} must equal the encoder's total reduction {reduction} "
                             "(pass encoder.encoder_stride)")
        if norm_target and (norm_target_patch < 1 or norm_target_patch % 2 == 0):
            raise ValueError(f"norm_target_patch must be an odd positive number, got {norm_target_patch}")
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size
        self.norm_target = bool(norm_target)
        self.norm_target_patch = int(norm_target_patch)
        # The token belongs to the encoder (key encoder.mask_token, as in the official code), which
        # declares it (`models.init.MaskTokenMixin`) and creates it only now, so that a bare
        # encoder still loads strictly into timm; its reset_parameters() re-initialises it
        # after a meta-device build.
        encoder.add_mask_token()
        # The 1x1 conv as a GEMM on the NHWC features (PatchConv2d, same keys): no convolution
        # in a whole-model compiled graph (gigamim.models.patch_conv says why that matters).
        self.decoder = nn.Sequential(
            PatchConv2d(encoder.num_features, encoder_stride**2 * self.in_chans, kernel_size=1),
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
        target = images.to(dtype)
        if self.norm_target:
            target = norm_targets(target, self.norm_target_patch)
        err = F.l1_loss(target, rec, reduction="none")
        return (err * m).sum() / (m.sum() + 1e-5) / self.in_chans

    def forward(self, images: torch.Tensor, mask: torch.Tensor, return_reconstruction: bool = False) -> torch.Tensor:
        # return_reconstruction: pictures from a ZeRO-3 engine must come through the module's
        # __call__ (its hooks gather the partitioned parameters); calling .reconstruct() on a
        # partitioned model directly would see empty parameters.
        rec = self.reconstruct(images, mask)
        return rec if return_reconstruction else self.loss(images, rec, mask)
