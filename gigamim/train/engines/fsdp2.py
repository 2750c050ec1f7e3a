"""PyTorch FSDP2 (`fully_shard`) behind the engine seam: `train.engine: fsdp2`, knobs in `fsdp:`.

Build, the torchtitan way: the model is built on the meta device (no rank ever holds it
whole), its blocks compiled one by one when `model.compile` is on, then every block
(SwinV2, ViT, Swin V1: `models.compile.find_blocks`) is its own `fully_shard` unit and the
root takes what is left (patch embed, merges, final norm, mask token, decoder), on a 1-D
mesh over the world. `to_empty` allocates each rank's shards only and
`models.init.reset_after_meta` re-initialises them, every module resetting what it owns.

Random init of shards: on a CPU (gloo) mesh DTensor has no RNG tracker, so a random init of
a sharded parameter draws the same numbers on every rank (its shards would be copies of each
other). Each rank therefore draws its shards with its own seed (train.seed, rank): iid
draws per shard, the distribution a whole-tensor init has, on every device. (On CUDA the
DTensor RNG tracker, where it engages, offsets each shard's Philox stream instead; either
way no two shards repeat.) The initial weights thus depend on the world size; a resume does
not (it loads them).

Precision: sharded parameters, gradients and AdamW states stay fp32; under bf16 the
gathered compute copies are bf16 (`MixedPrecisionPolicy.param_dtype`) and gradients are
reduce-scattered in `fsdp.reduce_dtype` (fp32 by default). fp16 is refused: there is no
loss scaler here.

The step matches the DeepSpeed engine's: each micro-batch's loss is scaled by
1/accumulation before backward (DeepSpeed's `scale_wrt_gas`), gradients are reduce-scattered
only at the accumulation boundary (`set_requires_gradient_sync`), where the global grad norm
is taken (before clipping), clipped to train.grad_clip, AdamW steps, the LR schedule steps.

Checkpoints: a tag folder holds `torch.distributed.checkpoint` (DCP) files of the model and
optimizer (each rank writes its shards; `.metadata` names every chunk) plus `engine_state.pt`
(rank 0: LR schedule, gigamim's client state). DCP reshards on load, so a tag resumes on any
world size (`describe()` says `reshardable`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from gigamim.checkpoint.dcp import ENGINE_STATE_FILE  # rank 0's file beside the DCP files
from gigamim.checkpoint.layout import atomic_file
from gigamim.config import ConfigError, gradient_accumulation_steps
from gigamim.train.engines.base import Engine


def init_seed(seed: int, rank: int) -> int:
    """The seed of this rank's random init draws: distinct per rank, fixed per (seed, rank)."""
    return (seed * 100_003 + rank) % 2**63


