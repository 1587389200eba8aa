"""Per-place seeds (albef/seeding.py): no two places of a run, or of two runs, share one by construction."""

from __future__ import annotations

import pytest

from albef.data.pretrain import sample_seed
from albef.seeding import micro_seed, mix_seed


def test_the_linear_mixes_collisions_are_gone():
    # the old sample rule gave sample i + 7919 of epoch 0 the seed of sample i of epoch 1, and
    # seed 1's samples those of seed 0 shifted by 1_000_003
    assert all(sample_seed(0, 1, i) != sample_seed(0, 0, i + 7_919) for i in range(1000))
    assert all(sample_seed(1, 0, i) != sample_seed(0, 0, i + 1_000_003) for i in range(1000))
    # the old micro-batch rule: (epoch 1, step s, micro m) == (epoch 0, step s + 99, micro m + 112)
    assert micro_seed(0, 1, 5, 0) != micro_seed(0, 0, 104, 112)
    # torch's CPU generator keeps the low 32 bits of a seed: the structured pairs differ there too
    low = 0xFFFFFFFF
    assert sum(sample_seed(0, 1, i) & low == sample_seed(0, 0, i + 7_919) & low for i in range(1000)) == 0


def test_seeds_are_distinct_over_a_run_and_across_uses():
    micro = {micro_seed(0, e, s, m) for e in range(3) for s in range(300) for m in range(64)}
    assert len(micro) == 3 * 300 * 64
    samples = {sample_seed(s, e, i) for s in range(2) for e in range(3) for i in range(20_000)}
    assert len(samples) == 2 * 3 * 20_000
    assert not micro & samples  # the same numbers in different uses give unrelated seeds
    assert mix_seed("shard-order", 0, 1) != mix_seed("sample-order", 0, 1)
    assert all(0 <= x < 2**63 for x in list(micro)[:1000])


def test_seeds_stay_what_they_were():
    """Seeds must not change between versions, or a resumed run would draw other samples and
    masks than it started with: two values recorded when the rule was introduced."""
    assert mix_seed("sample", 3, 1, 12345) == 5222220097092346122
    assert micro_seed(0, 0, 0, 0) == mix_seed("micro-batch", 0, 0, 0, 0) == 2609209917050090840


def test_any_integer_is_taken_and_floats_are_refused():
    assert mix_seed("x", -1) == mix_seed("x", 2**64 - 1)  # modulo 2**64, as a uint64 seed would be
    assert 0 <= mix_seed("x", 2**70, True) < 2**63
    with pytest.raises(TypeError):
        mix_seed("x", 1.5)


def test_a_domain_name_too_long_for_blake2b_is_refused():
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        mix_seed("a-very-long-domain-name", 1)
