"""WebDataset shards: conversion, one epoch = the JSON set, same samples as the JSON path, bad
samples counted, exact resume, and training runs over shards (one process and two gloo ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

from albef.checkpoints.files import load_checkpoint  # noqa: E402
from albef.cli import main as cli_main  # noqa: E402
from albef.data.annotations import read_annotations  # noqa: E402
from albef.data.cli import write_shapes  # noqa: E402
from albef.data.pretrain import PretrainCollator, PretrainDataset, parse_pretrain_entry  # noqa: E402
from albef.data.shards import ShardLoader, expand_urls  # noqa: E402
from albef.data.transforms import train_transform  # noqa: E402
from albef.recipes import load_recipe  # noqa: E402
from albef.text import Tokenizer  # noqa: E402
from albef.training.loop import TrainRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 good images in 4 shards of 12, and a second set with 2 broken images among 40."""
    d = tmp_path_factory.mktemp("shard-data")
    write_shapes(d / "good", n=48, image_size=32, seed=2)
    assert (
        cli_main(
            [
                "data",
                "shards",
                str(d / "good" / "pretrain.json"),
                "--image-root",
                str(d / "good"),
                "--out",
                str(d / "good-shards"),
                "--max-count",
                "12",
            ]
        )
        == 0
    )
    write_shapes(d / "bad", n=38, image_size=32, seed=3, corrupt=2)
    assert (
        cli_main(
            [
                "data",
                "shards",
                str(d / "bad" / "pretrain.json"),
                "--image-root",
                str(d / "bad"),
                "--out",
                str(d / "bad-shards"),
                "--max-count",
                "10",
            ]
        )
        == 0
    )
    return d


def _loader(shards, rank=0, world=2, accum=1, micro=4, seed=5, **kw) -> ShardLoader:
    return ShardLoader(
        str(shards),
        train_transform(32, (0.5, 1.0)),
        PretrainCollator(Tokenizer(), 30),
        micro,
        world,
        rank,
        accum,
        seed,
        shuffle_buffer=8,
        **kw,
    )


def _epoch(loader: ShardLoader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    it = iter(loader)
    return [next(it) for _ in range((loader.steps_per_epoch - start) * loader.grad_accum)]


def test_brace_patterns_and_folders_expand_to_the_same_list(data):
    folder = expand_urls(str(data / "good-shards"))
    assert folder == expand_urls(str(data / "good-shards" / "shard-{000000..000003}.tar"))
    assert len(folder) == 4


def test_an_epoch_over_two_ranks_sees_every_sample_once_like_the_json_run(data):
    loaders = [_loader(data / "good-shards", rank=r) for r in (0, 1)]
    assert loaders[0].steps_per_epoch == 48 // 8
    for epoch in (0, 1):
        seen = [int(i) for ld in loaders for mb in _epoch(ld, epoch) for i in mb.index]
        assert sorted(seen) == list(range(48))  # each sample once: the JSON data set's epoch
    # and the order differs between epochs (shards and buffer reshuffled)
    assert [int(i) for mb in _epoch(loaders[0], 0) for i in mb.index] != [
        int(i) for mb in _epoch(loaders[0], 1) for i in mb.index
    ]


def test_a_sample_reads_the_same_from_shards_and_from_json(data):
    records, _ = read_annotations([str(data / "good" / "pretrain.json")], parse_pretrain_entry(str(data / "good")))
    ds = PretrainDataset(records, train_transform(32, (0.5, 1.0)), seed=5)
    ds.set_epoch(1)
    loader = _loader(data / "good-shards", world=1)
    loader.set_epoch(1)
    stream = iter(loader.stream)
    for _ in range(5):
        item = next(stream)
        ref = ds[item["index"]]
        assert item["caption"] == ref["caption"]
        torch.testing.assert_close(item["image"], ref["image"])  # same crop, flip and RandAugment


@pytest.mark.parametrize("truncated_ok,n_bad", [(False, 2), (True, 1)])
def test_bad_images_inside_shards_are_skipped_and_counted(data, truncated_ok, n_bad):
    # the two broken samples: a truncated PNG (used as far as it goes by default, as the authors'
    # loader does) and a file that is no image
    loader = _loader(data / "bad-shards", world=1, truncated_ok=truncated_ok)
    batches = _epoch(loader, 0)
    bad = [b for mb in batches for b in mb.bad]
    assert len(bad) == n_bad and all(".tar:" in b.where for b in bad)
    assert ("truncated" in " ".join(b.reason for b in bad)) == (not truncated_ok)
    assert sum(mb.n_replaced for mb in batches) == n_bad
    assert all(len(mb.index) == 4 for mb in batches)  # batches keep their size


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_mid_epoch(data, resampled):
    kw = {"resampled": resampled, "epoch_samples": 48}
    full = _epoch(_loader(data / "good-shards", world=1, **kw), 0)
    resumed = _epoch(_loader(data / "good-shards", world=1, **kw), 0, start=4)
    assert len(resumed) == len(full) - 4
    if not resampled:  # exact epochs: the very same micro-batches
        for a, b in zip(full[4:], resumed, strict=True):
            assert a.index.tolist() == b.index.tolist()
            torch.testing.assert_close(a.images, b.images)
    else:  # a fresh draw for the rest of the epoch, still from the data set
        assert all(0 <= int(i) < 48 for mb in resumed for i in mb.index)


def test_epoch_length_must_be_known(data, tmp_path):
    import shutil

    for f in (data / "good-shards").glob("*.tar"):
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ValueError, match="epoch_samples"):
        _loader(tmp_path / "shard-{000000..000003}.tar")
    assert _loader(tmp_path / "shard-{000000..000003}.tar", epoch_samples=40).steps_per_epoch == 5


