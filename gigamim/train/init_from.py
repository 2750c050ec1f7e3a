"""`model.init_from`: start (or continue) SimMIM pretraining from a weights file.

The file is a gigamim safetensors file: `gigamim import` of an official SimMIM / SwinV2
pretraining checkpoint (encoder + decoder, the way to continue the official pretraining),
`gigamim export --format simmim`, or an encoder-only file (the decoder and mask token then keep
their initialisation). Checked on every rank before any weight moves (names and shapes, one
line naming the keys); rank 0 reads the tensors and the engine writes them into the built,
possibly partitioned model (`engine.load_weights`). A later `--resume` overrides them.
"""

from __future__ import annotations

from gigamim.config import ConfigError


def _names_and_shapes(path: str) -> dict[str, tuple]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' error types
        raise ConfigError(f"model.init_from: cannot read {path}: {e}") from None


def check_and_plan(path: str, model) -> set[str]:
    """The parameter names to load from ``path`` into ``model`` (a SimMIM module); a
    ConfigError naming the keys for what does not fit."""
    have = _names_and_shapes(path)
    if not any(k.startswith(("encoder.", "decoder.")) for k in have):
        have = {f"encoder.{k}": v for k, v in have.items()}  # an encoder-only file
    have = {k: v for k, v in have.items() if not k.startswith("encoder.head.")}
    want = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    unknown = sorted(set(have) - set(want))
    missing = sorted(k for k in set(want) - set(have) if k.startswith("encoder.") and k != "encoder.mask_token")
    wrong = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    if unknown or missing or wrong:
        raise ConfigError(f"model.init_from={path} does not fit model.name: {len(unknown)} unknown keys "
                          f"{unknown[:3]}, {len(missing)} encoder keys missing {missing[:3]}, {len(wrong)} of another "
                          f"shape {[(k, have[k], want[k]) for k in wrong[:2]]}")
    return set(have)


def load_init_from(path: str, model, engine, rank: int) -> set[str]:
    """Collective: check, then write the file's tensors into ``model``; the names loaded."""
    names = check_and_plan(path, model)
    state = None
    if rank == 0:
        from safetensors.torch import load_file

        state = load_file(str(path))
        if not any(k.startswith(("encoder.", "decoder.")) for k in state):
            state = {f"encoder.{k}": v for k, v in state.items()}
    engine.load_weights(model, state, names)
    return names
