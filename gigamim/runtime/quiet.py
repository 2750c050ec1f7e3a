"""A console that shows gigamim's lines: the libraries' noise filtered at the source.

A 20-step run on 2 CPU ranks printed ~170 lines, ~6 of them gigamim's: torch's
FutureWarnings about its own collectives (`torch.distributed.all_gather_into_tensor` /
`reduce_scatter_tensor` are deprecated — raised at every call DeepSpeed makes), DeepSpeed's
INFO lines and its accelerator / op-builder start-up warnings, once per rank.

`quiet_libraries` (called first thing by every training verb, before torch or DeepSpeed is
imported) keeps, by default:

- rank 0: warnings at WARNING level and above from DeepSpeed's logger, every Python warning
  except the deprecations of torch's collectives that DeepSpeed calls (nothing a user can
  act on) and DeepSpeed's accelerator guess (gigamim sets the accelerator itself);
- other ranks: DeepSpeed's errors only, and no Python warnings (rank 0 shows the same ones).

`--verbose` (or GIGAMIM_VERBOSE=1) keeps everything, on every rank.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "GIGAMIM_VERBOSE"

# Python warnings nobody running gigamim can act on (raised inside the libraries).
IGNORED_WARNINGS = (
    # torch deprecates the collectives DeepSpeed 0.19 calls at every gather / reduce-scatter
    (FutureWarning, r"`torch\.distributed\.[a-z_]+` is deprecated"),
    (FutureWarning, r".*torch\.distributed\._(all_gather_base|reduce_scatter_base)"),
)
# DeepSpeed log lines (any level) that say nothing to a gigamim user.
IGNORED_DEEPSPEED_LINES = (
    "Setting accelerator to CPU",  # gigamim sets DS_ACCELERATOR=cpu itself on CPU ranks
)


def is_verbose(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


class _DeepSpeedFilter(logging.Filter):
    def __init__(self, min_level: int):
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return False
        msg = record.getMessage()
        return not any(s in msg for s in IGNORED_DEEPSPEED_LINES)


def quiet_libraries(verbose: bool = False, rank: int = 0) -> bool:
    """Install the filters (see the module doc); returns whether the console stays verbose.
    Idempotent. Child processes (DataLoader workers) inherit the environment variable only."""
    if is_verbose(verbose):
        os.environ[VERBOSE_ENV] = "1"  # the ranks' helpers and children see it too
        return True
    if rank != 0:
        warnings.simplefilter("ignore")
    else:
        for category, message in IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
    if rank != 0 or os.environ.get("DS_ACCELERATOR") == "cpu":
        # torch's op-builder logger says "No CUDA runtime is found, using CUDA_HOME=..." on CPU
        # ranks when DeepSpeed builds its CPU comm op (each rank): nothing to act on there.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # DeepSpeed's logger ("DeepSpeed") gets its level at import (INFO) and never loses its
    # filters: one installed before the import holds for the whole run.
    ds = logging.getLogger("DeepSpeed")
    for f in list(ds.filters):
        if isinstance(f, _DeepSpeedFilter):
            ds.removeFilter(f)
    ds.addFilter(_DeepSpeedFilter(logging.WARNING if rank == 0 else logging.ERROR))
    return False


def library_prints():
    """A context that swallows what a library `print`s (DeepSpeed's "DeepSpeed
    deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", once per rank), unless
    verbose. Python-level prints only: errors still reach stderr."""
    import contextlib
    import io

    return contextlib.nullcontext() if is_verbose() else contextlib.redirect_stdout(io.StringIO())
