"""Every model-taking entry point (convert, predict, evaluate, serve, Pipeline.from_pretrained)
reads a training run's checkpoint or run folder with the config the run stored, and refuses a
bare state dict / an authors' checkpoint with a message naming the file and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from albef.api import Pipeline
from albef.checkpoints.convert import to_authors
from albef.checkpoints.files import load_checkpoint
from albef.checkpoints.pretrained import NotAModelError, from_pretrained
from albef.cli import main as cli_main
from albef.config import ALBEFConfig, get_preset
from albef.data.cli import write_shapes
from albef.models.albef import ALBEF
from albef.training.loop import load_trainer_from_checkpoint

# a tiny model that differs from its preset where a tensor cannot tell: heads, pooling, text length
OVERRIDES = "{queue_size: 16, text: {num_heads: 4}, vision: {num_heads: 4}, text_pooling: mean, max_text_len: 30}"
TEXTS = ["a red circle", "a blue square on the left", "two green triangles"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("modelpaths")
    write_shapes(d, n=16, image_size=32, seed=5, test=4)
    out = d / "run"
    rc = cli_main(
        [
            "pretrain",
            "model.preset=albef-tiny",
            f"model.overrides={OVERRIDES}",
            f"data.train_files=[{d / 'pretrain.json'}]",
            f"data.image_root={d}",
            "data.num_workers=0",
            "train.batch_size=4",
            "train.epochs=1",
            "train.max_steps=1",
            "train.device=cpu",
            "train.log_every=1",
            "train.checkpoint_every=0",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    return d, out


def _images(d):
    return [d / "images" / f"{i:06d}.png" for i in range(3)]


def _scores(pipe, images):
    return pipe.similarity(images, TEXTS), pipe.match(images, TEXTS)


def _student(ckpt):
    return Pipeline(load_trainer_from_checkpoint(ckpt).model.eval(), device="cpu")


def test_convert_uses_the_config_stored_in_a_training_checkpoint(run, tmp_path, capsys):
    d, out = run
    ckpt = out / "checkpoint_last.pt"
    stored = ALBEFConfig.from_dict(load_checkpoint(ckpt)["model_config"])
    assert stored.text.num_heads == 4 and stored.text_pooling == "mean" and stored.max_text_len == 30
    assert cli_main(["convert", str(ckpt), str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out
    assert "model.preset=albef-tiny" in printed and "training state" in printed
    assert from_pretrained(tmp_path / "m").config == stored
    expected = _scores(_student(ckpt), _images(d))
    got = _scores(Pipeline.from_pretrained(tmp_path / "m", device="cpu"), _images(d))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the run folder (no checkpoint_best.pt: its checkpoint_last.pt), and the run's own preset, agree
    assert cli_main(["convert", str(out), str(tmp_path / "m2"), "--preset", "albef-tiny"]) == 0
    assert from_pretrained(tmp_path / "m2").config == stored


def test_convert_refuses_options_that_contradict_the_stored_config(run, tmp_path, capsys):
    _, out = run
    ckpt = out / "checkpoint_last.pt"
    for extra, fields in (
        (["--preset", "albef-base"], ["text.num_heads", "text_pooling", "max_text_len"]),
        (["--text-heads", "2"], ["text.num_heads (--text-heads 2, stored: 4)"]),
        (["--task", "vqa"], ["task (--task vqa, stored: albef)"]),
    ):
        with pytest.raises(SystemExit) as e:
            cli_main(["convert", str(ckpt), str(tmp_path / "m"), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(ckpt) in err and all(f in err for f in fields), err
        assert "queue_size (" not in err  # training-only: not a contradiction
    assert not (tmp_path / "m").exists()


def test_predict_and_pipeline_take_a_checkpoint_or_a_run_folder(run, tmp_path, capsys):
    d, out = run
    ckpt = out / "checkpoint_last.pt"
    expected = _scores(_student(ckpt), _images(d))
    for src in (ckpt, out):
        pipe = Pipeline.from_pretrained(src, device="cpu")
        assert pipe.model.config.text_pooling == "mean"
        for a, b in zip(_scores(pipe, _images(d)), expected, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a run folder's checkpoint_best.pt comes first (the broken last one is never read)
    best = tmp_path / "run"
    best.mkdir()
    shutil.copy(ckpt, best / "checkpoint_best.pt")
    (best / "checkpoint_last.pt").write_bytes(b"not a checkpoint")
    torch.testing.assert_close(
        Pipeline.from_pretrained(best, device="cpu").similarity(_images(d), TEXTS), expected[0], atol=0, rtol=0
    )
    rows = []
    for src in (ckpt, best):
        assert (
            cli_main(
                [
                    "predict",
                    "score",
                    "--model",
                    str(src),
                    "--image",
                    str(_images(d)[0]),
                    "--text",
                    TEXTS[0],
                    "--text",
                    TEXTS[1],
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        rows.append(capsys.readouterr().out.splitlines()[1:])
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert f"{expected[0][0, 0].item():7.3f}" in rows[0][0]


@pytest.fixture(scope="module")
def bare_files(run):
    d, out = run
    torch.manual_seed(0)
    bare = d / "bare.pt"
    torch.save(ALBEF(get_preset("albef-tiny")).state_dict(), bare)
    authors = d / "ALBEF_authors.pth"
    trainer_sd = load_checkpoint(out / "checkpoint_last.pt")["model"]
    torch.save({"model": to_authors(trainer_sd), "epoch": 0}, authors)
    return {bare: "a bare state dict", authors: "an authors' checkpoint"}


def _assert_names_file_and_fix(message: str, path, what: str) -> None:
    assert str(path) in message and what in message, message
    assert f"albef convert {path} DIR --preset" in message and "then pass DIR" in message, message


def test_a_state_dict_is_refused_by_every_entry_point_with_the_fix(run, bare_files, tmp_path):
    d, _ = run
    for path, what in bare_files.items():
        with pytest.raises(NotAModelError) as e:
            cli_main(
                [
                    "evaluate",
                    "retrieval",
                    "--model",
                    str(path),
                    "--data",
                    str(d / "retrieval_test.json"),
                    "--image-root",
                    str(d),
                    "--k",
                    "2",
                    "--device",
                    "cpu",
                ]
            )
        _assert_names_file_and_fix(str(e.value), path, what)
        with pytest.raises(NotAModelError) as e:
            Pipeline.from_pretrained(path, device="cpu")
        _assert_names_file_and_fix(str(e.value), path, what)
        for argv in (
            ["predict", "score", "--model", str(path), "--image", str(_images(d)[0]), "--text", "a"],
            ["serve", "--model", str(path), "--images", str(d / "images"), "--cache-dir", str(tmp_path / "cache")],
        ):
            with pytest.raises(SystemExit) as e:
                cli_main(argv)
            _assert_names_file_and_fix(str(e.value.code), path, what)


def test_the_suggested_convert_makes_a_loadable_folder(bare_files, tmp_path):
    bare = next(iter(bare_files))
    assert cli_main(["convert", str(bare), str(tmp_path / "m"), "--preset", "albef-tiny"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["task"] == "albef"
    Pipeline.from_pretrained(tmp_path / "m", device="cpu")


def test_convert_keeps_an_existing_model_folder_unless_told(run, tmp_path, capsys):
    _, out = run
    ckpt = out / "checkpoint_last.pt"
    assert cli_main(["convert", str(ckpt), str(tmp_path / "m")]) == 0
    before = (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(ckpt), str(tmp_path / "m")])
    assert e.value.code == 2 and "already holds a model" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns == before
    assert cli_main(["convert", str(ckpt), str(tmp_path / "m"), "--overwrite"]) == 0


def test_model_init_reads_a_run_folder_as_the_commands_do(run, tmp_path):
    from albef.checkpoints.loading import read_state_dict

    _, out = run  # no validation: its checkpoint_last.pt
    got, want = read_state_dict(out), read_state_dict(out / "checkpoint_last.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without model.safetensors: give an albef model folder"):
        read_state_dict(tmp_path / "empty")


def test_a_damaged_model_folder_is_named_with_the_fix(run, tmp_path):
    _, out = run
    assert cli_main(["convert", str(out / "checkpoint_last.pt"), str(tmp_path / "m")]) == 0
    shutil.copytree(tmp_path / "m", tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"broken/config.json: not valid JSON .*write it again"):
        from_pretrained(tmp_path / "broken")
    # weights from another model beside this config: one save's two files no longer match
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["text"]["intermediate_size"] *= 2
    (tmp_path / "broken" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the model its config.json describes"):
        from_pretrained(tmp_path / "broken")
    del meta["mlm_head"]  # a config cut down by hand: named, not a bare KeyError
    (tmp_path / "broken" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"broken/config.json: no 'mlm_head' entry; .*write it again"):
        from_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"format": ')  # `albef convert` reads it too
    with pytest.raises(ValueError, match=r"broken/config.json: not valid JSON"):
        cli_main(["convert", str(tmp_path / "broken"), str(tmp_path / "m2")])
