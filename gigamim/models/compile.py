"""Per-block ``torch.compile`` of a SwinV2 / SimMIM model (plain PyTorch; no deepspeed here).

Why per block and not the whole model: under ZeRO-3 DeepSpeed hooks every module and its
hooks are ``torch.compiler.disable``d, so a whole-model graph breaks at every module
boundary. A block is the unit that works everywhere: single process, ZeRO-1/2, and ZeRO-3
with the block as a z3 leaf module (one hook / one gather per block; see
``gigamim.train.engines.deepspeed``). It is also where the time goes (attention + MLP + two fused
res-post-norms per block).

What is compiled is each block's ``forward`` (an instance attribute), not ``_call_impl``:
module hooks (DeepSpeed's gather/release, checkpoint recompute re-entering the module) stay
eager and are never traced, the state_dict keys do not change (no ``_orig_mod.``), and an
activation-checkpointed block (``checkpoint(blk, x)`` in the stage) recomputes through the
same compiled forward. The geometry the blocks read is in integer buffers, so tracing fills
no cache and the block graphs have no breaks (``torch._dynamo.explain``; tests check it).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Type

import torch
import torch.nn as nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_block_classes() -> tuple:
    """Every registered family's blocks (`FamilySpec.block_classes`: gigamim's SwinV2 block,
    the timm blocks its ViT and Swin V1 encoders are made of) and timm's SwinV2 block (the
    benchmark reference): the units an engine shards (FSDP2) or gathers (ZeRO-3 leaf modules)
    one at a time, and compiles one by one."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block as TimmBlock

    from gigamim.models.family import families

    classes = [c for spec in families() for c in spec.block_classes()]
    return tuple(dict.fromkeys(classes + [TimmBlock]))


def find_blocks(module: nn.Module, classes: Optional[Sequence[Type[nn.Module]]] = None) -> list:
    classes = tuple(classes or default_block_classes())
    return [m for m in module.modules() if isinstance(m, classes)]


def _raise_recompile_limits(n_blocks: int) -> None:
    # Every block's forward is the same code object, and dynamo keeps one cache per code
    # object: each distinct block geometry (stage width, shifted or not, extra norm) is one
    # entry. The default limit (8) would silently fall back to eager for the rest.
    cfg = torch._dynamo.config
    want = max(64, 2 * n_blocks)
    cfg.recompile_limit = max(cfg.recompile_limit, want)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * want)


def compile_blocks(module: nn.Module, mode: Optional[str] = None, *, classes: Optional[Iterable[type]] = None,
                   backend: str = "inductor", dynamic: bool = False, fullgraph: bool = False) -> list:
    """Compile the forward of every block of ``module`` in place; returns the blocks.

    mode: None / "default", "reduce-overhead" (CUDA graphs), "max-autotune",
    "max-autotune-no-cudagraphs". dynamic=False: shapes are fixed per block in training, and
    letting dynamo mark them dynamic after the second geometry would compile slower kernels.
    Idempotent: an already compiled block is left as it is.
    """
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
    blocks = find_blocks(module, tuple(classes) if classes else None)
    if not blocks:
        raise ValueError(f"compile_blocks: no SwinV2 block (nor ViT / Swin V1 block) found in {type(module).__name__}")
    _raise_recompile_limits(len(blocks))
    kwargs = dict(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    if mode not in (None, "default"):
        kwargs["mode"] = mode
    for blk in blocks:
        if getattr(blk, "_gigamim_compiled", False):
            continue
        # The bound forward, compiled; module.__call__ still runs hooks eagerly around it.
        blk.forward = torch.compile(blk.forward, **kwargs)
        blk._gigamim_compiled = True
    return blocks


def is_compiled(module: nn.Module) -> bool:
    return any(getattr(m, "_gigamim_compiled", False) for m in module.modules())