def _overrides(shards: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.preset": "albef-tiny",
        "model.overrides": "{queue_size: 32}",
        "data.shards": str(shards),
        "data.num_workers": 0,
        "data.crop_scale": "[0.5, 1.0]",
        "data.min_seen_for_bad_check": 16,
        "data.shuffle_buffer": 8,
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


@pytest.mark.slow
def test_training_over_shards_resumes_exactly(data, tmp_path):
    total, stop = 9, 4  # 6 steps per epoch at batch 8: the resumed part crosses an epoch boundary
    kw = {"train__grad_accum": 2}
    straight = tmp_path / "straight"
    TrainRun(load_recipe(None, _overrides(data / "good-shards", straight, train__max_steps=total, **kw))).fit()
    split = tmp_path / "split"
    TrainRun(load_recipe(None, _overrides(data / "good-shards", split, train__max_steps=stop, **kw))).fit()
    TrainRun(
        load_recipe(None, _overrides(data / "good-shards", split, train__max_steps=total, **kw)), resume=True
    ).fit()
    a, b = load_checkpoint(straight / "checkpoint_last.pt"), load_checkpoint(split / "checkpoint_last.pt")
    assert a["state"] == b["state"] and a["state"]["global_step"] == total
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_over_shards_complete_and_resume(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "ddp"

    def run(steps: int, *extra: str) -> None:
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
            *_overrides(data / "good-shards", out, train__max_steps=steps, train__device="cpu"),
            *extra,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(3)
    assert load_checkpoint(out / "checkpoint_last.pt")["state"]["global_step"] == 3
    run(8, "--resume")
    state = load_checkpoint(out / "checkpoint_last.pt")["state"]
    assert state["global_step"] == 8 and state["epoch"] == 1 and state["samples_seen"] == 8 * 8


def test_shards_of_another_layout_fail_loudly_instead_of_looping(tmp_path, monkeypatch):
    import webdataset as wds

    import albef.data.shards as S

    with wds.TarWriter(str(tmp_path / "other-000000.tar")) as sink:  # img2dataset-style keys
        for i in range(5):
            sink.write({"__key__": f"{i:05d}", "jpg": b"not read", "txt": "a caption"})
    monkeypatch.setattr(S, "MAX_BAD_IN_A_ROW", 3)
    loader = _loader(tmp_path / "other-000000.tar", world=1, epoch_samples=8, micro=2)
    loader.set_epoch(0)
    with pytest.raises(RuntimeError, match="unreadable samples in a row"):
        next(iter(loader))


def test_resume_over_shards_refuses_another_worker_layout(data, tmp_path):
    out = tmp_path / "run"
    TrainRun(load_recipe(None, _overrides(data / "good-shards", out, train__max_steps=2))).fit()
    with pytest.raises(ValueError, match="stream_slots"):
        TrainRun(
            load_recipe(None, _overrides(data / "good-shards", out, train__max_steps=4, data__num_workers=1)),
            resume=True,
        )


def test_a_shard_cut_short_is_counted_as_bad_and_the_rest_trains(data, tmp_path):
    import shutil

    for f in (data / "good-shards").iterdir():
        shutil.copy(f, tmp_path / f.name)
    cut, gone = tmp_path / "shard-000001.tar", tmp_path / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])  # a copy interrupted half-way
    loader = _loader(tmp_path, world=1)
    gone.unlink()  # and one deleted while the run goes on
    batches = _epoch(loader, 0) + _epoch(loader, 1)  # a bad read is reported with a later sample: two epochs
    bad = [b for mb in batches for b in mb.bad]
    assert {b.where.split(".tar")[0] + ".tar" for b in bad} == {str(cut), str(gone)}, bad
    assert all("unreadable shard: FileNotFoundError" in b.reason for b in bad if b.where.startswith(str(gone)))
    assert all(len(mb.index) == 4 for mb in batches)  # batches keep their size


