"""ViT encoders for SimMIM, built from timm's ``VisionTransformer`` (its modules, its keys).

As in the official ``VisionTransformerForSimMIM`` (microsoft/SimMIM): the mask token replaces
masked patch embeddings right after patch embedding, before the class token and the position
embedding are added. The state dict is timm's (``vit_base_patch16_224`` layout), so an encoder
without ``mask_token`` loads strictly into ``timm.create_model('vit_base_patch16_224',
num_classes=0)``. The encoder stride is the patch size (16: SimMIM's ViT-B/16 decoder).

Note: the official SimMIM ViT-B adds layer scale (0.1) and a shared relative position bias;
this is timm's standard ViT (absolute position embedding); ``init_values=0.1`` adds timm's
layer scale (keys ``ls1``/``ls2``, which timm has too).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from gigamim.models.family import FamilySpec, Geometry, ModelConfigError, encoder_of, register_variants
from gigamim.models.init import MaskTokenMixin
from gigamim.models.timm_init import linear_init_in_place, timm_linear_init_


class VisionTransformerForSimMIM(MaskTokenMixin, VisionTransformer):
    """timm ViT + SimMIM's mask input. ``forward(x, mask=None, features_only=False)``: logits,
    or with ``features_only`` the normed patch tokens as a (B, H/p, W/p, C) map."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1, init_values: Optional[float] = None, global_pool: str = "token",
                 **timm_kwargs):
        VIT.check(dict(img_size=img_size, patch_size=patch_size))  # the config's rules, the same messages
        with linear_init_in_place():
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             drop_path_rate=drop_path_rate, init_values=init_values, global_pool=global_pool,
                             weight_init="skip", **timm_kwargs)
        self._declare_mask_token()
        # The rest of timm's init_weights: top-level parameters, still whole here (zero.Init
        # partitions them when this __init__ returns).
        self._init_own()
        self.img_size = img_size
        self.patch_size = patch_size
        self.encoder_stride = patch_size
        self.depth = depth
        self.num_heads = num_heads

    def _init_own(self) -> None:
        with torch.no_grad():
            if self.pos_embed is not None:
                trunc_normal_(self.pos_embed, std=0.02)
            for token in (self.cls_token, self.reg_token):
                if token is not None:
                    nn.init.normal_(token, std=1e-6)
        self.mask_token_reset()

    def reset_parameters(self) -> None:
        """After a meta-device build (`models.init.reset_after_meta`, children first): timm's
        model-wide Linear init over what the Linears reset to, then the top-level tokens."""
        timm_linear_init_(self)
        self._init_own()

    def stage_modules(self):
        """The blocks, for intermediate features (probe) and layer-wise LR decay."""
        return list(self.blocks)

    def tokens_to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + L, C) tokens -> (B, H/p, W/p, C) map of the patch tokens."""
        side = self.img_size // self.patch_size
        return x[:, self.num_prefix_tokens:].reshape(x.shape[0], side, side, x.shape[-1])

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), got "
                             f"{tuple(x.shape)}; build the model with img_size matching the input")
        x = self.masked(self.patch_embed(x), mask)  # B, L, C
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """timm's forward_features (normed tokens, class token first), with the mask input."""
        x = self.embed(x, mask)
        if self.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, features_only: bool = False):
        x = self.forward_features(x, mask)
        return self.tokens_to_map(x) if features_only else self.forward_head(x)


_LAYER0 = ("cls_token", "pos_embed", "mask_token", "reg_token")


