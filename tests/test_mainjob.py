"""The README's main job, end to end at smoke scale on local fixtures (no network)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from albef.cli.mainjob import run_main
from albef.data.easyvqa import build_easyvqa
from albef.data.scene_grammar import RELATIONS

from test_emoji_data import _fixture


def _fake_easyvqa(src: Path):
    src.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 90, 30)).save(src / f"{i}.png")
    qs = (
        ["what color is the shape?", "is there a circle?", "what shape is it?", "is there a red shape?"] * 4,
        ["red", "yes", "circle", "no"] * 4,
        [i % 4 for i in range(16)],
    )
    return types.SimpleNamespace(
        get_train_questions=lambda: qs,
        get_test_questions=lambda: qs,
        get_train_image_paths=lambda: {i: str(src / f"{i}.png") for i in range(4)},
        get_test_image_paths=lambda: {i: str(src / f"{i}.png") for i in range(4)},
        get_answers=lambda: ["red", "yes", "circle", "no"],
    )


def _letters(i: int) -> str:  # emoji names the scene grammar takes: letters only
    return f"thing {chr(97 + i // 26)}{chr(97 + i % 26)}"


@pytest.mark.slow
def test_main_job_smoke(tmp_path, monkeypatch):
    import albef.data.easyvqa as E

    fake = _fake_easyvqa(tmp_path / "evqa_src")
    monkeypatch.setattr(E, "_easy_vqa", lambda: fake)
    fetch = lambda cache: _fixture(cache.mkdir(parents=True, exist_ok=True) or cache, n=64, name=_letters)  # noqa: E731
    report = run_main(
        tmp_path / "out", tmp_path / "data", scale="smoke", emoji_fetcher=fetch, easyvqa_builder=build_easyvqa
    )
    text = report.read_text()
    for section in (
        "## Relation and attribute test",
        "## Scene retrieval",
        "## Grad-CAM pointing",
        "## Held-out single emoji",
        "## VQA",
        "## Loss curves",
        "| total |",
    ):
        assert section in text, section
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    sc = results["scenes"]
    assert set(sc["retrieval"]) == {"all", "seen", "unseen_pair", "unseen_emoji"}
    assert sc["twins"]["chance"] == 50.0 and sc["twins"]["n"]["swap"] > 0
    assert 0 < sc["pointing"]["pointing_game"]["chance"] < 100 and sc["pointing"]["n"] > 0
    assert 0 <= results["vqa"]["metrics"]["overall"] <= 100
    # each VQA type against its own baselines: the fixture's shape questions all answer "circle"
    base = results["vqa"]["baselines"]
    assert base["shape"]["majority"] == "circle" and base["shape"]["majority_accuracy"] == 100.0
    assert list((tmp_path / "out" / "overlays").rglob("*.png"))

    # `albef serve` and `albef index` without arguments find what the main job wrote
    from albef.cli.serve import DEFAULTS

    for key in ("model", "vqa_model"):
        assert (tmp_path / "out" / Path(DEFAULTS[key]).relative_to("runs/main")).is_file(), DEFAULTS[key]
    for key in ("images", "answers"):
        assert (tmp_path / "data" / Path(DEFAULTS[key]).relative_to("data")).exists(), DEFAULTS[key]

    # the held-out emoji stay held out: no scene draws an emoji of the emoji test or val split, and
    # pretraining sees no single image of an emoji the scenes hold out
    data = tmp_path / "data"
    evals = {
        Path(e["image"]).name
        for f in ("retrieval_test.json", "retrieval_val.json")
        for e in json.loads((data / "emoji" / f).read_text())
    }
    drawn = {o["emoji_image"] for s in json.loads((data / "scenes" / "scenes.json").read_text()) for o in s["objects"]}
    assert drawn and not drawn & evals
    held = set(json.loads((data / "scenes" / "splits.json").read_text())["unseen_emoji"])
    held_images = {
        o["emoji_image"]
        for s in json.loads((data / "scenes" / "scenes.json").read_text())
        for o in s["objects"]
        if o["name"] in held
    }
    rows = json.loads((tmp_path / "out" / "pretrain_data.json").read_text())
    assert held_images and not {Path(r["image"]).name for r in rows if r["image"].startswith("emoji/")} & held_images

    # a second run refuses the folder unless told to overwrite
    with pytest.raises(FileExistsError):
        run_main(tmp_path / "out", data, scale="smoke", emoji_fetcher=fetch, easyvqa_builder=build_easyvqa)

    # bench/scene_variant.py: the same pretraining with one change, on the data the job built
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import scene_variant

    variant = ["--data", str(data), "--steps", "1", "--scale", '{"batch": 4, "k": 4, "sibling_share": 0.5}']
    recipe = '{"model": {"overrides": {"vision": {"image_size": 128, "pos_embed_init": "sincos"}}}}'
    assert (
        scene_variant.main([str(tmp_path / "variant"), *variant, "--recipe", recipe, "--sibling-negatives", "0.5"]) == 0
    )
    res = json.loads((tmp_path / "variant" / "variant.json").read_text())
    assert res["twins"]["n"]["swap"] > 0 and "itm" in res["retrieval_all"] and res["sibling_negatives"] == 0.5
    used = torch.load(tmp_path / "variant" / "pretrain" / "checkpoint_last.pt", weights_only=False)["recipe"]
    assert used["model"]["overrides"]["vision"]["pos_embed_init"] == "sincos" and used["data"]["group_size"] == 2

    # bench/fusion_probe.py on that run: where ITM's negative-sampling weight goes, MLM on relation words
    import fusion_probe

    ckpt = tmp_path / "variant" / "pretrain" / "checkpoint_last.pt"
    probe = ["--pretrain-data", str(tmp_path / "variant" / "pretrain_data.json"), "--data", str(data)]
    assert fusion_probe.main([str(ckpt), *probe, "--batches", "8", "--batch", "8"]) == 0
    res = json.loads((ckpt.parent / "fusion_probe.json").read_text())
    for mix in ("image -> text", "text -> image", "uniform"):  # every negative has one kind
        assert sum(res["negatives"][mix].values()) == pytest.approx(100, abs=0.3)
    twins = json.loads((data / "scenes" / "twins_test.json").read_text())
    with_relation = [t for t in twins if set(t["caption"].split()) & set(fusion_probe.OPPOSITE)]
    assert res["relation_mlm"]["all"]["n"] == len(with_relation) > 0

    # bench/where_probe.py on that run: sine-cosine positions are linear in each patch's place, and
    # the ViT (one step from random weights) keeps them in its output tokens
    import where_probe

    assert where_probe.main([str(ckpt), "--data", str(data), "--out", str(tmp_path / "where.json")]) == 0
    where = json.loads((tmp_path / "where.json").read_text())
    assert min(where["image_tokens"]["position_r2_row_col"]) > 0.9
    from albef.checkpoints.pretrained import load_inference_model

    config = load_inference_model(ckpt).config
    tc, vc = config.text, config.vision
    assert set(where["fusion"]) == {"text_only", *(f"fusion_{k + 1}" for k in range(tc.num_layers - tc.fusion_layer))}
    assert where["fusion"]["fusion_1"]["layer"] == tc.fusion_layer
    n_tokens = 1 + (vc.image_size // vc.patch_size) ** 2
    for f in (where["fusion"][f"fusion_{k + 1}"] for k in range(tc.num_layers - tc.fusion_layer)):
        # one step from random weights: a near-uniform look, whose mean place points at no object
        assert 1 / n_tokens <= f["mean_peak_weight"] < 3 / n_tokens, f
        assert f["best_head_attention_r2"] < 0.2, f
        # and puts on the named object about its share of the patches, as much as on another object
        share = where["object_share"]
        assert 0 < share < 0.5
        per_head = zip(f["weight_on_named_object_per_head"], f["weight_on_other_object_per_head"], strict=True)
        for named, other in per_head:
            assert named == pytest.approx(share, rel=0.5) and other == pytest.approx(named, rel=0.5)

    # bench/score_checkpoints.py: a checkpoint scored as scene_variant scored the same model
    import score_checkpoints

    curve = tmp_path / "curve.json"
    score = [str(ckpt), "--data", str(data), "--out", str(curve), "--k", "4", "--layers", "3", "5"]
    assert score_checkpoints.main(score) == 0
    row = json.loads(curve.read_text())["1"]
    variant_res = json.loads((tmp_path / "variant" / "variant.json").read_text())
    assert row["twins"] == variant_res["twins"] and row["retrieval_all"] == variant_res["retrieval_all"]
    # the default layer is the main score; the others are scored as asked
    assert row["pointing"]["layer"] == 4 and set(row["pointing_by_layer"]) == {"3", "5"}
    again = [str(ckpt), "--data", str(data), "--out", str(tmp_path / "c4.json"), "--k", "4", "--layers", "4"]
    assert score_checkpoints.main(again) == 0
    four = json.loads((tmp_path / "c4.json").read_text())["1"]
    assert four["pointing_by_layer"]["4"] == row["pointing"]["pointing_game"]["accuracy"]
    # --train-swaps: training scenes' captions against their swapped twins (the same words, the two
    # groups exchanged around the relation)
    swapped = [str(ckpt), "--data", str(data), "--out", str(tmp_path / "c5.json"), "--k", "4", "--train-swaps", "3"]
    assert score_checkpoints.main(swapped) == 0
    five = json.loads((tmp_path / "c5.json").read_text())["1"]
    assert five["twins"] == row["twins"]
    assert five["train_swaps"]["n"] == 3 and set(five["train_swaps"]) == {"n", "itc", "itm"}
    # three pairs, a tie counting a half: each score a multiple of 100 / 6
    for head in ("itc", "itm"):
        assert five["train_swaps"][head] * 6 / 100 == pytest.approx(round(five["train_swaps"][head] * 6 / 100))
    train_ids = {
        s["scene_id"] for s in json.loads((data / "scenes" / "scenes.json").read_text()) if s["split"] == "train"
    }
    cases = score_checkpoints.training_swaps(data / "scenes", 3)
    assert len(cases) == 3 and len({c.scene_id for c in cases}) == 3
    for case in cases:
        (kind, twin), rel = case.twins[0], next(r for r in RELATIONS.values() if f" {r} " in case.caption)
        a, b = case.caption.split(f" {rel} ")
        assert case.scene_id in train_ids and kind == "swap" and twin == f"{b} {rel} {a}" != case.caption

    # the job's scorer sizes the test images by the model it scores (a 32 px model here, the job's
    # images 128 px): every held-out caption and referent scored
    from albef.cli.mainjob import evaluate_scenes
    from albef.config import get_preset
    from albef.models.albef import ALBEF

    small = ALBEF(get_preset("albef-tiny")).eval()
    sc = evaluate_scenes(small, data / "scenes", 4, tmp_path / "tiny_overlays", subsets=False)
    assert sc["twins"]["n"]["swap"] > 0 and sc["pointing"]["n"] > 0

    # bench/place_probe.py: captions of one object's place, each true of its image; the pairs differ
    # by the place only and train in one batch
    import place_probe

    from albef.data.scene_grammar import noun_phrase

    counts = place_probe.build(data, singles_per_emoji=10, pairs_per_emoji=2)
    assert counts["train"]["scene"] > 0 and counts["test"]["single"] > 0 and counts["pairs"]["single"] > 0
    import numpy as np
    from PIL import Image

    def on_side(x: float, y: float, word: str) -> bool:  # the canvas's halves, 128 px
        return {"left": x < 64, "right": x > 64, "top": y < 64, "bottom": y > 64}[word]

    scenes = {f"scenes/{s['image']}": s for s in json.loads((data / "scenes" / "scenes.json").read_text())}
    for r in json.loads((data / "place" / "train.json").read_text()):
        if r["kind"] == "scene":  # the named group's every box on the side the caption says, its count said
            sc, phrase = scenes[r["image"]], r["caption"].rsplit(" ", 3)[0]
            boxes = [
                o["box"] for o in sc["objects"] if phrase in (noun_phrase(o["name"], 1), noun_phrase(o["name"], 2))
            ]
            assert boxes and phrase.startswith("two ") == (len(boxes) == 2), r
            assert all(on_side(b[0] + b[2] / 2, b[1] + b[3] / 2, r["word"]) for b in boxes), r
        else:  # the drawn pixels themselves (not the recorded box) lie on that side
            ys, xs = np.nonzero(np.asarray(Image.open(data / r["image"]).convert("L")) < 245)
            assert on_side(xs.mean(), ys.mean(), r["word"]), r
    units = json.loads((data / "place" / "pairs.json").read_text())
    assert {u[0]["kind"] for u in units} == {"single", "scene"}
    for a, b in units:  # each unit: the same words but the place, the place opposite
        assert a["caption"].rsplit(" ", 1)[0] == b["caption"].rsplit(" ", 1)[0], (a, b)
        assert a["word"] == place_probe.OPPOSITE[b["word"]] and a["image"] != b["image"]
    place = ["--data", str(data), "--steps", "1", "--scale", '{"batch": 4, "k": 4}', "--share", "0.5"]
    # --share 5 asks for more pairs than the smoke data holds: every unit, the scenes' too, is drawn
    assert place_probe.main(["run", str(tmp_path / "place"), *place, "--pairs", "--share", "5"]) == 0
    res = json.loads((tmp_path / "place" / "place_probe.json").read_text())
    assert res["place_rows"] > 0 and set(res["place"]["twins"]) == {"single", "scene"}
    for axis in ("x", "y"):
        assert set(res["place"]["single_readout"][axis]) == {"mean", "cls", "mask"}
    rows = json.loads((tmp_path / "place" / "pretrain_data.json").read_text())
    # every pair the run drew sits in one sampler unit, in its order (the job's rows hold caption lists)
    by_first = {(u[0]["image"], u[0]["caption"]): u[1] for u in units}
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2], strict=True) if (a["image"], str(a["caption"])) in by_first]
    assert len(pairs) == res["place_rows"] // 2 == len(units)
    assert all(by_first[a["image"], a["caption"]]["image"] == b["image"] for a, b in pairs)
    used = torch.load(tmp_path / "place" / "pretrain" / "checkpoint_last.pt", weights_only=False)["recipe"]
    assert used["data"]["group_size"] == 2
    # without --pairs: the place rows added one by one, the job's sampler left as it was
    assert place_probe.main(["run", str(tmp_path / "place1"), *place]) == 0
    res = json.loads((tmp_path / "place1" / "place_probe.json").read_text())
    rows = json.loads((tmp_path / "place1" / "pretrain_data.json").read_text())
    # (smoke data: singles enough to fill the share, and they come first)
    assert sum(r["image"].startswith("place/") for r in rows) == res["place_rows"] > 0
    used = torch.load(tmp_path / "place1" / "pretrain" / "checkpoint_last.pt", weights_only=False)["recipe"]
    assert used["data"]["group_size"] == 1
    # siblings kept in one batch by the job (units of two): place rows join as units, no sibling split
    shared = ["--data", str(data), "--steps", "1", "--scale", '{"batch": 4, "k": 4, "sibling_share": 1}']
    assert place_probe.main(["run", str(tmp_path / "place2"), *shared, "--share", "0.5"]) == 0
    rows = json.loads((tmp_path / "place2" / "pretrain_data.json").read_text())
    ids = [Path(r["image"]).stem if r["image"].startswith("scenes/") else None for r in rows]
    train_ids = [
        s["scene_id"] for s in json.loads((data / "scenes" / "scenes.json").read_text()) if s["split"] == "train"
    ]
    sibling = {a: b for a, b in zip(train_ids[::2], train_ids[1::2], strict=True)}
    firsts = [i for i, x in enumerate(ids) if x in sibling]
    assert firsts and all(i % 2 == 0 and ids[i + 1] == sibling[ids[i]] for i in firsts)
    res = json.loads((tmp_path / "place2" / "place_probe.json").read_text())
    assert sum(r["image"].startswith("place/") for r in rows) == res["place_rows"] > 0


def test_place_probe_readout_closed_form():
    """bench/place_probe.readout: a gap of 0 for labels that the features do not carry, the planted
    gap for a label carried by one feature (its noise taken out), and the ridge reading it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from place_probe import readout

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1200, 64, generator=g), (torch.rand(1200, generator=g) < 0.5).long()
    none = readout(x[:1000], y[:1000], x[1000:], y[1000:], lr=5e-4, steps=10, batch=2)
    assert none["gap_over_spread"] < 0.02 and 35 < none["ridge"] < 65
    x[:, 0] += 3 * (2 * y - 1)  # the label moves one feature by ±3: means 6 apart, spread sqrt(64 + 9)
    planted = readout(x[:1000], y[:1000], x[1000:], y[1000:], lr=5e-4, steps=10, batch=2)
    assert planted["gap_over_spread"] == pytest.approx(6 / 73**0.5, abs=0.03) and planted["ridge"] > 97


