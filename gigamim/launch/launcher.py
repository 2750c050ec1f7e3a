"""`gigamim launch`: start the ranks of one node, stay alive until they are done.

    gigamim launch --nproc-per-node 8 pretrain --config X.yaml --resume auto
    gigamim launch --nproc-per-node 8 --nnodes 4 --node-rank $I --master-addr HOST0 --master-port 29500 pretrain ...

The way to run under anything that takes the launcher's exit as the end of the job (a plain
batch script, a container runtime, Kubernetes, a CI step): the `deepspeed` runner returns at
once on a job-wide SIGTERM while its ranks go on to save, orphaned, and whatever waits for it
then kills them mid-save. This launcher instead:

- starts the ranks with torch's elastic agent (the machinery under torchrun: static
  rendezvous, the agent's TCP store, RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* in each rank's
  environment, each rank in its own session), so `gigamim.runtime.dist` sees a torchrun launch;
- on SIGTERM / SIGINT / SIGHUP forwards the signal ONCE to every rank (their own sessions keep
  a job-wide or terminal signal from reaching them a second time; a second SIGINT would abort
  the trainer's save), ignores further signals, and waits up to --stop-timeout seconds for the
  ranks' checkpoint before SIGKILL; it exits with the ranks' status (a clean preemption save
  is 0);
- when a rank dies (kill -9, OOM killer, a crash), gives the others --peer-grace seconds to
  exit by themselves, SIGKILLs the rest (ZeRO-3 ranks cannot save without every partition)
  and exits 1 with one line "rank N exited ...; resume with --resume auto";
- if the launcher itself is SIGKILLed, the ranks die with it (PR_SET_PDEATHSIG, set in
  `gigamim.launch.rank_entry`), so nothing is left running behind a scheduler's back.

In a container run it as PID 1 with an init (`docker run --init`, `tini`), or as the
container's command under Kubernetes, with terminationGracePeriodSeconds above the time a
save takes.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid

EXIT_USAGE = 2
EXIT_RANK_FAILED = 1
# Exit codes with which gigamim's ranks stop on purpose, all alike, after rank 0 said why
# (2: bad input or config, 3: non-finite losses): passed through without a "rank N exited".
SELF_EXPLAINED_EXITS = {2, 3}
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
DEFAULT_STOP_TIMEOUT_S = 900  # a SwinV2-G save on a slow file system takes minutes, not 30 s
DEFAULT_PEER_GRACE_S = 2.0


def _err(msg: str) -> None:
    print(f"gigamim launch: {msg}", file=sys.stderr, flush=True)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gigamim launch", description="Start the ranks of this node for a gigamim verb; forward "
                "SIGTERM/SIGINT once and wait for their checkpoint; stop every rank when one dies.")
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks on this node (GPUs)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default=None, help="host of node 0 (default 127.0.0.1 on one node)")
    p.add_argument("--master-port", type=int, default=None, help="default: a free port on one node, else 29500")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT_S,
                   help="seconds the ranks get to save after a forwarded signal before SIGKILL (default %(default)s)")
    p.add_argument("--peer-grace", type=float, default=DEFAULT_PEER_GRACE_S,
                   help="seconds the other ranks get to exit by themselves after one died (default %(default)s)")
    p.add_argument("--rdzv-timeout", type=int, default=900, help="seconds to wait for all nodes to join")
    p.add_argument("verb", help="the gigamim verb every rank runs (pretrain, doctor, ...)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the verb")
    return p


def _check(args) -> None:
    from gigamim.cli import VERBS

    if args.nproc_per_node < 1:
        raise _UsageError(f"--nproc-per-node must be >= 1, not {args.nproc_per_node}")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise _UsageError(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1} (--nnodes {args.nnodes})")
    if args.nnodes > 1 and not args.master_addr:
        raise _UsageError("--master-addr (the host of node 0) is required with --nnodes > 1")
    if args.verb not in VERBS or args.verb == "launch":
        raise _UsageError(f"unknown verb '{args.verb}' (one of: {', '.join(v for v in VERBS if v != 'launch')})")


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name if code < 0 else f"exit code {code}"
    except ValueError:
        return f"exit code {code}"


def _make_agent_class():
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    # torch 2.11's agent has no shutdown timeout: its `_shutdown(death_sig)` closes the ranks
    # with the process context's default 30 s, and its __init__ takes no `shutdown_timeout`
    # (both are there in 2.14). The stop policy needs its own wait on either.
    base_takes_timeout = "timeout" in inspect.signature(LocalElasticAgent._shutdown).parameters

    class GigamimAgent(LocalElasticAgent):
        """torch's local agent with gigamim's stop policy (see the module docstring)."""

        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
        peer_grace_s: float = DEFAULT_PEER_GRACE_S
        forwarded: str | None = None  # the signal passed on to the ranks
        first_failed: dict[int, int] | None = None  # global rank -> exit status, of the ranks that failed first
        stop_started: float | None = None

        def _ignore_further_signals(self):
            def note(signum, frame):
                _err(f"{signal.Signals(signum).name} again: still waiting for the ranks to finish their save "
                     f"(SIGKILL the launcher to abort)")

            for name in FORWARDED_SIGNALS + ("SIGQUIT",):
                signal.signal(getattr(signal, name), note)

        def _shutdown(self, death_sig=signal.SIGTERM, timeout=30):
            # Reached with the signal the agent caught (run()'s SignalException path), and
            # again from run()'s finally after the workers are gone (harmless then).
            if death_sig == signal.SIGHUP:
                death_sig = signal.SIGTERM  # a closed terminal: the ranks save (they handle TERM, not HUP)
            if self._pcontext is not None and self.forwarded is None and self._any_alive():
                self._ignore_further_signals()
                self.forwarded = signal.Signals(death_sig).name
                self.stop_started = time.monotonic()
                _err(f"{self.forwarded}: forwarded once to the ranks; waiting up to {self.stop_timeout_s:.0f} s "
                     f"for their checkpoint")
                from gigamim.runtime.jit_builds import builds_in_progress

                for folder in builds_in_progress():
                    _err(f"a JIT build of {folder.name} is running ({folder}): the ranks stop when the build "
                         f"in progress ends (seconds to minutes)")
                timeout = int(max(1, self.stop_timeout_s))
            self._base_shutdown(death_sig, timeout)

        def _base_shutdown(self, death_sig, timeout):
            """torch's own shutdown, waiting up to `timeout` s for the ranks on any torch."""
            if base_takes_timeout:
                super()._shutdown(death_sig, timeout)
                return
            if self._pcontext is not None:
                self._pcontext.close(death_sig, timeout)  # our wait; a second close finds them gone
            super()._shutdown(death_sig)  # the rest of torch's shutdown (its watchdog, health server)

        def _start_workers(self, worker_group):
            ids = super()._start_workers(worker_group)
            # When a rank fails, the process context's own poll terminates the others with
            # close() = SIGTERM + 30 s: the survivors would start a preemption save that can
            # never finish (ZeRO-3 needs every partition; DeepSpeed's CPU shm all-reduce spins
            # forever on a dead peer). Only that call comes without arguments; ours pass them.
            pcontext, close = self._pcontext, self._pcontext.close

            def close_after_failure(death_sig=None, timeout=None):
                if death_sig is None and timeout is None:
                    # Who had already failed when the poll noticed: the cause, not the victims.
                    self.first_failed = {self._worker_group.workers[lr].global_rank: h.proc.returncode
                                         for lr, h in pcontext.subprocess_handlers.items()
                                         if h.proc.poll() not in (None, 0)}
                    self._wait_for_survivors()
                    close(signal.SIGKILL, 5)
                    self._kill_leftovers()
                    return None
                return close(death_sig, 30 if timeout is None else timeout)

            pcontext.close = close_after_failure
            return ids

        def _wait_for_survivors(self):
            """The others usually notice the dead peer in their next collective and exit by
            themselves (with their own one line); whoever is still there after the grace
            period is stuck in a collective that cannot complete."""
            deadline = time.monotonic() + self.peer_grace_s
            while time.monotonic() < deadline and self._any_alive():
                time.sleep(0.05)

        def _kill_leftovers(self):
            """Each rank leads its own session: its DataLoader workers outlive a SIGKILLed rank
            by a few seconds (their parent watchdog), unless their group goes too."""
            for h in getattr(self._pcontext, "subprocess_handlers", {}).values():
                try:
                    os.killpg(h.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

        def _stop_workers(self, worker_group):
            self._base_shutdown(signal.SIGKILL, 5)  # after a failure: whatever is left cannot save

        def _any_alive(self) -> bool:
            handlers = getattr(self._pcontext, "subprocess_handlers", {}) if self._pcontext else {}
            return any(h.proc.poll() is None for h in handlers.values())

        def rank_exit_codes(self) -> dict[int, int]:
            """Global rank -> exit status of this node's ranks (after they are gone)."""
            handlers = getattr(self._pcontext, "subprocess_handlers", {}) if self._pcontext else {}
            base = self._worker_group.workers[0].global_rank if self._worker_group.workers else 0
            out = {}
            for local_rank, h in handlers.items():
                code = h.proc.wait()
                rank = next((w.global_rank for w in self._worker_group.workers if w.local_rank == local_rank),
                            base + local_rank)
                out[rank] = code
            return out

    return GigamimAgent


def _quiet_torch_elastic() -> None:
    """The agent logs every state change at INFO/WARNING; users get our lines instead."""
    # Their loggers get their level from $LOGLEVEL when created (at import), one per module.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def run_ranks(args) -> int:
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    from gigamim.runtime.dist import free_port

    _quiet_torch_elastic()
    master_addr = args.master_addr or "127.0.0.1"
    master_port = args.master_port or (free_port() if args.nnodes == 1 else 29500)
    run_id = os.environ.get("SLURM_JOB_ID") or uuid.uuid4().hex[:12]
    rdzv = RendezvousParameters(backend="static", endpoint=f"{master_addr}:{master_port}", run_id=run_id,
                                min_nodes=args.nnodes, max_nodes=args.nnodes,
                                rank=args.node_rank, timeout=args.rdzv_timeout)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(FORWARDED_SIGNALS)
    # Each rank sets PR_SET_PDEATHSIG against this pid before anything else.
    os.environ["GIGAMIM_LAUNCHER_PID"] = str(os.getpid())
    spec = WorkerSpec(role="gigamim", local_world_size=args.nproc_per_node, entrypoint=sys.executable,
                      args=("-m", "gigamim.launch.rank_entry", args.verb, *args.args),
                      rdzv_handler=rdzv_registry.get_rendezvous_handler(rdzv), max_restarts=0,
                      monitor_interval=0.1, master_addr=master_addr, master_port=master_port)
    log_dir = tempfile.mkdtemp(prefix="gigamim-launch-")  # the agent's per-rank error files
    agent_cls = _make_agent_class()
    # torch 2.14 also takes the stop timeout for its own shutdown calls; 2.11 has no such argument.
    timeout_kw = ({"shutdown_timeout": int(max(1, args.stop_timeout))}
                  if "shutdown_timeout" in inspect.signature(agent_cls.__init__).parameters else {})
    agent = agent_cls(spec=spec, logs_specs=DefaultLogsSpecs(log_dir=log_dir), start_method="spawn", **timeout_kw)
    agent.stop_timeout_s, agent.peer_grace_s = args.stop_timeout, args.peer_grace
    try:
        try:
            result = agent.run()
        except SignalException as e:
            codes = agent.rank_exit_codes()
            waited = time.monotonic() - (agent.stop_started or time.monotonic())
            bad = {r: c for r, c in codes.items() if c != 0}
            if not codes:  # the signal came before any rank started
                _err(f"{signal.Signals(e.sigval).name} before the ranks started; nothing to save")
                return 128 + int(e.sigval)
            if not bad:
                _err(f"all {len(codes)} ranks exited 0 after {agent.forwarded} ({waited:.1f} s)")
                return 0
            rank, code = min(bad.items())
            _err(f"after {agent.forwarded}: rank {rank} ended with {_signal_name(code)} ({waited:.1f} s); "
                 f"the last complete checkpoint is what `--resume auto` will load")
            return code if code > 0 else 128 - code
        if not result.is_failed():
            return 0
        # The agent polls every 0.1 s: first_failed holds the rank(s) that died first; the
        # others failed after them (in their next collective) or were stopped by us.
        first = agent.first_failed or {r: f.exitcode for r, f in result.failures.items()}
        codes = set(first.values())
        if len(codes) == 1 and codes <= SELF_EXPLAINED_EXITS:
            return codes.pop()  # bad input / non-finite stop: rank 0 printed its one line already
        rank, code = min(first.items())
        _err(f"rank {rank} exited ({_signal_name(code)}); stopped the other ranks. Resume with --resume auto")
        return EXIT_RANK_FAILED
    finally:
        agent._kill_leftovers()  # nothing of this launch outlives it
        shutil.rmtree(log_dir, ignore_errors=True)


# Verbs whose mistakes the launcher refuses itself, before any rank starts (their `Verb`).
TRAINING_VERBS = {"pretrain": "gigamim.train.pretrain", "finetune": "gigamim.train.finetune"}


def check_verb(args) -> int | None:
    """A training verb's pre-flight (`train.verb.check_before_launch`) in the launcher: a config
    or folder mistake is one line and exit 2 before any rank is started (each rank checks again)."""
    if args.verb not in TRAINING_VERBS:
        return None
    import importlib

    from gigamim.train.verb import check_before_launch

    verb = importlib.import_module(TRAINING_VERBS[args.verb]).VERB
    try:
        return check_before_launch(verb, list(args.args), world_size=args.nproc_per_node * args.nnodes)
    except SystemExit as e:  # argparse: it printed its usage (or --help) already
        return e.code if isinstance(e.code, int) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check(args)
    except _UsageError as e:
        _err(f"error: {e}")
        return EXIT_USAGE
    refused = check_verb(args)
    if refused is not None:
        return refused
    return run_ranks(args)


if __name__ == "__main__":
    sys.exit(main())
