"""`gigamim consolidate`: DeepSpeed ZeRO 1/2/3 checkpoint -> fp32 safetensors, or -> universal.

    gigamim consolidate CKPT_DIR OUT [--tag TAG] [--max-shard-size 5GB] [--force]
    gigamim consolidate CKPT_DIR --universal [--tag TAG] [OUT]

CKPT_DIR is the folder given to `engine.save_checkpoint` (holding `latest` and one folder
per tag) or a tag folder itself. Without --tag the tag named in `latest` is used.

The checkpoint is checked for completeness BEFORE anything is converted or written
(`check_checkpoint`): the tag exists, every rank's model/optimizer partition file that
the recorded data-parallel world size calls for is present and not truncated, no file
of another world size is mixed in, and each optimizer partition agrees on stage and
partition count. Any failure raises `CheckpointError` naming the file and what to do.

Conversion uses DeepSpeed's own `zero_to_fp32` (its lazy mode for ZeRO-3; its parsers plus
a lazy slice merge for ZeRO-1/2): the optimizer partitions are memory-mapped (the Adam
moments are never read), each parameter is gathered from the ranks only when
`safetensors_io` streams it to disk, and its mapped pages are dropped right after, so
peak RSS is the Python/torch/DeepSpeed import baseline plus about the largest tensor
(measured: SwinV2-L SimMIM, 0.745 GiB fp32, 2-rank ZeRO-3 -> peak RSS 0.683 GiB, of which
0.643 GiB is the import-only baseline).

--universal runs DeepSpeed's `ds_to_universal` and writes `<CKPT_DIR>/<TAG>_universal`
(or OUT) with the tag's `gigamim_config.yaml` and `gigamim_meta.json` (meta gains
`"universal": true, "source_tag", "source_world_size"`). DeepSpeed's own convention is
kept: `<CKPT_DIR>/latest_universal` names the new folder, and `latest` is NOT changed,
because a `latest` that names a universal folder breaks every resume that does not set
`checkpoint.load_universal`. Resume on any world size with `load_universal: true` in
the DeepSpeed config and `engine.load_checkpoint(CKPT_DIR, tag="<TAG>_universal")`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field

from gigamim.checkpoint.layout import (CONFIG_FILE, META_FILE, UNIVERSAL_SUFFIX, CheckpointError, atomic_write,
                                       is_universal)


@dataclass
class CheckpointInfo:
    root: str  # the folder holding `latest` and the tag folders
    tag: str
    tag_dir: str
    zero_stage: int
    world_size: int  # data-parallel ranks that saved it
    model_files: list[str] = field(default_factory=list)
    optim_files: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # gigamim_meta.json, {} when absent
    config_yaml: str | None = None  # gigamim_config.yaml text, None when absent


# ----------------------------------------------------------------------------- checks


def _is_tag_dir(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*_model_states.pt")) or
                glob.glob(os.path.join(path, "*_optim_states.pt")))


def _tags(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def resolve_tag(ckpt_dir: str, tag: str | None = None) -> tuple[str, str, str]:
    """(root, tag, tag_dir). `ckpt_dir` may be the save folder or a tag folder itself."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist")
    if tag is None and _is_tag_dir(ckpt_dir):
        return os.path.dirname(ckpt_dir), os.path.basename(ckpt_dir), ckpt_dir
    available = _tags(ckpt_dir)
    hint = f"available tags: {', '.join(available)}" if available else "it holds no tag folders"
    if tag is None:
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"no 'latest' file in {ckpt_dir}, so the tag is unknown; pass --tag ({hint})")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise CheckpointError(f"{latest} names tag {tag!r} but {os.path.join(ckpt_dir, tag)} does not exist "
                                  f"(the save was interrupted or the folder was removed); pass --tag ({hint})")
    elif not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise CheckpointError(f"tag {tag!r} not found: {os.path.join(ckpt_dir, tag)} does not exist ({hint})")
    return ckpt_dir, tag, os.path.join(ckpt_dir, tag)


