"""Seeds for one place in a run — a sample in an epoch, a micro-batch, a shard order — hashed from
the run's seed and the place's coordinates.

A linear mix such as ``seed * 1_000_003 + epoch * 7_919 + index`` gives equal seeds to different
places by construction: sample ``i + 7_919`` of one epoch and sample ``i`` of the next would draw
the same augmentation, and the run with seed 1 would replay the run with seed 0 shifted by a
million samples. A hash has no such structure; each use names its own ``domain``,
so equal coordinates in different uses give unrelated seeds too. Two places can still share a
stream by chance: torch's CPU generator keeps only the low 32 bits of a seed (Mersenne Twister's
``init_with_uint32``), so among n seeds about n**2 / 2**33 pairs coincide, random pairs of
different samples rather than a pattern.

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
import operator
import struct

# Written into training checkpoints, so that a resume across a change of rule says so. 1: the
# linear mixes before this module; 2: mix_seed.
SEED_RULE = 2


def mix_seed(domain: str, *parts: int) -> int:
    """A seed in ``[0, 2**63)`` from a short name of its use (at most 16 bytes) and integers (any
    size: each is taken modulo 2**64; floats are refused). The same arguments give the same seed
    on any machine and Python version (BLAKE2b, not ``hash()``)."""
    name = domain.encode()
    if len(name) > 16:
        raise ValueError(f"seed domain {domain!r} is longer than 16 bytes")
    data = struct.pack(f"<{len(parts)}Q", *(operator.index(p) % 2**64 for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=name).digest(), "little") >> 1


def micro_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """The seed of one micro-batch's random draws (dropout, MLM masks, hard negatives); ``micro``
    numbers the micro-batches of a step across ranks."""
    return mix_seed("micro-batch", seed, epoch, step, micro)
