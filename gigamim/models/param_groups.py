"""Optimizer parameter groups: no weight decay where it hurts, layer ids for layer-wise LR decay.

No weight decay (SimMIM / official Swin): every 1-D parameter (norm weights, biases, q_bias,
v_bias) plus ``logit_scale``, the ``cpb_mlp`` and ``mask_token`` (and any position table).
Shapes are read from ``ds_shape`` when present: under ZeRO-3 a partitioned parameter's
``.shape`` is an empty 1-D placeholder, which would otherwise put every weight in no-decay.

Layer ids (official SimMIM fine-tuning convention, mapped to timm's layout): patch embed and
mask token 0; block j of stage i is ``sum(depths[:i]) + j + 1``; the PatchMerging at the start
of stage i belongs with the last block of stage i-1 (``sum(depths[:i])``, where the official
code keeps it); everything else (final norm, head, decoder) gets ``sum(depths) + 1``. Swin V1 (timm layout)
uses the same map. ViT (official SimMIM ``get_vit_layer``): patch embed, ``cls_token``,
``pos_embed`` and ``mask_token`` 0; ``blocks.{i}`` ``i + 1``; everything else ``depth + 1``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set

import torch.nn as nn

NO_DECAY_KEYWORDS = ("logit_scale", "cpb_mlp", "mask_token", "relative_position", "pos_embed", "cls_token")
_VIT_LAYER0 = ("cls_token", "pos_embed", "mask_token", "reg_token")


def _shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    # An encoder may name its own keywords (the official SimMIM ViT decays its position tables
    # and mask token: only pos_embed and cls_token are exempt there, besides 1-D parameters).
    keywords = getattr(_encoder_and_prefix(model)[0], "no_weight_decay_keywords", NO_DECAY_KEYWORDS)
    return {
        name
        for name, p in model.named_parameters()
        if len(_shape(p)) <= 1 or any(k in name for k in keywords)
    }


def _encoder_and_prefix(model: nn.Module):
    enc = getattr(model, "encoder", None)
    return (enc, "encoder.") if enc is not None else (model, "")


def _is_vit(enc: nn.Module) -> bool:
    return getattr(enc, "family", None) == "vit"


def num_layer_ids(model: nn.Module) -> int:
    enc, _ = _encoder_and_prefix(model)
    return (enc.depth if _is_vit(enc) else sum(enc.depths)) + 2


def _vit_layer_id(n: str, depth: int) -> int:
    if n in _VIT_LAYER0 or n.startswith("patch_embed."):
        return 0
    if n.startswith("blocks."):
        return int(n.split(".")[1]) + 1
    return depth + 1


def layer_id_map(model: nn.Module) -> Dict[str, int]:
    """Parameter name -> layer id (see module docstring); works for encoders and SimMIM."""
    enc, prefix = _encoder_and_prefix(model)
    vit = _is_vit(enc)
    depths = (enc.depth,) if vit else enc.depths
    last = sum(depths) + 1
    ids = {}
    for name, _ in model.named_parameters():
        n = name[len(prefix):] if name.startswith(prefix) else None
        if n is None:
            ids[name] = last
        elif vit:
            ids[name] = _vit_layer_id(n, enc.depth)
        elif n.startswith("patch_embed.") or n == "mask_token":
            ids[name] = 0
        elif n.startswith("layers."):
            parts = n.split(".")
            stage = int(parts[1])
            if parts[2] == "downsample":
                ids[name] = sum(depths[:stage])
            else:
                ids[name] = sum(depths[:stage]) + int(parts[3]) + 1
        else:
            ids[name] = last
    return ids


def layer_decay(rate: float) -> Callable[[int, int], float]:
    """lr_scale_fn for ``param_groups``: ``rate ** (num_layers - 1 - layer_id)``."""
    return lambda layer_id, num_layers: rate ** (num_layers - 1 - layer_id)


def param_groups(
    model: nn.Module, weight_decay: float, lr_scale_fn: Optional[Callable[[int, int], float]] = None
) -> List[dict]:
    """Groups for torch / DeepSpeed optimizers. Each dict: ``params``, ``weight_decay``,
    ``lr_scale`` (1.0 without ``lr_scale_fn``; the LR schedule multiplies by it) and
    ``group_name``. With ``lr_scale_fn(layer_id, num_layers)``, one pair of groups per layer id.
    Frozen parameters are left out; empty groups are dropped."""
    no_decay = no_weight_decay_names(model)
    ids = layer_id_map(model) if lr_scale_fn is not None else None
    n_ids = num_layer_ids(model)
    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = name not in no_decay
        layer = ids[name] if ids is not None else None
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": 1.0 if layer is None else float(lr_scale_fn(layer, n_ids)),
                "group_name": ("decay" if decay else "no_decay") + ("" if layer is None else f"_layer{layer}"),
            }
        groups[key]["params"].append(p)
    return list(groups.values())
