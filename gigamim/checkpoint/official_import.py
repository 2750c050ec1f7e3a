"""`gigamim import`: official SimMIM / Swin-Transformer checkpoints -> gigamim safetensors.

Reads the `.pth` files the official code writes (``torch.save({'model': state_dict, ...})``):

- microsoft/SimMIM pretraining (``encoder.``-prefixed Swin V1 or ViT + ``decoder.0.*``) and
  fine-tuning (bare encoder + ``head.*``) files;
- microsoft/Swin-Transformer SwinV2 SimMIM pretraining and classification files.

The official layouts differ from gigamim's (timm's) in known ways, mapped here: Swin's
``layers.{i}.downsample`` sits at the end of stage i there and at the start of stage i + 1
here; the classifier is ``head`` there and ``head.fc`` here; ``mask_token`` is (1, 1, C) there
and (1, 1, 1, C) here; the index / coordinate / shift-mask buffers (``relative_position_index``,
``relative_coords_table``, ``attn_mask``) are persistent there and rebuilt from the geometry
here, so they are dropped (after reading the geometry they carry). The official ViT keys are
gigamim's `vit_*_patch16_simmim` keys already.

The geometry is read from the weights where they hold it (embed dim, depths, heads; Swin V1's
window from its tables; SwinV2's window per stage and its pretrained window from the
``relative_coords_table`` buffers; the image size from a shifted block's ``attn_mask`` or the
last stage's clipped window), else taken from ``--img-size`` / ``--window-size``. The output is
one safetensors file whose metadata names the model and its settings (``gigamim_config``),
so ``gigamim.models.from_pretrained(path)``, ``finetune.weights`` and ``model.init_from`` build
the matching module. What cannot be mapped is refused in one line naming the keys.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch

BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


class OfficialImportError(ValueError):
    """An official checkpoint this importer cannot map; the message names the keys."""


def read_official(path: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """The ``model`` dict of an official `.pth` (weights-only unpickling unless ``trust``: the
    official training files also pickle the yacs config and the optimizer)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - the unpickler's own error types vary
        if not trust and "weights_only" in str(e):
            raise OfficialImportError(
                f"{path} pickles more than tensors (the official training files hold the yacs config and the "
                "optimizer): pass --trust if you trust the file, or re-save torch.load(f)['model'] alone") from None
        raise OfficialImportError(f"cannot read {path}: {e}") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise OfficialImportError(f"{path} holds no state dict under 'model' (top-level keys: {list(obj)[:5]})")
    return sd


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
    return state, {"family": family, "name": name, "model": model, "simmim": simmim, "num_classes": num_classes}


def import_official(src: str, out: str, img_size: int | None = None, window_size: int | None = None,
                    trust: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Convert official checkpoint ``src`` to the gigamim safetensors file ``out``; the info."""
    import os

    import yaml

    from gigamim.checkpoint.safetensors_io import save

    if not str(out).endswith(".safetensors"):
        raise OfficialImportError(f"output {out} must be a .safetensors file")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    state, info = convert(read_official(src, trust), img_size, window_size)
    metadata = {"format": "simmim" if info["simmim"] else "encoder", "source": f"official:{Path(src).name}",
                "official_family": info["family"], "num_classes": str(info["num_classes"]),
                "gigamim_config": yaml.safe_dump({"model": info["model"]}, sort_keys=False)}
    save(str(out), {k: v.contiguous() for k, v in state.items()}, metadata)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gigamim import", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="official .pth (SimMIM or Swin-Transformer; a 'model' state dict)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--img-size", type=int, default=None, help="when the weights do not say it")
    p.add_argument("--window-size", type=int, default=None, help="when the weights do not say it")
    p.add_argument("--trust", action="store_true", help="unpickle the whole file (it holds more than tensors)")
    p.add_argument("--force", action="store_true", help="replace OUT")
    a = p.parse_args(argv)
    try:
        info = import_official(a.src, a.out, a.img_size, a.window_size, a.trust, a.force)
    except (OfficialImportError, FileExistsError) as e:
        print(f"gigamim import: {e}")
        return 2
    kind = "SimMIM (encoder + decoder)" if info["simmim"] else f"encoder ({info['num_classes']} classes)"
    print(f"gigamim import: wrote {a.out}: {kind}, model {info['model']}")
    return 0