def test_main_picks_the_gpu_scale_only_on_cuda(tmp_path, monkeypatch):
    import albef.cli.mainjob as M

    seen = {}
    monkeypatch.setattr(M, "run_main", lambda *a, **k: seen.update(scale=a[2], device=k["device"]))
    monkeypatch.setattr(M.torch.cuda, "is_available", lambda: False)
    M.main(["--out", str(tmp_path)])
    assert seen == {"scale": "full", "device": "cpu"}
    monkeypatch.setattr(M.torch.cuda, "is_available", lambda: True)
    M.main(["--out", str(tmp_path)])
    assert seen == {"scale": "gpu", "device": "cuda"}
    M.main(["--out", str(tmp_path), "--scale", "smoke", "--device", "cpu"])
    assert seen == {"scale": "smoke", "device": "cpu"}


def _scene_annotations(data: Path, n_pairs: int) -> tuple[Path, int]:
    """The annotation files the job's pretraining data is made of, for ``n_pairs`` sibling pairs."""
    (data / "scenes").mkdir(parents=True)
    (data / "emoji").mkdir()
    # scene 2i and 2i + 1 are siblings (the same layout, the two emoji exchanged), as build_scenes writes them
    scenes = [{"image": f"images/train/{i}.png", "caption": [f"pair {i // 2}", "converse"]} for i in range(2 * n_pairs)]
    (data / "scenes" / "pretrain.json").write_text(json.dumps(scenes))
    (data / "scenes" / "splits.json").write_text(json.dumps({"unseen_emoji": [], "seen": ["cat"]}))
    objects = [{"name": "cat", "emoji_image": "cat.png"}]
    (data / "scenes" / "scenes.json").write_text(json.dumps([{"objects": objects}]))
    (data / "emoji" / "pretrain.json").write_text(json.dumps([{"image": "cat.png", "caption": "cat"}]))
    return data, n_pairs


