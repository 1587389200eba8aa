"""FSDP (train.fsdp): 2 gloo ranks train like DDP; a checkpoint saved on 2 ranks resumes on 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from albef.data.cli import write_shapes
from albef.recipes import load_recipe
from albef.training.loop import PretrainRun

ROOT = Path(__file__).resolve().parents[1]


def _args(data: Path, out: Path, steps: int, **extra) -> list[str]:
    base = {"model.preset": "albef-tiny", "model.overrides": "{queue_size: 32}",
            "data.train_files": f"[{data / 'pretrain.json'}]", "data.image_root": str(data), "data.num_workers": 0,
            "train.batch_size": 4, "train.epochs": 2, "train.max_steps": steps, "train.seed": 3,
            "train.log_every": 1, "train.checkpoint_every": 0, "train.device": "cpu", "output_dir": str(out)}
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "albef.cli", "pretrain", *args]
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
    PretrainRun(load_recipe(None, _args(data, tmp_path / "fsdp", 8, train__grad_accum=2)), resume=True).fit()
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
    PretrainRun(load_recipe(None, _args(data, tmp_path / "one", 4, train__grad_accum=2, **clip))).fit()
    fsdp, one = _metrics(tmp_path / "fsdp"), _metrics(tmp_path / "one")
    for step in range(1, 5):
        assert one[step]["grad_norm"] > 0.5, step
        # the norm over both ranks' shards and the replicated parameters is the whole model's
        assert fsdp[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4), step
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert fsdp[step][k] == pytest.approx(one[step][k], abs=1e-4), (step, k)
