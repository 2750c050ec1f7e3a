"""Byte sizes as people write them: '500M', '1.5GB', '2GiB', '4096'."""

from __future__ import annotations

import argparse
import re


class SizeError(argparse.ArgumentTypeError, ValueError):
    """An unreadable size. argparse shows its message for `type=parse_size` options;
    everything else can catch it as a ValueError."""


def parse_size(text: str | int | None) -> int | None:
    """'500M', '1.5GB', '4096' -> bytes (powers of 1000 for K/M/G/T, 1024 for Ki/Mi/Gi/Ti;
    the trailing B is optional, case does not matter). None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)([iI]?)[bB]?\s*", str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise SizeError(f"cannot parse size {text!r} (examples: 4096, 500M, 5GB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index((m.group(2) or " ").lower()))
