"""Swin Transformer (V1) encoders for SimMIM, built from timm's ``SwinTransformer``.

As in the official ``SwinTransformerForSimMIM`` (microsoft/SimMIM, Swin-Transformer): the
mask token replaces masked patch embeddings right after patch embedding + norm. Keys are
timm's (``swin_base_patch4_window7_224`` layout: ``layers.{i}.downsample`` at the start of
stages 1-3, ``relative_position_bias_table`` per block), so an encoder without ``mask_token``
loads strictly into timm's ``SwinTransformer`` of the same geometry. Defaults follow the
SimMIM pretraining configs: Swin-B 192 px window 6, Swin-L 192 px window 12.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.models.swin_transformer import SwinTransformer

from gigamim.models.family import HierarchicalSpec, register_variants
from gigamim.models.init import MaskTokenMixin
from gigamim.models.timm_init import linear_init_in_place, timm_linear_init_


class SwinTransformerForSimMIM(MaskTokenMixin, SwinTransformer):
    """timm Swin V1 + SimMIM's mask input. ``forward(x, mask=None, features_only=False)``:
    logits, or with ``features_only`` the final normed (B, H/32, W/32, C) map."""

    def __init__(self, img_size: int = 192, patch_size: int = 4, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 128, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (4, 8, 16, 32), window_size: int = 6, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, **timm_kwargs):
        reduction = patch_size * 2 ** (len(depths) - 1)
        SWIN.check(dict(img_size=img_size, patch_size=patch_size, depths=depths, num_heads=num_heads))  # the config's rules
        with linear_init_in_place():
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                             window_size=window_size, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                             weight_init="skip", **timm_kwargs)
        self.img_size = img_size
        self.patch_size = patch_size
        self.encoder_stride = reduction
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.window_size = window_size
        self._declare_mask_token()

    def reset_parameters(self) -> None:
        """After a meta-device build (`models.init.reset_after_meta`, children first: timm's
        window attention and blocks rebuild their tables and masks): timm's model-wide Linear
        init, and SimMIM's mask token."""
        timm_linear_init_(self)
        self.mask_token_reset()

    def stage_modules(self):
        return list(self.layers)

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), got "
                             f"{tuple(x.shape)}; build the model with img_size matching the input")
        return self.masked(self.patch_embed(x), mask)  # B, H/4, W/4, C (normed)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.norm(self.layers(self.embed(x, mask)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, features_only: bool = False):
        x = self.forward_features(x, mask)
        return x if features_only else self.forward_head(x)


class SwinSpec(HierarchicalSpec):
    """The Swin V1 family (timm's SwinTransformer keys): relative position bias tables, no
    analytic FLOPs count (mfu null). No window-tiling rule: timm's blocks pad a stage map the
    window does not tile."""

    name = "swin"
    model_class = SwinTransformerForSimMIM
    timm_family = "swin"
    no_decay_keywords = ("relative_position", "pos_embed", "mask_token")

    def block_classes(self):
        from timm.models.swin_transformer import SwinTransformerBlock

        return (SwinTransformerBlock,)

    def plan_count(self, model):
        """Per block a `WindowBlockCount` as timm built it (window and shift after timm's
        shrink rule); before stages 1-3 timm's PatchMerging (2x2 concat, LayerNorm on 4C, then
        the 4C -> 2C reduction): the norm's input and the reduction's input, 4 x (C/2) per new
        token each, + stats; the stem: patch-embed conv input (3HW), its norm's input + stats,
        the mask-token blend (two T-sized masks). ``explicit`` is what CPU runs (SDPA's math
        kernel: the mask requires grad), ``fused`` the GPU's memory-efficient kernel."""
        from gigamim.models.counting import (ModelCount, Saved, WindowBlockCount, decoder_flops, patch_embed_flops,
                                             simmim_head)
        from gigamim.models.family import encoder_of

        enc = encoder_of(model)
        size, patch = enc.img_size, enc.patch_size
        blocks, before, flops = [], {}, 0
        side0 = size // patch
        flops += patch_embed_flops(side0 * side0, enc.embed_dim, patch, enc.in_chans)
        for i, stage in enumerate(enc.layers):
            side, dim = side0 // 2**i, enc.embed_dim * 2**i
            t = side * side
            if i > 0:
                before[len(blocks)] = Saved(2 * t * 2 * dim, stats=2 * t)
                flops += 2 * t * (2 * dim) * dim  # reduction 4 x (dim/2) -> dim
            for blk in stage.blocks:
                n = blk.window_size[0] * blk.window_size[1]
                b = WindowBlockCount(t, dim, blk.attn.num_heads, n, blk.mlp_ratio, i, shifted=any(blk.shift_size))
                blocks.append(b)
                flops += b.flops()
        t0 = side0 * side0
        return ModelCount(size, tuple(blocks), stem=Saved(3 * size * size + t0 * enc.embed_dim + 2 * t0, stats=2 * t0),
                          head=simmim_head(t, dim, size), forward_flops=float(flops + decoder_flops(model, size)),
                          before=before, attention_modes=("explicit", "fused"), window_size=enc.window_size)


SWIN = SwinSpec()

_VARIANTS = {
    # nano: the test size, like swinv2_nano (C=32, one shifted pair per stage, window 6)
    "swin_nano": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6),
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=6),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}
_COMMON = dict(img_size=192, window_size=6, drop_path_rate=0.0)


register_variants(SWIN, _VARIANTS, _COMMON)
