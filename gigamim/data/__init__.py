"""SimMIM data: shard writer (make-shards), multi-rank tar reader with exact resume, transforms, masks.

Public names: SimMIMLoader, MaskGenerator, SimMIMTransform, normalize_on_device,
write_synthetic_shards. Imported lazily so `gigamim make-shards --help` stays fast.
"""

__all__ = ["SimMIMLoader", "MaskGenerator", "SimMIMTransform", "normalize_on_device", "write_synthetic_shards"]

_WHERE = {"SimMIMLoader": "pipeline", "MaskGenerator": "masking", "SimMIMTransform": "transforms",
          "normalize_on_device": "transforms", "write_synthetic_shards": "synthetic"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"gigamim.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gigamim.data' has no attribute {name!r}")
