"""`gigamim <verb> ...`: one program, one verb per job.

Each verb lives in its own module as `main(argv=None) -> int | None`; the table below
is the only place that maps verbs to modules. Modules are imported only when their
verb runs, so `gigamim --help` stays fast and a verb's heavy imports (deepspeed,
webdataset) do not slow the others.
"""

from __future__ import annotations

import importlib
import sys

# verb -> ("module:function", one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "pretrain": ("gigamim.train.pretrain:main", "SimMIM pretraining under DeepSpeed (ZeRO-3)"),
    "demo": ("gigamim.demo:main", "write synthetic shards, pretrain swinv2_nano on 2 CPU ranks, consolidate, picture"),
    "make-shards": ("gigamim.data.make_shards:main", "write webdataset tar shards from images, lists, shards or synthetic data"),
    "consolidate": ("gigamim.checkpoint.consolidate:main", "ZeRO checkpoint -> fp32 safetensors (or universal format)"),
    "export": ("gigamim.checkpoint.export:main", "consolidated weights -> encoder / timm / simmim safetensors"),
    "import": ("gigamim.checkpoint.official_import:main", "official SimMIM / Swin-Transformer .pth -> gigamim safetensors"),
    "finetune": ("gigamim.train.finetune:main", "classification fine-tuning of a (SimMIM-pretrained) encoder under DeepSpeed"),
    "probe": ("gigamim.train.probe:main", "linear probe of a frozen encoder on labelled shards"),
    "bench": ("gigamim_benchmarks.run:main", "throughput / MFU / memory benchmarks against a timm reference"),
    "plan": ("gigamim.tools.plan:main", "per-GPU memory plan: ZeRO stage, offload, checkpointing, micro-batch"),
    "doctor": ("gigamim.launch.doctor:main", "versions, devices and all-reduce bandwidth of a launch"),
    "launch": ("gigamim.launch.launcher:main", "start N ranks of a verb; forward SIGTERM once, wait for their save"),
}


def parser_for(verb: str):
    """The argparse parser of `gigamim <verb>` (each verb module's `build_parser()`): the one
    that parses its command line, for checks of the command lines gigamim suggests."""
    module_name = VERBS[verb][0].split(":")[0]
    return importlib.import_module(module_name).build_parser()


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: gigamim <verb> [options]   (or: python -m gigamim <verb>)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`gigamim <verb> --help` shows a verb's options."]
    return "\n".join(lines)


def _strip_launcher_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher runs `python -m gigamim --local_rank=N <verb> ...`: take that
    flag off the front (every launcher also sets LOCAL_RANK, which is what we read)."""
    import os

    while argv and argv[0].startswith(("--local_rank", "--local-rank")):
        flag = argv.pop(0)
        value = flag.split("=", 1)[1] if "=" in flag else (argv.pop(0) if argv else "0")
        os.environ.setdefault("LOCAL_RANK", value)
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from gigamim import __version__

        print(f"gigamim {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"gigamim: unknown verb '{verb}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = VERBS[verb][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
