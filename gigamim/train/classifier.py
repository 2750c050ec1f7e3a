"""The fine-tune classifier: an encoder with a `num_classes` head, built from pretrained
weights (or a random init). The weights file records what it is (its run's `model` section):
`configure_from_weights` takes the architecture, image size and windows from there unless the
config gives them explicitly, so a fine-tune recipe needs no model section. Library code for
the fine-tune task and anyone building the same model."""

from __future__ import annotations

from typing import Any


class FinetuneError(ValueError):
    """Bad input for fine-tuning; one line, exit 2."""


_ADOPTED = ("img_size", "window_size")


def configure_from_weights(cfg) -> list[str]:
    """Fill the model section from `finetune.weights`' recorded run, in place; returns what was
    taken, as lines to print. Keys given in the YAML or by `--set` stay (`config.explicit_keys`):
    another image size or window is a fine-tune at a new geometry, whose SwinV2 position bias
    keeps the pretraining windows as `pretrained_window_sizes` (the official recipe's rule).
    An architecture or pretrained window that contradicts the weights is one line naming both
    values. Idempotent; nothing to do without weights or without a recorded run."""
    from gigamim.config import explicit_keys
    from gigamim.models.build import position_bias_windows
    from gigamim.train.load_encoder import EncoderLoadError, read_metadata, run_model_config

    m, ft = cfg.model, cfg.finetune
    if not ft.weights:
        return []
    try:
        run = run_model_config(read_metadata(ft.weights))
    except EncoderLoadError as e:
        raise FinetuneError(str(e)) from None
    name = run.get("name")
    if not name:
        return [f"{ft.weights} records no model (no run config in its metadata): model.name={m.name} "
                "as configured"]
    given = explicit_keys(cfg)
    if "model.name" in given and m.name != name:
        raise FinetuneError(f"finetune.weights {ft.weights} holds {name} and the config sets model.name={m.name}: "
                            f"drop model.name from the config (the weights' model is used) or pass "
                            f"--set model.name={name}")
    m.name = str(name)
    taken = [k for k in _ADOPTED if f"model.{k}" not in given and run.get(k) is not None]
    for key in taken:
        setattr(m, key, int(run[key]))
    try:
        trained = position_bias_windows(m.name, img_size=run.get("img_size"), window_size=run.get("window_size"),
                                        pretrained_window_sizes=run.get("pretrained_window_sizes"))
        # The windows this run's own geometry would scale by without pretrained windows:
        own = position_bias_windows(m.name, img_size=m.img_size, window_size=m.window_size)
        asked = (position_bias_windows(m.name, img_size=m.img_size, window_size=m.window_size,
                                       pretrained_window_sizes=m.pretrained_window_sizes)
                 if m.pretrained_window_sizes is not None else None)
    except ValueError as e:
        raise FinetuneError(f"model {m.name} at img_size {m.img_size}, window_size {m.window_size}: {e}") from None
    geometry = f"{m.name}, {m.img_size} px, window {m.window_size if m.window_size is not None else 'default'}"
    source = ", ".join(f"model.{k}" for k in ["name", *taken])
    line = f"model from {ft.weights}: {geometry} ({source} from the weights' run"
    if trained is not None:
        if asked is not None and asked != trained:
            raise FinetuneError(
                f"model.pretrained_window_sizes=[{','.join(map(str, m.pretrained_window_sizes))}] but {ft.weights} was "
                f"trained with "
                f"windows {list(trained)}: drop model.pretrained_window_sizes from the config (the weights' windows "
                f"are used) or pass --set model.pretrained_window_sizes=[{','.join(map(str, trained))}]")
        if asked is None:
            # Only where the maths changes: the same windows again is the same model without them
            # (and keeps a timm model name matchable).
            m.pretrained_window_sizes = list(trained) if trained != own else None
        if m.pretrained_window_sizes is not None:
            line += f"; its windows {list(trained)} -> model.pretrained_window_sizes"
    return [line + ")"]


def classes_from_shards(cfg) -> list[str]:
    """`finetune.num_classes: 0` -> the number of classes the training shards' index.json lists
    (`gigamim make-shards` of an ImageFolder writes them), in place; returns what it said."""
    from gigamim.data import shardspec

    ft = cfg.finetune
    if ft.num_classes or not ft.train_shards:
        return []
    try:
        classes = shardspec.resolve(ft.train_shards).classes or []
    except (ValueError, FileNotFoundError) as e:
        raise FinetuneError(f"finetune.train_shards: {e}") from None
    if len(classes) < 2:
        raise FinetuneError(f"finetune.num_classes=0 takes the class count from the training shards' index.json, and "
                            f"{ft.train_shards} lists {len(classes) or 'no'} class(es): pass --set "
                            "finetune.num_classes=N")
    ft.num_classes = len(classes)
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return [f"{len(classes)} classes from {ft.train_shards} ({shown}) -> finetune.num_classes={len(classes)}"]


def build_classifier(cfg, keep_state: bool = False):
    """(encoder with a num_classes head, info), the model section completed from the weights
    (`configure_from_weights`)."""
    from gigamim.train.load_encoder import EncoderLoadError, build_encoder

    configure_from_weights(cfg)
    m, ft = cfg.model, cfg.finetune
    if ft.num_classes < 2:
        raise FinetuneError(f"finetune.num_classes={ft.num_classes}: give finetune.train_shards whose index.json lists "
                            "the classes, or pass --set finetune.num_classes=N")
    overrides: dict[str, Any] = {"img_size": m.img_size, "drop_path_rate": m.drop_path_rate}
    if m.window_size is not None:
        overrides["window_size"] = m.window_size
    if m.pretrained_window_sizes is not None:
        overrides["pretrained_window_sizes"] = list(m.pretrained_window_sizes)
    try:
        return build_encoder(m.name, ft.weights or None, overrides, num_classes=ft.num_classes,
                             keep_state=keep_state, name_hint="--set model.name={name}")
    except EncoderLoadError as e:
        raise FinetuneError(str(e)) from None
