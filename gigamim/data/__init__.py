"""Data: the shard-spec parser, shard writer (make-shards), multi-rank tar readers with exact and elastic resume, transforms, masks.

Public names: SimMIMLoader, ClassificationLoader, MaskGenerator, SimMIMTransform, ClassifyTransform,
normalize_on_device, write_synthetic_shards, resolve_shards (shardspec.resolve). Imported lazily
so `gigamim make-shards --help` stays fast.
"""

__all__ = ["SimMIMLoader", "ClassificationLoader", "MaskGenerator", "SimMIMTransform", "ClassifyTransform",
           "normalize_on_device", "write_synthetic_shards", "resolve_shards"]

_WHERE = {"SimMIMLoader": "loader", "ClassificationLoader": "loader", "MaskGenerator": "masking",
          "SimMIMTransform": "transforms", "ClassifyTransform": "transforms", "normalize_on_device": "transforms",
          "write_synthetic_shards": "synthetic", "resolve_shards": "loader"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"gigamim.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gigamim.data' has no attribute {name!r}")
