"""SwinTransformerV2 (Liu et al. 2022) with timm-compatible state-dict keys, and its variants.

Exact to the official code / timm: res-post-norm blocks, cosine window attention with a
log-spaced CPB, PatchMerging = reduce(4C->2C) then LayerNorm, window shrinks to the map
(shift 0) when a stage's map is no larger than the window. Additions for scale:

* huge/giant: a LayerNorm on the main branch after every 6th block of a stage
  (``layers.i.blocks.j.norm3``), as in the paper; other variants have no such key.
* per-stage sequential (chunked, recomputed) window attention, an SDPA path, and
  configurable activation checkpointing with optional CPU offload of saved activations.
* only integer, non-persistent buffers (geometry), so construction is safe under
  ``deepspeed.zero.Init`` (any dtype) and on the meta device; all init happens inside each module's own ``__init__`` because
  zero.Init partitions a module as soon as its ``__init__`` returns. Every module with
  parameters or buffers of its own re-initialises them in ``reset_parameters()``, so a model
  built on the meta device and materialised sharded (FSDP2) is re-initialised by
  ``models.init.reset_after_meta``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gigamim.kernels import ResPostLayerNorm, drop_path_scale
from gigamim.models.attention import TruncNormalLinear, WindowAttention
from gigamim.models.family import HierarchicalSpec, ModelConfigError, register_variants
from gigamim.models.init import MaskTokenMixin
from gigamim.models.patch_conv import PatchConv2d

IntOrSeq = Union[int, Sequence[int]]


class ZeroInitLayerNorm(ResPostLayerNorm):
    """The res-post-norm LayerNorm: `norm(y, shortcut=x, drop_path_scale=s)` is
    `x + s * LayerNorm(y)` in one fused kernel where one runs (gigamim.kernels: Triton on
    GPUs, apex, else PyTorch). Weight and bias start at 0: the official init, under which
    every residual branch outputs exactly 0 at initialisation."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class PatchEmbed(nn.Module):
    """Conv patchify + LayerNorm, NHWC output (keys patch_embed.proj.*, patch_embed.norm.*).

    The patchify is a ``PatchConv2d`` (a Conv2d computed as one GEMM over patches): a graph with
    a convolution in it turns on inductor's CPU channels-last layout optimisation for every
    saved activation of a whole-model ``torch.compile`` (see gigamim.models.patch_conv)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = PatchConv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (timm's channel order) -> Linear 4C->2C -> LayerNorm(2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = TruncNormalLinear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (keys mlp.fc1.*, mlp.fc2.*)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = TruncNormalLinear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = TruncNormalLinear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def window_partition(x: torch.Tensor, ws: Tuple[int, int]) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], c)


def window_reverse(windows: torch.Tensor, ws: Tuple[int, int], h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws[0], w // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_regions(h: int, w: int, ws: Tuple[int, int], shift: Tuple[int, int], device=None) -> torch.Tensor:
    """(nW, N) int64 region label of every token of every window of a shifted (h, w) map."""
    region = torch.zeros(h, w, dtype=torch.int64, device=device)
    label = 0
    for hs in (slice(0, -ws[0]), slice(-ws[0], -shift[0]), slice(-shift[0], None)):
        for wsl in (slice(0, -ws[1]), slice(-ws[1], -shift[1]), slice(-shift[1], None)):
            region[hs, wsl] = label
            label += 1
    return window_partition(region.view(1, h, w, 1), ws).squeeze(-1)  # nW, N


def mask_from_regions(regions: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(nW, N, N) additive mask: 0 within a region, -inf across regions.

    -inf rather than the official -100: with the logit scale near its clamp (100) cosine
    logits span -100..+116 and -100 no longer removes a cross-region key. No row is ever fully
    masked (a token always shares its own region), so softmax stays finite; in fp64 the result
    equals the -100 mask to ~1e-40 wherever -100 suffices."""
    same = regions.unsqueeze(1) == regions.unsqueeze(2)
    return torch.zeros(same.shape, dtype=dtype, device=regions.device).masked_fill(~same, float("-inf"))


def shift_mask(h: int, w: int, ws: Tuple[int, int], shift: Tuple[int, int], device=None) -> torch.Tensor:
    """(nW, N, N) fp32 mask for shifted windows: 0 within a region, -inf across regions."""
    return mask_from_regions(shift_regions(h, w, ws, shift, device))