class ViTSpec(FamilySpec):
    """timm's ViT as a SimMIM encoder: one stage of ``depth`` blocks at stride ``patch_size``;
    layer ids as the official SimMIM ``get_vit_layer``; probed after any block (mean of the
    patch tokens); no analytic FLOPs count (mfu null)."""

    name = "vit"
    model_class = VisionTransformerForSimMIM
    timm_family = "vit"
    no_decay_keywords = ("pos_embed", "cls_token", "mask_token")
    probe_unit = "blocks"
    attention_modes = ("fused",)  # for the planner: timm's SDPA without a mask (flash, GPU and CPU)

    def check_args(self, args) -> None:
        patch = int(args.get("patch_size", 16))
        if args["img_size"] % patch:
            raise ModelConfigError("img_size", f"img_size={args['img_size']} must be divisible by "
                                   f"patch_size={patch} (the ViT's stride)")

    def geometry(self, args) -> Geometry:
        patch, depth, dim = int(args.get("patch_size", 16)), int(args["depth"]), int(args["embed_dim"])
        prefix = (1 if args.get("class_token", True) else 0) + int(args.get("reg_tokens", 0) or 0)
        tokens = (args["img_size"] // patch) ** 2 + prefix
        return Geometry(args["img_size"], patch, patch, tokens, (tokens,) * depth, (dim,) * depth)

    def encoder_stride(self, encoder) -> int:
        return encoder.patch_size

    def num_layer_ids(self, encoder) -> int:
        return encoder.depth + 2

    def layer_id(self, encoder, name: str) -> int:
        """Patch embed, class/register tokens, position embedding, mask token 0; block i
        ``i + 1``; the rest ``depth + 1``."""
        if name in _LAYER0 or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return encoder.depth + 1

    def probe_depth(self, encoder) -> int:
        return len(encoder.blocks)

    def stage_features(self, encoder, x, stage: int):
        t = encoder.embed(x)
        for blk in encoder.blocks[: stage + 1]:
            t = blk(t)
        return t[:, encoder.num_prefix_tokens:].mean(dim=1)

    def owns_state_dict(self, sd) -> bool:
        # timm's ViT keys; the official SimMIM ViT (models/vit_simmim.py) has its own layout
        return super().owns_state_dict(sd) and not ("blocks.0.gamma_1" in sd or any(
            k.endswith("relative_position_bias_table") for k in sd))

    def export_geometry(self, encoder, run_args=None):
        return {"num_heads": encoder.num_heads}  # not in the keys' shapes

    def block_classes(self):
        from timm.models.vision_transformer import Block

        return (Block,)

    def plan_count(self, model):
        """Per block a `GlobalBlockCount` over every token (class / register tokens included);
        the stem: patch-embed conv input (3HW) and the mask-token blend (two L-sized masks; timm's
        ViT has no patch norm); the head: the final norm and the decoder's input (a view of the
        normed tokens). timm runs SDPA without a mask: the flash kernel, on GPU and on CPU."""
        from gigamim.models.counting import ModelCount, Saved, decoder_flops, patch_embed_flops, simmim_head

        enc = encoder_of(model)
        size, patch, dim = enc.img_size, enc.patch_size, enc.embed_dim
        patches = (size // patch) ** 2
        tokens = patches + enc.num_prefix_tokens
        blocks = tuple(self._block_count(blk, tokens, dim) for blk in enc.blocks)
        flops = patch_embed_flops(patches, dim, patch, enc.in_chans) + sum(b.flops() for b in blocks)
        return ModelCount(size, blocks, stem=Saved(3 * size * size + 2 * patches), head=simmim_head(tokens, dim, size),
                          forward_flops=float(flops + decoder_flops(model, size)),
                          attention_modes=self.attention_modes)

    def _block_count(self, blk, tokens: int, dim: int):
        from gigamim.models.counting import GlobalBlockCount

        return GlobalBlockCount(tokens, dim, blk.attn.num_heads, tokens, blk.mlp.fc1.out_features / dim,
                                layer_scale=not isinstance(blk.ls1, nn.Identity))


VIT = ViTSpec()

_VARIANTS = {
    # nano: the test size (64 px, 4x4 patches of 16 px), 4 blocks
    "vit_nano_patch16": dict(img_size=64, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0),
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),  # SimMIM ViT-B/16, 224 px
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
}
_COMMON = dict(img_size=224, patch_size=16, drop_path_rate=0.1)


register_variants(VIT, _VARIANTS, _COMMON)
