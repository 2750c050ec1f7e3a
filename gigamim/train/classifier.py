"""The fine-tune classifier: an encoder with a `num_classes` head, built from pretrained
weights (or a random init), geometry taken from the weights' recorded run where the config
leaves it open. Library code for the fine-tune task and anyone building the same model."""

from __future__ import annotations

from typing import Any


class FinetuneError(ValueError):
    """Bad input for fine-tuning; one line, exit 2."""


def build_classifier(cfg, keep_state: bool = False):
    """(encoder with a num_classes head, info). The pretrained window becomes
    pretrained_window_sizes for a SwinV2 fine-tuned at another window."""
    from gigamim.models.registry import model_arguments
    from gigamim.train.load_encoder import EncoderLoadError, build_encoder, read_weights, run_model_config

    m, ft = cfg.model, cfg.finetune
    overrides: dict[str, Any] = {"img_size": m.img_size, "drop_path_rate": m.drop_path_rate}
    if m.window_size is not None:
        overrides["window_size"] = m.window_size
    if m.pretrained_window_sizes is not None:
        overrides["pretrained_window_sizes"] = list(m.pretrained_window_sizes)
    elif ft.weights and "pretrained_window_sizes" in model_arguments(m.name):  # the family rescales windows
        try:
            run = run_model_config(read_weights(ft.weights)[1])
        except EncoderLoadError:
            run = {}
        if run.get("window_size") and m.window_size and int(run["window_size"]) != int(m.window_size):
            overrides["pretrained_window_sizes"] = int(run["window_size"])
    try:
        return build_encoder(m.name, ft.weights or None, overrides, num_classes=ft.num_classes, keep_state=keep_state)
    except EncoderLoadError as e:
        raise FinetuneError(str(e)) from None
