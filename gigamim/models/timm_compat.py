"""timm compatibility of gigamim encoders: which timm class and model name a state dict is,
with which arguments, and whether it loads into it strictly (cf. timm's ``checkpoint_filter_fn``
next to each model).

Three families, told apart by their keys:

  swinv2  ``layers.{i}.blocks.{j}.attn.logit_scale``   -> timm ``SwinTransformerV2``
  swin    ``layers.{i}.blocks.{j}.attn.relative_position_bias_table`` -> ``SwinTransformer``
  vit     ``blocks.{i}.attn.qkv.weight`` + ``pos_embed``  -> ``VisionTransformer``

Architecture (embed_dim, depths, heads, windows, patch and image size) is read from key names
and shapes where they show it; what they cannot show (SwinV2's window / pretrained windows and
image size, Swin V1's image size, ViT's head count) comes from ``geo`` (the run's config) or a
stated default. Everything is built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, Mapping

FAMILIES = ("swinv2", "swin", "vit")


class TimmCompatError(ValueError):
    """A state dict that does not map onto timm as asked; the message says what differs."""


def encoder_family(enc: Mapping[str, Any]) -> str:
    if "layers.0.blocks.0.attn.logit_scale" in enc:
        return "swinv2"
    if "layers.0.blocks.0.attn.relative_position_bias_table" in enc:
        return "swin"
    if "blocks.0.attn.qkv.weight" in enc and "patch_embed.proj.weight" in enc:
        return "vit"
    sample = ", ".join(list(enc)[:5])
    raise TimmCompatError(f"not a SwinV2, Swin or ViT encoder state dict (first keys: {sample})")


def _embed_dim(enc: Mapping[str, Any], family: str) -> int:
    try:
        return int(enc["patch_embed.proj.weight"].shape[0])
    except KeyError:
        raise TimmCompatError(f"encoder has no 'patch_embed.proj.weight': not a {family} encoder") from None


def _stages(enc: Mapping[str, Any], leaf: str) -> list[int]:
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.") for k in enc):
        i, n = len(depths), 0
        while f"layers.{i}.blocks.{n}.attn.{leaf}" in enc:
            n += 1
        if n == 0:
            raise TimmCompatError(f"encoder stage {i} has no 'layers.{i}.blocks.0.attn.{leaf}'")
        depths.append(n)
    return depths


def swinv2_arch(enc: Mapping[str, Any]) -> dict[str, Any]:
    """embed_dim, depths and heads of a SwinV2 encoder, read from its key names and shapes."""
    embed_dim = _embed_dim(enc, "SwinV2")
    depths = _stages(enc, "logit_scale")
    heads = [int(enc[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in range(len(depths))]
    return {"embed_dim": embed_dim, "depths": tuple(depths), "num_heads": tuple(heads)}


def swin_arch(enc: Mapping[str, Any]) -> dict[str, Any]:
    """Swin V1: embed_dim, depths, heads and per-stage windows (from the bias tables)."""
    embed_dim = _embed_dim(enc, "Swin")
    depths = _stages(enc, "relative_position_bias_table")
    heads, windows = [], []
    for i in range(len(depths)):
        table = enc[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape  # (2w-1)^2, heads
        heads.append(int(table[1]))
        windows.append((math.isqrt(int(table[0])) + 1) // 2)
    return {"family": "swin", "embed_dim": embed_dim, "depths": tuple(depths), "num_heads": tuple(heads),
            "patch_size": int(enc["patch_embed.proj.weight"].shape[-1]), "windows": tuple(windows)}


def vit_arch(enc: Mapping[str, Any], num_heads: int | None = None) -> dict[str, Any]:
    """ViT: embed_dim, depth, patch and image size (from pos_embed); heads are not in the
    shapes: ``num_heads`` if given, else timm's convention of 64 channels per head."""
    embed_dim = _embed_dim(enc, "ViT")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in enc:
        depth += 1
    patch = int(enc["patch_embed.proj.weight"].shape[-1])
    arch = {"family": "vit", "embed_dim": embed_dim, "depth": depth, "patch_size": patch,
            "num_heads": int(num_heads or max(1, embed_dim // 64)), "class_token": "cls_token" in enc,
            "init_values": 1.0 if "blocks.0.ls1.gamma" in enc else None}
    if "pos_embed" in enc:
        tokens = int(enc["pos_embed"].shape[1]) - (1 if arch["class_token"] else 0)
        arch["img_size"] = math.isqrt(tokens) * patch
    return arch


def read_arch(enc: Mapping[str, Any], geo: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture of any of the three families (``family`` key added)."""
    family = encoder_family(enc)
    if family == "swinv2":
        return {"family": "swinv2", **swinv2_arch(enc)}
    if family == "swin":
        return swin_arch(enc)
    return vit_arch(enc, (geo or {}).get("num_heads"))


def timm_class(family: str):
    if family == "swinv2":
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return SwinTransformerV2
    if family == "swin":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer
    if family == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer
    raise TimmCompatError(f"unknown encoder family {family!r}; known: {', '.join(FAMILIES)}")


def _family(arch: Mapping[str, Any]) -> str:
    return arch.get("family", "swinv2")


def timm_kwargs(arch: Mapping[str, Any], geo: Mapping[str, Any], num_classes: int = 0) -> dict[str, Any]:
    """Arguments of the timm class that has exactly this architecture (and geometry)."""
    family = _family(arch)
    if family == "vit":
        kw = {"img_size": arch.get("img_size", geo.get("img_size", 224)), "patch_size": arch["patch_size"],
              "embed_dim": arch["embed_dim"], "depth": arch["depth"], "num_heads": arch["num_heads"],
              "num_classes": num_classes}
        if not arch.get("class_token", True):
            kw.update(class_token=False, global_pool="avg")
        if arch.get("init_values"):
            kw["init_values"] = arch["init_values"]
        return kw
    kw = {"embed_dim": arch["embed_dim"], "depths": list(arch["depths"]), "num_heads": list(arch["num_heads"]),
          "num_classes": num_classes}
    if family == "swin":
        windows = arch["windows"]
        if "window_size" in geo:
            kw["window_size"] = geo["window_size"]
        else:  # per-stage windows as the tables show them (after the shrink rule)
            kw["window_size"] = windows[0] if len(set(windows)) == 1 else list(windows)
        if "img_size" in geo:
            kw["img_size"] = geo["img_size"]
        return kw
    for k in ("img_size", "window_size"):
        if k in geo:
            kw[k] = geo[k]
    if "pretrained_window_sizes" in geo:
        kw["pretrained_window_sizes"] = list(geo["pretrained_window_sizes"])
    return kw


def _signature(sd: Mapping[str, Any]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def extra_norm_period(enc: Mapping[str, Any]) -> int:
    """SwinV2-H/G's main-branch LayerNorm period, read from the keys (``layers.i.blocks.j.norm3``
    at the end of every period-th block of a stage), 0 when there are none."""
    found = {(int(m.group(1)), int(m.group(2))) for m in
             (re.match(r"layers\.(\d+)\.blocks\.(\d+)\.norm3\.weight$", k) for k in enc) if m}
    if not found:
        return 0
    period = min(j + 1 for _, j in found)
    want = {(i, j) for i, depth in enumerate(_stages(enc, "logit_scale")) for j in range(depth) if (j + 1) % period == 0}
    if found != want:
        raise TimmCompatError(f"main-branch norms at blocks {sorted(found)[:6]} follow no period (every {period}th "
                              f"block would be {sorted(want)[:6]})")
    return period


def add_extra_norms(model, period: int):
    """timm's SwinTransformerV2 with SwinV2-H/G's main-branch LayerNorm at the end of every
    period-th block of each stage (``layers.i.blocks.j.norm3``, as the paper and gigamim place
    it: after both residual branches), as a forward hook: timm's class has no such option."""
    import torch

    def apply_norm3(block, args, out):
        return block.norm3(out)

    for layer in model.layers:
        for j, block in enumerate(layer.blocks):
            if (j + 1) % period == 0:
                dim = block.norm1.normalized_shape[0]
                block.norm3 = torch.nn.LayerNorm(dim, device=block.norm1.weight.device, dtype=block.norm1.weight.dtype)
                block.register_forward_hook(apply_norm3)
    return model


def build_timm(family: str, kwargs: Mapping[str, Any], norm_period: int = 0):
    """timm's class of ``family`` with ``kwargs`` (+ SwinV2-H/G's main-branch norms)."""
    model = timm_class(family)(**kwargs)
    return add_extra_norms(model, norm_period) if norm_period else model


def check_timm_keys(enc: Mapping[str, Any], kwargs: Mapping[str, Any], family: str = "swinv2",
                    norm_period: int = 0) -> None:
    """Raise TimmCompatError unless timm's class(**kwargs) (with SwinV2-H/G's main-branch
    norms every ``norm_period`` blocks) has exactly these keys/shapes."""
    import torch

    cls = timm_class(family)
    with torch.device("meta"):
        ref = build_timm(family, kwargs, norm_period).state_dict()
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
        hint = (" (SwinV2-H/G's main-branch norms (norm3) are not in timm's class: `gigamim export SRC OUT --format timm` "
                "records their period and `timm_model_from_metadata` adds them; or use --format encoder.)"
                if family == "swinv2" and any(".norm3." in k for k in extra) else "")
        raise TimmCompatError(f"encoder does not load strictly into timm {cls.__name__}"
                              f"({json.dumps(dict(kwargs))}): " + "; ".join(parts) + "." + hint)


# ----------------------------------------------------------------------------- timm names


def _timm_geometry(m) -> dict[str, Any]:
    attn = m.layers[0].blocks[0].attn
    return {
        "img_size": int(m.patch_embed.img_size[0]),
        "window_size": int(attn.window_size[0]),
        "pretrained_window_sizes": tuple(int(layer.blocks[0].attn.pretrained_window_size[0]) for layer in m.layers),
    }


@functools.lru_cache(maxsize=None)
def _timm_swinv2(name: str) -> tuple[tuple, dict]:
    """((embed_dim, depths, heads), geometry) of one timm SwinV2 model, built on the meta device."""
    import timm
    import torch

    with torch.device("meta"):
        m = timm.create_model(name, num_classes=0)
    arch = (m.embed_dim, tuple(len(l.blocks) for l in m.layers), tuple(l.blocks[0].attn.num_heads for l in m.layers))
    return arch, _timm_geometry(m)


@functools.lru_cache(maxsize=None)
def _timm_signature(name: str) -> tuple[tuple, int]:
    """(sorted key/shape pairs, img_size) of timm model ``name`` without a head, on meta."""
    import timm
    import torch

    with torch.device("meta"):
        m = timm.create_model(name, num_classes=0)
    return tuple(sorted(_signature(m.state_dict()).items())), int(m.patch_embed.img_size[0])


# Canonical timm names only: variants sharing these shapes but not the maths (CLIP's pre-norm
# and quick-GELU ViTs, Swin-S3) have other name patterns.
_NAME_PATTERNS = {
    "swin": re.compile(r"swin_(tiny|small|base|large)_patch\d+_window\d+_\d+$"),
    "vit": re.compile(r"vit_(tiny|small|base|large|huge)_patch\d+_\d+$"),
}


def _input_size(name: str) -> int:
    import timm

    return int(timm.models.get_pretrained_cfg(name).input_size[-1])


def timm_candidates(arch: Mapping[str, Any], img_size: int | None = None, enc: Mapping[str, Any] | None = None
                    ) -> list[tuple[str, dict]]:
    """timm's registered models of this family with this architecture (and default input size,
    when given), with their geometry. Swin/ViT compare the whole key/shape signature (``enc``)."""
    import timm

    family = _family(arch)
    out = []
    if family == "swinv2":
        key = (arch["embed_dim"], tuple(arch["depths"]), tuple(arch["num_heads"]))
        for name in timm.list_models("swinv2_*"):
            if name.startswith("swinv2_cr"):  # a different architecture (SwinV2-CR)
                continue
            # Building models costs seconds on a busy CPU: skip those trained at another size.
            if img_size is not None and _input_size(name) != img_size:
                continue
            a, geo = _timm_swinv2(name)
            if a == key:
                out.append((name, geo))
        return out
    pattern = _NAME_PATTERNS[family]
    want = tuple(sorted(_signature(enc).items())) if enc is not None else None
    for name in timm.list_models(f"{family}_*"):
        if not pattern.match(name) or (img_size is not None and _input_size(name) != img_size):
            continue
        sig, size = _timm_signature(name)
        if want is None or sig == want:
            out.append((name, {"img_size": size}))
    return out


def pick_timm_name(arch: Mapping[str, Any], geo: Mapping[str, Any], enc: Mapping[str, Any] | None = None
                   ) -> tuple[str | None, str]:
    """(timm model name or None, a sentence saying why)."""
    family = _family(arch)
    if family != "swinv2":
        if enc is None:
            raise TimmCompatError("pick_timm_name for Swin/ViT needs the state dict (enc=...)")
        img = arch.get("img_size", geo.get("img_size"))
        desc = ", ".join(f"{k} {v}" for k, v in arch.items() if k != "family") + (f", img_size {img}" if img else "")
        if img is None:
            return None, f"the image size is not recorded, so no timm {family} name can be picked ({desc})"
        cands = timm_candidates(arch, img, enc)
        if len(cands) == 1:
            return cands[0][0], f"{cands[0][0]} fits ({desc})"
        if not cands:
            return None, f"no timm {family} model has {desc}"
        return None, f"several timm models fit ({', '.join(n for n, _ in cands)})"
    cands = timm_candidates(arch, geo.get("img_size"))
    desc = (f"embed_dim {arch['embed_dim']}, depths {list(arch['depths'])}, heads {list(arch['num_heads'])}, "
            f"{_geo_text(geo)}")
    if not cands:
        return None, f"no timm swinv2 model has {desc} ({timm_swinv2_sizes()})"
    fits = [n for n, g in cands if all(g[k] == geo[k] for k in geo if k in g)
            and (("pretrained_window_sizes" in geo) or g["pretrained_window_sizes"] == (0, 0, 0, 0))]
    if len(fits) == 1:
        return fits[0], f"{fits[0]} fits ({desc})"
    if not fits:
        have = "; ".join(f"{n}: {_geo_text(g)}" for n, g in cands)
        return None, f"no timm model has {desc}; same architecture and size: {have}"
    return None, f"several timm models fit ({', '.join(fits)}); the run's window_size is not recorded"


@functools.lru_cache(maxsize=None)
def timm_swinv2_sizes() -> str:
    """What timm names among its SwinV2 models, by size and input size, read from its registry
    (names and default configs, nothing built): "timm names SwinV2 tiny at 256 px, ..."."""
    import timm

    sizes: dict[str, set] = {}
    for name in timm.list_models("swinv2_*"):
        m = re.match(r"swinv2_(tiny|small|base|large|huge|giant)_", name)
        if m and not name.startswith("swinv2_cr"):
            sizes.setdefault(m.group(1), set()).add(_input_size(name))
    order = ("tiny", "small", "base", "large", "huge", "giant")
    parts = [f"{k} at {'/'.join(map(str, sorted(sizes[k])))} px" for k in order if k in sizes]
    return "timm names SwinV2 " + ", ".join(parts) + "; the constructor arguments build any other"


def timm_metadata(enc: Mapping[str, Any], geo: Mapping[str, Any], num_classes: int = 0) -> tuple[dict[str, str], str]:
    """(safetensors metadata that rebuilds ``enc`` in timm, a sentence on the name): ``timm_class``,
    ``timm_kwargs`` (JSON constructor arguments: these work for every size), ``timm_model`` (a
    timm model name when one has exactly this architecture and geometry, else ""), and for
    SwinV2-H/G ``timm_extra_norm_period``. Checked: the class with these arguments has exactly
    these keys and shapes (``check_timm_keys``)."""
    arch = read_arch(enc, geo)
    family = arch["family"]
    period = extra_norm_period(enc) if family == "swinv2" else 0
    kwargs = timm_kwargs(arch, geo, num_classes=num_classes)
    check_timm_keys(enc, kwargs, family, norm_period=period)
    body = {k: v for k, v in enc.items() if not k.startswith("head.")}
    name, note = pick_timm_name(arch, geo, body) if not period else (
        None, f"no timm model has SwinV2-H/G's main-branch norms (every {period} blocks): timm's SwinTransformerV2 "
        "with the recorded arguments plus the norms (`timm_model_from_metadata`)")
    meta = {"timm_family": family, "timm_class": timm_class_name(family), "timm_kwargs": json.dumps(kwargs),
            "timm_model": name or ""}
    if period:
        meta["timm_extra_norm_period"] = str(period)
    return meta, note


def timm_class_name(family: str) -> str:
    """The dotted name of timm's class for ``family``."""
    return {"swinv2": "timm.models.swin_transformer_v2.SwinTransformerV2",
            "swin": "timm.models.swin_transformer.SwinTransformer",
            "vit": "timm.models.vision_transformer.VisionTransformer"}[family]


def timm_model_from_metadata(metadata: Mapping[str, str]):
    """The timm model an export's (or a fine-tune's) metadata describes, ready for
    ``load_state_dict(state, strict=True)``: timm's class with the recorded constructor
    arguments, plus SwinV2-H/G's main-branch norms where the file has them. Any size."""
    try:
        kwargs = json.loads(metadata["timm_kwargs"])
        cls = metadata["timm_class"]
    except KeyError as e:
        raise TimmCompatError(f"the metadata has no {e.args[0]!r}: not written by `gigamim export SRC OUT --format timm` "
                              "or `gigamim finetune`") from None
    family = {timm_class_name(f): f for f in FAMILIES}.get(cls)
    if family is None:
        raise TimmCompatError(f"timm_class {cls!r} is not one of {', '.join(timm_class_name(f) for f in FAMILIES)}")
    return build_timm(family, kwargs, int(metadata.get("timm_extra_norm_period") or 0))


def _geo_text(g: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in g.items()) or "geometry unknown"


# ----------------------------------------------------------------------------- gigamim names


def registered_model_for(enc: Mapping[str, Any]) -> str | None:
    """The registered gigamim variant (``list_models()``) whose encoder, built at its default
    geometry, has exactly the keys and shapes of ``enc`` (heads and the mask token left out), or
    None. What a weights file holds when its metadata does not say: error messages name it."""
    import torch

    from gigamim.models.registry import create_model, list_models, model_defaults

    arch = read_arch(enc)
    depths = tuple(arch.get("depths") or (arch.get("depth"),))
    want = {k: tuple(v.shape) for k, v in enc.items() if not k.startswith("head.") and k != "mask_token"}
    for name in list_models():
        d = model_defaults(name)
        if d.get("embed_dim") != arch["embed_dim"] or tuple(d.get("depths") or (d.get("depth"),)) != depths:
            continue  # the cheap test first: building a giant on meta takes seconds
        with torch.device("meta"):
            sd = create_model(name, num_classes=0).state_dict()
        if encoder_family(sd) == arch["family"] and {k: tuple(v.shape) for k, v in sd.items()} == want:
            return name
    return None