@pytest.mark.parametrize(("scale", "temp_lr"), [("full", None), ("full", 1e-4), ("gpu", 1e-4), ("smoke", 1e-4)])
def test_job_learns_the_temperature_at_temp_lr_and_all_else_at_the_pretraining_rate(tmp_path, scale, temp_lr):
    from albef.cli.mainjob import SCALES, scene_pretraining
    from albef.config import get_preset
    from albef.models import ALBEF
    from albef.training.optim import build_optimizer

    data, _ = _scene_annotations(tmp_path / "data", n_pairs=2)
    s = {**SCALES[scale], "scene_emoji_repeats": 1, "emoji_pretrain": 0, "temp_lr": temp_lr}
    (tmp_path / "out").mkdir()
    t = scene_pretraining(tmp_path / "out", data, s, seed=0).train
    model = ALBEF(get_preset("albef-tiny"))  # the loop's optimizer holds the student's parameters
    groups = build_optimizer(model, t.lr, t.weight_decay, lr_scale=t.lr_scale).param_groups
    (temp_group,) = [g for g in groups if any(p is model.temp for p in g["params"])]
    assert t.lr == s["pretrain_lr"] and t.lr * temp_group["lr_scale"] == pytest.approx(temp_lr or t.lr)
    others = [p for g in groups if g["lr_scale"] == 1.0 for p in g["params"] if p is not model.temp]
    assert len(others) == len(list(model.parameters())) - 1  # nothing else slowed


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_pretraining_data_keeps_the_given_share_of_siblings_together(tmp_path, share):
    from albef.cli.mainjob import FULL, pretraining_data

    data, n_pairs = _scene_annotations(tmp_path / "data", n_pairs=10)
    s = {**FULL, "sibling_share": share, "scene_emoji_repeats": 2, "emoji_pretrain": 0}
    rows = json.loads(pretraining_data(data, tmp_path, s, seed=3).read_text())
    got = [int(Path(r["image"]).stem) for r in rows if r["image"].startswith("scenes/")]
    assert sorted(got) == list(range(2 * n_pairs))  # every scene once
    units = list(zip(got[0::2], got[1::2], strict=True))  # what a sampler with group_size 2 keeps in one batch
    together = sum(a // 2 == b // 2 for a, b in units)
    # the loose scenes are paired at random and may meet their sibling again
    assert round(share * n_pairs) <= together <= n_pairs and (together < n_pairs or share == 1.0)
    assert len(rows) - len(got) == 2  # the scene emoji's own image, twice


def test_rerank_sentence_names_each_direction_that_falls():
    from albef.cli.mainjob_report import rerank_sentence

    def r(tr, ir, tr_itm, ir_itm):
        return {"itc": {"txt_r1": tr, "img_r1": ir}, "itm": {"txt_r1": tr_itm, "img_r1": ir_itm}}

    assert "raises R@1 both ways: TR@1 (1.0 -> 2.0) and IR@1 (3.0 -> 4.0)" in rerank_sentence(r(1, 3, 2, 4), "x")[0]
    fell = rerank_sentence(r(2, 3, 1, 3), "x", "because")[0]  # level is not a rise
    assert fell.endswith("raises neither TR@1 (2.0 -> 1.0) nor IR@1 (3.0 -> 3.0): because.")
    assert rerank_sentence(r(1, 3, 2, 3), "x", "because")[0].endswith(
        "raises TR@1 (1.0 -> 2.0) but not IR@1 (3.0 -> 3.0): because."
    )


def test_swap_and_rerank_sentences_name_the_gpu_scale_only_below_it():
    from albef.cli.mainjob import SCALES
    from albef.cli.mainjob_report import _scene_rerank_why, _swap_sentence

    tw = {"itm": {"swap": 47.0}, "itc": {"swap": 51.7}}
    full, gpu = SCALES["full"], SCALES["gpu"]
    ratio = gpu["pretrain"] * gpu["batch"] / (full["pretrain"] * full["batch"])
    assert f"neither {ratio:.1f}x the pretraining samples" in _swap_sentence(tw, full)[0]
    assert "bench/fusion_toy.py" in _swap_sentence(tw, full)[0]  # the control with ideal image tokens
    assert f"with {ratio:.1f}x the pretraining samples" in _scene_rerank_why(full)
    # the GPU scale itself (or more) cannot point to itself as the remedy
    for s in (gpu, {**gpu, "pretrain": 2 * gpu["pretrain"]}):
        assert "--scale gpu" not in _swap_sentence(tw, s)[0] and "--scale gpu" not in _scene_rerank_why(s)
    assert _swap_sentence({"itm": {"swap": 75.0}, "itc": {"swap": 51.0}}, full) == []  # learned: nothing to explain


def test_a_scene_set_of_other_settings_is_put_aside_and_taken_back(tmp_path, capsys):
    # switching the job's scale redraws the scenes; the set of the other settings is kept, not deleted
    from albef.cli.mainjob import SCALES, build_data

    fetch = lambda cache: _fixture(cache.mkdir(parents=True, exist_ok=True) or cache, n=64, name=_letters)  # noqa: E731
    data, smoke = tmp_path / "data", SCALES["smoke"]
    no_vqa = lambda out: {}  # noqa: E731
    build_data(data, smoke, fetch, no_vqa)
    first = (data / "scenes" / "scenes.json").read_text()
    other = {**smoke, "scene_test": smoke["scene_test"] + 2}
    build_data(data, other, fetch, no_vqa)
    aside = [p for p in data.glob("scenes.*") if p.is_dir()]
    assert len(aside) == 1 and (aside[0] / "scenes.json").read_text() == first
    assert (data / "scenes" / "scenes.json").read_text() != first and "moved to" in capsys.readouterr().out
    build_data(data, smoke, fetch, no_vqa)  # back: the first set, not a new draw
    assert (data / "scenes" / "scenes.json").read_text() == first and "taken back" in capsys.readouterr().out
    assert len([p for p in data.glob("scenes.*") if p.is_dir()]) == 1  # the other settings' set, now aside
