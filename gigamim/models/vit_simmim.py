"""The SimMIM paper's ViT (microsoft/SimMIM ``models/vision_transformer.py``, BEiT-style).

Not timm's standard ViT (`models/vit.py`: absolute position embedding, class-token pooling):
this is the encoder behind the paper's ViT-B/16 result (83.8% top-1), with

- layer scale: ``x + gamma_1 * attn(norm1(x))``, ``x + gamma_2 * mlp(norm2(x))``, gammas
  initialised to ``init_values`` (0.1, the official ``MODEL.VIT.INIT_VALUES``);
- relative position bias: in pretraining one table shared by every block
  (``USE_SHARED_RPB``, key ``rel_pos_bias.relative_position_bias_table``), in fine-tuning one
  per block (``USE_RPB``, ``blocks.{i}.attn.relative_position_bias_table``) initialised from the
  shared one by the official remapping (`remap_pretrained_state`); the table holds
  ``(2h-1)(2w-1)`` patch-to-patch offsets plus 3 entries (cls->token, token->cls, cls->cls);
- no absolute position embedding (``USE_APE False``; ``use_abs_pos_emb=True`` adds one);
- q and v biases, no k bias; LayerNorm eps 1e-6; GELU MLP;
- pretraining form: final ``norm``, the patch tokens to the decoder (encoder stride 16);
  fine-tuning form (``USE_MEAN_POOLING``): no final norm, mean of the patch tokens, then
  ``fc_norm`` and the head.

The state dict uses the official key names (a released checkpoint's ``model`` dict, less its
``encoder.`` prefix and the ``relative_position_index`` buffers, loads as it is). Every module
initialises its own parameters in its own ``__init__`` (safe under ``deepspeed.zero.Init``,
which partitions a module when its ``__init__`` returns) and again in ``reset_parameters``
(meta-device builds); the only buffers are integer, non-persistent index tables.

Init as the official code: trunc-normal std .02 for Linear / Conv / tokens (truncated at
+-std in the pretraining encoder, ``VisionTransformerForSimMIM._trunc_normal_``; at +-2 in the
fine-tuning model), zero biases, attention ``proj`` and MLP ``fc2`` weights divided by
sqrt(2 * layer) (``fix_init_weight``), the head scaled by ``init_scale`` (0.001). A model
with ``num_classes == 0`` is taken to be a pretraining encoder.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from gigamim.models.init import MaskTokenMixin
from gigamim.models.registry import register_model
from gigamim.models.vit import ViTSpec

LN_EPS = 1e-6


def _trunc_(t: torch.Tensor, std: float, bound: Optional[float]) -> torch.Tensor:
    """trunc normal, std ``std``, cut at +-bound (None: timm's default +-2, absolute)."""
    with torch.no_grad():
        if bound is None:
            return trunc_normal_(t, std=std)
        return trunc_normal_(t, std=std, a=-bound, b=bound)


class _InitLinear(nn.Linear):
    """nn.Linear with the official init in its own ``reset_parameters`` (run by its __init__):
    trunc normal std .02 (cut at ``bound``), zero bias, weight / ``divisor`` (fix_init_weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bound: Optional[float] = None,
                 divisor: float = 1.0, scale: float = 1.0):
        self._bound, self._divisor, self._scale = bound, divisor, scale  # read by reset_parameters
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _trunc_(self.weight, 0.02, self._bound)
            self.weight.div_(self._divisor).mul_(self._scale)
            if self.bias is not None:
                nn.init.zeros_(self.bias)


class _QKV(_InitLinear):
    """The bias-free qkv projection taking (q_bias, 0, v_bias) as an argument: still called as
    a module, so ZeRO-3 gathers its weight."""

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class _PatchProj(nn.Conv2d):
    def __init__(self, in_chans: int, dim: int, patch_size: int, bound: Optional[float]):
        self._bound = bound
        super().__init__(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _trunc_(self.weight, 0.02, self._bound)
            nn.init.zeros_(self.bias)


class PatchEmbed(nn.Module):
    """Conv patchify (key ``patch_embed.proj``) -> (B, L, C)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, bound: Optional[float]):
        super().__init__()
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.proj = _PatchProj(in_chans, dim, patch_size, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def relative_position_index(shape: Tuple[int, int], device=None) -> torch.Tensor:
    """(N+1, N+1) int64 index into the BEiT table for N = h*w patches plus the class token:
    patch pairs by their (dh, dw) offset, row-major over (2h-1, 2w-1); cls->token, token->cls
    and cls->cls are the last three rows of the table."""
    h, w = shape
    coords = torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                        indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    idx = (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)
    n = h * w
    num = (2 * h - 1) * (2 * w - 1) + 3
    out = torch.zeros(n + 1, n + 1, dtype=torch.int64, device=device)
    out[1:, 1:] = idx
    out[0, :] = num - 3  # cls -> token
    out[:, 0] = num - 2  # token -> cls
    out[0, 0] = num - 1  # cls -> cls
    return out


def num_relative_distance(shape: Tuple[int, int]) -> int:
    return (2 * shape[0] - 1) * (2 * shape[1] - 1) + 3


def _gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()  # heads, N+1, N+1


class RelativePositionBias(nn.Module):
    """The shared table of pretraining (key ``rel_pos_bias.relative_position_bias_table``);
    ``forward()`` -> (heads, N+1, N+1)."""

    def __init__(self, patch_shape: Tuple[int, int], num_heads: int):
        super().__init__()
        self.patch_shape = tuple(patch_shape)
        self.relative_position_bias_table = nn.Parameter(torch.empty(num_relative_distance(self.patch_shape), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.patch_shape), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.relative_position_bias_table)
            dev = self.relative_position_index.device
            self.relative_position_index.copy_(relative_position_index(self.patch_shape, dev))

    def forward(self) -> torch.Tensor:
        return _gather_bias(self.relative_position_bias_table, self.relative_position_index)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, patch_shape: Optional[Tuple[int, int]],
                 attn_drop: float, proj_drop: float, bound: Optional[float], layer: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.explicit = False  # the encoder sets it (attn_impl="explicit")
        self.qkv = _QKV(dim, dim * 3, bias=False, bound=bound)
        self.q_bias = nn.Parameter(torch.empty(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.empty(dim)) if qkv_bias else None
        self.patch_shape = tuple(patch_shape) if patch_shape else None
        if self.patch_shape:  # per-block table (fine-tuning, USE_RPB)
            self.relative_position_bias_table = nn.Parameter(
                torch.empty(num_relative_distance(self.patch_shape), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.patch_shape),
                                 persistent=False)
        else:
            self.relative_position_bias_table = None
        self.proj = _InitLinear(dim, dim, bound=bound, divisor=math.sqrt(2.0 * layer))
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.q_bias, self.v_bias, self.relative_position_bias_table):
                if p is not None:
                    nn.init.zeros_(p)
            if self.patch_shape:
                dev = self.relative_position_index.device
                self.relative_position_index.copy_(relative_position_index(self.patch_shape, dev))

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = self.qkv(x, bias).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = None
        if self.relative_position_bias_table is not None:
            mask = _gather_bias(self.relative_position_bias_table, self.relative_position_index).unsqueeze(0)
        if rel_pos_bias is not None:
            mask = rel_pos_bias.unsqueeze(0) if mask is None else mask + rel_pos_bias
        if mask is not None:
            mask = mask.to(q.dtype)
        if self.explicit:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            attn = (attn if mask is None else attn + mask).softmax(dim=-1)
            x = F.dropout(attn, self.attn_drop, self.training) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float, bound: Optional[float], layer: int):
        super().__init__()
        self.fc1 = _InitLinear(dim, hidden, bound=bound)
        self.act = nn.GELU()
        self.fc2 = _InitLinear(hidden, dim, bound=bound, divisor=math.sqrt(2.0 * layer))
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float, init_values: Optional[float], patch_shape: Optional[Tuple[int, int]],
                 bound: Optional[float], layer: int):
        super().__init__()
        self.init_values = init_values
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, patch_shape, attn_drop, drop, bound, layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, bound, layer)
        if init_values is not None:
            self.gamma_1 = nn.Parameter(torch.empty(dim))
            self.gamma_2 = nn.Parameter(torch.empty(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gamma_1 is not None:
            with torch.no_grad():
                self.gamma_1.fill_(self.init_values)
                self.gamma_2.fill_(self.init_values)

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        x = x + self.drop_path(a)
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return x + self.drop_path(m)


class VisionTransformerSimMIMOfficial(MaskTokenMixin, nn.Module):
    """The official SimMIM ViT. ``forward(x, mask=None, features_only=False)``: logits, or
    with ``features_only`` the final patch tokens as a (B, H/p, W/p, C) map (normed in the
    pretraining form). The mask token is declared here and created by the SimMIM wrapper."""

    num_prefix_tokens = 1
    # The official optimizer exempts 1-D parameters and no_weight_decay() = {pos_embed, cls_token};
    # the relative position tables and the (3-D there) mask token are decayed.
    no_weight_decay_keywords = ("pos_embed", "cls_token")

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, init_values: Optional[float] = 0.1, use_abs_pos_emb: bool = False,
                 use_rel_pos_bias: bool = False, use_shared_rel_pos_bias: bool = True,
                 use_mean_pooling: bool = False, init_scale: float = 0.001, grad_checkpointing: bool = False,
                 attn_impl: str = "auto"):
        super().__init__()
        if attn_impl not in ("auto", "explicit", "sdpa"):
            raise ValueError(f"attn_impl={attn_impl!r}: this ViT has 'explicit' (softmax(q k^T / sqrt(d) + bias) v, the "
                             "official formula) and 'sdpa' ('auto': sdpa)")
        VIT_SIMMIM.check(dict(img_size=img_size, patch_size=patch_size))  # the config's rules, the same messages
        if use_rel_pos_bias and use_shared_rel_pos_bias:
            raise ValueError("use_rel_pos_bias (per block) and use_shared_rel_pos_bias are exclusive")
        # The pretraining encoder (VisionTransformerForSimMIM) truncates its inits at +-std.
        bound = 0.02 if num_classes == 0 else None
        self._bound = bound
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.encoder_stride = patch_size
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bound)
        shape = self.patch_embed.patch_shape
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(1, shape[0] * shape[1] + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = RelativePositionBias(shape, num_heads) if use_shared_rel_pos_bias else None
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # also under meta
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], init_values,
                  shape if use_rel_pos_bias else None, bound, layer=i + 1)
            for i in range(depth)])
        for blk in self.blocks:
            blk.attn.explicit = attn_impl == "explicit"
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if use_mean_pooling else None
        self.head = _InitLinear(embed_dim, num_classes, bound=bound, scale=init_scale) if num_classes > 0 \
            else nn.Identity()
        self._declare_mask_token()
        self._init_own()

    def _init_own(self) -> None:
        with torch.no_grad():
            if self.pos_embed is not None:
                _trunc_(self.pos_embed, 0.02, self._bound)
            _trunc_(self.cls_token, 0.02, self._bound)
        self.mask_token_reset()

    def reset_parameters(self) -> None:
        """After a meta-device build (children reset themselves first)."""
        self._init_own()

    def stage_modules(self):
        return list(self.blocks)

    def shared_bias(self) -> Optional[torch.Tensor]:
        return self.rel_pos_bias() if self.rel_pos_bias is not None else None

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch embedding, the mask token on masked patches, the class token (and the absolute
        position embedding when there is one): the official VisionTransformerForSimMIM order."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"expected images (B, {self.in_chans}, {self.img_size}, {self.img_size}), got "
                             f"{tuple(x.shape)}; build the model with img_size matching the input")
        x = self.masked(self.patch_embed(x), mask)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_blocks(self, x: torch.Tensor, upto: Optional[int] = None) -> torch.Tensor:
        """Run blocks [0, upto) (all by default) with the shared bias when there is one."""
        bias = self.shared_bias()
        for blk in self.blocks[:upto]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, rel_pos_bias=bias)
        return x

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1 + L, C) tokens after the blocks and ``norm`` (Identity in the fine-tuning form)."""
        return self.norm(self.forward_blocks(self.embed(x, mask)))

    def tokens_to_map(self, x: torch.Tensor) -> torch.Tensor:
        side = self.img_size // self.patch_size
        return x[:, 1:].reshape(x.shape[0], side, side, x.shape[-1])

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc_norm(x[:, 1:].mean(1)) if self.fc_norm is not None else x[:, 0]
        return self.head(x)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, features_only: bool = False):
        x = self.forward_features(x, mask)
        return self.tokens_to_map(x) if features_only else self.forward_head(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def timm_equivalent(self) -> tuple[str, dict]:
        """(timm family, kwargs): timm's ``Beit`` with these arguments has this model's keys and
        computes the same function (the fine-tuning export names it)."""
        a = self.blocks[0].attn
        return "beit", dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                            num_classes=self.num_classes, embed_dim=self.embed_dim, depth=self.depth,
                            num_heads=self.num_heads, mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim,
                            qkv_bias=a.q_bias is not None, init_values=self.blocks[0].init_values,
                            use_abs_pos_emb=self.pos_embed is not None,
                            use_rel_pos_bias=a.relative_position_bias_table is not None,
                            use_shared_rel_pos_bias=self.rel_pos_bias is not None,
                            global_pool="avg" if self.fc_norm is not None else "token")

    def remap_pretrained_state(self, state: dict) -> dict:
        """Encoder weights of either form -> this form's keys (see `remap_pretrained_state`);
        a ``fc_norm`` the weights lack (pretraining has none) starts at the official LayerNorm
        init (1, 0), like the head."""
        out = remap_pretrained_state(state, self)
        if self.fc_norm is not None and "fc_norm.weight" not in out:
            like = next(iter(out.values()))  # on the weights' device even inside torch.device("meta")
            out["fc_norm.weight"] = torch.ones(self.embed_dim, dtype=like.dtype, device=like.device)
            out["fc_norm.bias"] = torch.zeros(self.embed_dim, dtype=like.dtype, device=like.device)
        return out


def remap_pretrained_state(state: dict, model: VisionTransformerSimMIMOfficial) -> dict:
    """Pretraining encoder weights -> this model's keys, as the official fine-tuning loader does
    (microsoft/SimMIM ``utils.remap_pretrained_keys_vit``): the shared table copied into every
    block when the model has per-block tables; ``relative_position_index`` buffers dropped; the
    final ``norm`` dropped for the mean-pooling form (its ``fc_norm`` starts fresh). A
    table of another patch grid is refused (the official code interpolates it with scipy's
    removed ``interp2d``): one line naming the key and both sizes."""
    out = {k: v for k, v in state.items() if "relative_position_index" not in k}
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in out and model.rel_pos_bias is None and model.blocks[0].attn.relative_position_bias_table is not None:
        table = out.pop(shared)
        for i in range(len(model.blocks)):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    if isinstance(model.norm, nn.Identity):
        # the fine-tuning form pools then normalises with a new fc_norm: the pretraining final
        # norm has no place (the official strict=False load leaves it out the same way)
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}
    want = model.state_dict()
    for k, v in out.items():
        if k.endswith("relative_position_bias_table") and k in want and tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(f"{k}: the weights' table has {v.shape[0]} rows (a {_grid(v.shape[0])} patch grid), this "
                             f"model needs {want[k].shape[0]} ({_grid(want[k].shape[0])}): build the model with the "
                             "weights' img_size and patch_size")
    return out


def _grid(rows: int) -> str:
    side = (int(round((rows - 3) ** 0.5)) + 1) // 2
    return f"{side}x{side}"


# Pretraining (official simmim_pretrain__vit_base__img224__800ep: USE_SHARED_RPB, no mean pooling)
# and fine-tuning (simmim_finetune__vit_base__img224__800ep: USE_RPB, USE_MEAN_POOLING) forms.
_PRETRAIN = dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_mean_pooling=False)
_FINETUNE = dict(use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_mean_pooling=True)
_SIZES = {
    "nano": dict(img_size=64, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0),  # tests
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),  # SimMIM ViT-B/16
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_COMMON = dict(img_size=224, patch_size=16, drop_path_rate=0.1, init_values=0.1, qkv_bias=True)


def official_layout(sd) -> bool:
    """Whether encoder state dict ``sd`` has this ViT's keys, not timm's (layer scale as
    ``gamma_1``, BEiT relative position tables)."""
    return "blocks.0.gamma_1" in sd or any(k.endswith("relative_position_bias_table") for k in sd)


class ViTSimMIMSpec(ViTSpec):
    """The official SimMIM ViT: ViT's geometry, layer ids and validation; its own decay set
    (the official optimizer decays the position tables and the mask token), blocks that take
    the shared position bias, and timm's ``Beit`` (same keys) as its timm counterpart."""

    name = "vit_simmim"
    model_class = VisionTransformerSimMIMOfficial
    timm_family = None  # not timm's VisionTransformer: the export names Beit (timm_metadata below)
    no_decay_keywords = ("pos_embed", "cls_token")

    def owns_state_dict(self, sd) -> bool:
        return official_layout(sd)

    def stage_features(self, encoder, x, stage: int):
        t = encoder.forward_blocks(encoder.embed(x), stage + 1)
        return t[:, encoder.num_prefix_tokens:].mean(dim=1)

    def export_geometry(self, encoder, run_args=None):
        return {"beit_kwargs": encoder.timm_equivalent()[1]}

    def timm_metadata(self, sd, geo, num_classes: int = 0):
        import json

        if "beit_kwargs" not in geo:  # a weights file alone (gigamim export): the module's flags are not in it
            from gigamim.models.timm_compat import TimmCompatError

            raise TimmCompatError("the official SimMIM ViT exports for timm from its fine-tune run (finetuned.safetensors "
                                  "names timm's Beit); export these weights with --format encoder or simmim")
        kwargs = dict(geo["beit_kwargs"], num_classes=num_classes)
        return ({"timm_family": "beit", "timm_class": "timm.models.beit.Beit", "timm_kwargs": json.dumps(kwargs),
                 "timm_model": ""}, "timm's Beit with the recorded arguments has this model's keys")

    def block_classes(self):
        return (Block,)

    # SDPA with the position bias as a mask that requires grad: the memory-efficient kernel on GPU
    # ('fused'), the math kernel on CPU ('explicit'; also the attn_impl="explicit" path).
    attention_modes = ("explicit", "fused")

    def _block_count(self, blk, tokens: int, dim: int):
        from gigamim.models.counting import GlobalBlockCount

        return GlobalBlockCount(tokens, dim, blk.attn.num_heads, tokens, blk.mlp.fc1.out_features / dim,
                                layer_scale=blk.gamma_1 is not None)


VIT_SIMMIM = ViTSimMIMSpec()


def _register(name: str, defaults: dict) -> None:
    def factory(**overrides) -> VisionTransformerSimMIMOfficial:
        return VisionTransformerSimMIMOfficial(**{**defaults, **overrides})

    factory.__name__ = name
    factory.__doc__ = f"{name}: {defaults}"
    register_model(name, factory, defaults, model_class=VisionTransformerSimMIMOfficial, family=VIT_SIMMIM)


for _size, _arch in _SIZES.items():
    _register(f"vit_{_size}_patch16_simmim", {**_COMMON, **_PRETRAIN, **_arch})
    _register(f"vit_{_size}_patch16_simmim_ft", {**_COMMON, **_FINETUNE, **_arch})
