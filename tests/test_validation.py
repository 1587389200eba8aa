"""Validation after each fine-tuning epoch and the best epoch's checkpoint, as the authors keep it:
the logged metrics are the ones `albef evaluate` computes, checkpoint_best.pt is the best epoch
(first of equals, the authors' strict ">"), and `albef evaluate RUN_DIR` reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef.checkpoints.files import load_checkpoint
from albef.cli import main as cli_main
from albef.data.cli import write_shapes

from helpers import bare_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    write_shapes(d, n=16, image_size=32, seed=7, test=8)
    return d


def _args(task: str, data: Path, out: Path, train: str, val: str, *extra: str) -> list[str]:
    return [
        "finetune",
        task,
        "--config",
        bare_recipe(out.parent, task),
        "model.preset=albef-tiny",
        "model.overrides={queue_size: 16}",
        f"data.train_files=[{data / train}]",
        f"data.val_files=[{data / val}]",
        f"data.image_root={data}",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.epochs=3",
        "train.lr=1e-3",
        "train.warmup_lr=1e-3",
        "train.warmup_epochs=1",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.seed=1",
        "train.device=cpu",
        f"output_dir={out}",
        *extra,
    ]


def _val_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"]


def test_ve_keeps_the_best_epoch_and_evaluate_reads_it(data, tmp_path, capsys):
    out = tmp_path / "ve"
    assert cli_main(_args("ve", data, out, "ve_train.json", "ve_train.json")) == 0
    rows = _val_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    accs = [r["accuracy"] for r in rows]
    best = accs.index(max(accs)) + 1  # the first epoch with the top score
    assert rows[-1]["best_epoch"] == best
    best_ckpt, last_ckpt = load_checkpoint(out / "checkpoint_best.pt"), load_checkpoint(out / "checkpoint_last.pt")
    assert best_ckpt["state"]["epoch"] == best and best_ckpt["state"]["best_metric"] == max(accs)
    assert last_ckpt["state"]["epoch"] == 3
    capsys.readouterr()
    # `albef evaluate` on the run folder scores checkpoint_best.pt, and gets the logged accuracy
    assert (
        cli_main(
            [
                "evaluate",
                "ve",
                "--model",
                str(out),
                "--data",
                str(data / "ve_train.json"),
                "--image-root",
                str(data),
                "--out",
                str(tmp_path / "scores" / "m.json"),  # its folder is made before the scoring, not after
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "checkpoint_best.pt" in capsys.readouterr().err
    assert json.loads((tmp_path / "scores" / "m.json").read_text())["accuracy"] == pytest.approx(max(accs), abs=1e-9)
    ve = ["evaluate", "ve", "--model", str(out), "--data", str(data / "ve_train.json")]
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path"):  # before the model is loaded
        cli_main([*ve, "--out", str(tmp_path)])
    scores = (tmp_path / "scores" / "m.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite to replace it"):  # the earlier scores are kept
        cli_main([*ve, "--out", str(tmp_path / "scores" / "m.json"), "--image-root", str(data)])
    assert (tmp_path / "scores" / "m.json").read_text() == scores
    assert "checkpoint_best.pt" not in capsys.readouterr().err  # refused before the model was looked for


def test_retrieval_validation_is_the_two_stage_r_mean_of_albef_evaluate(data, tmp_path):
    out = tmp_path / "re"
    assert (
        cli_main(
            _args(
                "retrieval",
                data,
                out,
                "retrieval_train.json",
                "retrieval_test.json",
                "train.epochs=1",
                "train.k_test=4",
            )
        )
        == 0
    )
    (row,) = _val_rows(out)
    assert (
        cli_main(
            [
                "evaluate",
                "retrieval",
                "--model",
                str(out / "checkpoint_last.pt"),
                "--data",
                str(data / "retrieval_test.json"),
                "--image-root",
                str(data),
                "--k",
                "4",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "r.json").read_text())
    assert row["r_mean"] == pytest.approx(res["itm"]["r_mean"], abs=1e-9)
    assert row["itc_r_mean"] == pytest.approx(res["itc"]["r_mean"], abs=1e-9)
    assert row["best_epoch"] == 1 and (out / "checkpoint_best.pt").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_validate_like_one_process(data, tmp_path):
    """Under torchrun each rank scores a share of the validation pairs; the gathered metrics are the
    one-process run's (same global batch through accumulation)."""
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
        *_args("ve", data, ddp, "ve_train.json", "ve_train.json", "train.batch_size=2", "train.epochs=2"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    assert (
        cli_main(
            _args(
                "ve",
                data,
                single,
                "ve_train.json",
                "ve_train.json",
                "train.batch_size=2",
                "train.grad_accum=2",
                "train.epochs=2",
            )
        )
        == 0
    )
    a, b = _val_rows(ddp), _val_rows(single)
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b] and len(a) == 2
    assert (ddp / "checkpoint_best.pt").exists()