def _check_zip(path: str) -> None:
    """torch checkpoints are zip archives: a truncated one has no central directory, or
    members that run past the end of the file. Cheap: reads only the directory."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                # local header (30 bytes + name + extra) then the member's data
                if info.header_offset + 30 + len(info.filename) + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename} runs past the end of the file")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"partition file {path} is damaged ({os.path.getsize(path)} bytes; {e}): "
                              "it was truncated or not fully written. Use an earlier tag (--tag) or "
                              "re-save the checkpoint.") from None


def _torch_load(path: str):
    import torch

    try:
        # mmap: only the pickled structure is read; tensors stay on disk until touched.
        # weights_only=False: DeepSpeed pickles its own classes (its checkpoints only).
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read partition file {path}: {type(e).__name__}: {e}. "
                              "Use an earlier tag (--tag) or re-save the checkpoint.") from None


def check_checkpoint(ckpt_dir: str, tag: str | None = None) -> CheckpointInfo:
    """Completeness check of a ZeRO checkpoint; raises CheckpointError, reads no weights."""
    root, tag, tag_dir = resolve_tag(ckpt_dir, tag)
    model_files = sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")))
    optim_files = sorted(glob.glob(os.path.join(tag_dir, "*_optim_states.pt")))
    if not model_files and not optim_files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed checkpoint files (*_model_states.pt, "
                              "*_optim_states.pt)")
    if os.path.isdir(os.path.join(tag_dir, "zero")) and not optim_files:
        raise CheckpointError(f"{tag_dir} is a universal checkpoint; consolidate the tag it was made from")

    # Stage 3 saves one model-states file per rank, stages 1/2 one for all ranks.
    stage3 = bool(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_*_model_states.pt")))
    first_model = (os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt") if stage3
                   else os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    if not os.path.isfile(first_model):
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {os.path.basename(first_model)} is missing")
    _check_zip(first_model)
    state = _torch_load(first_model)
    world = state.get("dp_world_size") if isinstance(state, dict) else None
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{first_model} records no data-parallel world size (dp_world_size); "
                              "is it a DeepSpeed checkpoint?")
    if state.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{first_model}: model-parallel checkpoints (mp_world_size="
                              f"{state['mp_world_size']}) are not supported")
    del state

    prefix = ""  # DeepSpeed's bf16 optimizer names its partitions bf16_zero_pp_rank_*
    if any(os.path.basename(f).startswith("bf16_") for f in optim_files):
        prefix = "bf16_"
    want_optim = [os.path.join(tag_dir, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(world)]
    want_model = ([os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
                  if stage3 else [first_model])
    missing = [f for f in want_model + want_optim if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(
            f"checkpoint {tag_dir} is incomplete: {first_model} records world size {world} but "
            f"{', '.join(os.path.basename(m) for m in missing)} {'is' if len(missing) == 1 else 'are'} missing "
            "(a rank did not finish saving). Use an earlier tag (--tag) or re-save.")
    extra = sorted(set(model_files + optim_files) - set(want_model + want_optim))
    if extra:
        raise CheckpointError(
            f"checkpoint {tag_dir} mixes world sizes: {first_model} records world size {world} but "
            f"{', '.join(os.path.basename(e) for e in extra)} also exist (left over from a save with more ranks?). "
            "Remove the extra files or re-save into a fresh tag.")

    meta: dict = {}
    meta_path = os.path.join(tag_dir, META_FILE)
    if os.path.isfile(os.path.join(tag_dir, CONFIG_FILE)) and not os.path.isfile(meta_path):
        # gigamim writes the meta file last, after every rank finished: without it the save
        # was interrupted even if the partition files look whole.
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {META_FILE} is missing (gigamim writes it "
                              "after every rank finished saving). Use an earlier tag (--tag) or re-save.")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
        if "world_size" in meta and int(meta["world_size"]) != world:
            raise CheckpointError(f"world size mismatch: {meta_path} says {meta['world_size']} but "
                                  f"{first_model} records {world}")
    config_yaml = None
    if os.path.isfile(os.path.join(tag_dir, CONFIG_FILE)):
        with open(os.path.join(tag_dir, CONFIG_FILE), encoding="utf-8") as f:
            config_yaml = f.read()

    for f in want_model[1:] + want_optim:
        _check_zip(f)
    stage = None
    numels = []
    for f in want_optim:
        osd = _torch_load(f).get("optimizer_state_dict", {})
        f_stage, count = osd.get("zero_stage"), osd.get("partition_count")
        if f_stage is None or count is None:
            raise CheckpointError(f"{f} is not a ZeRO optimizer partition (no zero_stage/partition_count)")
        count = max(count) if isinstance(count, list) else count
        if count != world:
            raise CheckpointError(f"world size mismatch: {f} was saved as one of {count} partitions but "
                                  f"{first_model} records world size {world}")
        stage = int(f_stage) if stage is None else stage
        if int(f_stage) != stage:
            raise CheckpointError(f"{f} is a ZeRO stage {int(f_stage)} partition, the others are stage {stage}")
        if stage == 3:
            numels.append(sum(t.numel() for t in osd.get("fp32_flat_groups", [])))
    if stage == 3 and len(set(numels)) > 1:
        raise CheckpointError(f"ZeRO-3 partitions of {tag_dir} differ in size ({numels} elements per rank): "
                              "files from different saves are mixed")
    if (stage == 3) != stage3:
        raise CheckpointError(f"{tag_dir}: optimizer partitions are ZeRO stage {stage} but the model-states "
                              "files have the other stage's layout")
    return CheckpointInfo(root=root, tag=tag, tag_dir=tag_dir, zero_stage=stage, world_size=world,
                          model_files=want_model, optim_files=want_optim, meta=meta, config_yaml=config_yaml)


# ----------------------------------------------------------------------------- convert


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    """DeepSpeed's converters print progress (stdout, tqdm on stderr); keep our CLI output readable."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def metadata_for(info: CheckpointInfo, fmt: str) -> dict[str, str]:
    """safetensors metadata (strings only) describing where weights came from."""
    from gigamim import __version__

    md = {
        "format": fmt,
        "gigamim_version": str(info.meta.get("version", __version__)),
        "exported_by": f"gigamim {__version__}",
        "step": str(info.meta.get("step", "")),
        "model": str(info.meta.get("model", "")),
        "img_size": str(info.meta.get("img_size", "")),
        "source_tag": info.tag,
        "source_world_size": str(info.world_size),
        "zero_stage": str(info.zero_stage),
        "dtype": "float32",
    }
    if info.config_yaml is not None:
        md["gigamim_config"] = info.config_yaml
    return md


