"""Encoder weights for probing and fine-tuning: from a consolidated SimMIM checkpoint, an
exported encoder, a DeepSpeed checkpoint folder, or nothing (random init).

The model comes from ``--model`` or the run's config recorded in the weights' metadata
(``model.name``, ``img_size``, ``window_size``); CLI overrides win. Weights of another
architecture, or of a shape the model cannot take, are refused with one line naming the
first differing keys. ``mask_token`` (SimMIM only) and any classifier head are left out:
probe and fine-tune build their own heads.
"""

from __future__ import annotations

from typing import Any

import torch


class EncoderLoadError(ValueError):
    """Weights that do not fit the requested encoder; the message says why and what to do."""


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(encoder state without prefix, mask token and head; metadata) of any gigamim weights."""
    from gigamim.checkpoint.consolidate import CheckpointError
    from gigamim.checkpoint.export import ExportError, open_source

    try:
        full, metadata = open_source(path)
        keys = list(full)
        if any(k.startswith("encoder.") for k in keys):
            keys = [k for k in keys if k.startswith("encoder.")]
            enc = {k[len("encoder."):]: full[k] for k in keys}
        else:
            enc = {k: full[k] for k in keys}
        enc = {k: (v if isinstance(v, torch.Tensor) else v.contiguous()) for k, v in enc.items()
               if k != "mask_token" and not k.startswith("head.") and not k.startswith("decoder.")}
    except (ExportError, CheckpointError, OSError) as e:
        raise EncoderLoadError(f"cannot read weights {path}: {e}") from None
    if not enc:
        raise EncoderLoadError(f"{path} holds no encoder weights")
    return enc, dict(metadata)


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of any gigamim weights (a training checkpoint folder: its checked tag's),
    without reading a tensor."""
    from gigamim.checkpoint.consolidate import CheckpointError
    from gigamim.checkpoint.export import ExportError, open_source

    try:
        return dict(open_source(path)[1])
    except (ExportError, CheckpointError, OSError) as e:
        raise EncoderLoadError(f"cannot read weights {path}: {e}") from None


