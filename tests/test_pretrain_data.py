"""Pretraining data: annotation parsing, bad samples, the global-batch sampler, schedules."""

from __future__ import annotations

import json

import pytest
import torch

from albef.data.annotations import BadDataError, check_bad_share, read_annotations
from albef.data.cli import write_shapes
from albef.data.pretrain import PretrainCollator, PretrainDataset, parse_pretrain_entry
from albef.data.sampler import GlobalBatchSampler
from albef.data.transforms import test_transform as make_test_transform
from albef.text import Tokenizer
from albef.training.schedule import LRSchedule, alpha_at


def test_annotations_skip_and_name_bad_entries(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(
        json.dumps(
            [
                {"image": "x.png", "caption": "A dog!"},
                {"image": "y.png", "caption": ["", "Two cats."]},
                {"image": "z.png", "caption": "?!..."},  # empty after cleaning
                {"caption": "no image"},  # missing field
                ["not", "an", "object"],
                {"image": "w.png", "caption": 3},
            ]
        )
    )
    lines = tmp_path / "b.jsonl"
    lines.write_text(
        '{"image": "p.png", "caption": "a bird"}\n{broken json\n\n{"image": "q.png", "caption": "a fish"}\n'
    )
    records, bad = read_annotations([good, lines], parse_pretrain_entry(str(tmp_path)))
    assert [r.captions for r in records] == [("a dog",), ("two cats",), ("a bird",), ("a fish",)]
    assert records[0].image == str(tmp_path / "x.png")
    wheres = [b.where for b in bad]
    assert wheres == [f"{good}[2]", f"{good}[3]", f"{good}[4]", f"{good}[5]", f"{lines}:2"]
    assert "empty after cleaning" in bad[0].reason and "unreadable JSON line" in bad[4].reason
    (tmp_path / "c.json").write_text("[{oops")
    with pytest.raises(ValueError, match="c.json: not valid JSON"):
        read_annotations(tmp_path / "c.json", parse_pretrain_entry(None))


def test_a_truncated_image_is_used_as_far_as_it_goes_unless_told(tmp_path):
    # the authors' datasets set PIL's LOAD_TRUNCATED_IMAGES: a file cut short trains, the rest black
    path = write_shapes(tmp_path, n=2, image_size=16, corrupt=1)  # the first broken entry: a truncated PNG
    records, _ = read_annotations(path, parse_pretrain_entry(str(tmp_path)))
    i = next(k for k, r in enumerate(records) if r.image.endswith("bad_000.png"))
    item = PretrainDataset(records, make_test_transform(16))[i]
    assert item["index"] == i and not item["bad"]
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True  # set by something else in the process: refused all the same
    try:
        item = PretrainDataset(records, make_test_transform(16), truncated_ok=False)[i]
        assert item["index"] != i and "truncated" in item["bad"][0].reason
        assert ImageFile.LOAD_TRUNCATED_IMAGES  # the process-wide switch is left as it was
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _png_with_a_damaged_chunk(path):
    """A PNG whose second data chunk has a damaged type: PIL opens it and, with
    LOAD_TRUNCATED_IMAGES off, fails while decoding with a SyntaxError (not an OSError)."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(buf, "PNG", compress_level=0)  # stored: 3 chunks
    data, pos, idat = bytearray(buf.getvalue()), 8, []
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat.append(pos)
        pos += 12 + n
    assert len(idat) > 1, "the test image needs two data chunks"
    data[idat[1] + 4 : idat[1] + 8] = b"ID\x00T"
    path.write_bytes(bytes(data))
    return path


def test_an_image_damaged_inside_is_a_bad_sample_not_a_crash(tmp_path):
    from albef.data.pretrain import PretrainRecord, load_image

    bad = _png_with_a_damaged_chunk(tmp_path / "damaged.png")
    with pytest.raises(OSError, match="damaged.png: damaged image data") as e:
        load_image(str(bad))
    assert e.value.filename == str(bad)
    assert load_image(str(bad), truncated_ok=True).size == (256, 256)  # as far as it goes, as the authors
    good = write_shapes(tmp_path / "ok", n=1, image_size=16)
    records = [
        PretrainRecord(str(bad), ("a red square",), "test"),
        *read_annotations(good, parse_pretrain_entry(str(tmp_path / "ok")))[0],
    ]
    item = PretrainDataset(records, make_test_transform(16), truncated_ok=False)[0]
    assert item["index"] != 0 and [b.where for b in item["bad"]] == [str(bad)]
    assert "damaged image data" in item["bad"][0].reason


def test_bad_images_are_replaced_reported_and_limited(tmp_path):
    path = write_shapes(tmp_path, n=6, image_size=16, corrupt=3)
    records, bad = read_annotations(path, parse_pretrain_entry(str(tmp_path)))
    assert not bad and len(records) == 9
    ds = PretrainDataset(records, make_test_transform(16), truncated_ok=False)
    seen_bad, replaced = [], 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16)
        seen_bad += item["bad"]
        replaced += bool(item["bad"])
    assert replaced == 3
    names = sorted({b.where for b in seen_bad})  # a replacement may hit another bad file: one report per read
    assert names == sorted(str(tmp_path / f"images/{n}") for n in ("bad_000.png", "bad_001.png", "missing_002.png"))
    assert any("truncated" in b.reason for b in seen_bad)
    # the replacement is deterministic: loading again gives the same sample
    assert torch.equal(ds[6]["image"], ds[6]["image"]) and ds[6]["index"] == ds[6]["index"]
    with pytest.raises(BadDataError, match="3 of 9 images were bad(.|\n)*bad_000.png"):
        check_bad_share(replaced, len(ds), 0.2, seen_bad, "images")
    check_bad_share(replaced, len(ds), 0.5, seen_bad, "images")  # under the limit: fine


def test_collate_pads_to_the_longest_caption(tmp_path):
    path = write_shapes(tmp_path, n=4, image_size=16)
    records, _ = read_annotations(path, parse_pretrain_entry(str(tmp_path)))
    ds = PretrainDataset(records, make_test_transform(16))
    batch = PretrainCollator(Tokenizer(), max_length=25)([ds[i] for i in range(4)])
    longest = max(len(Tokenizer().encode(r.captions[0])) for r in records)
    assert batch.input_ids.shape == (4, longest) and batch.images.shape == (4, 3, 16, 16)
    assert batch.attention_mask.sum(1).tolist() == [len(Tokenizer().encode(r.captions[0])) for r in records]


def test_accumulation_sees_what_the_ranks_see_together():
    one = GlobalBatchSampler(40, micro_batch=3, world_size=1, rank=0, grad_accum=2, seed=7)
    ranks = [GlobalBatchSampler(40, micro_batch=3, world_size=2, rank=r, grad_accum=1, seed=7) for r in range(2)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch == 6
    for epoch in (0, 1):
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in ranks]
        for step in range(6):
            assert single[2 * step] == per_rank[0][step] and single[2 * step + 1] == per_rank[1][step]
    flat = [i for mb in single for i in mb]
    assert len(set(flat)) == len(flat) == 36  # no repeats within an epoch; 4 dropped


def test_sampler_resumes_mid_epoch_and_differs_across_epochs():
    s = GlobalBatchSampler(50, micro_batch=5, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_step=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    s.set_epoch(4)
    assert list(s) != full
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, micro_batch=4, world_size=2)


def test_authors_lr_schedule_step_by_step():
    # configs/Pretrain.yaml: lr 1e-4, min 1e-5, warmup_lr 1e-5, warmup_epochs 20, epochs 30;
    # the timm scheduler is stepped with i // 100 after iteration i in epoch 0, then per epoch.
    s = LRSchedule(lr=1e-4, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=20, epochs=30)
    expected = {
        (0, 0): 1e-5,
        (0, 100): 1e-5,
        (0, 101): 1.45e-5,
        (0, 1900): 9.1e-5,
        (0, 2000): 9.55e-5,
        (0, 2001): 1e-4,
        (0, 9999): 1e-4,
        (1, 0): 9.97535e-5,
        (10, 5): 7.75e-5,
        (20, 0): 3.25e-5,
        (29, 0): 1.02465e-5,
    }
    for (epoch, step), lr in expected.items():
        assert s(epoch, step) == pytest.approx(lr, rel=1e-5), (epoch, step)
    c = LRSchedule(lr=1e-3, min_lr=0.0, warmup_lr=0.0, epochs=2, style="cosine", warmup_steps=10, steps_per_epoch=50)
    assert c(0, 5) == pytest.approx(5e-4) and c(0, 10) == pytest.approx(1e-3) and c(1, 49) < 1e-6


def test_alpha_ramp():
    assert alpha_at(0.4, 0, 0, 100) == 0 and alpha_at(0.4, 0, 50, 100) == pytest.approx(0.2)
    assert alpha_at(0.4, 1, 0, 100) == 0.4 and alpha_at(0.4, 3, 7, 100) == 0.4
    assert alpha_at(0.4, 1, 0, 100, ramp_epochs=2) == pytest.approx(0.2)  # LAVIS
    assert alpha_at(0.4, 0, 0, 100, ramp_epochs=0) == 0.4


@pytest.mark.parametrize(
    "task,scale,ramp",
    [
        ("pretrain", (0.2, 1.0), 1.0),
        ("nlvr_pretrain", (0.2, 1.0), 1.0),
        ("retrieval", (0.5, 1.0), 1.0),
        ("vqa", (0.5, 1.0), 1.0),
        ("nlvr", (0.5, 1.0), 1.0),
        ("ve", (0.5, 1.0), 0.0),  # the authors' VE config: warm_up False
        ("grounding", (0.5, 1.0), 1.0),  # used only with data.random_crop=true (the authors resize)
    ],
)
def test_unset_crop_scale_and_alpha_ramp_are_the_tasks(task, scale, ramp):
    from albef.recipes import alpha_ramp_for, crop_scale_for, load_recipe

    recipe = load_recipe(None, [f"task={task}"])
    assert (crop_scale_for(recipe), alpha_ramp_for(recipe)) == (scale, ramp)
    recipe = load_recipe(None, [f"task={task}", "data.crop_scale=[0.9, 1.0]", "train.alpha_ramp_epochs=2"])
    assert (crop_scale_for(recipe), alpha_ramp_for(recipe)) == ((0.9, 1.0), 2.0)  # set: as given


def test_cosine_schedule_ends_at_max_steps():
    s = LRSchedule(
        lr=1e-3,
        min_lr=1e-4,
        warmup_lr=0.0,
        epochs=100,
        style="cosine",
        warmup_steps=10,
        steps_per_epoch=50,
        total_steps=110,
    )
    assert s(0, 10) == pytest.approx(1e-3) and s(0, 60) == pytest.approx(5.5e-4) and s(2, 10) == pytest.approx(1e-4)


def test_resuming_a_run_whose_recipe_resolved_crop_and_ramp_otherwise_warns(caplog, tmp_path):
    from types import SimpleNamespace

    from albef.config import get_preset
    from albef.recipes import load_recipe
    from albef.training.loop import TrainRun

    run = SimpleNamespace(
        recipe=load_recipe(None, ["task=vqa"]), dist=SimpleNamespace(is_main=True), cfg=get_preset("albef-tiny")
    )
    with caplog.at_level("WARNING"):
        same = {"data": {"crop_scale": [0.5, 1.0], "max_words": 30}, "train": {}}
        TrainRun._warn_changed_resolution(run, tmp_path / "c.pt", same)
        assert not caplog.text  # the same values, or none recorded: nothing to say
        saved = {"data": {"crop_scale": [0.2, 1.0]}, "train": {"alpha_ramp_epochs": 2.0}}
        TrainRun._warn_changed_resolution(run, tmp_path / "c.pt", saved)
        run.cfg.text_cleaning = "blip"  # a run written when data.max_words was 30 for every cleaning
        TrainRun._warn_changed_resolution(run, tmp_path / "c.pt", same)
    assert "data.crop_scale = [0.2, 1.0]; this run uses (0.5, 1.0)" in caplog.text
    assert "train.alpha_ramp_epochs = 2.0; this run uses 1.0" in caplog.text
    assert "data.max_words = 30; this run uses 50" in caplog.text


def test_a_pair_names_the_image_that_fails(tmp_path):
    # NLVR2's records hold two images: the bad-sample log names the second when the second fails
    from albef.data.pretrain import PretrainRecord

    good = write_shapes(tmp_path / "ok", n=2, image_size=16)
    ok = read_annotations(good, parse_pretrain_entry(str(tmp_path / "ok")))[0]
    cut = tmp_path / "cut.png"
    data = open(ok[0].image, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    records = [PretrainRecord((ok[0].image, str(cut)), ("a pair",), "test"), *ok]
    item = PretrainDataset(records, make_test_transform(16), truncated_ok=False)[0]
    assert item["index"] != 0 and [b.where for b in item["bad"]] == [str(cut)]


def test_an_image_over_pils_pixel_limit_is_a_value_error_naming_it(tmp_path, monkeypatch):
    from PIL import Image

    from albef.data.pretrain import PretrainRecord, load_image, read_image

    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # over twice the limit: PIL refuses it
    with pytest.raises(ValueError, match="big.png: .*MAX_IMAGE_PIXELS"):
        load_image(str(big))
    with pytest.raises(ValueError, match="big.png: cannot be read .*drop its entry"):
        read_image(str(big))
    good = write_shapes(tmp_path / "ok", n=1, image_size=16)  # 16 x 16: under the limit
    records = [
        PretrainRecord(str(big), ("a big one",), "test"),
        *read_annotations(good, parse_pretrain_entry(str(tmp_path / "ok")))[0],
    ]
    item = PretrainDataset(records, make_test_transform(16))[0]  # training skips and counts it
    assert item["index"] != 0 and [b.where for b in item["bad"]] == [str(big)]
    assert read_image(records[1].image).size == (16, 16)