class SwinTransformerV2Block(nn.Module):
    """x + drop_path(norm1(attn(x))); x + drop_path(norm2(mlp(x))); optional main-branch norm3."""

    def __init__(
        self,
        dim: int,
        resolution: Tuple[int, int],
        num_heads: int,
        window_size: Tuple[int, int],
        shift_size: Tuple[int, int],
        pretrained_window_size: Tuple[int, int],
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        extra_norm: bool = False,
        attn_impl: str = "explicit",
        sequential: bool = False,
        attn_chunk: int = 32,
    ):
        super().__init__()
        self.resolution = tuple(resolution)
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.attn = WindowAttention(
            dim, self.window_size, num_heads, pretrained_window_size, attn_drop, proj_drop,
            impl=attn_impl, sequential=sequential, chunk=attn_chunk,
        )
        self.norm1 = ZeroInitLayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.norm2 = ZeroInitLayerNorm(dim)
        self.drop_path = drop_path  # per-sample, drawn as timm's DropPath draws it
        # huge/giant: a main-branch LayerNorm keeps the main branch's scale bounded; Identity
        # (no parameters, no state-dict key) in every other block.
        self.norm3 = nn.LayerNorm(dim) if extra_norm else nn.Identity()
        self.checkpointed = False
        if any(self.shift_size):
            # Integer and non-persistent, like attention's index buffers: zero.Init and bf16
            # casts leave it alone; the float mask is rebuilt from it in forward (cheap, and a
            # compiled graph just reads the buffer: no cache filled while tracing).
            self.register_buffer("shift_regions",
                                 shift_regions(*self.resolution, self.window_size, self.shift_size), persistent=False)

    def reset_parameters(self) -> None:
        """The shift regions (geometry, non-persistent): rebuilt after a meta-device build is
        materialised (`models.init.reset_after_meta`); the block has no parameters of its own."""
        if any(self.shift_size):
            self.shift_regions.copy_(shift_regions(*self.resolution, self.window_size, self.shift_size,
                                                   device=self.shift_regions.device))

    def _mask(self, dtype) -> Optional[torch.Tensor]:
        if not any(self.shift_size):
            return None
        return mask_from_regions(self.shift_regions, dtype)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window_size), mask=self._mask(x.dtype))
        x = window_reverse(windows, self.window_size, h, w)
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self._window_attention(x), shortcut=x,
                       drop_path_scale=drop_path_scale(x, self.drop_path, self.training))
        x = self.norm2(self.mlp(x), shortcut=x, drop_path_scale=drop_path_scale(x, self.drop_path, self.training))
        return self.norm3(x)