def test_shard_lists_name_what_is_missing(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shard files not found, e.g. .*shard-000004.tar"):
        expand_urls(str(data / "good-shards" / "shard-{000001..000004}.tar"))
    with pytest.raises(FileNotFoundError, match="shards.json not found: a shard folder needs the index"):
        expand_urls(str(tmp_path))
    (tmp_path / "shards.json").write_text('{"files": []}')
    with pytest.raises(ValueError, match=r"shards.json: expected"):
        expand_urls(str(tmp_path))


def test_shards_are_replaced_only_when_told(data, tmp_path, capsys):
    args = ["data", "shards", str(data / "good" / "pretrain.json"), "--image-root", str(data / "good")]
    assert cli_main([*args, "--out", str(tmp_path), "--max-count", "12"]) == 0
    with pytest.raises(SystemExit):
        cli_main([*args, "--out", str(tmp_path), "--max-count", "24"])
    assert "already holds shards" in capsys.readouterr().err
    assert len(expand_urls(str(tmp_path))) == 4
    assert cli_main([*args, "--out", str(tmp_path), "--max-count", "24", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]  # none stale
    (tmp_path / "shards.json").write_text("{damaged")  # the set it lists is then found by name
    (tmp_path / "mine.tar").write_bytes(b"not a shard of the set")
    assert cli_main([*args, "--out", str(tmp_path), "--max-count", "48", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["mine.tar", "shard-000000.tar"]


@pytest.mark.parametrize("caps", [[" "], [""], "a dog", [], ["a cat", 3]])
def test_a_shard_sample_without_usable_captions_is_a_bad_sample(caps, tmp_path):
    import io
    import json

    from PIL import Image

    from albef.data.shards import ShardStream

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(buf, "PNG")
    stream = ShardStream([], train_transform(32, (0.5, 1.0)), seed=0, rank=0, world_size=1)
    sample = {"__key__": "k", "__url__": "x.tar", "img": buf.getvalue()}
    good = stream._decode({**sample, "json": json.dumps({"index": 0, "captions": ["a cat"]}).encode()}, [])
    assert good is not None and good["caption"] == "a cat"
    bad = []
    assert stream._decode({**sample, "json": json.dumps({"index": 0, "captions": caps}).encode()}, bad) is None
    assert [b.where for b in bad] == ["x.tar:k"] and "non-empty strings" in bad[0].reason
