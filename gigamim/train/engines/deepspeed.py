"""DeepSpeed ZeRO 0-3 behind the engine seam (the default engine).

The DeepSpeed config is a template (ds_configs/*.json, by name: zero3_bf16,
cpu, ...) that says how to partition and communicate (ZeRO stage, offload, buckets).
Everything that must agree with the gigamim config (batch sizes, precision, gradient
clipping, the optimizer) is written here from it, and a template that sets any of those is
rejected, so nothing is ever set twice.

ZeRO-3 builds the model under `zero.Init` (no rank ever holds the whole model: parameters
are partitioned as they are made); ZeRO-0/1/2 build it on the rank's GPU in the training
dtype. `model.compile` compiles each block; under ZeRO-3 the blocks are registered as z3
leaf modules first (one gather per block, and a block's inside is free for the compiler).
Why not `engine.compile()`: it compiles the whole model, and under ZeRO-3 every module's
hooks are `torch.compiler.disable`d, so that graph breaks at each of the ~840 module
boundaries of a SwinV2-G; DeepCompile needs its native op, CUDA-only in DeepSpeed 0.19.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from gigamim.config import Config, ConfigError, gradient_accumulation_steps, resolve_ds_config_path
from gigamim.train.engines.base import Engine
from gigamim.train.precision import PRECISION_DTYPES, default_dtype, resolve_precision

# Keys gigamim owns. DeepSpeed silently defaults some of them (gradient_clipping=1.0),
# so a template setting them would be a second, conflicting source of truth.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def load_template(path: str) -> dict:
    p = resolve_ds_config_path(path)
    try:
        tree = json.loads(Path(p).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config '{p}' is not valid JSON: {e}") from None
    clash = [k for k in OWNED_KEYS if k in tree]
    if clash:
        raise ConfigError(
            f"deepspeed.config '{p}' sets {', '.join(clash)}: these come from the gigamim config "
            f"(train.*, optim.*); remove them from the DeepSpeed file"
        )
    return {k: v for k, v in tree.items() if not k.startswith("_")}


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def build_ds_config(cfg: Config, world_size: int, on_gpu: bool, peak_lr: float) -> dict:
    ds = load_template(cfg.deepspeed.config)
    precision = resolve_precision(cfg.train.precision, on_gpu)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = gradient_accumulation_steps(cfg, world_size)
    ds["train_batch_size"] = cfg.train.global_batch_size
    ds["gradient_clipping"] = float(cfg.train.grad_clip)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000}
    if precision != "bf16" and ds.get("communication_data_type") == "bf16":
        ds.pop("communication_data_type")
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": peak_lr,
            "betas": list(cfg.optim.betas),
            "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
        },
    }
    # DeepSpeed picks DeepSpeedCPUAdam when the optimizer is offloaded and FusedAdam on
    # GPUs; on CPU ranks without offload, torch's AdamW (no op to JIT-build).
    if not on_gpu and not offloads_optimizer(ds):
        ds["optimizer"]["params"]["torch_adam"] = True
    return ds


def arch_list_for_deepspeed(environ=os.environ) -> Optional[str]:
    """Make ``TORCH_CUDA_ARCH_LIST`` one DeepSpeed's JIT op builder can parse; returns what it
    rewrote (None if nothing).

    DeepSpeed 0.19.8 sorts the list by ``int()`` of each dotted part (``builder.py``
    ``compute_capability_args``), so an arch-specific entry such as ``9.0a`` (sm_90a, as an
    H200 image may set it for its own kernels) fails FusedAdam's build with ``ValueError:
    invalid literal for int() with base 10: '0a'`` (seen on the first GPU run). Its ops use no
    sm_90a-only instructions: the plain ``9.0`` target builds them for the same GPU. The
    suffix is dropped for this process and the ranks it starts; ``+PTX`` is kept."""
    raw = environ.get("TORCH_CUDA_ARCH_LIST", "")
    entries = raw.replace(";", " ").split()
    fixed = []
    for cc in entries:
        arch, plus, ptx = cc.partition("+")
        cc = ".".join(part.rstrip("abcdefghijklmnopqrstuvwxyz") for part in arch.split(".")) + plus + ptx
        if cc not in fixed:
            fixed.append(cc)
    if fixed == entries:
        return None
    new = ";".join(fixed)
    environ["TORCH_CUDA_ARCH_LIST"] = new
    return f"TORCH_CUDA_ARCH_LIST {raw!r} -> {new!r} (DeepSpeed's op builder parses no arch suffix)"


def _import_deepspeed():
    # DeepSpeed picks its accelerator at import; CPU ranks need it told.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    arch_list_for_deepspeed()
    import deepspeed

    return deepspeed


def init_comm() -> None:
    """DeepSpeed's communication layer on the existing process group (`runtime.dist`).

    On CPU ranks DeepSpeed's comm op creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_
    <MASTER_ADDR>_<MASTER_PORT>_<rank>` (~66 MiB each) and never unlinks it, so every CPU run
    leaked one per rank until /dev/shm (RAM) was full (150 test runs filled 20 GiB). Every
    rank maps every other rank's buffer here; after a barrier all mappings exist, and an
    unlinked POSIX shm object stays alive while mapped, so each rank unlinks its own name: the
    memory goes when the last process exits, even after a crash or kill -9. Idempotent."""
    import torch.distributed as tdist

    deepspeed = _import_deepspeed()
    from deepspeed import comm

    if comm.is_initialized():
        return
    from gigamim.runtime.quiet import library_prints
    from gigamim.train.signals import StoppedInSetup, stop_requested

    if tdist.get_rank() == 0:
        _say_comm_op_build(deepspeed)
    interrupted = None
    try:
        with library_prints():
            deepspeed.init_distributed(dist_backend=tdist.get_backend(), verbose=False)
    except RuntimeError as exc:
        # A job-wide SIGTERM reaches the compiler too (each rank's session gets it): the build
        # stops, torch raises. On CPU ranks every rank learns of it below and all stop cleanly.
        if not (tdist.get_backend() == "gloo" and stop_requested() and "Error building extension" in str(exc)):
            raise
        interrupted = stop_requested()
    if tdist.get_backend() != "gloo":
        return
    path = Path("/dev/shm") / "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), tdist.get_rank())
    if tdist.get_world_size() > 1:
        tdist.barrier()  # on every rank (a stale file of an old run must not make it one-sided)
    try:
        path.unlink()
    except FileNotFoundError:
        pass  # the op was not built, or the ranks are not all local: nothing was created
    stopped = _max_over_ranks(interrupted or 0)  # one rank's build interrupted: all stop
    if stopped:
        import signal

        raise StoppedInSetup(f"{signal.Signals(stopped).name} stopped the JIT build of DeepSpeed's "
                             f"CPU comm op: stopped before step 1, nothing to save (the next start builds it)")


def _max_over_ranks(value: int) -> int:
    """The max of `value` over the ranks, through the process group's store, not a collective: a
    gloo all-reduce right before the process exits aborted a rank (1 in ~6 tries; core dump: gloo's
    worker thread freed the finished work's tensor, needed the GIL while Python was finalising,
    and `std::terminate` ended the rank). The store's set / wait / get leave nothing behind."""
    import torch.distributed as tdist

    world = tdist.get_world_size()
    if world == 1:
        return value
    store = tdist.distributed_c10d._get_default_store()
    keys = [f"gigamim/init_comm/stop/{r}" for r in range(world)]
    store.set(keys[tdist.get_rank()], str(value))
    store.wait(keys)
    return max(int(store.get(k)) for k in keys)


def _say_comm_op_build(deepspeed) -> None:
    """One line before DeepSpeed's communication layer builds its CPU comm op (silent seconds to
    minutes on a machine's first start) or waits for another process's build of it."""
    from deepspeed.accelerator import get_accelerator

    from gigamim.runtime.jit_builds import build_state

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed builds nothing here (its own test, deepspeed/comm/torch.py)
    line = build_state(builder.NAME).start_line("DeepSpeed's CPU comm op")
    if line:
        print(line, flush=True)


def mark_z3_leaf_blocks(model: nn.Module, classes: Optional[Iterable[type]] = None) -> list:
    """Register every block as a ZeRO-3 leaf module (before deepspeed.initialize, where
    DeepSpeed installs its per-module hooks and skips the children of a leaf)."""
    from deepspeed.utils import set_z3_leaf_modules

    from gigamim.models.compile import find_blocks

    blocks = find_blocks(model, tuple(classes) if classes else None)
    if not blocks:
        raise ValueError(f"mark_z3_leaf_blocks: no block in {type(model).__name__}")
    set_z3_leaf_modules(model, sorted({type(b) for b in blocks}, key=lambda c: c.__name__))
    return blocks


def compile_blocks(model: nn.Module, stage: int, mode: Optional[str] = None,
                   classes: Optional[Iterable[type]] = None, **kwargs) -> list:
    """Compile each block's forward in place. ZeRO-3 requires the blocks to be z3 leaf
    modules already (`mark_z3_leaf_blocks`) and rejects CUDA-graph modes: ZeRO-3 swaps
    parameter storage every step, which a captured graph cannot follow; it also puts torch's
    own `F.linear` back in place of zero.Init's (`restore_torch_linear`)."""
    from gigamim.models.compile import compile_blocks as compile_model_blocks
    from gigamim.models.compile import find_blocks

    if stage == 3:
        from deepspeed.utils import z3_leaf_module

        if mode in ("reduce-overhead",):
            raise ValueError(f"compile mode {mode!r} uses CUDA graphs, which ZeRO-3's parameter gathering breaks; "
                             "use 'default' or 'max-autotune-no-cudagraphs'")
        blocks = find_blocks(model, tuple(classes) if classes else None)
        missing = [b for b in blocks if not z3_leaf_module(b)]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(blocks)} blocks are not ZeRO-3 leaf modules: call "
                               "mark_z3_leaf_blocks(model) before deepspeed.initialize(...)")
        restore_torch_linear()
    return compile_model_blocks(model, mode, classes=classes, **kwargs)


def restore_torch_linear() -> bool:
    """Put torch's own ``F.linear`` back if ``deepspeed.zero.Init`` replaced it; True if it did.

    zero.Init (``memory_efficient_linear``, on by default) swaps ``torch.nn.functional.linear``
    for ``LinearFunctionForZeroStage3``, an autograd.Function whose forward adds the bias in
    place. torch 2.11's dynamo routes the gradient of such a Function to the wrong output
    (pytorch/pytorch#180642; fixed for 2.12, and 2.14.1 measured right): every Linear inside a
    compiled block got a zero gradient, so a compiled ZeRO-3 run on 2.11 trained little more
    than its decoder and norms, silently (the first loss is right). The wrapper is not needed
    there: a compiled block is a z3 leaf module, whose hooks gather all its parameters for
    forward and for backward; the eager modules outside the blocks get theirs from their own
    ZeRO-3 hooks, as with ``memory_efficient_linear: false``.
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


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def check_config(cls, cfg) -> None:
        ds = load_template(cfg.deepspeed.config)
        if cfg.model.compile and zero_stage(ds) == 3 and cfg.model.compile_mode == "reduce-overhead":
            raise ConfigError("model.compile_mode=reduce-overhead uses CUDA graphs, which ZeRO-3's parameter "
                              "gathering breaks: use default or max-autotune-no-cudagraphs")

    @classmethod
    def partitions_at_build(cls, cfg) -> bool:
        return zero_stage(load_template(cfg.deepspeed.config)) == 3

    def __init__(self, cfg, dist, precision: str):
        super().__init__(cfg, dist, precision)
        init_comm()
        self.ds = None  # the deepspeed.DeepSpeedEngine, once built
        self._writer = None  # the background saves' SnapshotWriter, made at the first one
        self.stage = zero_stage(load_template(cfg.deepspeed.config))

    def build(self, build_model, groups, partition_at_build=True, after_build=None, load_universal=False):
        deepspeed = _import_deepspeed()
        from gigamim.train.optim import make_lr_scheduler, peak_lr

        cfg, on_gpu = self.cfg, self.dist.device.type == "cuda"
        ds_config = build_ds_config(cfg, self.dist.world_size, on_gpu, peak_lr=peak_lr(cfg))
        if load_universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if not partition_at_build:
            model = build_model()
        elif self.stage == 3:
            # The dtype comes from the config's bf16/fp16 flags. Do not pass dtype= : in
            # DeepSpeed 0.19 an explicit dtype is overridden by an operator-precedence slip
            # (`dtype or fp16 if ... else bf16`), which gives bf16 on CPU ranks.
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = build_model()
        elif on_gpu:
            # ZeRO-0/1/2 keep full parameters on every rank: build them straight on this rank's
            # GPU in the training dtype (SwinV2-G in bf16: 6 GB, never 12 GB of fp32 weights, no
            # host copy); DeepSpeed makes the fp32 master partitions from them, initialize()
            # broadcasts rank 0's weights.
            with torch.device(self.dist.device), default_dtype(PRECISION_DTYPES[self.precision]):
                model = build_model()
        else:
            model = build_model()
        if after_build is not None:
            after_build(model)
        if cfg.model.compile and self.stage == 3:
            mark_z3_leaf_blocks(model)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups(model), config=ds_config,
            lr_scheduler=make_lr_scheduler(cfg), dist_init_required=False,
        )
        if cfg.model.compile:
            compile_blocks(self.ds.module, self.stage, mode=cfg.model.compile_mode)
        self.module = self.ds.module
        return model

    def describe(self) -> dict:
        return {"engine": self.name, "zero_stage": self.stage}

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss):
        self.ds.backward(loss)

    def step(self):
        self.ds.step()

    def lrs(self):
        return list(self.ds.get_lr())

    def grad_norm(self):
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def load_weights(self, model, state, names):
        """One parameter at a time: gathered, written by rank 0, partitioned again (ZeRO-3;
        under ZeRO-0/1/2 the gather is a no-op and initialize() broadcasts rank 0's weights)."""
        deepspeed = _import_deepspeed()
        names = set(names)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in names:  # the same on every rank: the same gathers
                    continue
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.dist.rank == 0:
                        p.data.copy_(state[name].to(p.dtype))

    def full_state_dict(self, module):
        deepspeed = _import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            # straight to host memory (a GPU copy of SwinV2-G in fp32 would be 12 GB more on rank 0)
            if self.dist.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}

    def num_parameters(self) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.module.parameters())

    def local_shards(self) -> Iterator[torch.Tensor]:
        """ZeRO-3: each parameter's `ds_tensor`, valid elements only (the tail of the last
        rank's partition is alignment padding that DeepSpeed allocates uninitialised)."""
        for p in self.module.parameters():
            local = getattr(p, "ds_tensor", None)
            if local is None:
                yield p.detach()
            else:
                valid = max(0, min(local.numel(), p.ds_numel - local.numel() * self.dist.rank))
                yield local.detach().view(-1).narrow(0, 0, valid)

    def save(self, root, tag, client_state):
        # save_latest=False: `latest` is written by checkpoint.save once every rank's files are on disk.
        self.ds.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)

    # -- background saves (checkpoint.async_save) ------------------------------------------------

    supports_async_save = True

    def save_async(self, root, tag, client_state):
        """DeepSpeed's own save, with gigamim's `SnapshotWriter` as its checkpoint engine for
        this call: returns once this rank's state is copied to host memory; a thread writes the
        files (`deepspeed_writer`; why not DeepSpeed's decoupled engine is said there). The
        synchronous `save` keeps DeepSpeed's torch.save engine."""
        from gigamim.train.engines.deepspeed_writer import SnapshotWriter

        if self._writer is None:
            self._writer = SnapshotWriter(self.dist.rank, getattr(self.ds.checkpoint_engine, "zipfile_serialization",
                                                                  True))
        own, self.ds.checkpoint_engine = self.ds.checkpoint_engine, self._writer
        try:
            self.save(root, tag, client_state)
        finally:
            self.ds.checkpoint_engine = own
        return self._writer.write

    def load(self, root, tag):
        path, client = self.ds.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(root) / tag}")
        return client or {}
