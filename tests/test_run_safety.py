"""Nothing is lost: a run is never overwritten unless asked, checkpoint damage is detected and the
previous checkpoint takes over, unsafe or non-finite checkpoints are refused, and recipe values are
checked before any work. Each test meets the problem the way a user (or an attacker) would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from albef.checkpoints.files import CheckpointError, load_checkpoint, save_checkpoint
from albef.cli import main as cli_main
from albef.data.cli import write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes(d, n=16, image_size=32, seed=1)
    return d


def _args(data: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
    return [
        "pretrain",
        "model.preset=albef-tiny",
        "model.overrides={queue_size: 32}",
        f"data.train_files=[{data / 'pretrain.json'}]",
        f"data.image_root={data}",
        "data.num_workers=0",
        "train.batch_size=4",
        f"train.max_steps={steps}",
        "train.checkpoint_every=1",
        "train.log_every=1",
        "train.device=cpu",
        f"output_dir={out}",
        *extra,
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _step(folder: Path, name: str = "checkpoint_last.pt") -> int:
    return load_checkpoint(folder / name)["state"]["global_step"]


@pytest.fixture
def finished(shapes, tmp_path):
    """A finished 3-step run (and its files' bytes)."""
    out = tmp_path / "run"
    assert cli_main(_args(shapes, out, 3)) == 0
    return out, _snapshot(out)


def test_the_same_command_again_refuses_and_changes_nothing(shapes, finished, capsys):
    out, before = finished
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(_args(shapes, out, 3))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before


def test_a_resume_path_that_does_not_exist_is_an_error(shapes, finished, capsys):
    out, before = finished
    with pytest.raises(SystemExit):
        cli_main(_args(shapes, out, 5) + ["--resume", str(out / "checkpoint_lsat.pt")])
    assert "checkpoint_lsat.pt: no such checkpoint file" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_never_swallows_an_override(shapes, finished, tmp_path):
    """`--resume output_dir=X` resumes the run in X; the recipe's own folder is not touched."""
    out, _ = finished
    recipe_dir = tmp_path / "recipe_default"
    assert cli_main(_args(shapes, recipe_dir, 2)) == 0
    before = _snapshot(recipe_dir)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"output_dir: {recipe_dir}\n")
    args = _args(shapes, out, 5)
    args.remove(f"output_dir={out}")
    assert cli_main(["pretrain", "--config", str(cfg), *args[1:], "--resume", f"output_dir={out}"]) == 0
    assert _step(out) == 5  # continued from step 3, not started over
    assert _snapshot(recipe_dir) == before


def test_overwrite_starts_over(shapes, finished):
    out, _ = finished
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    assert cli_main(_args(shapes, out, 2) + ["--overwrite"]) == 0
    assert _step(out) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"