class _FlatSlice:
    """A lazy parameter of a ZeRO-1/2 checkpoint: `numel` elements at `offset` of a param
    group's flat fp32 vector, which is split over the ranks' (memory-mapped) partitions.
    DeepSpeed's own ZeRO-1/2 path concatenates every group into one full vector first
    (a second copy of the model); this reads only the slice being written."""

    def __init__(self, partitions, offset: int, shape):
        import torch

        self.partitions, self.offset, self.shape = partitions, offset, torch.Size(shape)
        self.dtype = partitions[0].dtype

    def contiguous(self):
        import torch

        start, end, pos, chunks = self.offset, self.offset + self.shape.numel(), 0, []
        for part in self.partitions:
            n = part.numel()
            lo, hi = max(start, pos), min(end, pos + n)
            if lo < hi:
                chunks.append(part[lo - pos:hi - pos])
            pos += n
        flat = torch.cat(chunks) if chunks else torch.empty(0, dtype=self.dtype)
        if flat.numel() != self.shape.numel():
            raise CheckpointError(f"ZeRO partitions end before a parameter of shape {tuple(self.shape)} "
                                  f"at offset {self.offset}: the checkpoint is inconsistent")
        return flat.view(self.shape)


def _lazy_zero12(info: CheckpointInfo) -> dict:
    """ZeRO-1/2: parsed by DeepSpeed's zero_to_fp32 helpers, merged lazily (`_FlatSlice`),
    with DeepSpeed's offset bookkeeping (per-parameter alignment padding)."""
    import math

    from deepspeed.utils import zero_to_fp32 as z

    states = z.parse_model_states(info.model_files)
    _, world, flat_groups, paddings = z.parse_optim_states(info.optim_files, info.tag_dir)
    sd = dict(states[0].buffers)
    for name, shape in (states[0].frozen_param_shapes or {}).items():
        sd[name] = states[0].frozen_param_fragments[name]
    for g, shapes in enumerate(states[0].param_shapes):
        parts = [flat_groups[r][g] for r in range(world)]
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            sd[name] = _FlatSlice(parts, offset, shape)
            offset += math.prod(shape)
            if paddings is not None:
                offset += paddings[g][i]
        # DeepSpeed pads each group to a multiple of 2*world_size: the same check as zero_to_fp32's.
        avail = sum(p.numel() for p in parts)
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(avail / align):
            raise CheckpointError(f"param group {g} of {info.tag_dir}: parameters need {offset} elements but "
                                  f"the partitions hold {avail}; the checkpoint is inconsistent")
    for alias, target in states[0].shared_params:
        if target in sd:
            sd[alias] = sd[target]
    return sd


