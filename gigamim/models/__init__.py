"""SwinV2 (nano..giant), Swin V1, ViT (timm's and the official SimMIM one) encoders, one
`FamilySpec` per family (`family_of`), and the SimMIM wrapper; plain PyTorch, never imports
deepspeed."""

from gigamim.models import swinv2 as _swinv2  # noqa: F401  (registers the variants)
from gigamim.models import swin as _swin  # noqa: F401
from gigamim.models import vit as _vit  # noqa: F401
from gigamim.models import vit_simmim as _vit_simmim  # noqa: F401  (the official SimMIM ViT)
from gigamim.models.pretrained import from_pretrained
from gigamim.models.family import FamilySpec, family_of, register_variants
from gigamim.models.registry import create_model, list_models, model_defaults, register_model
from gigamim.models.simmim import SimMIM
from gigamim.models.swinv2 import SwinTransformerV2

__all__ = ["create_model", "from_pretrained", "list_models", "model_defaults", "register_model", "register_variants",
           "family_of", "FamilySpec", "SimMIM", "SwinTransformerV2"]