def test_the_previous_checkpoint_is_kept_and_takes_over_when_the_last_is_damaged(shapes, finished):
    out, _ = finished
    assert _step(out) == 3 and _step(out, "checkpoint_prev.pt") == 2
    # one flipped bit in the middle of the last checkpoint: its record's CRC-32 no longer matches
    data = bytearray((out / "checkpoint_last.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (out / "checkpoint_last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32"):
        load_checkpoint(out / "checkpoint_last.pt")
    assert cli_main(_args(shapes, out, 4) + ["--resume"]) == 0  # warns, resumes from step 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert _step(out) == 4
    assert _step(out, "checkpoint_prev.pt") == 3  # the damaged file was replaced, never kept as "previous"


def test_stale_temp_files_of_killed_writes_are_removed(shapes, finished):
    out, _ = finished
    dead = out / ".checkpoint_last.pt.tmp-999999999"  # no such process
    dead.write_bytes(b"x" * 1000)
    mine = out / f".checkpoint_last.pt.tmp-{os.getppid()}"  # a live process's write in progress: kept
    mine.write_bytes(b"y")
    assert cli_main(_args(shapes, out, 4) + ["--resume"]) == 0
    assert not dead.exists() and mine.exists()


def test_a_malicious_checkpoint_is_refused_without_running_it(shapes, tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "state": Evil()}, evil)
    with pytest.raises(SystemExit):
        cli_main(_args(shapes, tmp_path / "run", 2) + ["--resume", str(evil)])
    err = capsys.readouterr().err
    assert "refused for safety" in err and "posix.system" in err
    assert "weights_only=False" not in err and "trust" not in err
    assert not marker.exists()


def test_non_finite_weights_are_refused_naming_them(tmp_path):
    sd = {"w": torch.ones(3), "b": torch.tensor([0.0, float("nan")]), "n": torch.tensor([3])}
    save_checkpoint({"model": sd}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in b"):
        load_checkpoint(tmp_path / "c.pt")
    assert torch.isnan(load_checkpoint(tmp_path / "c.pt", allow_nonfinite=True)["model"]["b"][1])


@pytest.mark.parametrize(
    "override, says",
    [
        ("train.itc='false'", "train.itc: 'false' is not allowed; give true or false"),
        ("train.epochs=-1", "train.epochs = -1: must be an integer >= 1"),
        ("train.max_steps=0", "train.max_steps = 0: must be null"),
        ("data.max_bad_fraction=-1", "data.max_bad_fraction = -1.0: must be a fraction in [0, 1]"),
        ("train.checkpoint_every=-5", "train.checkpoint_every = -5: must be an integer >= 0"),
        (
            "data.crop_scale=[1.0,0.2]",
            "data.crop_scale = [1.0, 0.2]: must be null (the task's) or [low, high] with 0 < low <= high <= 1",
        ),
        ("train.lr=", "train.lr: empty is not allowed; give a number"),
        ("train.batch_size=-4", "train.batch_size = -4: must be an integer >= 1"),
        ("train.precision=fp8", "train.precision: 'fp8' is not allowed; give fp32 / bf16 / fp16"),
        # a list the shell split at its space
        ("data.train_files=[a.json,", "override 'data.train_files=[a.json,': the value is not valid YAML"),
        ("model.overrides.vision.widht=384", "unknown vision config keys ['widht']; vision takes"),
    ],
)
def test_recipe_values_are_checked_before_any_work(shapes, tmp_path, capsys, override, says):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli_main(_args(shapes, out, 2, override))
    assert e.value.code == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(shapes, finished, capsys):
    """--overwrite clears the old run only once the new recipe's data and weights have been read."""
    out, before = finished
    for bad in ("data.train_files=[/no/such/file.json]", "model.overrides.text.num_layerz=2"):
        with pytest.raises(SystemExit) as e:
            cli_main(_args(shapes, out, 2, bad) + ["--overwrite"])
        assert e.value.code == 2
        assert _snapshot(out) == before, bad


def test_resume_with_another_model_config_names_what_differs(shapes, finished, capsys):
    out, before = finished
    with pytest.raises(SystemExit):
        cli_main(_args(shapes, out, 5, "model.overrides={queue_size: 64}") + ["--resume"])
    err = capsys.readouterr().err
    assert "was written for another model config (queue_size: 32 in the checkpoint, 64 here)" in err, err
    assert _snapshot(out) == before


def test_resume_from_weights_that_are_not_a_run_says_to_use_model_init(shapes, finished, tmp_path, capsys):
    out, before = finished
    weights = tmp_path / "weights.pt"
    save_checkpoint({"model": load_checkpoint(out / "checkpoint_last.pt")["model"]}, weights)
    with pytest.raises(SystemExit):
        cli_main(_args(shapes, tmp_path / "fresh", 5) + ["--resume", str(weights)])
    err = capsys.readouterr().err
    assert f"{weights} is not a training checkpoint" in err and "model.init" in err, err
    assert not (tmp_path / "fresh" / "checkpoint_last.pt").exists()


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(shapes, finished, tmp_path, capsys):
    out, before = finished
    other = tmp_path / "other"
    assert cli_main(_args(shapes, other, 2)) == 0
    with pytest.raises(SystemExit):
        cli_main(_args(shapes, out, 5) + ["--resume", str(other / "checkpoint_last.pt")])
    assert "--resume names another run's checkpoint" in capsys.readouterr().err
    assert _snapshot(out) == before
    # into an empty folder it continues from there
    assert cli_main(_args(shapes, tmp_path / "fresh", 4) + ["--resume", str(other / "checkpoint_last.pt")]) == 0
    assert _step(tmp_path / "fresh") == 4
