"""gigamim: SimMIM pretraining of SwinV2 encoders (up to SwinV2-G, 3B) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name):
    # Lazy so that `import gigamim` (e.g. for the CLI's --help) does not pay for torch.
    if name in ("create_model", "list_models"):
        from gigamim import models

        return getattr(models, name)
    raise AttributeError(f"module 'gigamim' has no attribute {name!r}")