def _has_dtensor(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


class FSDP2Engine(Engine):
    name = "fsdp2"

    # -- before any process group --------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.train.precision == "fp16":
            raise ConfigError("train.engine=fsdp2 has no fp16 loss scaler: use train.precision=bf16 (or fp32)")
        if cfg.model.compile and cfg.model.compile_mode == "reduce-overhead":
            raise ConfigError("model.compile_mode=reduce-overhead uses CUDA graphs, which FSDP2's per-step parameter "
                              "gathers break: use default or max-autotune-no-cudagraphs")
        from gigamim.models.init import meta_init_problem
        from gigamim.models.registry import create_model

        try:
            with torch.device("meta"):
                encoder = create_model(cfg.model.name)
        except ValueError:
            return  # an unknown model is the config validation's line, not ours
        problem = meta_init_problem(encoder)
        if problem:
            raise ConfigError(f"train.engine=fsdp2 builds model.name={cfg.model.name} on the meta device and "
                              f"re-initialises it sharded, but {problem}: use train.engine=deepspeed")

    @classmethod
    def partitions_at_build(cls, cfg) -> bool:
        return True

    # -- after the process group ---------------------------------------------------------------

    def __init__(self, cfg, dist, precision: str):
        super().__init__(cfg, dist, precision)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        self.accum = gradient_accumulation_steps(cfg, dist.world_size)
        self.optimizer = None
        self._micro = 0  # applied micro-batches since the start of this process
        self._grad_norm: Optional[float] = None

    def _policies(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        fsdp = self.cfg.fsdp
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "bf16" else None,
                                  reduce_dtype=dtypes[fsdp.reduce_dtype])
        offload = CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda") if fsdp.cpu_offload else OffloadPolicy()
        return dict(mesh=self.mesh, reshard_after_forward=fsdp.reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)

    def build(self, build_model, groups, partition_at_build=True, after_build=None, load_universal=False):
        from torch.distributed.fsdp import fully_shard

        from gigamim.models.compile import compile_blocks, find_blocks
        from gigamim.train.optim import make_lr_scheduler, peak_lr

        cfg = self.cfg
        if partition_at_build:
            with torch.device("meta"):
                model = build_model()
        else:
            model = build_model()  # whole, weights already in (every rank holds it: the task's choice)
        # torchtitan's order: compile each block, then shard it (the FSDP hooks stay outside the
        # compiled forward; activation checkpointing is the model's own, around the block call).
        if cfg.model.compile:
            compile_blocks(model, cfg.model.compile_mode)
        policies = self._policies()
        for block in find_blocks(model):
            fully_shard(block, **policies)
        fully_shard(model, **policies)
        if partition_at_build:
            self._materialise(model)
        if after_build is not None:
            after_build(model)
        self.optimizer = torch.optim.AdamW(groups(model), lr=peak_lr(cfg), betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_lr_scheduler(cfg)(self.optimizer)
        self.module = model
        return model

    def _materialise(self, model: nn.Module) -> None:
        """Each rank's shards (and the buffers, whole) get storage, then their init values."""
        from gigamim.models.init import reset_after_meta

        device = self.dist.device
        offload = self.cfg.fsdp.cpu_offload
        model.to_empty(device="cpu" if offload else device)
        if offload and device.type != "cpu":
            # Sharded parameters live in host memory; buffers are read by the compute.
            for module in model.modules():
                for key, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[key] = buf.to(device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            # DTensor warns that a CPU mesh has no RNG tracker: the per-rank seed is our answer.
            warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
            torch.manual_seed(init_seed(self.cfg.train.seed, self.dist.rank))
            reset_after_meta(model)

    def describe(self) -> dict:
        fsdp = self.cfg.fsdp
        return {"engine": self.name, "reshardable": True,
                "fsdp": {"reshard_after_forward": fsdp.reshard_after_forward, "cpu_offload": fsdp.cpu_offload,
                         "reduce_dtype": fsdp.reduce_dtype}}

    # -- the step ------------------------------------------------------------------------------

    def backward(self, loss):
        self._micro += 1
        # Reduce-scatter only with the last micro-batch of the step; before it, gradients
        # accumulate unreduced in each rank's unsharded gradient buffers.
        self.module.set_requires_gradient_sync(self._micro % self.accum == 0)
        (loss / self.accum).backward()

    def step(self):
        if self._micro % self.accum:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor: sum over ranks
        self._grad_norm = float(full)
        clip = float(self.cfg.train.grad_clip)
        if clip > 0:
            # torch's clip_grad_norm_ rule (coef = max / (norm + 1e-6), never above 1), applied
            # as a Python float: the grads are DTensors, the norm a plain tensor.
            coef = min(1.0, clip / (self._grad_norm + 1e-6))
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lrs(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def grad_norm(self):
        return self._grad_norm

    # -- parameters ----------------------------------------------------------------------------

    def load_weights(self, model, state, names):
        """Rank 0's whole tensors, broadcast one at a time and sliced into every rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = set(names)
        full = {k: v for k, v in state.items() if k in names} if self.dist.rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   strict=False))

    def full_state_dict(self, module):
        def fp32(v):
            return v.detach().to("cpu", torch.float32, copy=True) if v.is_floating_point() else v.detach().cpu()

        if _has_dtensor(module):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # whole tensors gathered one at a time, straight to host memory, on rank 0 only
            sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: fp32(v) for k, v in sd.items()} if self.dist.rank == 0 else None
        # a plain module (an EMA copy): every rank holds it whole
        return {k: fp32(v) for k, v in module.state_dict().items()} if self.dist.rank == 0 else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())  # a DTensor's numel is the global one

    def local_shards(self) -> Iterator[torch.Tensor]:
        """Each DTensor's local part (FSDP2's padding is outside it)."""
        for p in self.module.parameters():
            yield p.to_local().detach() if hasattr(p, "to_local") else p.detach()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, root, tag, client_state):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from torch.distributed.checkpoint.api import CheckpointException

        tag_dir = Path(root) / tag
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tag_dir))
        except CheckpointException as e:
            # DCP gathers every rank's write error into a BaseException that `except Exception`
            # would let through: raise this rank's own (a full disk stays an OSError) instead.
            raise self._own_failure(e, f"could not write {tag_dir}") from None
        if self.dist.rank == 0:
            # On disk (fsync, as DCP syncs its own files) before the caller writes meta + `latest`.
            self._write_engine_state(tag_dir, client_state)
        dist.barrier()

    # -- background saves (checkpoint.async_save) ------------------------------------------------

    supports_async_save = True

    def _checkpoint_group(self):
        """A gloo group of its own for the background writes: DCP's planning and finishing
        collectives run in the writer thread, and must never interleave with the training
        step's collectives on the default group (same ranks, same order, one thread each)."""
        if getattr(self, "_ckpt_pg", None) is None:
            import torch.distributed as dist

            self._ckpt_pg = dist.new_group(backend="gloo")
        return self._ckpt_pg

    def save_async(self, root, tag, client_state):
        """DCP `async_save`: the step loop waits for the host copy of this rank's shards
        (DCP's stager: pinned memory on GPUs), a thread writes them; rank 0's engine state
        (LR schedule + client state, a few kB) is written here, before the handle returns."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        tag_dir = Path(root) / tag
        group = self._checkpoint_group()
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        tag_dir.mkdir(parents=True, exist_ok=True)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tag_dir),
                                process_group=group)
        if self.dist.rank == 0:
            self._write_engine_state(tag_dir, client_state)
        return _DCPWrite(future, self, tag_dir)

    def _write_engine_state(self, tag_dir: Path, client_state: dict) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "client": client_state}
        atomic_file(tag_dir / ENGINE_STATE_FILE, lambda f: torch.save(state, f))

    def _own_failure(self, e, what: str) -> BaseException:
        """This rank's exception out of DCP's gathered ones, else one naming the rank that failed
        (its exception as the cause, so that a full disk is still recognised as one)."""
        failures = {rank: pair[0] for rank, pair in e.failures.items()}
        if self.dist.rank in failures:
            return failures[self.dist.rank]
        rank, exc = next(iter(sorted(failures.items())))
        err = RuntimeError(f"rank {rank} {what}: {type(exc).__name__}: {exc}".splitlines()[0])
        err.__cause__ = exc
        return err

    def load(self, root, tag):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from torch.distributed.checkpoint.api import CheckpointException

        from gigamim.checkpoint.layout import CheckpointError

        tag_dir = Path(root) / tag
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(tag_dir))  # resharded to this run's world size
        except CheckpointException as e:
            failure = self._own_failure(e, "")
            raise CheckpointError(f"cannot load {tag_dir}: {type(failure).__name__}: {failure}".splitlines()[0]
                                  + " (use an earlier tag, --tag)") from None
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # Our own file (rank 0 wrote it with torch.save): the client state holds RNG states
        # (numpy arrays, tuples), as DeepSpeed's client state does.
        extra = torch.load(tag_dir / ENGINE_STATE_FILE, map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        return extra["client"] or {}


class _DCPWrite:
    """The handle of one background DCP write (`FSDP2Engine.save_async`)."""

    def __init__(self, future, engine: FSDP2Engine, tag_dir: Path):
        self.future, self.engine, self.tag_dir = future, engine, tag_dir

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            self.future.result()
        except CheckpointException as e:
            # a BaseException gathering every rank's failure: this rank's own (a full disk stays an OSError)
            raise self.engine._own_failure(e, f"could not write {self.tag_dir}") from None
