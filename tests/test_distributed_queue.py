"""Queue enqueue all-gathers the global batch across gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from albef.training.momentum import FeatureQueue

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        q = FeatureQueue(embed_dim=3, size=8, with_idx=True)  # same init on every rank
        img = torch.full((2, 3), float(rank + 1))
        txt = -img
        q.enqueue(img, txt, torch.tensor([10 * rank, 10 * rank + 1]))
        torch.save({k: v for k, v in q.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_enqueue_gathers_every_rank(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for s in states:  # every rank holds the same queue, with rank 0's features first
        assert s["queue_ptr"].item() == 4
        torch.testing.assert_close(s["image_queue"][:, :4], torch.tensor([[1.0] * 2 + [2.0] * 2] * 3))
        torch.testing.assert_close(s["text_queue"][:, :4], -s["image_queue"][:, :4])
        assert s["idx_queue"][0, :4].tolist() == [0, 1, 10, 11]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
