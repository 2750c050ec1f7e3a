"""Run on 2 CPU ranks (`deepspeed --num_gpus 2 tests/helpers/faults_padding.py OUT`): the
trainer's finite check of ZeRO-3 partitions with NaN planted in the alignment padding.

DeepSpeed allocates each partition with torch.empty and never writes the tail past the
parameter's last element, so leftover memory (NaN, 1e31) sits there. The reference for
"are the weights finite" is the gathered parameter (deepspeed.zero.GatheredParameters:
only real elements), not the partition. Writes one JSON line per rank to OUT.
"""

import json
import sys

import torch
import torch.distributed as dist


def main(out: str) -> None:
    import deepspeed

    from gigamim.config import load_config
    from gigamim.runtime.dist import init_distributed
    from gigamim.models.build import build_simmim
    from gigamim.train.engines.deepspeed import DeepSpeedEngine
    from gigamim.train.trainer import Trainer

    cfg = load_config("demo", ["model.img_size=64", "model.window_size=4", "train.micro_batch_size=2",
                               "train.global_batch_size=4"])
    info = init_distributed()
    import dataclasses

    torch.manual_seed(0)
    engine = DeepSpeedEngine(cfg, info, "fp32")
    engine.build(lambda: build_simmim(dataclasses.asdict(cfg.model)), lambda m: [{"params": list(m.parameters())}])
    assert engine.stage == 3
    trainer = Trainer.__new__(Trainer)
    trainer.engine, trainer.dist, trainer.device = engine, info, info.device

    def gathered_finite() -> bool:
        ok = True
        for p in engine.module.parameters():
            with deepspeed.zero.GatheredParameters([p]):
                ok &= bool(torch.isfinite(p.data).all())
        return ok

    # Parameters whose last partition has padding (numel not divisible by the world size).
    padded = [(n, p) for n, p in engine.module.named_parameters() if p.ds_tensor.numel() * info.world_size > p.ds_numel]
    planted = 0
    for _, p in padded:
        flat = p.ds_tensor.view(-1)
        start = p.ds_tensor.numel() * info.rank
        valid = max(0, min(flat.numel(), p.ds_numel - start))
        if valid < flat.numel():
            flat[valid:] = float("nan")
            planted += flat.numel() - valid
    result = {"rank": info.rank, "padded_params": len(padded), "planted": planted,
              "reference_finite": gathered_finite(), "check_with_padding_nan": trainer._weights_finite()}
    # Now a real element: the first padded parameter's element 0 on rank 0.
    _, p = padded[0]
    if info.rank == 0:
        p.ds_tensor.view(-1)[0] = float("nan")
    result["reference_after_real_nan"] = gathered_finite()
    result["check_after_real_nan"] = trainer._weights_finite()
    with open(f"{out}.{info.rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    with torch.no_grad():
        main(sys.argv[-1])  # the deepspeed runner puts --local_rank=N first
