"""Seeds for one place in a run — a sample in an epoch, a micro-batch, a shard order — hashed from
the run's seed and the place's coordinates.

A linear mix such as ``seed * 1_000_003 + epoch * 7_919 + index`` (what albef used before) gives
equal seeds to different places: sample ``i + 7_919`` of one epoch and sample ``i`` of the next
drew the same augmentation, and the run with seed 1 replayed the run with seed 0 shifted by a
million samples. A hash has no such structure: two places share a seed by a 2**-63 chance. Each
use names its own ``domain``, so equal coordinates in different uses give unrelated seeds too.

Example:
    >>> mix_seed("sample", 0, 1, 5) == mix_seed("sample", 0, 1, 5)
    True
    >>> mix_seed("sample", 0, 1, 5) == mix_seed("sample", 0, 0, 5 + 7_919)
    False
    >>> 0 <= mix_seed("micro", 0, 0, 0, 0) < 2**63
    True
"""

from __future__ import annotations

import hashlib
import struct


def mix_seed(domain: str, *parts: int) -> int:
    """A seed in ``[0, 2**63)`` from a short name of its use (at most 16 bytes) and integers
    (each within a signed 64-bit range). The same arguments give the same seed on any machine and
    Python version (BLAKE2b, not ``hash()``)."""
    name = domain.encode()
    if len(name) > 16:
        raise ValueError(f"seed domain {domain!r} is longer than 16 bytes")
    data = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=name).digest(), "little") >> 1
