"""Per-sample random streams derived from names, not from process state.

Every random choice the data path makes (which crop, whether to flip, which mask
cells) comes from a generator seeded by a hash of (seed, epoch, sample key, ...).
That is what makes crops and masks independent of the worker count and of where
a run was resumed: no worker-local RNG state is ever consumed.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any printable parts (stable across processes and Python runs,
    unlike `hash()`, which is salted per process)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def sample_rng(*parts: object) -> random.Random:
    """A `random.Random` for one sample; cheap to create (a few microseconds)."""
    return random.Random(derive_seed(*parts))