class _ReleaseAfterRead:
    """Keeps peak RSS near one tensor instead of one model: DeepSpeed memory-maps the
    partition files, and every page read stays mapped (and counted in RSS) until the
    process ends, i.e. ~1x the fp32 model by the last tensor. Once a tensor has been
    copied out (`contiguous()` concatenates into new memory), its pages of the mapping
    are dropped with madvise(MADV_DONTNEED); a later read would fault them back from the
    file. Applied only to address ranges that /proc/self/maps shows as mappings of the
    checkpoint's own partition files (never to anonymous memory, where DONTNEED would
    zero data). Linux only; elsewhere a no-op."""

    MADV_DONTNEED = 4

    def __init__(self, files: list[str]):
        self.ranges: list[tuple[int, int]] = []
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            import ctypes

            self.madvise = ctypes.CDLL(None, use_errno=True).madvise
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            wanted = {os.path.realpath(f) for f in files}
            with open("/proc/self/maps", encoding="utf-8") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and os.path.realpath(parts[5].strip()) in wanted:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
        except (OSError, AttributeError):
            self.ranges = []

    def release(self, tensor, start: int, end: int) -> None:
        """Drop the whole pages of elements [start, end) of a memory-mapped 1-D tensor."""
        if not self.ranges or end <= start:
            return
        size = tensor.element_size()
        lo = tensor.data_ptr() + start * size
        hi = tensor.data_ptr() + end * size
        lo = -(-lo // self.page) * self.page  # whole pages inside the range only
        hi = hi // self.page * self.page
        if hi <= lo or not any(a <= lo and hi <= b for a, b in self.ranges):
            return
        self.madvise(lo, hi - lo, self.MADV_DONTNEED)


class _Released:
    """A lazy tensor whose mapped source pages are released once it is materialised."""

    def __init__(self, lazy, spans, releaser: _ReleaseAfterRead):
        self.lazy, self.spans, self.releaser = lazy, spans, releaser
        self.shape, self.dtype = lazy.shape, lazy.dtype

    def contiguous(self):
        t = self.lazy.contiguous()
        for flat, lo, hi in self.spans:
            self.releaser.release(flat, lo, hi)
        return t


def _spans(parts, start: int, end: int):
    """(tensor, lo, hi) pieces of the range [start, end) of tensors laid end to end."""
    out, pos = [], 0
    for part in parts:
        n = part.numel()
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((part, lo - pos, hi - pos))
        pos += n
    return out


def _with_page_release(sd: dict, files: list[str]) -> dict:
    releaser = _ReleaseAfterRead(files)
    if not releaser.ranges:
        return sd
    out = {}
    for name, t in sd.items():
        if isinstance(t, _FlatSlice):  # ZeRO-1/2
            spans = _spans(t.partitions, t.offset, t.offset + t.shape.numel())
        elif hasattr(t, "flat_groups") and hasattr(t, "partitioned_numel"):  # zero_to_fp32.GatheredTensor
            spans = [s for groups in t.flat_groups
                     for s in _spans(groups, t.offset, t.offset + t.partitioned_numel)]
        else:
            spans = []
        out[name] = _Released(t, spans, releaser) if spans else t
    return out


def lazy_fp32_state_dict(info: CheckpointInfo, quiet: bool = True) -> dict:
    """name -> lazy fp32 tensor (`.shape`, `.dtype`, `.contiguous()`), from DeepSpeed's
    zero_to_fp32 (its lazy mode for ZeRO-3). Call `check_checkpoint` first."""
    from deepspeed.utils import zero_to_fp32

    try:
        with _quiet(quiet):
            if info.zero_stage <= 2:
                sd = _lazy_zero12(info)
            else:
                sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(info.root, tag=info.tag,
                                                                           lazy_mode=True)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise CheckpointError(f"DeepSpeed could not consolidate {info.tag_dir}: {e}") from None
    # zero_to_fp32 returns buffers in their saved dtype; floating weights are fp32.
    return _with_page_release(dict(sd), info.optim_files)


def consolidate(ckpt_dir: str, out: str, tag: str | None = None, max_shard_size: str | int | None = "5GB",
                overwrite: bool = False, quiet: bool = True) -> list[str]:
    """Check, then stream the fp32 weights of a ZeRO checkpoint into safetensors at `out`
    (a `.safetensors` file or an HF-style folder). Returns the written files."""
    from gigamim.checkpoint import safetensors_io

    info = check_checkpoint(ckpt_dir, tag)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    sd = lazy_fp32_state_dict(info, quiet=quiet)
    import torch

    return safetensors_io.save(out, sd, metadata_for(info, "simmim"), max_shard_size=max_shard_size,
                               dtype=torch.float32, overwrite=overwrite, progress=not quiet or sys.stderr.isatty())




def to_universal(ckpt_dir: str, tag: str | None = None, out: str | None = None, overwrite: bool = False,
                 workers: int = 1, quiet: bool = True) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (loadable on any world
    size with `checkpoint.load_universal`). Returns the universal tag folder."""
    from deepspeed.checkpoint import ds_to_universal

    info = check_checkpoint(ckpt_dir, tag)
    out = os.path.abspath(out or os.path.join(info.root, info.tag + UNIVERSAL_SUFFIX))
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".partial", dir=parent)
    latest_universal = os.path.join(parent, "latest_universal")
    previous = open(latest_universal, encoding="utf-8").read() if os.path.isfile(latest_universal) else None
    args = argparse.Namespace(input_folder=info.tag_dir, output_folder=tmp, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              # ZeRO-1/2 conversion asserts a version record that plain
                              # (non-Megatron) models do not save; DeepSpeed's flag adds it.
                              inject_missing_state=True)
    try:
        with _quiet(quiet):
            ds_to_universal.main(args)
        if os.path.isfile(os.path.join(info.tag_dir, CONFIG_FILE)):
            shutil.copy2(os.path.join(info.tag_dir, CONFIG_FILE), os.path.join(tmp, CONFIG_FILE))
        meta = dict(info.meta, universal=True, source_tag=info.tag, source_world_size=info.world_size)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        from gigamim.checkpoint.safetensors_io import _replace

        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        # ds_to_universal pointed latest_universal at the temporary folder; undo that.
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(latest_universal)
        else:
            with open(latest_universal, "w", encoding="utf-8") as f:
                f.write(previous)
        raise
    atomic_write(latest_universal, os.path.basename(out))
    return out


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gigamim consolidate",
        description="Consolidate a DeepSpeed ZeRO 1/2/3 checkpoint into fp32 safetensors "
                    "(or, with --universal, into DeepSpeed's universal format to resume on another world size).")
    p.add_argument("ckpt_dir", help="checkpoint folder (holding 'latest' and tag folders) or a tag folder")
    p.add_argument("out", nargs="?", help="output: a .safetensors file, or a folder (model.safetensors, or "
                   "shards + model.safetensors.index.json above --max-shard-size). With --universal: the "
                   "universal folder (default CKPT_DIR/<TAG>_universal)")
    p.add_argument("--tag", help="checkpoint tag (default: the one named in CKPT_DIR/latest)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard when OUT is a folder "
                   "(default 5GB; units B, KB, MB, GB, KiB, MiB, GiB)")
    p.add_argument("--universal", action="store_true", help="write DeepSpeed's universal checkpoint instead")
    p.add_argument("--workers", type=int, default=1, help="--universal: worker processes (default 1)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's own progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        if args.universal:
            out = to_universal(args.ckpt_dir, args.tag, args.out, overwrite=args.force, workers=args.workers,
                               quiet=not args.verbose)
            print(f"universal checkpoint: {out}")
            print("resume on any world size with DeepSpeed config checkpoint.load_universal=true and "
                  f"load tag {os.path.basename(out)!r} from {os.path.dirname(out)}")
            return 0
        if not args.out:
            p.error("OUT is required (or pass --universal)")
        try:
            from gigamim.checkpoint.safetensors_io import parse_size

            parse_size(args.max_shard_size)
        except ValueError as e:
            p.error(str(e))
        files = consolidate(args.ckpt_dir, args.out, args.tag, args.max_shard_size, overwrite=args.force,
                            quiet=not args.verbose)
        print(f"wrote {len(files)} file(s): " + ", ".join(files))
        return 0
    except (CheckpointError, FileExistsError) as e:
        print(f"gigamim consolidate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
