"""FSDP (train.fsdp): 2 gloo ranks train like DDP; a checkpoint saved on 2 ranks resumes on 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from albef.data.cli import write_shapes
from albef.recipes import load_recipe
from albef.training.fsdp import clip_grad_norm
from albef.training.loop import TrainRun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # torchrun or torch.multiprocessing, 2 gloo ranks

ROOT = Path(__file__).resolve().parents[1]


def _args(data: Path, out: Path, steps: int, **extra) -> list[str]:
    base = {
        "model.preset": "albef-tiny",
        "model.overrides": "{queue_size: 32}",
        "data.train_files": f"[{data / 'pretrain.json'}]",
        "data.image_root": str(data),
        "data.num_workers": 0,
        "train.batch_size": 4,
        "train.epochs": 2,
        "train.max_steps": steps,
        "train.seed": 3,
        "train.log_every": 1,
        "train.checkpoint_every": 0,
        "train.device": "cpu",
        "output_dir": str(out),
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "albef.cli",
        "pretrain",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_fsdp_trains_like_ddp_and_resumes_on_one_process(tmp_path):
    data = tmp_path / "data"
    write_shapes(data, n=64, image_size=32, seed=1)
    _torchrun(_args(data, tmp_path / "ddp", 8))
    _torchrun(_args(data, tmp_path / "fsdp", 5, train__fsdp="true"))
    ddp, fsdp = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4, 5]
    for step, row in fsdp.items():
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert row[k] == pytest.approx(ddp[step][k], abs=1e-4), (step, k)
    # the 2-rank sharded checkpoint continues in one process (same global batch by accumulation)
    TrainRun(load_recipe(None, _args(data, tmp_path / "fsdp", 8, train__grad_accum=2)), resume=True).fit()
    resumed = _metrics(tmp_path / "fsdp")
    assert sorted(resumed) == list(range(1, 9))
    for step in (6, 7, 8):
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert resumed[step][k] == pytest.approx(ddp[step][k], abs=1e-4), (step, k)


def test_fsdp_clips_gradients_like_one_process(tmp_path):
    """train.max_grad_norm under FSDP: the norm spans the shards on both ranks and the replicated
    parameters once, so 2 sharded ranks clip exactly as one process with the same global batch."""
    data = tmp_path / "data"
    write_shapes(data, n=64, image_size=32, seed=1)
    clip = {"train__max_grad_norm": 0.5}  # below every step's norm, so every step is clipped
    _torchrun(_args(data, tmp_path / "fsdp", 4, train__fsdp="true", **clip))
    TrainRun(load_recipe(None, _args(data, tmp_path / "one", 4, train__grad_accum=2, **clip))).fit()
    fsdp, one = _metrics(tmp_path / "fsdp"), _metrics(tmp_path / "one")
    for step in range(1, 5):
        assert one[step]["grad_norm"] > 0.5, step
        # the norm over both ranks' shards and the replicated parameters is the whole model's
        assert fsdp[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4), step
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert fsdp[step][k] == pytest.approx(one[step][k], abs=1e-4), (step, k)


def _clip_worker(rank: int, world: int, init: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        ref.load_state_dict(model.state_dict())
        fully_shard(model[0], mesh=init_device_mesh("cpu", (world,)))  # model[2] stays replicated
        x = torch.randn(4, 6)  # the same on both ranks, so the averaged gradients are one process's
        model(x).square().sum().backward()
        ref(x).square().sum().backward()
        assert isinstance(model[0].weight.grad, DTensor) and not isinstance(model[2].weight.grad, DTensor)
        total = clip_grad_norm(model.parameters(), 0.1)
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        assert expected > 0.1  # the clipping is active
        torch.testing.assert_close(total, expected)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):  # the clipped gradients themselves
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(g, q.grad)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    # passed: leave without the interpreter's teardown, where a gloo/mesh thread still joinable
    # aborts the process now and then ("terminate called without an active exception")
    os._exit(0)


def test_clip_grad_norm_over_shards_equals_torch_on_the_whole_model(tmp_path):
    mp.spawn(_clip_worker, args=(2, f"file://{tmp_path / 'rendezvous'}"), nprocs=2)
