"""``model.compile`` for the trainer: per-block torch.compile of a (DeepSpeed-wrapped) model.

The trainer's sequence (ZeRO-3 needs the first call *before* ``deepspeed.initialize``,
because DeepSpeed registers its per-module hooks there and skips the children of a leaf):

    from gigamim.train.compile import compile_blocks, mark_z3_leaf_blocks
    model = SimMIM(create_model(...))                    # under zero.Init for ZeRO-3
    if cfg.model.compile and zero_stage == 3:
        mark_z3_leaf_blocks(model)                        # one hook / one gather per block
    engine, opt, _, sched = deepspeed.initialize(model=model, ...)
    if cfg.model.compile:
        compile_blocks(engine, zero_stage=zero_stage, mode=cfg.model.compile_mode)

Why not ``engine.compile()``: it runs ``module.compile()`` on the whole model. Under ZeRO-3
every module's hooks are ``torch.compiler.disable``d, so that graph breaks at each of the
~840 module boundaries of a SwinV2-G (hundreds of tiny graphs, one gather per Linear);
DeepCompile (``compile: {deepcompile: true}``) replaces those hooks with graph passes, but
needs its native op, which is CUDA-only in DeepSpeed 0.19 (nothing to measure on CPU ranks)
and is a whole-model graph that 84 giant blocks make slow to compile. Per-block compile with
the blocks as z3 leaf modules gives one gather per block (what DeepSpeed's prefetch wants
anyway) and one graph per block geometry; it works the same under ZeRO-0/1/2.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from gigamim.models.compile import COMPILE_MODES, find_blocks
from gigamim.models.compile import compile_blocks as _compile_blocks

__all__ = ["COMPILE_MODES", "compile_blocks", "mark_z3_leaf_blocks", "restore_torch_linear"]


def _unwrap(module: nn.Module) -> nn.Module:
    """A DeepSpeed engine's model (engine.module), or the module itself."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def mark_z3_leaf_blocks(model: nn.Module, classes: Optional[Iterable[type]] = None) -> list:
    """Register every SwinV2 block as a ZeRO-3 leaf module (call before deepspeed.initialize)."""
    from deepspeed.utils import set_z3_leaf_modules

    model = _unwrap(model)
    blocks = find_blocks(model, tuple(classes) if classes else None)
    if not blocks:
        raise ValueError(f"mark_z3_leaf_blocks: no SwinV2 block in {type(model).__name__}")
    set_z3_leaf_modules(model, sorted({type(b) for b in blocks}, key=lambda c: c.__name__))
    return blocks


def compile_blocks(module: nn.Module, zero_stage: int = 0, mode: Optional[str] = None,
                   classes: Optional[Iterable[type]] = None, **kwargs) -> list:
    """Compile each block's forward of ``module`` (a model or a DeepSpeed engine) in place.

    zero_stage=3 requires the blocks to be z3 leaf modules already (``mark_z3_leaf_blocks``
    before ``deepspeed.initialize``) and rejects CUDA-graph modes: ZeRO-3 swaps parameter
    storage every step, which a captured graph cannot follow; it also puts torch's own
    ``F.linear`` back in place of zero.Init's (``restore_torch_linear``). Returns the compiled blocks.
    """
    model = _unwrap(module)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage!r}")
    blocks = find_blocks(model, tuple(classes) if classes else None)
    if zero_stage == 3:
        from deepspeed.utils import z3_leaf_module

        if mode in ("reduce-overhead",):
            raise ValueError(f"compile mode {mode!r} uses CUDA graphs, which ZeRO-3's parameter gathering breaks; "
                             "use 'default' or 'max-autotune-no-cudagraphs'")
        missing = [b for b in blocks if not z3_leaf_module(b)]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(blocks)} blocks are not ZeRO-3 leaf modules: call "
                "gigamim.train.compile.mark_z3_leaf_blocks(model) before deepspeed.initialize(...)")
        restore_torch_linear()
    return _compile_blocks(model, mode, classes=classes, **kwargs)


def restore_torch_linear() -> bool:
    """Put torch's own ``F.linear`` back if ``deepspeed.zero.Init`` replaced it; True if it did.

    zero.Init (``memory_efficient_linear``, on by default) swaps ``torch.nn.functional.linear``
    for ``LinearFunctionForZeroStage3``, an autograd.Function whose forward adds the bias in
    place. torch 2.11's dynamo routes the gradient of such a Function to the wrong output
    (pytorch/pytorch#180642; fixed for 2.12, and 2.14.1 measured right): every Linear inside a
    compiled block got a zero gradient, so a compiled ZeRO-3 run on 2.11 trained little more
    than its decoder and norms, silently (the first loss is right). The
    wrapper is not needed there: a compiled block is a z3 leaf module, whose hooks gather all
    its parameters for forward and for backward; the eager modules outside the blocks get
    theirs from their own ZeRO-3 hooks, as with ``memory_efficient_linear: false``.
    """
    import torch.nn.functional as F

    try:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
    except ImportError:  # another DeepSpeed layout: nothing of its kind to undo
        return False
    if F.linear is not zero3_linear_wrap:
        return False
    # zero.Init keeps the function it replaced; torch's builtin if that is ever missing.
    F.linear = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch._C._nn.linear)
    return True