def test_resume_keeps_the_best_so_far(data, tmp_path):
    out = tmp_path / "ve"
    assert cli_main(_args("ve", data, out, "ve_train.json", "ve_train.json", "train.epochs=1")) == 0
    first = load_checkpoint(out / "checkpoint_last.pt")["state"]
    assert cli_main(_args("ve", data, out, "ve_train.json", "ve_train.json", "train.epochs=2") + ["--resume"]) == 0
    rows = _val_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    state = load_checkpoint(out / "checkpoint_last.pt")["state"]
    expected = 2 if rows[1]["accuracy"] > first["best_metric"] else 1
    assert state["best_epoch"] == expected == load_checkpoint(out / "checkpoint_best.pt")["state"]["epoch"]


@pytest.mark.parametrize("task, train", [("vqa", "ve_train.json"), ("nlvr_pretrain", "pretrain.json")])
def test_tasks_without_a_validation_metric_refuse_val_files(data, tmp_path, capsys, task, train):
    with pytest.raises(SystemExit):
        cli_main(_args(task, data, tmp_path / "x", train, "ve_train.json"))
    assert "has no validation metric" in capsys.readouterr().err


def test_a_missing_validation_file_fails_before_training(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(_args("ve", data, tmp_path / "x", "ve_train.json", "nowhere.json"))
    assert "nowhere.json" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoint_last.pt").exists()


def test_a_wrong_select_metric_names_the_choices(data, tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        cli_main(
            _args(
                "ve",
                data,
                tmp_path / "x",
                "ve_train.json",
                "ve_train.json",
                "train.select_metric=r_mean",
                "train.epochs=1",
            )
        )
    torch.manual_seed(0)


@pytest.mark.parametrize("task,recipe", [("vqa", "recipes/vqa.yaml"), ("retrieval", "recipes/retrieval_coco.yaml")])
def test_finetuning_without_a_recipe_names_the_authors_one(task, recipe, tmp_path, capsys):
    # without --config the run would take the pretraining defaults, never the task's
    with pytest.raises(SystemExit):
        cli_main(["finetune", task, f"output_dir={tmp_path / 'x'}"])
    assert recipe in capsys.readouterr().err and not (tmp_path / "x").exists()


def _with_val_image(data: Path, tmp_path: Path, image: str) -> tuple[list[str], list[dict]]:
    """A SNLI-VE run whose first validation entry's image is ``image``: (its arguments, the entries)."""
    entries = json.loads((data / "ve_test.json").read_text())
    entries[0]["image"] = image
    (tmp_path / "val.json").write_text(json.dumps(entries))
    args = _args("ve", data, tmp_path / "x", "ve_train.json", "ve_test.json")
    args[args.index(f"data.val_files=[{data / 've_test.json'}]")] = f"data.val_files=[{tmp_path / 'val.json'}]"
    return args, entries


@pytest.mark.parametrize("damage", ["missing", "not an image", "cut short", "a JPEG cut short"])
def test_a_missing_or_damaged_validation_image_fails_before_training(data, tmp_path, capsys, damage):
    bad = tmp_path / ("broken.jpg" if "JPEG" in damage else "broken.png")
    if damage != "missing":
        from PIL import Image

        good = data / json.loads((data / "ve_test.json").read_text())[1]["image"]
        if "JPEG" in damage:  # read at an eighth of its size (PIL's draft), still to its last byte
            Image.open(good).convert("RGB").resize((256, 256)).save(tmp_path / "whole.jpg", quality=95)
            good = tmp_path / "whole.jpg"
        data_ = good.read_bytes()
        bad.write_bytes(b"not an image" if damage == "not an image" else data_[: len(data_) // 2])
    args, _ = _with_val_image(data, tmp_path, str(bad))
    with pytest.raises(SystemExit):
        cli_main(args)
    err = capsys.readouterr().err
    if damage == "missing":
        assert "1 validation image(s) not found" in err and bad.name in err and "data.val_image_root" in err
    else:
        assert "1 validation image(s) cannot be read" in err and bad.name in err and "drop their entries" in err
    assert not (tmp_path / "x" / "checkpoint_last.pt").exists()


def test_an_unreadable_validation_image_keeps_the_epochs_checkpoint(data, tmp_path, monkeypatch):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    args, entries = _with_val_image(data, tmp_path, str(bad))
    # an image that goes bad after the start-up check (a network file system, a disk error)
    monkeypatch.setattr("albef.training.validation.check_images", lambda paths: None)
    with pytest.raises(ValueError, match="broken.png"):
        cli_main(args)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "x" / "checkpoint_last.pt")  # epoch 1's training is not lost
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["global_step"] > 0
    assert ckpt["state"]["validation_pending"]
    # the image mended, --resume scores epoch 1 before it trains epoch 2: no epoch goes unvalidated
    bad.write_bytes((data / entries[1]["image"]).read_bytes())
    assert cli_main([*args, "--resume"]) == 0
    assert [r["epoch"] for r in _val_rows(tmp_path / "x")] == [1, 2, 3]
    assert not load_checkpoint(tmp_path / "x" / "checkpoint_last.pt")["state"]["validation_pending"]
