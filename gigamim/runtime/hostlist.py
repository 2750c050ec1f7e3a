"""SLURM hostlists and rendezvous ports, without SLURM installed.

`python -m gigamim.runtime.hostlist 'gpu[01-04]'` prints one host per line (`--first`: the
master, `--count`: how many). The SLURM recipes call it in batch scripts on every node, so
this module imports nothing heavy (no torch).
"""

from __future__ import annotations

import argparse
import re
import sys


def expand_hostlist(expr: str) -> list[str]:
    """Expand a SLURM hostlist (`gpu[01-03,07],login1`, `r[1-2]-n[1-2]`) into host names.

    Same rules as `scontrol show hostnames`: commas outside brackets separate items; each
    bracket group is a comma list of numbers or `lo-hi` ranges whose zero padding follows
    the width of `lo`; several groups in one item multiply out left to right. Implemented
    here so that dry runs and tests need no SLURM installation.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"empty hostlist {expr!r}")
    hosts: list[str] = []
    for item in _split_top_level(expr.strip(), expr):
        hosts.extend(_expand_item(item, expr))
    return hosts


def _split_top_level(text: str, expr: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {expr!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
    items.append(text[start:])
    for item in items:
        if not item.strip():
            raise ValueError(f"empty item in hostlist {expr!r}")
    return [item.strip() for item in items]


def _expand_item(item: str, expr: str) -> list[str]:
    # Split "pre[1-2]mid[3]post" into literal and bracket parts, then take the product.
    parts = re.split(r"(\[[^\]]*\])", item)
    names = [""]
    for part in parts:
        if part.startswith("["):
            choices = _expand_ranges(part[1:-1], expr)
        else:
            choices = [part]
        names = [n + c for n in names for c in choices]
    return names


def _expand_ranges(body: str, expr: str) -> list[str]:
    out: list[str] = []
    for rng in body.split(","):
        rng = rng.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", rng)
        if not m:
            raise ValueError(f"bad range {rng!r} in hostlist {expr!r} (expected N or LO-HI)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"range {rng!r} runs backwards in hostlist {expr!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def slurm_master_port(job_id: str | int) -> int:
    """Port for a SLURM job's rendezvous: derived from the job id so two jobs sharing a node
    do not collide, and stable across requeues (same job id). The sbatch scripts use the
    same rule (20000 + id % 20000)."""
    return 20000 + int(job_id) % 20000



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gigamim.runtime.hostlist",
                                     description="Expand a SLURM hostlist, one host per line.")
    parser.add_argument("expr", help="e.g. 'gpu[01-03,07]'")
    parser.add_argument("--first", action="store_true", help="print only the first host (the master)")
    parser.add_argument("--count", action="store_true", help="print only the number of hosts")
    args = parser.parse_args(argv)
    try:
        hosts = expand_hostlist(args.expr)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(len(hosts) if args.count else "\n".join(hosts[:1] if args.first else hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
