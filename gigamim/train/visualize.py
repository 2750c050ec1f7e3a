"""Reconstruction pictures: original / masked input / SimMIM reconstruction."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def save_reconstruction_png(path: str | Path, images_uint8: torch.Tensor, mask: torch.Tensor,
                            reconstruction: torch.Tensor, title: str = "") -> Path:
    """images_uint8 (B,3,H,W); mask bool on the patch grid (B,h,w); reconstruction in
    normalised space (B,3,H,W). Row 3 pastes the reconstruction into the masked area only,
    which is what the loss trains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images_uint8.float().cpu() / 255.0
    rec = denormalize(reconstruction.float().cpu())
    b, _, h, w = images.shape
    mask_px = mask.float().cpu().unsqueeze(1)
    mask_px = torch.nn.functional.interpolate(mask_px, size=(h, w), mode="nearest")
    masked = images * (1 - mask_px) + 0.5 * mask_px
    pasted = images * (1 - mask_px) + rec * mask_px
    rows = (("original", images), ("masked input", masked), ("reconstruction", pasted))
    fig, axes = plt.subplots(len(rows), b, figsize=(2.2 * b, 2.2 * len(rows)), squeeze=False)
    for r, (name, batch) in enumerate(rows):
        for c in range(b):
            ax = axes[r][c]
            ax.imshow(batch[c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
