"""The official SimMIM / Swin-Transformer checkpoints' key layouts -> gigamim's models: which
family and variant an official ``model`` dict is, its geometry (image size, windows,
pretrained windows read from the buffers the official code saves), and its keys renamed.
Pure state-dict code beside the model families (as timm keeps ``checkpoint_filter_fn`` beside
a model); reading and writing files is `gigamim.checkpoint.official_import`'s."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


class OfficialImportError(ValueError):
    """An official checkpoint this importer cannot map; the message names the keys."""


def _family(enc: dict) -> str:
    if "layers.0.blocks.0.attn.logit_scale" in enc:
        return "swinv2"
    if "layers.0.blocks.0.attn.relative_position_bias_table" in enc:
        return "swin"
    if "blocks.0.gamma_1" in enc or "rel_pos_bias.relative_position_bias_table" in enc or \
            "blocks.0.attn.relative_position_bias_table" in enc:
        return "vit_simmim"
    raise OfficialImportError(f"not an official SimMIM / Swin / SwinV2 state dict (first keys: {list(enc)[:5]})")


def _count(enc: dict, pattern: str) -> int:
    return len({m.group(1) for k in enc for m in [re.match(pattern, k)] if m})


def _swin_arch(enc: dict, family: str, img_size: int | None, window_size: int | None) -> dict[str, Any]:
    stages = _count(enc, r"layers\.(\d+)\.")
    depths = tuple(_count(enc, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
    if family == "swinv2":
        heads = tuple(int(enc[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in range(stages))
    else:
        heads = tuple(int(enc[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
                      for i in range(stages))
    arch = {"embed_dim": int(enc["patch_embed.proj.weight"].shape[0]), "depths": depths, "num_heads": heads}
    patch = int(enc["patch_embed.proj.weight"].shape[-1])
    windows, pretrained = [], []
    for i in range(stages):
        if family == "swin":
            rows = int(enc[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[0])
            windows.append((int(round(math.sqrt(rows))) + 1) // 2)
            continue
        table = enc.get(f"layers.{i}.blocks.0.attn.relative_coords_table")
        if table is None:
            windows.append(None)
            pretrained.append(0)
            continue
        w = (int(table.shape[1]) + 1) // 2
        windows.append(w)
        # official: offsets / (pretrained_window - 1) * 8, then sign * log2(1 + |x|) / log2(8)
        top = float(table.abs().max())
        pw = int(round(8 * (w - 1) / (2 ** (3 * top) - 1) + 1)) if w > 1 and top > 0 else w
        pretrained.append(0 if pw == w else pw)
    if img_size is None:
        for i in range(stages):  # a shifted block's mask: (windows, w*w, w*w)
            for j in range(depths[i]):
                mask = enc.get(f"layers.{i}.blocks.{j}.attn_mask")
                if mask is not None and windows[i]:
                    img_size = int(round(math.sqrt(mask.shape[0]))) * windows[i] * patch * 2 ** i
                    break
            if img_size:
                break
    if img_size is None and windows[-1] and windows[0] and windows[-1] < windows[0]:
        img_size = windows[-1] * patch * 2 ** (stages - 1)  # the last stage's window clipped to its map
    if img_size is None:
        raise OfficialImportError("the weights do not say the image size (no attn_mask, no clipped window): pass "
                                  "--img-size")
    known = [w for w in windows if w]
    window = window_size or (max(known) if known else None)
    if window is None:
        raise OfficialImportError("the weights do not say the window (no relative_coords_table): pass --window-size")
    arch.update(img_size=img_size, window_size=window)
    if family == "swinv2" and any(pretrained):
        arch["pretrained_window_sizes"] = tuple(pretrained)
    return arch


def _vit_arch(enc: dict, img_size: int | None) -> dict[str, Any]:
    w = enc["patch_embed.proj.weight"]
    depth = _count(enc, r"blocks\.(\d+)\.")
    table = enc.get("rel_pos_bias.relative_position_bias_table", enc.get("blocks.0.attn.relative_position_bias_table"))
    grid = (int(round(math.sqrt(table.shape[0] - 3))) + 1) // 2 if table is not None else None
    size = img_size or (grid * int(w.shape[-1]) if grid else None)
    if size is None:
        raise OfficialImportError("the weights do not say the image size (no relative position table): pass --img-size")
    return {"embed_dim": int(w.shape[0]), "depth": depth, "num_heads": int(table.shape[1]) if table is not None else None,
            "patch_size": int(w.shape[-1]), "img_size": size,
            "finetune_form": "blocks.0.attn.relative_position_bias_table" in enc}


def _model_name(family: str, arch: dict) -> str:
    from gigamim.models import list_models, model_defaults

    if family == "vit_simmim":
        pattern = "vit_*_patch16_simmim_ft" if arch["finetune_form"] else "vit_*_patch16_simmim"
        keys = ("embed_dim", "depth", "num_heads")
    else:
        pattern = f"{family}_*"
        keys = ("embed_dim", "depths", "num_heads")
    for name in list_models(pattern):
        d = model_defaults(name)
        if all(arch.get(k) is None or tuple(_as_tuple(d.get(k))) == tuple(_as_tuple(arch[k])) for k in keys):
            return name
    dims = ", ".join(f"{k}={arch.get(k)}" for k in keys)
    raise OfficialImportError(f"no gigamim {family} model has {dims} (known: {', '.join(list_models(pattern))})")


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _swin_keys(enc: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in enc.items():
        if any(b in k for b in BUFFERS):
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        if k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def convert(sd: dict[str, torch.Tensor], img_size: int | None = None, window_size: int | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(gigamim state dict, info) of an official ``model`` dict. info: family, name, model
    (the model section: name + geometry), simmim (has a decoder), num_classes."""
    simmim = any(k.startswith("encoder.") for k in sd)
    if simmim:
        enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        other = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
        unknown = sorted(k for k in other if not k.startswith("decoder."))
        if unknown:
            raise OfficialImportError(f"keys outside encoder./decoder. in a pretraining file: {unknown[:5]}")
    else:
        enc, other = dict(sd), {}
    family = _family(enc)
    mask_token = enc.pop("mask_token", None)
    if family == "vit_simmim":
        arch = _vit_arch(enc, img_size)
        state = {k: v for k, v in enc.items() if "relative_position_index" not in k}
    else:
        arch = _swin_arch(enc, family, img_size, window_size)
        state = _swin_keys(enc)
    name = _model_name(family, arch)
    head = state.get("head.fc.weight", state.get("head.weight"))
    num_classes = int(head.shape[0]) if head is not None else 0
    model = {"name": name, "img_size": arch["img_size"]}
    if family != "vit_simmim":
        model["window_size"] = arch["window_size"]
        if arch.get("pretrained_window_sizes"):
            model["pretrained_window_sizes"] = list(arch["pretrained_window_sizes"])
    if simmim:
        state = {f"encoder.{k}": v for k, v in state.items()}
        if mask_token is not None:
            state["encoder.mask_token"] = mask_token.reshape(1, 1, 1, -1)
        state.update(other)
    return state, {"layout": family, "name": name, "model": model, "simmim": simmim, "num_classes": num_classes}


