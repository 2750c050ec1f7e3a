"""What each rank started by `gigamim launch` runs: `python -m gigamim.launch.rank_entry <verb> ...`.

The ranks live in their own sessions (so a job-wide signal reaches them once, through the
launcher); the price is that a SIGKILLed launcher would leave them running. PR_SET_PDEATHSIG
closes that hole: the kernel SIGKILLs this rank when the launcher dies. Linux only; elsewhere
it is a no-op.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    launcher = os.environ.get("GIGAMIM_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The launcher may have died between our fork and the prctl: then our parent is no longer it.
    if os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pretrain"]:
        # A SIGTERM forwarded while this rank is still importing torch/DeepSpeed must not kill
        # it: the trainer picks it up, finishes step 1 and saves.
        from gigamim.train.signals import catch_early

        catch_early()
    from gigamim.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