class SwinTransformerV2Stage(nn.Module):
    """Optional PatchMerging at the start (timm layout), then the blocks."""

    def __init__(self, dim: int, downsample: bool, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if blk.checkpointed and torch.is_grad_enabled():
                # Non-reentrant + preserve_rng_state: drop path / dropout replay the same masks.
                x = checkpoint(blk, x, use_reentrant=False, preserve_rng_state=True)
            else:
                x = blk(x)
        return x


class Head(nn.Module):
    """Global average pool + Linear (key head.fc.*); fc is Identity when num_classes == 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = TruncNormalLinear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2)))


def _per_stage(value: IntOrSeq, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ModelConfigError(name, f"{name} must be an int or {n} values (one per stage), got {value}")
    return value


def _check_sequential(sequential_stages: Sequence[int], n: int) -> None:
    bad = set(sequential_stages) - set(range(n))
    if bad:
        raise ModelConfigError("sequential_stages", f"sequential_stages {sorted(bad)} out of range 0..{n - 1}")


def stage_geometry(img_size: int, patch_size: int, num_stages: int, window_size: IntOrSeq):
    """Per stage: (map side, window side, shift). Shrink rule: a map no larger than the
    window becomes one unshifted window. Raises ValueError for maps the window does not tile."""
    windows = _per_stage(window_size, num_stages, "window_size")
    out = []
    for i, target in enumerate(windows):
        side = img_size // patch_size // 2**i
        if target < 1:
            raise ModelConfigError("window_size", f"window_size must be >= 1, got {target} for stage {i}")
        if side <= target:
            out.append((side, side, 0))
        elif side % target:
            raise ModelConfigError("window_size",
                f"img_size={img_size} with window_size={target}: stage {i} feature map {side}x{side} is not "
                f"divisible by the window; pick a window_size that divides {side} (or is >= it)"
            )
        else:
            out.append((side, target, target // 2))
    return out


def _checkpoint_plan(grad_checkpointing, depths: Sequence[int]) -> list:
    """Which blocks (global order) to checkpoint: False/None/0 none, True all, int k every k-th
    block (0, k, 2k, ...), a list/tuple of stage ids every block of those stages."""
    total = sum(depths)
    if grad_checkpointing is None or grad_checkpointing is False:
        return [False] * total
    if grad_checkpointing is True:
        return [True] * total
    if isinstance(grad_checkpointing, int):
        if grad_checkpointing < 0:
            raise ModelConfigError("grad_checkpointing", f"grad_checkpointing={grad_checkpointing}: use True, k >= 1, or a list of stage ids")
        return [grad_checkpointing > 0 and i % grad_checkpointing == 0 for i in range(total)]
    stages = set(int(s) for s in grad_checkpointing)
    bad = stages - set(range(len(depths)))
    if bad:
        raise ModelConfigError("grad_checkpointing", f"grad_checkpointing stage ids {sorted(bad)} out of range 0..{len(depths) - 1}")
    return [s in stages for s, d in enumerate(depths) for _ in range(d)]


class SwinTransformerV2(MaskTokenMixin, nn.Module):
    """SwinV2 encoder. ``forward_features(x[, mask]) -> (B, H/32, W/32, C)``; ``forward`` adds the head.

    ``mask`` (bool, (B, H/4, W/4)) swaps masked patch embeddings for ``self.mask_token``,
    which is None until SimMIM calls ``add_mask_token()`` (so plain encoders load into timm
    strictly).
    """

    def __init__(
        self,
        img_size: int = 192,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: IntOrSeq = 12,
        pretrained_window_sizes: IntOrSeq = 0,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        extra_norm_period: int = 0,
        attn_impl: str = "explicit",
        sequential_stages: Sequence[int] = (),
        attn_chunk: int = 32,
        grad_checkpointing=False,
        checkpoint_offload: bool = False,
    ):
        super().__init__()
        n = len(depths)
        # The family's rules, the same messages a config gets (ModelConfigError is a ValueError).
        SWINV2.check(dict(img_size=img_size, patch_size=patch_size, depths=depths, num_heads=num_heads,
                          window_size=window_size, pretrained_window_sizes=pretrained_window_sizes,
                          sequential_stages=sequential_stages, grad_checkpointing=grad_checkpointing))
        geometry = stage_geometry(img_size, patch_size, n, window_size)
        pretrained = _per_stage(pretrained_window_sizes, n, "pretrained_window_sizes")

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.mlp_ratio = mlp_ratio
        self.target_window_sizes = _per_stage(window_size, n, "window_size")  # as asked
        self.window_sizes = tuple(g[1] for g in geometry)  # after the shrink rule
        self.shift_sizes = tuple(g[2] for g in geometry)
        self.num_features = embed_dim * 2 ** (n - 1)
        self.extra_norm_period = extra_norm_period
        self.checkpoint_offload = checkpoint_offload

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist() if sum(depths) else []
        layers, b = [], 0
        for i in range(n):
            dim = embed_dim * 2**i
            side, ws, shift = geometry[i]
            blocks = []
            for j in range(depths[i]):
                blocks.append(
                    SwinTransformerV2Block(
                        dim, (side, side), num_heads[i], (ws, ws), (0, 0) if j % 2 == 0 else (shift, shift),
                        (pretrained[i], pretrained[i]), mlp_ratio, dpr[b], attn_drop_rate, proj_drop_rate,
                        extra_norm=bool(extra_norm_period) and (j + 1) % extra_norm_period == 0,
                        attn_impl=attn_impl, sequential=i in sequential_stages, attn_chunk=attn_chunk,
                    )
                )
                b += 1
            layers.append(SwinTransformerV2Stage(dim, i > 0, blocks))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = Head(self.num_features, num_classes)
        self._declare_mask_token()
        self.set_grad_checkpointing(grad_checkpointing)

    def reset_parameters(self) -> None:
        """The encoder's own parameter: SimMIM's mask token, when added (every other
        parameter belongs to a submodule that resets itself; `models.init.reset_after_meta`)."""
        self.mask_token_reset()

    def stage_geometry(self, img_size: Optional[int] = None):
        """Per stage (map side, window side, shift) at ``img_size`` (default: the built size),
        by the same shrink rule (and ValueError) as construction."""
        return stage_geometry(img_size or self.img_size, self.patch_size, len(self.depths), self.target_window_sizes)

    def blocks(self):
        """All blocks in forward order."""
        return [blk for stage in self.layers for blk in stage.blocks]

    def set_grad_checkpointing(self, enable=True) -> None:
        """True: every block; int k: every k-th block; list of stage ids; False: none."""
        for blk, on in zip(self.blocks(), _checkpoint_plan(enable, self.depths)):
            blk.checkpointed = on
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(
                f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}; "
                f"build the model with img_size matching the input"
            )
        x = self.masked(self.patch_embed(x), mask)
        # save_on_cpu keeps what autograd saves (for checkpointed blocks: their inputs) in host memory.
        offload = self.checkpoint_offload and torch.is_grad_enabled()
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else nullcontext()
        with ctx:
            x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, features_only: bool = False):
        """Logits, or the final feature map with ``features_only``. Wrappers (SimMIM) call this
        rather than ``forward_features`` because ZeRO-3 gathers the encoder's own parameters
        (``mask_token``) in the hook that runs when the encoder module itself is called."""
        x = self.forward_features(x, mask)
        return x if features_only else self.forward_head(x)


class SwinV2Spec(HierarchicalSpec):
    """The SwinV2 family: timm's SwinTransformerV2 keys (+ huge/giant's ``norm3``), analytic
    FLOPs (`models.flops`), no weight decay on the CPB MLP and the logit scales."""

    name = "swinv2"
    model_class = SwinTransformerV2
    timm_family = "swinv2"
    no_decay_keywords = ("logit_scale", "cpb_mlp", "mask_token")

    def check_args(self, args) -> None:
        super().check_args(args)
        patch, depths, _ = self.stage_args(args)
        n = len(depths)
        stage_geometry(args["img_size"], patch, n, args.get("window_size", 12))  # every stage tiled
        _per_stage(args.get("pretrained_window_sizes", 0), n, "pretrained_window_sizes")
        _check_sequential(args.get("sequential_stages", ()) or (), n)
        _checkpoint_plan(args.get("grad_checkpointing", False), depths)

    def flops(self, model, img_size=None):
        from gigamim.models.flops import model_and_hardware_flops

        return model_and_hardware_flops(model, img_size)

    def plan_count(self, model):
        """Per block a `WindowV2BlockCount` as built (window after the shrink rule, shifted or
        not, huge/giant's norm3); before stages 1-3 the PatchMerging's 2x2-concat copy (its
        reduction's input) and its LayerNorm's input + stats; the stem: patch-embed conv input
        (3HW), its norm's input + stats, the mask-token blend (two T-sized masks). FLOPs from
        `models.flops` (the CPB MLP once per forward)."""
        from gigamim.models.counting import ModelCount, Saved, WindowV2BlockCount, simmim_head
        from gigamim.models.family import encoder_of
        from gigamim.models.flops import forward_flops

        enc = encoder_of(model)
        size = enc.img_size
        blocks, before = [], {}
        prev = None
        for i, stage in enumerate(enc.layers):
            side, dim = size // enc.patch_size // 2**i, enc.embed_dim * 2**i
            t = side * side
            if prev is not None:
                before[len(blocks)] = Saved(prev[0] * prev[1] + t * dim, stats=2 * t)
            for blk in stage.blocks:
                ws = blk.window_size[0]
                blocks.append(WindowV2BlockCount(t, dim, blk.attn.num_heads, ws * ws, enc.mlp_ratio, i, window=ws,
                                                 side=side, shifted=any(blk.shift_size),
                                                 extra_norm=isinstance(blk.norm3, nn.LayerNorm)))
            prev = (t, dim)
        t0, c0 = (size // enc.patch_size) ** 2, enc.embed_dim
        per_image = float(forward_flops(model, size, batch_size=10**12))  # the CPB term vanishes
        return ModelCount(size, tuple(blocks), stem=Saved(3 * size * size + t0 * c0 + 2 * t0, stats=2 * t0),
                          head=simmim_head(prev[0], prev[1], size), forward_flops=per_image,
                          per_forward_flops=float(forward_flops(model, size, batch_size=1)) - per_image,
                          before=before, attention_modes=("explicit", "fused", "sequential"), checkpoint_every=(2, 1),
                          window_size=enc.target_window_sizes[0] if len(set(enc.target_window_sizes)) == 1
                          else list(enc.target_window_sizes))

    def export_geometry(self, encoder, run_args=None):
        """The run's pretrained window sizes (not in the keys), one per stage."""
        pws = (run_args or {}).get("pretrained_window_sizes")
        if pws is None:
            return {}
        return {"pretrained_window_sizes": list(pws) if isinstance(pws, (list, tuple))
                else [int(pws)] * len(encoder.depths)}

    def block_classes(self):
        return (SwinTransformerV2Block,)


SWINV2 = SwinV2Spec()

# Defaults: SimMIM pretraining geometry (192 px, window 12); nano is the test/demo model.
_VARIANTS = {
    # nano: C=32, one shifted pair per stage, window 6 so stages 0-2 use shifted windows at 192 px.
    "swinv2_nano": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6, drop_path_rate=0.0),
    "swinv2_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swinv2_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "swinv2_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6),
    "swinv2_giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_period=6),
}
_COMMON = dict(img_size=192, window_size=12, drop_path_rate=0.1)


register_variants(SWINV2, _VARIANTS, _COMMON)
