"""A deterministic, resumable sampler of global batches split into per-rank micro-batches.

Each epoch draws one permutation from ``(seed, epoch)``. Optimizer step ``t`` consumes the
global batch ``perm[t*G : (t+1)*G]`` (``G = micro_batch * world_size * grad_accum``); rank
``r``'s ``j``-th micro-batch is slice ``r * grad_accum + j`` of it. So the samples of a step, and
their order, depend only on the seed, the epoch and the global batch — one process with
``grad_accum = 2`` sees exactly what two processes with ``grad_accum = 1`` see together — and a
resumed run restarts at any step without reading the skipped data. The incomplete last batch
is dropped, as the reference does (and as the feature queue requires).

``group_size`` > 1 shuffles runs of that many consecutive samples as units (the samples of a run
stay together and in order; a global batch must hold whole runs): data written in groups that
belong in one batch, such as a scene and its sibling in :mod:`albef.data.scenes`, meet there.
The authors shuffle single samples (``group_size=1``, the default).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from albef.seeding import mix_seed


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices) for one epoch.

    Example:
        >>> s = GlobalBatchSampler(10, micro_batch=2, world_size=2, rank=1, grad_accum=1, seed=0)
        >>> len(s), s.steps_per_epoch
        (2, 2)
    """

    def __init__(
        self,
        dataset_size: int,
        micro_batch: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        group_size: int = 1,
    ):
        if micro_batch < 1 or grad_accum < 1 or not 0 <= rank < world_size or group_size < 1:
            raise ValueError(
                f"bad sampler setup: micro_batch={micro_batch} grad_accum={grad_accum} "
                f"rank={rank} world_size={world_size} group_size={group_size}"
            )
        if micro_batch % group_size:
            raise ValueError(
                f"data.group_size={group_size} must divide the batch size per rank ({micro_batch}): "
                "a group is kept in one micro-batch"
            )
        self.n, self.micro_batch, self.world_size, self.rank = dataset_size, micro_batch, world_size, rank
        self.grad_accum, self.seed, self.shuffle, self.group_size = grad_accum, seed, shuffle, group_size
        self.global_batch = micro_batch * world_size * grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch "
                f"({self.global_batch} = {micro_batch} per rank x {world_size} ranks x "
                f"{grad_accum} accumulation steps)"
            )
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.group_size * self.group_size // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed("sample-order", self.seed, self.epoch))
            if self.group_size == 1:
                perm = torch.randperm(self.n, generator=g)
            else:  # whole groups shuffled; a last incomplete group is dropped with the last batch
                groups = torch.randperm(self.n // self.group_size, generator=g)
                perm = (groups[:, None] * self.group_size + torch.arange(self.group_size)).reshape(-1)
        else:
            perm = torch.arange(self.n)
        b = self.micro_batch
        for step in range(self.start_step, self.steps_per_epoch):
            batch = perm[step * self.global_batch : (step + 1) * self.global_batch]
            for j in range(self.grad_accum):
                k = self.rank * self.grad_accum + j
                yield batch[k * b : (k + 1) * b].tolist()
