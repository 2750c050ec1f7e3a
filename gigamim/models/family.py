"""The model-family seam: one `FamilySpec` per family, declared once in the family's own file.

A family (SwinV2 in ``swinv2.py``, Swin V1 in ``swin.py``, timm's ViT in ``vit.py``) is one
file holding its modules, its variants and its spec, as timm keeps one family in one file with
its ``checkpoint_filter_fn`` beside it, and as torchtitan keeps one ``ModelSpec`` per model so
that the trainer applies the same steps to any of them. The rest of gigamim asks the spec
(`family_of(model_or_name)`), never a family string or ``hasattr``:

- built: its variants (`register_variants`: one helper for every family's registration loop);
- validated: `validate(args, mask_patch_size)`, the one-line config errors (image size, patch,
  window tiling per stage, mask-patch compatibility) as `ModelConfigError` naming the key;
- counted: `geometry(args)` (patch size, total stride, tokens per image, as data),
  `count_parameters`, `flops` (analytic where the family has a count), and `plan_count(model)`:
  the planner's count of a built SimMIM model (its blocks as `models.counting` block kinds,
  what it saves outside them, its FLOPs), which `gigamim plan` sums without knowing the family;
- grouped: `no_decay_keywords`, `layer_id` / `num_layer_ids` (layer-wise LR decay);
- probed: `probe_depth` and `stage_features` (which stages or blocks, how pooled);
- exported: `owns_state_dict` (its keys), `timm_export` / `pick_timm_name` (timm's class and
  arguments, delegating to `timm_compat`), `export_geometry` (what the keys do not show);
- partitioned: `block_classes`, the units an engine shards, gathers or compiles one by one.

`HierarchicalSpec` holds what the two Swin families share (stages of blocks after a patch
embedding). A new family subclasses `FamilySpec` in its own file and calls
`register_variants`; nothing outside ``models/`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from gigamim.models.registry import list_models, model_defaults, register_model, registered_family

NO_DECAY_KEYWORDS = ("mask_token",)


class ModelConfigError(ValueError):
    """A model argument that cannot build (or cannot be trained with SimMIM as configured):
    ``key`` is the argument's name (``img_size``, ``window_size``, ``mask_patch_size``, ...),
    the message says the value and what to pick instead."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Geometry:
    """What a planner needs of a model at one image size, as data."""

    img_size: int
    patch_size: int  # pixels per side of one patch token (the mask grid's unit)
    encoder_stride: int  # pixels per side of one token of the final map (SimMIM decoder)
    tokens_per_image: int  # tokens after patch embedding (+ class/register tokens)
    stage_tokens: Tuple[int, ...]  # tokens per stage (ViT: one entry per block)
    stage_dims: Tuple[int, ...]  # channels per stage (ViT: one entry per block)


