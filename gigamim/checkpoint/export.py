"""`gigamim export`: consolidated weights -> encoder / timm / simmim safetensors.

    gigamim export SRC OUT [--format encoder|timm|simmim] [--tag TAG] [--max-shard-size 5GB] [--force]

SRC is a consolidated safetensors (file, index json or folder, from `gigamim consolidate`)
or a DeepSpeed checkpoint folder, consolidated on the fly (same checks, same streaming;
nothing is written besides OUT). Formats:

  encoder  the encoder alone for fine-tuning: `encoder.*` without the prefix and without
           `mask_token` (the decoder is dropped).
  timm     the encoder keys that timm's `SwinTransformerV2(num_classes=0)` loads with
           `load_state_dict(strict=True)`; gigamim's encoder already uses timm's key names,
           so this is `encoder` checked key-by-key and shape-by-shape against a timm model
           built on the meta device. The fitting timm model name (if any) is printed and
           stored in the metadata (`timm_model`, `timm_kwargs`).
  simmim   the full SimMIM model (encoder with mask token + decoder).

Every export carries safetensors metadata: `format`, `step`, `gigamim_version`,
`gigamim_config` (the run's resolved YAML) and provenance. `load_export(path)` reads any
export back with safetensors (never pickle): `(state_dict, metadata)`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from gigamim.checkpoint import safetensors_io
from gigamim.checkpoint.layout import LATEST_FILE, CheckpointError, complete_tags, is_tag_dir

FORMATS = ("encoder", "timm", "simmim")
ENCODER_PREFIX = "encoder."
MASK_TOKEN = "mask_token"


class ExportError(Exception):
    """An export that cannot be made as asked; the message names the key/value and the fix."""


def load_export(path: str):
    """(state_dict, metadata) of an export or consolidated file/folder; safetensors only."""
    try:
        return safetensors_io.load(path)
    except safetensors_io.SafetensorsError as e:
        raise ExportError(str(e)) from None


def open_source(src: str, tag: str | None = None, quiet: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """Lazy full-model tensors + metadata from a safetensors source or a ZeRO checkpoint folder."""
    from gigamim.checkpoint.check import open_checkpoint
    from gigamim.checkpoint.zero_fp32 import lazy_fp32_state_dict, metadata_for

    if os.path.isdir(src) and (os.path.isfile(os.path.join(src, LATEST_FILE)) or tag is not None or is_tag_dir(src)
                               or complete_tags(src)):
        info = open_checkpoint(src, tag)  # the same tag `--resume` and `consolidate` pick
        return lazy_fp32_state_dict(info, quiet=quiet), metadata_for(info, "simmim")
    if tag is not None:
        raise ExportError(f"--tag applies to DeepSpeed checkpoint folders; {src} is not one")
    try:
        return safetensors_io.open_lazy(src)
    except safetensors_io.SafetensorsError as e:
        raise ExportError(f"{e} (SRC must be a consolidated safetensors file/folder or a DeepSpeed "
                          "checkpoint folder)") from None


def encoder_state(full: Mapping[str, Any]) -> dict[str, Any]:
    """`encoder.*` keys without the prefix, without the mask token (SimMIM-only)."""
    enc = {k[len(ENCODER_PREFIX):]: v for k, v in full.items() if k.startswith(ENCODER_PREFIX)}
    if not enc:
        sample = ", ".join(list(full)[:5])
        raise ExportError(f"no '{ENCODER_PREFIX}*' keys in the source (first keys: {sample}); is it a gigamim "
                          "SimMIM checkpoint or consolidated file?")
    enc.pop(MASK_TOKEN, None)
    return enc


# ----------------------------------------------------------------------------- timm


def swinv2_arch(enc: Mapping[str, Any]) -> dict[str, Any]:
    """embed_dim, depths and heads of a SwinV2 encoder, read from its key names and shapes."""
    try:
        embed_dim = int(enc["patch_embed.proj.weight"].shape[0])
    except KeyError:
        raise ExportError("encoder has no 'patch_embed.proj.weight': not a SwinV2 encoder") from None
    depths, heads = [], []
    while any(k.startswith(f"layers.{len(depths)}.") for k in enc):
        i = len(depths)
        n = 0
        while f"layers.{i}.blocks.{n}.attn.logit_scale" in enc:
            n += 1
        if n == 0:
            raise ExportError(f"encoder stage {i} has no 'layers.{i}.blocks.0.attn.logit_scale'")
        depths.append(n)
        heads.append(int(enc[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]))
    return {"embed_dim": embed_dim, "depths": tuple(depths), "num_heads": tuple(heads)}


def _run_config(metadata: Mapping[str, str]) -> dict:
    """The gigamim config of the run (from the metadata's YAML), {} when absent."""
    text = metadata.get("gigamim_config")
    if not text:
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def run_geometry(metadata: Mapping[str, str]) -> dict[str, Any]:
    """img_size / window_size / pretrained_window_sizes the weights were trained with, as far
    as the run's config/metadata say (missing entries are left out)."""
    model = _run_config(metadata).get("model") or {}
    geo: dict[str, Any] = {}
    img = model.get("img_size") or metadata.get("img_size")
    if img not in (None, ""):
        geo["img_size"] = int(img)
    if model.get("window_size") is not None:
        geo["window_size"] = int(model["window_size"])
    if model.get("pretrained_window_sizes") is not None:
        geo["pretrained_window_sizes"] = tuple(int(w) for w in model["pretrained_window_sizes"])
    return geo


def _timm_geometry(m) -> dict[str, Any]:
    attn = m.layers[0].blocks[0].attn
    return {
        "img_size": int(m.patch_embed.img_size[0]),
        "window_size": int(attn.window_size[0]),
        "pretrained_window_sizes": tuple(int(layer.blocks[0].attn.pretrained_window_size[0]) for layer in m.layers),
    }


@functools.lru_cache(maxsize=None)
def _timm_swinv2(name: str) -> tuple[tuple, dict]:
    """((embed_dim, depths, heads), geometry) of one timm model, read from the model itself,
    built on the meta device (no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        m = timm.create_model(name, num_classes=0)
    arch = (m.embed_dim, tuple(len(l.blocks) for l in m.layers), tuple(l.blocks[0].attn.num_heads for l in m.layers))
    return arch, _timm_geometry(m)


def timm_candidates(arch: Mapping[str, Any], img_size: int | None = None) -> list[tuple[str, dict]]:
    """timm's registered swinv2_* models with this embed_dim/depths/heads (and default input
    size, when given), with their geometry."""
    import timm

    key = (arch["embed_dim"], tuple(arch["depths"]), tuple(arch["num_heads"]))
    out = []
    for name in timm.list_models("swinv2_*"):
        if name.startswith("swinv2_cr"):  # a different architecture (SwinV2-CR)
            continue
        # Building models costs seconds on a busy CPU: skip those trained at another size.
        if img_size is not None and tuple(timm.models.get_pretrained_cfg(name).input_size[1:]) != (img_size,) * 2:
            continue
        a, geo = _timm_swinv2(name)
        if a == key:
            out.append((name, geo))
    return out


def pick_timm_name(arch: Mapping[str, Any], geo: Mapping[str, Any]) -> tuple[str | None, str]:
    """(timm model name or None, a sentence saying why)."""
    cands = timm_candidates(arch, geo.get("img_size"))
    desc = (f"embed_dim {arch['embed_dim']}, depths {list(arch['depths'])}, heads {list(arch['num_heads'])}, "
            f"{_geo_text(geo)}")
    if not cands:
        return None, (f"no timm swinv2 model has {desc} (timm has SwinV2 tiny/small/base/large at "
                      "192/256/384 px)")
    fits = [n for n, g in cands if all(g[k] == geo[k] for k in geo if k in g)
            and (("pretrained_window_sizes" in geo) or g["pretrained_window_sizes"] == (0, 0, 0, 0))]
    if len(fits) == 1:
        return fits[0], f"{fits[0]} fits ({desc})"
    if not fits:
        have = "; ".join(f"{n}: {_geo_text(g)}" for n, g in cands)
        return None, f"no timm model has {desc}; same architecture and size: {have}"
    return None, f"several timm models fit ({', '.join(fits)}); the run's window_size is not recorded"


def _geo_text(g: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in g.items()) or "geometry unknown"


def timm_kwargs(arch: Mapping[str, Any], geo: Mapping[str, Any]) -> dict[str, Any]:
    kw = {"embed_dim": arch["embed_dim"], "depths": list(arch["depths"]), "num_heads": list(arch["num_heads"]),
          "num_classes": 0}
    for k in ("img_size", "window_size"):
        if k in geo:
            kw[k] = geo[k]
    if "pretrained_window_sizes" in geo:
        kw["pretrained_window_sizes"] = list(geo["pretrained_window_sizes"])
    return kw


def check_timm_keys(enc: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """Raise ExportError unless timm's SwinTransformerV2(**kwargs) has exactly these keys/shapes."""
    import torch
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    with torch.device("meta"):
        ref = SwinTransformerV2(**kwargs).state_dict()
    missing = sorted(set(ref) - set(enc))
    extra = sorted(set(enc) - set(ref))
    shapes = [f"{k}: ours {tuple(enc[k].shape)} vs timm {tuple(ref[k].shape)}"
              for k in sorted(set(ref) & set(enc)) if tuple(enc[k].shape) != tuple(ref[k].shape)]
    if missing or extra or shapes:
        parts = []
        if extra:
            parts.append(f"keys timm does not have: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if missing:
            parts.append(f"timm keys missing here: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches: {shapes[:4]}")
        raise ExportError("encoder does not load strictly into timm SwinTransformerV2"
                          f"({json.dumps(dict(kwargs))}): " + "; ".join(parts)
                          + ". (SwinV2-H/G's extra main-branch norms have no timm counterpart: "
                          "use --format encoder.)")


# ----------------------------------------------------------------------------- export


def export(src: str, out: str, fmt: str = "encoder", tag: str | None = None,
           max_shard_size: str | int | None = "5GB", overwrite: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Write `fmt` weights of `src` to `out`. Returns {"files": [...], "timm_model": name|None,
    "timm_note": str} (the timm entries only for fmt='timm')."""
    import torch

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    full, metadata = open_source(src, tag, quiet=quiet)
    metadata = dict(metadata, format=fmt)
    result: dict[str, Any] = {}
    if fmt == "simmim":
        tensors = full
    else:
        tensors = encoder_state(full)
    if fmt == "timm":
        # timm's num_classes=0 model has no head; a classifier head is not part of pretraining.
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
        arch, geo = swinv2_arch(tensors), run_geometry(metadata)
        kwargs = timm_kwargs(arch, geo)
        check_timm_keys(tensors, kwargs)
        name, note = pick_timm_name(arch, geo)
        metadata.update(timm_model=name or "", timm_kwargs=json.dumps(kwargs))
        result.update(timm_model=name, timm_note=note, timm_kwargs=kwargs)
    result["files"] = safetensors_io.save(out, tensors, metadata, max_shard_size=max_shard_size,
                                          dtype=torch.float32, overwrite=overwrite, progress=sys.stderr.isatty())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gigamim export",
                                description="Export consolidated gigamim weights as encoder, timm or full "
                                            "SimMIM safetensors (with config, step and version metadata).")
    p.add_argument("src", help="consolidated safetensors (file, index json or folder) or a DeepSpeed "
                   "checkpoint folder (consolidated on the fly)")
    p.add_argument("out", help="a .safetensors file, or a folder (sharded above --max-shard-size)")
    p.add_argument("--format", choices=FORMATS, default="encoder",
                   help="encoder: encoder only, no mask token (default); timm: strict-loadable into timm "
                        "SwinTransformerV2(num_classes=0); simmim: full model")
    p.add_argument("--tag", help="tag of a DeepSpeed checkpoint SRC (default: its 'latest')")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        safetensors_io.parse_size(args.max_shard_size)
    except ValueError as e:
        p.error(str(e))
    try:
        res = export(args.src, args.out, args.format, args.tag, args.max_shard_size, overwrite=args.force)
    except (ExportError, CheckpointError, FileExistsError) as e:
        print(f"gigamim export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} weights: " + ", ".join(res["files"]))
    if args.format == "timm":
        kw = ", ".join(f"{k}={v!r}" for k, v in res["timm_kwargs"].items())
        if res["timm_model"]:
            print(f"timm model: {res['timm_model']}  ->  timm.create_model({res['timm_model']!r}, num_classes=0)"
                  ".load_state_dict(weights, strict=True)")
        else:
            print(f"timm model: none fits: {res['timm_note']}")
            print(f"load with timm.models.swin_transformer_v2.SwinTransformerV2({kw})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
