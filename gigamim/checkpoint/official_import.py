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
from pathlib import Path
from typing import Any

import torch

from gigamim.models.official import OfficialImportError, convert  # noqa: F401  (re-exported)


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
                "official_family": info["layout"], "num_classes": str(info["num_classes"]),
                "gigamim_config": yaml.safe_dump({"model": info["model"]}, sort_keys=False)}
    save(str(out), {k: v.contiguous() for k, v in state.items()}, metadata)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigamim import", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="official .pth (SimMIM or Swin-Transformer; a 'model' state dict)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--img-size", type=int, default=None, help="when the weights do not say it")
    p.add_argument("--window-size", type=int, default=None, help="when the weights do not say it")
    p.add_argument("--trust", action="store_true", help="unpickle the whole file (it holds more than tensors)")
    p.add_argument("--force", action="store_true", help="replace OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        info = import_official(a.src, a.out, a.img_size, a.window_size, a.trust, a.force)
    except (OfficialImportError, FileExistsError) as e:
        print(f"gigamim import: {e}")
        return 2
    kind = "SimMIM (encoder + decoder)" if info["simmim"] else f"encoder ({info['num_classes']} classes)"
    print(f"gigamim import: wrote {a.out}: {kind}, model {info['model']}")
    return 0
