"""End-to-end pretraining runs on generated images: torchrun vs one process, resume, bad data, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef.checkpoints.files import load_checkpoint, save_checkpoint
from albef.cli import main as cli_main
from albef.data.annotations import BadDataError
from albef.data.cli import write_shapes
from albef.recipes import load_recipe
from albef.training.loop import TrainRun, load_trainer_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.preset": "albef-tiny",
        "model.overrides": "{queue_size: 32}",
        "data.train_files": f"[{data / 'pretrain.json'}]",
        "data.image_root": str(data),
        "data.num_workers": 0,
        "data.crop_scale": "[0.5, 1.0]",
        "data.min_seen_for_bad_check": 16,
        "train.batch_size": 4,
        "train.epochs": 2,
        "train.lr": 1e-3,
        "train.warmup_lr": 1e-4,
        "train.warmup_epochs": 2,
        "train.seed": 3,
        "train.log_every": 1,
        "train.checkpoint_every": 0,
        "output_dir": str(out),
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes(d, n=64, image_size=32, seed=1)
    return d


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_equal_one_process_with_accumulation(shapes, tmp_path):
    """Same global batch (8) and seed: 2 ranks x 4 == 1 process x 4 x 2 accumulation steps."""
    steps = 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ddp = tmp_path / "ddp"
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
        *_overrides(shapes, ddp, train__max_steps=steps, train__device="cpu"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = tmp_path / "single"
    recipe = load_recipe(None, _overrides(shapes, single, train__max_steps=steps, train__grad_accum=2))
    TrainRun(recipe).fit()

    a, b = _losses(ddp), _losses(single)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm", "lr", "alpha"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)
    qa = load_checkpoint(ddp / "checkpoint_last.pt")["model"]
    qb = load_checkpoint(single / "checkpoint_last.pt")["model"]
    for k in ("queue.image_queue", "queue.text_queue", "queue.queue_ptr"):
        torch.testing.assert_close(qa[k], qb[k], atol=1e-5, rtol=0)
    assert int(qa["queue.queue_ptr"]) == (steps * 8) % 32


@pytest.mark.slow
def test_resume_continues_exactly(shapes, tmp_path):
    total, stop = 20, 7  # 16 steps per epoch: the resumed part crosses an epoch boundary
    straight = tmp_path / "straight"
    TrainRun(load_recipe(None, _overrides(shapes, straight, train__max_steps=total))).fit()
    split = tmp_path / "split"
    TrainRun(load_recipe(None, _overrides(shapes, split, train__max_steps=stop))).fit()
    assert load_checkpoint(split / "checkpoint_last.pt")["state"]["global_step"] == stop
    TrainRun(load_recipe(None, _overrides(shapes, split, train__max_steps=total)), resume=True).fit()

    a = load_checkpoint(straight / "checkpoint_last.pt")
    b = load_checkpoint(split / "checkpoint_last.pt")
    assert a["state"] == b["state"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=0, msg=k)
    # the metrics of the resumed run continue without duplicate steps
    assert [r["step"] for r in _losses(split)] == list(range(1, total + 1))


def test_bad_images_are_skipped_and_counted_then_limit_stops(tmp_path):
    data = tmp_path / "data"
    write_shapes(data, n=60, image_size=32, corrupt=3)
    out = tmp_path / "ok"
    summary = TrainRun(load_recipe(None, _overrides(data, out, train__epochs=1, data__max_bad_fraction=0.2))).fit()
    assert summary["bad_samples"] >= 1
    logged = (out / "bad_samples.txt").read_text()
    assert "missing_002.png" in logged or "bad_001.png" in logged
    assert "bad_000.png" not in logged  # a truncated PNG trains as far as it goes, as the authors'
    strict = tmp_path / "no_truncated"
    over = _overrides(data, strict, train__epochs=1, data__max_bad_fraction=0.2, data__load_truncated_images=False)
    TrainRun(load_recipe(None, over)).fit()
    assert "bad_000.png" in (strict / "bad_samples.txt").read_text()
    with pytest.raises(BadDataError, match=r"more than the limit(.|\n)*\.png"):
        TrainRun(
            load_recipe(None, _overrides(data, tmp_path / "strict", train__epochs=1, data__max_bad_fraction=0.001))
        ).fit()


def test_cli_pretrain_writes_metrics_plot_and_a_loadable_checkpoint(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(
        [
            "pretrain",
            "--config",
            str(ROOT / "recipes" / "pretrain_cpu_tiny.yaml"),
            *_overrides(shapes, out, train__max_steps=4),
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 4
    for name in ("metrics.jsonl", "metrics.csv", "loss_curves.png", "checkpoint_last.pt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "tensorboard").iterdir())
    trainer = load_trainer_from_checkpoint(out / "checkpoint_last.pt")
    model = trainer.model.eval()
    ids = torch.tensor([[101, 1037, 2417, 4418]])
    with torch.no_grad():
        p = model.match(torch.zeros(1, 3, 32, 32), ids, torch.ones_like(ids))
    assert 0 <= p.item() <= 1


def test_queue_must_be_a_multiple_of_the_global_batch(shapes, tmp_path):
    with pytest.raises(ValueError, match="queue_size 30 is not a multiple of the global batch 8"):
        TrainRun(
            load_recipe(None, _overrides(shapes, tmp_path, model__overrides="{queue_size: 30}", train__grad_accum=2))
        )


def test_resume_refuses_another_global_batch(shapes, tmp_path):
    out = tmp_path / "run"
    TrainRun(load_recipe(None, _overrides(shapes, out, train__max_steps=2))).fit()
    with pytest.raises(ValueError, match="global_batch 4, this run has 8"):
        TrainRun(load_recipe(None, _overrides(shapes, out, train__max_steps=4, train__grad_accum=2)), resume=True)


def test_resume_across_a_change_of_seed_rule_warns(shapes, tmp_path, caplog):
    """A checkpoint from before albef/seeding.py (no seed_rule in its geometry) resumes, saying
    that the draws from there on are not the uninterrupted run's; one of this version does not."""
    out = tmp_path / "run"
    TrainRun(load_recipe(None, _overrides(shapes, out, train__max_steps=2))).fit()
    path = out / "checkpoint_last.pt"
    with caplog.at_level("WARNING", logger="albef.train"):
        TrainRun(load_recipe(None, _overrides(shapes, out, train__max_steps=3)), resume=True)
    assert "seed rule" not in caplog.text
    ckpt = load_checkpoint(path)
    assert ckpt["geometry"].pop("seed_rule") == 2
    save_checkpoint(ckpt, path)
    with caplog.at_level("WARNING", logger="albef.train"):
        TrainRun(load_recipe(None, _overrides(shapes, out, train__max_steps=3)), resume=True)
    assert "seed rule 1, or before checkpoints recorded it (this one: 2)" in caplog.text


