"""A whole model family in one file, as a new family would be added: the encoder, its spec,
its variants. Importing this module registers ``toy_nano``; nothing outside this file (and
nothing outside ``gigamim/models/`` in the library) knows about it.

The toy is a two-stage hierarchical conv-MLP: 8-px patches, a 2x2 merge before stage 1, so its
total stride is 16; blocks are a depthwise 3x3 conv then ``x + fc2(gelu(fc1(norm(x))))`` on an NHWC map.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from gigamim.models.counting import BlockCount, ModelCount, Saved, decoder_flops, patch_embed_flops, simmim_head
from gigamim.models.family import FamilySpec, Geometry, ModelConfigError, encoder_of, register_variants
from gigamim.models.init import MaskTokenMixin


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # token mixing (depthwise 3x3)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class ToyStage(nn.Module):
    def __init__(self, dim: int, depth: int, merge: bool):
        super().__init__()
        self.downsample = nn.Linear(2 * dim, dim) if merge else nn.Identity()  # 4 * (dim/2) -> dim
        self.blocks = nn.Sequential(*[ToyBlock(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.downsample, nn.Linear):
            b, h, w, c = x.shape
            x = self.downsample(x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).flatten(3))
        return self.blocks(x)


class ToyEncoder(MaskTokenMixin, nn.Module):
    def __init__(self, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 16, depths: Sequence[int] = (1, 1)):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depths = embed_dim, tuple(depths)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.layers = nn.Sequential(*[ToyStage(embed_dim * 2**i, d, i > 0) for i, d in enumerate(depths)])
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self._declare_mask_token()

    def reset_parameters(self) -> None:
        self.mask_token_reset()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, features_only: bool = False):
        x = self.norm(self.layers(self.masked(self.embed(x), mask)))
        return x if features_only else self.head(x.mean(dim=(1, 2)))


class ToyBlockCount(BlockCount):
    """What autograd keeps of a ToyBlock per image: the depthwise conv's input (a permuted view
    of the block input), the norm's input, fc1's input TC each, GELU's and fc2's inputs HT each,
    the norm's mean / rstd. No attention: every mode saves the same."""

    def saved(self, attn: str) -> Saved:
        t, c = self.tokens, self.dim
        return Saved(3 * t * c + 2 * self.hidden * t, stats=2 * t)

    def attn_flops(self) -> int:
        return 0

    def flops(self) -> int:
        t, c = self.tokens, self.dim
        return 2 * t * c * 9 + 2 * 2 * t * c * self.hidden  # depthwise 3x3, fc1 + fc2


class ToySpec(FamilySpec):
    """The toy's rules, counts, groups, probe points; no timm counterpart (``timm_family``
    None): it exports as ``encoder`` / ``simmim`` weights only."""

    name = "toy"
    model_class = ToyEncoder
    no_decay_keywords = ("mask_token",)

    def check_args(self, args) -> None:
        stride = args["patch_size"] * 2 ** (len(args["depths"]) - 1)
        if args["img_size"] % stride:
            raise ModelConfigError("img_size", f"img_size={args['img_size']} must be divisible by {stride} "
                                   "(the toy's stride)")

    def geometry(self, args) -> Geometry:
        side, n, c = args["img_size"] // args["patch_size"], len(args["depths"]), args["embed_dim"]
        return Geometry(args["img_size"], args["patch_size"], args["patch_size"] * 2 ** (n - 1), side * side,
                        tuple((side // 2**i) ** 2 for i in range(n)), tuple(c * 2**i for i in range(n)))

    def encoder_stride(self, encoder) -> int:
        return encoder.patch_size * 2 ** (len(encoder.depths) - 1)

    def num_layer_ids(self, encoder) -> int:
        return len(encoder.depths) + 2

    def layer_id(self, encoder, name: str) -> int:
        if name.startswith("patch_embed.") or name == "mask_token":
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        return len(encoder.depths) + 1

    def probe_depth(self, encoder) -> int:
        return len(encoder.layers)

    def stage_features(self, encoder, x, stage: int):
        t = encoder.embed(x)
        for layer in encoder.layers[: stage + 1]:
            t = layer(t)
        return t.mean(dim=(1, 2))

    def owns_state_dict(self, sd) -> bool:
        return "layers.0.blocks.0.fc1.weight" in sd and "patch_embed.weight" in sd

    def block_classes(self):
        return (ToyBlock,)

    def plan_count(self, model) -> ModelCount:
        """For `gigamim plan`: the blocks, the merge's input before stage 1, the stem (the conv's
        input image, the mask blend's two masks), SimMIM's head."""
        enc = encoder_of(model)
        size, side = enc.img_size, enc.img_size // enc.patch_size
        blocks, before, flops = [], {}, patch_embed_flops(side * side, enc.embed_dim, enc.patch_size, enc.in_chans)
        for i, stage in enumerate(enc.layers):
            t, c = (side // 2**i) ** 2, enc.embed_dim * 2**i
            if i > 0:
                before[len(blocks)] = Saved(4 * t * c // 2)  # the 2x2 concat, the merge's input
                flops += 2 * t * (2 * c) * c
            for _ in stage.blocks:
                blocks.append(ToyBlockCount(t, c, 0, 0, 2.0, i))
                flops += blocks[-1].flops()
        return ModelCount(size, tuple(blocks), stem=Saved(3 * size * size + 2 * side * side), head=simmim_head(t, c, size),
                          forward_flops=float(flops + decoder_flops(model, size)))


TOY = ToySpec()
register_variants(TOY, {"toy_nano": dict(embed_dim=16, depths=(1, 1))}, dict(img_size=64, patch_size=8))
