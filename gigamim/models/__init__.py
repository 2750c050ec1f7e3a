"""SwinV2 (nano..giant), Swin V1 and ViT encoders, one `FamilySpec` per family (`family_of`),
and the SimMIM wrapper; plain PyTorch, never imports deepspeed."""

from gigamim.models import swinv2 as _swinv2  # noqa: F401  (registers the variants)
from gigamim.models import swin as _swin  # noqa: F401
from gigamim.models import vit as _vit  # noqa: F401
from gigamim.models.family import FamilySpec, family_of, register_variants
from gigamim.models.registry import create_model, list_models, model_defaults, register_model
from gigamim.models.simmim import SimMIM
from gigamim.models.swinv2 import SwinTransformerV2

__all__ = ["create_model", "list_models", "model_defaults", "register_model", "register_variants", "family_of",
           "FamilySpec", "SimMIM", "SwinTransformerV2"]
