"""What the planner knows of a model, from one meta-device build: its parameters (per block,
per module, per FSDP2 unit), and the family's count (`FamilySpec.plan_count`: per block what
autograd saves and the FLOPs, what the model saves outside its blocks). The memory model
(`tools.memory`) and the step-time model (`tools.step_model`) both read these facts; neither
builds the model again nor asks which family it is.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from gigamim.models.counting import ModelCount


@dataclass
class ModelFacts:
    name: str
    img_size: int
    params: int
    block_params: list  # per block, forward order
    block_flops: list  # forward FLOPs per image per block
    block_attn_flops: list  # of which QK^T + AV
    block_stage: list
    forward_flops: float  # per image, whole SimMIM forward, without what runs once per forward
    cpb_flops: float  # once per forward pass, shared by the micro-batch (SwinV2's CPB MLP)
    modules_with_params: int
    small_params: dict = field(default_factory=dict)  # threshold -> parameters in tensors below it
    module_param_sizes: list = field(default_factory=list)  # per parameter-holding module, forward order
    # FSDP2 units: each block's parameter shapes (forward order), and the root's (what no block holds)
    block_shapes: list = field(default_factory=list)
    root_shapes: list = field(default_factory=list)
    count: ModelCount | None = None  # the family's count (activations per block, FLOPs)

    def fsdp_padded(self, ranks: int) -> tuple:
        """(block elements, root elements) as FSDP2's collectives carry them over `ranks`: each
        parameter's dim 0 cut in torch.chunk pieces, every rank's piece padded to the first."""
        def padded(shape):
            if not shape:  # a 0-dim parameter is sharded as one element
                return ranks
            rest = math.prod(shape[1:])
            return math.ceil(shape[0] / ranks) * ranks * rest

        blocks = sum(padded(s) for blk in self.block_shapes for s in blk)
        return blocks, sum(padded(s) for s in self.root_shapes)

    @property
    def fsdp_units(self) -> int:
        return len(self.block_shapes) + 1

    @property
    def root_params(self) -> int:
        """Parameters no block holds (patch embedding, merges, final norm, mask token, decoder):
        FSDP2's root unit."""
        return self.params - sum(self.block_params)

    @property
    def largest_block_params(self) -> int:
        """Parameters of the largest block: what ZeRO-3 / FSDP2 gather at once."""
        return max(self.block_params, default=0)

    def kept_from_forward(self, max_live: float, threshold: float) -> int:
        """Partitioned parameters ZeRO-3 still holds gathered when backward starts: the longest
        run of modules at the END of forward (backward's first) whose parameters fit in
        `stage3_max_live_parameters`. Measured on 2 CPU ranks (swinv2_tiny, max_live 1e7):
        9.47M kept; this rule gives 9.46M (the decoder + the last block)."""
        kept = 0
        for sizes in reversed(self.module_param_sizes):
            n = sum(x for x in sizes if x >= threshold)
            if kept + n > max_live:
                break
            kept += n
        return kept


@functools.lru_cache(maxsize=32)
def model_facts(name: str, img_size: int | None = None, window_size=None) -> ModelFacts:
    """The facts of SimMIM(variant ``name``) at ``img_size`` / ``window_size`` (None: the
    variant's), counted on the meta device (no weights allocated). Bad names and shapes raise
    ValueError with the config validation's one-line message, before anything is built."""
    import torch

    from gigamim.models import family_of
    from gigamim.models.build import build_simmim, check_model_section
    from gigamim.models.compile import find_blocks

    section = {"name": name, "img_size": img_size, "window_size": window_size}
    check_model_section(section)  # ModelConfigError (a ValueError): unknown name, a shape the family refuses
    with torch.device("meta"):
        model = build_simmim(section)
    try:
        count = family_of(name).plan_count(model)
    except NotImplementedError as e:
        raise ValueError(f"{name}: {e}") from None
    # The units an engine shards (FSDP2) and gathers: every block the families declare.
    units = find_blocks(model)
    if len(units) != len(count.blocks):
        raise ValueError(f"{name}: the family counts {len(count.blocks)} blocks, the model has {len(units)} "
                         "(FamilySpec.plan_count and block_classes disagree)")
    in_block = set()
    block_shapes = []
    for blk in units:
        block_shapes.append([tuple(p.shape) for p in blk.parameters()])
        in_block.update(id(p) for p in blk.parameters())
    root_shapes = [tuple(p.shape) for p in model.parameters() if id(p) not in in_block]
    sizes = sorted(p.numel() for p in model.parameters())
    small = {thr: sum(n for n in sizes if n < thr) for thr in (0, 1e5, 1e6, 1e7)}
    per_module = [[p.numel() for p in m.parameters(recurse=False)] for m in model.modules()]
    per_module = [x for x in per_module if x]
    return ModelFacts(
        name, count.img_size, sum(sizes),
        block_params=[sum(p.numel() for p in blk.parameters()) for blk in units],
        block_flops=[b.flops() for b in count.blocks], block_attn_flops=[b.attn_flops() for b in count.blocks],
        block_stage=[b.stage for b in count.blocks], forward_flops=count.forward_flops,
        cpb_flops=count.per_forward_flops, modules_with_params=len(per_module), small_params=small,
        module_param_sizes=per_module, block_shapes=block_shapes, root_shapes=root_shapes, count=count)