def run_model_config(metadata: dict[str, str]) -> dict[str, Any]:
    """The ``model`` section of the run's config recorded in the metadata ({} if none)."""
    import yaml

    try:
        cfg = yaml.safe_load(metadata.get("gigamim_config") or "") or {}
    except yaml.YAMLError:
        return {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return dict(model) if isinstance(model, dict) else {}


_GEOMETRY_KEYS = ("img_size", "window_size", "pretrained_window_sizes")


def build_encoder(name: str | None, weights: str | None, overrides: dict[str, Any] | None = None,
                  num_classes: int = 0, keep_state: bool = False,
                  name_hint: str = "--model {name}") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(encoder, info). ``weights`` None = random init (``name`` required).
    keep_state: also return the checked, shape-adapted weights as ``info["state"]`` (to load
    them into another copy of the model, e.g. one partitioned under ZeRO-3; built on the
    meta device, this call then only checks the weights).
    name_hint: how the calling verb is told the model, with ``{name}`` for a model name
    (probe: ``--model {name}``; finetune: ``--set model.name={name}``): errors suggest it."""
    from gigamim.models import create_model
    from gigamim.models.family import family_of, family_of_state_dict
    from gigamim.models.timm_compat import TimmCompatError

    overrides = dict(overrides or {})
    enc_sd, metadata, run_model = None, {}, {}
    if weights:
        enc_sd, metadata = read_weights(weights)
        run_model = run_model_config(metadata)
    name = name or run_model.get("name")
    if not name and enc_sd is None:
        raise EncoderLoadError(f"no model name and no weights: pass {name_hint.format(name='NAME')} (a random init) "
                               "or weights that record their model")
    if not name:
        holds = _registered_match(enc_sd)
        raise EncoderLoadError(f"{weights} records no model name (no run config in its metadata)"
                               + (f"; its shapes are those of {holds}: pass {name_hint.format(name=holds)}" if holds
                                  else f": pass {name_hint.format(name='NAME')}"))
    kwargs = {k: run_model[k] for k in _GEOMETRY_KEYS if run_model.get(k) is not None}
    kwargs.update(overrides)
    try:
        encoder = create_model(str(name), num_classes=num_classes, **kwargs)
    except (ValueError, TypeError) as e:
        raise EncoderLoadError(f"cannot build {name} with {kwargs}: {e}") from None
    info = {"model": str(name), "kwargs": kwargs, "weights": weights or "random init",
            "step": metadata.get("step")}
    if enc_sd is None:
        return encoder, info
    if callable(getattr(encoder, "remap_pretrained_state", None)):
        enc_sd = encoder.remap_pretrained_state(enc_sd)  # e.g. the SimMIM ViT: shared -> per-block tables
    want = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    try:
        got_family = family_of_state_dict(enc_sd).name
    except TimmCompatError:
        got_family = "unknown"
    model_family = family_of(encoder).name
    missing = sorted(set(want) - set(enc_sd))
    extra = sorted(set(enc_sd) - set(want))
    if got_family != model_family or missing or extra:
        holds = run_model.get("name") or _registered_match(enc_sd)
        fix = (f"pass {name_hint.format(name=holds)}, the model the weights hold" if holds and holds != name
               else f"pass {name_hint.format(name='NAME')} with the model the weights were trained as")
        raise EncoderLoadError(
            f"{weights} is a {got_family} encoder{f' ({holds})' if holds else ''}, not one of {name} ({model_family}): "
            f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); {fix}")
    enc_sd = adapt_shapes(encoder, enc_sd, str(weights))
    import warnings

    with warnings.catch_warnings():
        # a meta-device encoder (keep_state) takes no values; that is the point
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        result = encoder.load_state_dict(enc_sd, strict=False)
    if result.missing_keys and any(not k.startswith("head.") for k in result.missing_keys):
        raise EncoderLoadError(f"{weights}: keys missing for {name}: {result.missing_keys[:5]}")
    if keep_state:
        info["state"] = enc_sd
    return encoder, info


def _registered_match(enc_sd: dict) -> str | None:
    """The registered model whose encoder has exactly these keys and shapes at its default
    geometry (SwinV2's and Swin V1's shapes do not depend on the image size), else None."""
    from gigamim.models.timm_compat import registered_model_for

    try:
        return registered_model_for(enc_sd)
    except ValueError:
        return None


def adapt_shapes(encoder: torch.nn.Module, enc_sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Weights whose shape depends on the geometry, resized to this encoder's: Swin V1 relative
    position tables (another window: timm's resize_rel_pos_bias_table), ViT position
    embeddings (another image size: timm's resample_abs_pos_embed). SwinV2's CPB MLP does not
    depend on the window (that is why it exists). Any other shape mismatch is an error."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    want = encoder.state_dict()
    out = dict(enc_sd)
    for k, v in enc_sd.items():
        if k not in want or tuple(v.shape) == tuple(want[k].shape):
            continue
        target = tuple(want[k].shape)
        if k.endswith("relative_position_bias_table"):
            new_w = (int(round(target[0] ** 0.5)) + 1) // 2
            old_w = (int(round(v.shape[0] ** 0.5)) + 1) // 2
            # on the weights' device even when the encoder is built on "meta" (ZeRO-3 checks)
            with torch.device(v.device):
                out[k] = resize_rel_pos_bias_table(v, new_window_size=(new_w, new_w), new_bias_shape=target,
                                                   old_window_size=(old_w, old_w))
        elif k == "pos_embed":
            prefix = getattr(encoder, "num_prefix_tokens", 1)
            side = int(round((target[1] - prefix) ** 0.5))
            with torch.device(v.device):
                out[k] = resample_abs_pos_embed(v, new_size=(side, side), num_prefix_tokens=prefix)
        else:
            raise EncoderLoadError(f"{where}: {k} has shape {tuple(v.shape)}, the model needs {target}; "
                                   "the weights are of another size of this architecture")
    return out