class FamilySpec:
    """What gigamim needs of a model family. Subclass it in the family's file, set the class
    attributes, implement what the family has; a method a family cannot answer raises
    NotImplementedError naming the family and what is missing."""

    name: str = ""  # the family's name in messages and metadata (e.g. "swinv2")
    model_class: Optional[type] = None  # the encoder class the variants build
    timm_family: Optional[str] = None  # timm_compat's family of the keys; None: no timm export
    no_decay_keywords: Tuple[str, ...] = NO_DECAY_KEYWORDS  # besides every 1-D parameter
    probe_unit: str = "stages"  # what `stage_features`' index counts, in messages

    # -- built

    def variants(self) -> List[str]:
        return [n for n in list_models() if registered_family(n) is self]

    def resolve(self, name: str, args: Mapping[str, Any] | None = None) -> Dict[str, Any]:
        """Variant ``name``'s defaults with ``args`` over them: every argument it is built with."""
        return {**model_defaults(name), **dict(args or {})}

    # -- validated

    def geometry(self, args: Mapping[str, Any]) -> Geometry:
        raise NotImplementedError(f"model family {self.name!r} does not state its geometry")

    def check_args(self, args: Mapping[str, Any]) -> None:
        """Raise ModelConfigError for arguments the family cannot build (default: none)."""

    def check(self, args: Mapping[str, Any]) -> None:
        """The family's argument rules: a positive integer image size, then `check_args`. The
        config's `validate` and the model constructors both call this: one rule, one message."""
        img = args.get("img_size")
        if not isinstance(img, int) or isinstance(img, bool) or img <= 0:
            raise ModelConfigError("img_size", f"img_size={img!r} must be a positive integer")
        self.check_args(args)

    def validate(self, args: Mapping[str, Any], mask_patch_size: Optional[int] = None) -> Geometry:
        """The model-shape rules, before anything is built: the family's own (`check`), then
        SimMIM's mask grid against the patch size and the image. Returns the geometry."""
        self.check(args)
        img = args["img_size"]
        geo = self.geometry(args)
        if mask_patch_size is not None:
            if mask_patch_size % geo.patch_size:
                raise ModelConfigError("mask_patch_size", f"mask_patch_size={mask_patch_size} must be a multiple of "
                                       f"the model's {geo.patch_size}-px patch")
            if img % mask_patch_size:
                raise ModelConfigError("img_size", f"img_size={img} must be divisible by "
                                       f"mask_patch_size={mask_patch_size}")
        return geo

    # -- counted

    def encoder_stride(self, encoder: nn.Module) -> int:
        """Pixels per side of one token of a built encoder's output map."""
        raise NotImplementedError(f"model family {self.name!r} does not state its encoder stride")

    def count_parameters(self, model_or_name, **overrides) -> int:
        """Parameters of a model, or of variant ``name`` built on the meta device (no memory);
        full sizes also when ZeRO-3 has partitioned the model (``ds_numel``)."""
        if isinstance(model_or_name, str):
            from gigamim.models.registry import create_model

            with torch.device("meta"):
                model_or_name = create_model(model_or_name, **overrides)
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in model_or_name.parameters())

    def flops(self, model: nn.Module, img_size: Optional[int] = None) -> Tuple[Optional[int], Optional[int]]:
        """(model FLOPs, hardware FLOPs) per image of one training step, or (None, None) where
        the family has no analytic count (the run logs mfu null)."""
        return None, None

    def plan_count(self, model: nn.Module):
        """`models.counting.ModelCount` of SimMIM model ``model`` (built; the meta device is
        enough): per block, what autograd saves and the FLOPs, as `gigamim plan` sums them."""
        raise NotImplementedError(f"model family {self.name!r} does not say how it is counted for the planner "
                                  "(FamilySpec.plan_count)")

    # -- grouped

    def num_layer_ids(self, encoder: nn.Module) -> int:
        raise NotImplementedError(f"model family {self.name!r} does not give layer ids (layer decay)")

    def layer_id(self, encoder: nn.Module, name: str) -> int:
        """Layer id of encoder parameter ``name`` (0: the embedding ... num_layer_ids - 1)."""
        raise NotImplementedError(f"model family {self.name!r} does not give layer ids (layer decay)")

    # -- probed

    def probe_depth(self, encoder: nn.Module) -> int:
        raise NotImplementedError(f"model family {self.name!r} does not say how it is probed")

    def stage_features(self, encoder: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        """(B, C) features after stage ``stage`` (0 <= stage < probe_depth - 1), pooled."""
        raise NotImplementedError(f"model family {self.name!r} does not say how it is probed")

    # -- exported

    def owns_state_dict(self, sd: Mapping[str, Any]) -> bool:
        """Whether encoder state dict ``sd`` has this family's keys."""
        if self.timm_family is None:
            return False
        from gigamim.models.timm_compat import TimmCompatError, encoder_family

        try:
            return encoder_family(sd) == self.timm_family
        except TimmCompatError:
            return False

    def export_geometry(self, encoder: nn.Module, run_args: Mapping[str, Any] | None = None) -> Dict[str, Any]:
        """What the keys do not show and the timm arguments need (beyond img_size/window_size)."""
        return {}

    def _timm(self):
        if self.timm_family is None:
            from gigamim.models.timm_compat import TimmCompatError

            raise TimmCompatError(f"model family {self.name!r} has no timm counterpart: export it with "
                                  "--format encoder or simmim")
        from gigamim.models import timm_compat

        return timm_compat

    @property
    def timm_class_name(self) -> str:
        cls = self._timm().timm_class(self.timm_family)
        return f"{cls.__module__}.{cls.__name__}"

    def timm_export(self, sd: Mapping[str, Any], geo: Mapping[str, Any], num_classes: int = 0,
                    check: bool = False) -> Dict[str, Any]:
        """The timm class arguments of encoder state dict ``sd`` at geometry ``geo``
        (``check``: and raise TimmCompatError unless it loads strictly into that class)."""
        tc = self._timm()
        kwargs = tc.timm_kwargs(tc.read_arch(sd, geo), geo, num_classes=num_classes)
        if check:
            tc.check_timm_keys(sd, kwargs, self.timm_family)
        return kwargs

    def timm_metadata(self, sd: Mapping[str, Any], geo: Mapping[str, Any],
                      num_classes: int = 0) -> Tuple[Dict[str, str], str]:
        """(the export's timm metadata: class, constructor arguments, a model name where one
        fits; a sentence on the name), checked to load strictly (`timm_compat.timm_metadata`)."""
        return self._timm().timm_metadata(sd, geo, num_classes=num_classes)

    def pick_timm_name(self, sd: Mapping[str, Any], geo: Mapping[str, Any]) -> Tuple[Optional[str], str]:
        """(timm model name or None, why)."""
        tc = self._timm()
        return tc.pick_timm_name(tc.read_arch(sd, geo), geo, sd)

    # -- partitioned

    def block_classes(self) -> Tuple[type, ...]:
        """The units an engine shards (FSDP2), gathers (ZeRO-3 leaf modules) and compiles."""
        return ()

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class HierarchicalSpec(FamilySpec):
    """Swin-like families: a patch embedding (NHWC map), then ``layers`` of stages of blocks,
    each stage after the first starting with a 2x PatchMerging (``layers.{i}.downsample``)."""

    def stage_args(self, args: Mapping[str, Any]) -> Tuple[int, Sequence[int], Sequence[int]]:
        return int(args.get("patch_size", 4)), tuple(args["depths"]), tuple(args["num_heads"])

    def check_args(self, args: Mapping[str, Any]) -> None:
        patch, depths, heads = self.stage_args(args)
        if len(heads) != len(depths):
            raise ModelConfigError("num_heads", f"num_heads {tuple(heads)} must have one entry per stage "
                                   f"({len(depths)})")
        stride = patch * 2 ** (len(depths) - 1)
        if args["img_size"] % stride:
            raise ModelConfigError("img_size", f"img_size={args['img_size']} must be divisible by {stride} (the "
                                   f"model's total stride: patch {patch} x 2^{len(depths) - 1} downsamplings)")

    def geometry(self, args: Mapping[str, Any]) -> Geometry:
        patch, depths, _ = self.stage_args(args)
        side = args["img_size"] // patch
        dim = int(args["embed_dim"])
        n = len(depths)
        return Geometry(args["img_size"], patch, patch * 2 ** (n - 1), side * side,
                        tuple((side // 2**i) ** 2 for i in range(n)), tuple(dim * 2**i for i in range(n)))

    def encoder_stride(self, encoder: nn.Module) -> int:
        return encoder.patch_size * 2 ** (len(encoder.depths) - 1)

    def num_layer_ids(self, encoder: nn.Module) -> int:
        return sum(encoder.depths) + 2

    def layer_id(self, encoder: nn.Module, name: str) -> int:
        """Official SimMIM fine-tuning ids in timm's layout: patch embed and mask token 0;
        block j of stage i ``sum(depths[:i]) + j + 1``; the PatchMerging at the start of stage
        i with the last block of stage i-1; the rest ``sum(depths) + 1``."""
        depths = encoder.depths
        if name.startswith("patch_embed.") or name == "mask_token":
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            stage = int(parts[1])
            if parts[2] == "downsample":
                return sum(depths[:stage])
            return sum(depths[:stage]) + int(parts[3]) + 1
        return sum(depths) + 1

    def probe_depth(self, encoder: nn.Module) -> int:
        return len(encoder.layers)

    def stage_features(self, encoder: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        t = encoder.patch_embed(x)
        for layer in encoder.layers[: stage + 1]:
            t = layer(t)
        return t.mean(dim=(1, 2))


# ----------------------------------------------------------------------------- registration


def register_variants(spec: FamilySpec, variants: Mapping[str, Mapping[str, Any]],
                      common: Mapping[str, Any] | None = None) -> List[str]:
    """Register every variant of a family: ``name -> arguments`` over ``common``; the factory
    builds ``spec.model_class`` with the defaults and the caller's overrides over them."""
    if spec.model_class is None:
        raise TypeError(f"{type(spec).__name__}.model_class is not set")
    names = []
    for name, arch in variants.items():
        defaults = {**dict(common or {}), **dict(arch)}
        register_model(name, _factory(spec.model_class, name, defaults), defaults, model_class=spec.model_class,
                       family=spec)
        names.append(name)
    return names


def _factory(cls: type, name: str, defaults: Mapping[str, Any]) -> Callable[..., nn.Module]:
    def factory(**overrides) -> nn.Module:
        return cls(**{**defaults, **overrides})

    factory.__name__ = name
    factory.__doc__ = f"{name}: {dict(defaults)}"
    return factory


# ----------------------------------------------------------------------------- lookup


def families() -> List[FamilySpec]:
    """Every registered family, in registration order."""
    out: List[FamilySpec] = []
    for n in list_models():
        spec = registered_family(n)
        if spec is not None and spec not in out:
            out.append(spec)
    return out


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder of a SimMIM model (its ``encoder`` child), or the model itself."""
    enc = model._modules.get("encoder") if isinstance(model, nn.Module) else None
    return enc if enc is not None else model


def family_of(model_or_name) -> FamilySpec:
    """The spec of a registered variant name, of an encoder, or of a SimMIM model's encoder."""
    if isinstance(model_or_name, str):
        spec = registered_family(model_or_name)  # raises ValueError for an unknown name
        if spec is None:
            raise ValueError(f"model {model_or_name!r} was registered without a family spec")
        return spec
    enc = encoder_of(model_or_name)
    for spec in families():
        if spec.model_class is not None and isinstance(enc, spec.model_class):
            return spec
    raise TypeError(f"{type(enc).__name__} is not an encoder of a registered model family "
                    f"({', '.join(s.name for s in families())})")


def family_of_state_dict(sd: Mapping[str, Any]) -> FamilySpec:
    """The family whose keys encoder state dict ``sd`` has (TimmCompatError if none)."""
    for spec in families():
        if spec.owns_state_dict(sd):
            return spec
    from gigamim.models.timm_compat import TimmCompatError

    sample = ", ".join(list(sd)[:5])
    names = ", ".join(s.name for s in families())
    raise TimmCompatError(f"not an encoder state dict of a known family ({names}); first keys: {sample}")


def encoder_stride(encoder: nn.Module) -> int:
    """Total reduction from pixels to the encoder's output map (32 for Swin, 16 for ViT/16):
    the one definition (SimMIM's decoder and the model builder both ask it)."""
    return int(family_of(encoder).encoder_stride(encoder))


__all__ = ["FamilySpec", "HierarchicalSpec", "Geometry", "ModelConfigError", "register_variants", "family_of",
           "family_of_state_dict", "families", "encoder_of", "encoder_stride"]