def test_lr_scale_zero_freezes_the_text_side_only(shapes, tmp_path):
    """train.lr_scale from the command line: text_encoder at 0 stays where it started (so its
    momentum copy equals it), while the vision side moves away from its momentum copy."""
    out = tmp_path / "run"
    assert (
        cli_main(["pretrain", *_overrides(shapes, out, train__max_steps=3, train__lr_scale="{text_encoder: 0.0}")]) == 0
    )
    trainer = load_trainer_from_checkpoint(out / "checkpoint_last.pt")
    student, teacher = trainer.model.state_dict(), trainer.model_m.state_dict()
    text = [k for k in student if k.startswith("text_encoder.") and k in teacher]
    vision = [k for k in student if k.startswith("visual_encoder.") and k in teacher]
    assert text and vision
    assert all(torch.equal(student[k], teacher[k]) for k in text)
    assert not all(torch.equal(student[k], teacher[k]) for k in vision)


def test_resume_refuses_another_lr_scale(shapes, tmp_path):
    """The optimizer's groups follow train.lr_scale: a checkpoint resumes only with the same one."""
    out = tmp_path / "run"
    TrainRun(
        load_recipe(None, _overrides(shapes, out, train__max_steps=2, train__lr_scale="{text_encoder: 0.1}"))
    ).fit()
    for other in ("{text_encoder: 0.5}", "{}"):
        recipe = load_recipe(None, _overrides(shapes, out, train__max_steps=4, train__lr_scale=other))
        with pytest.raises(ValueError, match="lr_scale"):
            TrainRun(recipe, resume=True)
    TrainRun(
        load_recipe(None, _overrides(shapes, out, train__max_steps=4, train__lr_scale="{text_encoder: 0.1}")),
        resume=True,
    ).fit()
    assert [r["step"] for r in _losses(out)] == [1, 2, 3, 4]


def test_authors_recipes_run_in_float32_with_tf32_on_gpu():
    """The recipes that mirror the authors' configs train as they did: float32 (PyTorch 1.8's TF32
    matmuls on Ampere GPUs); bf16 is an override."""
    from pathlib import Path

    from albef.precision import set_tf32
    from albef.recipes import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    full = [p for p in root.glob("*.yaml") if "cpu" not in p.name]
    assert len(full) >= 9
    for p in full:
        r = load_recipe(p)
        assert (r.train.precision, r.train.tf32) == ("fp32", True), p.name
    assert load_recipe(full[0], ["train.precision=bf16"]).train.precision == "bf16"
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
