"""`gigamim export`: consolidated weights -> encoder / timm / simmim safetensors.

    gigamim export SRC OUT [--format encoder|timm|simmim] [--tag TAG] [--max-shard-size 5GB] [--force]

SRC is a consolidated safetensors (file, index json or folder, from `gigamim consolidate`)
or a training checkpoint folder (DeepSpeed or torch.distributed.checkpoint), consolidated on
the fly (same checks, same streaming; nothing is written besides OUT). Formats:

  encoder  the encoder alone for fine-tuning: `encoder.*` without the prefix and without
           `mask_token` (the decoder is dropped).
  timm     the encoder keys that timm's `SwinTransformerV2` / `SwinTransformer` (V1) /
           `VisionTransformer` (num_classes=0) loads with `load_state_dict(strict=True)`;
           gigamim's encoders already use timm's key names, so this is `encoder` checked
           key-by-key and shape-by-shape against a timm model built on the meta device
           (gigamim.models.timm_compat). The fitting timm model name (if any) is printed and
           stored in the metadata (`timm_model`, `timm_kwargs`).
  simmim   the full SimMIM model (encoder with mask token + decoder).

Every export carries safetensors metadata: `format`, `step`, `gigamim_version`,
`gigamim_config` (the run's resolved YAML) and provenance. `load_export(path)` reads any
export back with safetensors (never pickle): `(state_dict, metadata)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from gigamim.checkpoint import safetensors_io
from gigamim.checkpoint.layout import LATEST_FILE, CheckpointError, complete_tags, is_tag_dir
from gigamim.models.family import family_of_state_dict
from gigamim.models.timm_compat import TimmCompatError

FORMATS = ("encoder", "timm", "simmim")
ENCODER_PREFIX = "encoder."
MASK_TOKEN = "mask_token"


# An export that cannot be made as asked; the message names the key/value and the fix. One class
# with timm_compat's, so a timm mismatch is an export error too.
ExportError = TimmCompatError


def load_export(path: str):
    """(state_dict, metadata) of an export or consolidated file/folder; safetensors only."""
    try:
        return safetensors_io.load(path)
    except safetensors_io.SafetensorsError as e:
        raise ExportError(str(e)) from None


def open_source(src: str, tag: str | None = None, quiet: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """Lazy full-model tensors + metadata from a safetensors source or a training checkpoint folder."""
    from gigamim.checkpoint.check import open_checkpoint
    from gigamim.checkpoint.weights import lazy_fp32_state_dict, metadata_for

    if os.path.isdir(src) and (os.path.isfile(os.path.join(src, LATEST_FILE)) or tag is not None or is_tag_dir(src)
                               or complete_tags(src)):
        info = open_checkpoint(src, tag)  # the same tag `--resume` and `consolidate` pick
        return lazy_fp32_state_dict(info, quiet=quiet), metadata_for(info, "simmim")
    if tag is not None:
        raise ExportError(f"--tag applies to training checkpoint folders; {src} is not one")
    try:
        return safetensors_io.open_lazy(src)
    except safetensors_io.SafetensorsError as e:
        raise ExportError(f"{e} (SRC must be a consolidated safetensors file/folder or a training "
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
    name = model.get("name")
    if name:  # what the weights cannot show (ViT heads; geometry the config left at defaults)
        try:
            from gigamim.models import model_defaults

            defaults = model_defaults(str(name))
        except ValueError:
            defaults = {}
        for k in ("img_size", "window_size", "num_heads"):
            if k not in geo and isinstance(defaults.get(k), int):
                geo[k] = defaults[k]
    return geo


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
        timm_meta, note = family_of_state_dict(tensors).timm_metadata(tensors, run_geometry(metadata))
        metadata.update(timm_meta)
        result.update(timm_model=timm_meta["timm_model"] or None, timm_note=note,
                      timm_kwargs=json.loads(timm_meta["timm_kwargs"]), timm_class=timm_meta["timm_class"],
                      timm_extra_norm_period=int(timm_meta.get("timm_extra_norm_period", 0)))
    result["source"] = {k: metadata.get(k) for k in ("step", "source_tag", "model")}
    result["files"] = safetensors_io.save(out, tensors, metadata, max_shard_size=max_shard_size,
                                          dtype=torch.float32, overwrite=overwrite, progress=sys.stderr.isatty())
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigamim export",
                                description="Export consolidated gigamim weights as encoder, timm or full "
                                            "SimMIM safetensors (with config, step and version metadata).")
    p.add_argument("src", help="consolidated safetensors (file, index json or folder) or a DeepSpeed "
                   "checkpoint folder (consolidated on the fly)")
    p.add_argument("out", help="a .safetensors file, or a folder (sharded above --max-shard-size)")
    p.add_argument("--format", choices=FORMATS, default="encoder",
                   help="encoder: encoder only, no mask token (default); timm: strict-loadable into timm "
                        "SwinTransformerV2 / SwinTransformer / VisionTransformer (num_classes=0; the constructor "
                        "arguments and, where one fits, a timm model name in the metadata); simmim: full model")
    p.add_argument("--tag", help="tag of a DeepSpeed checkpoint SRC (default: its 'latest')")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def summary(fmt: str, res: dict[str, Any]) -> list[str]:
    """What `gigamim export` did and how to load the result, as printed lines."""
    src = res.get("source") or {}
    origin = ", ".join(f"{k} {v}" for k, v in (("step", src.get("step")), ("tag", src.get("source_tag")),
                                                  ("model", src.get("model"))) if v)
    lines = [f"wrote {fmt} weights ({origin or 'no provenance recorded'}): " + ", ".join(res["files"])]
    if fmt != "timm":
        return lines
    kw = ", ".join(f"{k}={v!r}" for k, v in res["timm_kwargs"].items())
    cls = res["timm_class"].rsplit(".", 1)[-1]
    if res["timm_model"]:
        lines.append(f"timm model: {res['timm_model']}: timm.create_model({res['timm_model']!r}, num_classes=0) "
                     "loads it with strict=True")
    else:
        lines.append(f"timm model: no named one: {res['timm_note']}")
    lines.append(f"timm class: {res['timm_class']}; {cls}(**json.loads(metadata['timm_kwargs'])) = {cls}({kw})"
                 + (f" + a LayerNorm every {res['timm_extra_norm_period']} blocks: "
                    "gigamim.models.timm_compat.timm_model_from_metadata(metadata)" if res["timm_extra_norm_period"]
                    else " loads it with strict=True (any size: gigamim.models.timm_compat.timm_model_from_metadata)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
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
    print("\n".join(summary(args.format, res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
