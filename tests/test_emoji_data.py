"""The emoji data builder on a small local fixture shaped like the npm packages (no network)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from albef.data.emoji import CELL, PAD, build_emoji


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (CELL, CELL), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fixture(cache: Path, n: int = 40, name=lambda i: f"THING {i}") -> dict[str, Path]:
    emoji = []
    for i in range(n):
        e = {
            "name": name(i),
            "short_names": [f"obj_{i}"],
            "unified": f"U{i}",
            "image": f"u{i}.png",
            "sheet_x": i % 8,
            "sheet_y": i // 8,
            "category": "Objects",
            "has_img_google": True,
            "has_img_twitter": True,
        }
        if i % 5 == 0:  # a skin-tone variant that must stay with its base emoji
            e["skin_variations"] = {
                "1F3FB": {
                    "unified": f"U{i}-1",
                    "image": f"u{i}-1.png",
                    "sheet_x": 0,
                    "sheet_y": 0,
                    "has_img_google": True,
                    "has_img_twitter": True,
                }
            }
        emoji.append(e)
    emoji.append(
        {
            "name": "LIGHT SKIN TONE",
            "short_names": ["skin-tone-2"],
            "unified": "C",
            "image": "c.png",
            "sheet_x": 7,
            "sheet_y": 7,
            "category": "Component",
            "has_img_google": True,
        }
    )
    paths = {}
    meta = cache / "emoji-datasource-16.0.0.tgz"
    with tarfile.open(meta, "w:gz") as t:
        _add(t, "package/emoji.json", json.dumps(emoji).encode())
    paths["meta"] = meta
    step = CELL + 2 * PAD
    sheet = Image.new("RGBA", (8 * step, 8 * step), (0, 0, 0, 0))
    for e in emoji[:n]:
        sheet.paste(
            Image.new("RGBA", (CELL, CELL), (e["sheet_x"] * 30, e["sheet_y"] * 30, 99, 255)),
            (e["sheet_x"] * step + PAD, e["sheet_y"] * step + PAD),
        )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    for style in ("google", "twitter"):
        p = cache / f"emoji-datasource-{style}-16.0.0.tgz"
        with tarfile.open(p, "w:gz") as t:
            for e in emoji[:n]:
                for v in [e] + list((e.get("skin_variations") or {}).values()):
                    _add(t, f"package/img/{style}/64/{v['image']}", _png((10, 200, 30, 255)))
            _add(t, f"package/img/{style}/sheets/64.png", buf.getvalue())
        paths[style] = p
    return paths


def test_split_by_emoji_never_leaks_and_variants_stay_together(tmp_path):
    counts = build_emoji(
        tmp_path, seed=3, windows=10, fetcher=lambda cache: _fixture(cache.mkdir(parents=True) or cache)
    )
    assert counts["concepts"] == 40  # the Component entry is left out
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["train"]) & set(splits["val"])
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (32, 4, 4)
    train_ids = {e["image_id"] for e in json.loads((tmp_path / "retrieval_train.json").read_text())}
    assert train_ids == set(splits["train"])
    test = json.loads((tmp_path / "retrieval_test.json").read_text())
    test_names = {c for e in test for c in e["caption"]}
    pre_names = {c for e in json.loads((tmp_path / "pretrain.json").read_text()) for c in e["caption"]}
    assert not test_names & pre_names  # held-out concepts are never seen in pretraining
    for e in json.loads((tmp_path / "pretrain.json").read_text()):
        stem = Path(e["image"]).stem.split("-")[0]  # a variant image u5-1 belongs to emoji U5
        assert f"U{stem[1:]}" in splits["train"]
    assert test[0]["caption"][0].startswith("thing ") and len(test[0]["caption"]) == 2
    assert Image.open(tmp_path / test[0]["image"]).mode == "RGB"
    assert "CC-BY" in (tmp_path / "LICENSE.md").read_text()


def test_grounding_boxes_point_at_the_named_cell(tmp_path):
    build_emoji(tmp_path, seed=1, windows=20, fetcher=lambda cache: _fixture(cache.mkdir(parents=True) or cache))
    splits = json.loads((tmp_path / "splits.json").read_text())
    for split in ("train", "test"):
        for e in json.loads((tmp_path / f"grounding_{split}.json").read_text()):
            assert e["box"] in e["candidates"] and len(e["candidates"]) == 9
            x, y, w, h = e["box"]
            img = Image.open(tmp_path / e["image"]).convert("RGB")
            # the fixture paints cell (sx, sy) with colour (30*sx, 30*sy, 99): recover the emoji
            r, g, b = img.getpixel((x + w // 2, y + h // 2))
            sx, sy = round(r / 30), round(g / 30)
            unified = f"U{sy * 8 + sx}"
            assert e["text"] == f"thing {sy * 8 + sx}" and b == 99
            assert unified in splits[split]


def _down(cache: Path) -> dict[str, Path]:
    raise OSError("npm pack: registry unreachable")


def test_data_emoji_rebuilds_its_own_set_and_refuses_one_built_otherwise(tmp_path, monkeypatch):
    import albef.data.emoji as emoji
    from albef.data.cli import main as data_main

    fetched = []
    built_by = emoji.build_emoji

    def fake_fetch(cache: Path) -> dict[str, Path]:
        fetched.append(cache)
        cache.mkdir(exist_ok=True)
        return _fixture(cache)

    def offline(out, seed, windows, overwrite=False):
        return built_by(out, seed, windows, fetcher=fake_fetch, overwrite=overwrite)

    monkeypatch.setattr(emoji, "build_emoji", offline)
    assert data_main(["emoji", str(tmp_path), "--seed", "3", "--windows", "10"]) == 0
    splits = (tmp_path / "splits.json").read_text()
    assert data_main(["emoji", str(tmp_path), "--seed", "3", "--windows", "10"]) == 0  # the same set: built again
    assert (tmp_path / "splits.json").read_text() == splits and len(fetched) == 2
    with pytest.raises(FileExistsError, match=r"seed: 3 there, 4 here\): .*--overwrite"):
        data_main(["emoji", str(tmp_path), "--seed", "4", "--windows", "10"])
    assert (tmp_path / "splits.json").read_text() == splits and len(fetched) == 2  # refused before any fetch
    (tmp_path / "grounding" / "train_9999.png").write_bytes(b"")  # a window the new set does not draw
    with monkeypatch.context() as m:  # a download that fails leaves the set it would have replaced
        m.setattr(emoji, "build_emoji", lambda out, seed, windows, overwrite: built_by(out, seed, windows, _down, True))
        with pytest.raises(OSError, match="registry unreachable"):
            data_main(["emoji", str(tmp_path), "--seed", "4", "--windows", "2", "--overwrite"])
    assert (tmp_path / "splits.json").read_text() == splits
    assert json.loads((tmp_path / "build.json").read_text())["complete"] is True
    assert data_main(["emoji", str(tmp_path), "--seed", "4", "--windows", "2", "--overwrite"]) == 0
    assert (tmp_path / "splits.json").read_text() != splits
    named = {
        e["image"]
        for f in ("grounding_train.json", "grounding_test.json")
        for e in json.loads((tmp_path / f).read_text())
    }
    assert {f"grounding/{p.name}" for p in (tmp_path / "grounding").iterdir()} == named  # no earlier window is left


def _row(**kw) -> dict:
    return {
        "twins_itm": 80.0,
        "twins_itc": 50.0,
        "swap_itm": 55.0,
        "txt_r1_itc": 0.5,
        "txt_r1": 1.0,
        "img_r1_itc": 1.5,
        "img_r1": 2.0,
        "pointing": 30.0,
        "itm_loss_end": 0.6,
        "lr_scale": {},  # the main job's own
        **kw,
    }


def test_ablation_table_reports_mean_and_spread(tmp_path):
    from albef.cli.ablation import ROWS, write_table

    runs = {"Full (ITC_MoD + MLM_MoD + ITM_hard)": [_row(txt_r1=1.0, pointing=20.0), _row(txt_r1=3.0, pointing=40.0)]}
    runs["MLM + ITM"] = [_row()]  # run after the full model, listed first as in the paper
    write_table(runs, tmp_path / "t.md", [0, 1], "ablation")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines if line.startswith("| ") and "±" in line] == [
        "| MLM + ITM",
        "| Full (ITC_MoD + MLM_MoD + ITM_hard)",
    ]
    row = [line for line in lines if line.startswith("| Full")][0]
    assert (
        "| 2 | 80.00 ± 0.00 | 50.00 ± 0.00 | 55.00 ± 0.00 | 0.50 ± 0.00 | 2.00 ± 1.41 | 1.50 ± 0.00 | 2.00 ± 0.00 "
        "| 30.00 ± 14.14 | 0.60 ± 0.00 |"
    ) in row
    assert list(ROWS)[0] == "MLM + ITM" and ROWS["MLM + ITM"]["itc"] is False


def test_ablation_table_rewrite_keeps_the_analysis_around_it(tmp_path):
    from albef.cli.ablation import write_table

    path = tmp_path / "t.md"
    write_table({"MLM + ITM": [_row(txt_r1=1.0)]}, path, [0], "ablation")
    path.write_text(path.read_text() + "\n## What we see\n\nhand-written analysis\n")
    write_table({"MLM + ITM": [_row(txt_r1=3.0)]}, path, [0], "ablation")
    text = path.read_text()
    assert "hand-written analysis" in text and text.count("# Pretraining ablation") == 1
    assert "| 3.00 ± 0.00 |" in text and "| 1.00 ± 0.00 |" not in text


def test_ablation_at_another_step_count_gets_its_own_table(tmp_path):
    from albef.cli.ablation import write_table

    path = tmp_path / "t.md"
    write_table({"MLM + ITM": [_row(txt_r1=1.0)]}, path, [0], "ablation")
    write_table({"MLM + ITM": [_row(txt_r1=5.0)]}, path, [0], "ablation", pretrain_steps=650)
    write_table({"MLM + ITM": [_row(txt_r1=3.0)]}, path, [0], "ablation")  # rewrites the first only
    text = path.read_text()
    first, second = text.split("<!-- ablation-table-650-steps:start -->")
    assert "| 3.00 ± 0.00 |" in first and "650" not in first
    assert "| 5.00 ± 0.00 |" in second and '`albef ablation --row "MLM + ITM" --pretrain-steps 650`' in second
    assert "650 steps of batch" in second


def test_ablation_table_marks_what_older_runs_did_not_record(tmp_path):
    from albef.cli.ablation import write_table

    old = {k: v for k, v in _row().items() if k not in ("txt_r1_itc", "img_r1_itc", "itm_loss_end")}
    write_table({"MLM + ITM": [old, _row(txt_r1_itc=2.5)]}, tmp_path / "t.md", [0, 1], "ablation")
    row = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| MLM + ITM")][0]
    assert "| 2.50 ± 0.00 (1 of 2 runs) | 1.00 ± 0.00 |" in row  # TR@1 with ITC alone: one of the two runs has it
    write_table({"MLM + ITM": [old]}, tmp_path / "t.md", [0], "ablation")
    row = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| MLM + ITM")][0]
    assert row.count("| — |") == 3 and row.endswith('| — | `albef ablation --row "MLM + ITM"` |')


def test_ablation_fills_in_itm_loss_from_the_runs_own_logs(tmp_path):
    import torch

    from albef.cli.ablation import ITM_PRIOR, main, run_dir

    # ITM's 2-way cross-entropy over one positive and two negatives, the head predicting the base rate
    logits = torch.tensor([2 / 3, 1 / 3]).log().expand(3, 2)  # [P(no match), P(match)] for each pair
    labels = torch.tensor([1, 0, 0])
    assert ITM_PRIOR == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-6)
    steps = 300  # the scale's own count
    (tmp_path / "ablation.json").write_text(
        json.dumps({"MLM + ITM": [_row(itm_loss_end=None), _row(itm_loss_end=None)]})
    )
    log = run_dir(tmp_path, "MLM + ITM", 0) / "pretrain" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    rows = [
        {"step": s, "split": "train", "loss_itm": 0.6 if s <= steps - 100 else 0.2} for s in range(10, steps + 1, 10)
    ]
    log.write_text("\n".join(json.dumps(r) for r in rows + [{"step": steps, "split": "val", "loss_itm": 9.0}]))
    main(["--out", str(tmp_path), "--seeds", "0", "1", "--row", "MLM + ITM", "--table", str(tmp_path / "t.md")])
    runs = json.loads((tmp_path / "ablation.json").read_text())["MLM + ITM"]
    assert runs[0]["itm_loss_end"] == pytest.approx(0.2)  # the last 100 steps, training rows only
    assert runs[1]["itm_loss_end"] is None  # seed 1's log is not there
    assert "| 0.20 ± 0.00 (1 of 2 runs) |" in (tmp_path / "t.md").read_text()
    # a run that recorded its seed finds its own log whatever --seeds says
    (tmp_path / "ablation.json").write_text(json.dumps({"MLM + ITM": [_row(itm_loss_end=None, seed=0)]}))
    main(["--out", str(tmp_path), "--seeds", "5", "--row", "MLM + ITM", "--table", str(tmp_path / "t.md")])
    assert json.loads((tmp_path / "ablation.json").read_text())["MLM + ITM"][0]["itm_loss_end"] == pytest.approx(0.2)


def test_ablation_refuses_to_mix_runs_of_another_step_count(tmp_path):
    from albef.cli.ablation import main

    (tmp_path / "ablation.json").write_text(json.dumps({"MLM + ITM": [_row()]}))  # the scale's 300 steps
    with pytest.raises(SystemExit, match="runs of \\[300\\] pretraining steps, not 650: give another --out"):
        main(["--out", str(tmp_path), "--pretrain-steps", "650", "--table", str(tmp_path / "t.md")])
    assert not (tmp_path / "t.md").exists()


def test_ablation_with_a_recipe_change_gets_its_own_table_and_refuses_other_settings(tmp_path):
    from albef.cli.ablation import main, write_table

    path = tmp_path / "t.md"
    write_table({"MLM + ITM": [_row(txt_r1=5.0)]}, path, [0], "ablation", pretrain_steps=650)
    sets = ["train.lr_scale.temp=0.2"]
    write_table({"MLM + ITM": [_row(txt_r1=7.0, set=sets)]}, path, [0], "ablation", pretrain_steps=650, sets=sets)
    text = path.read_text()
    plain, changed = text.split("<!-- ablation-table-650-steps-train.lr_scale.temp-0.2:start -->")
    assert "| 5.00 ± 0.00 |" in plain and "| 7.00 ± 0.00 |" not in plain
    assert "| 7.00 ± 0.00 |" in changed and "650 steps, `train.lr_scale.temp=0.2`" in changed
    assert '`albef ablation --row "MLM + ITM" --pretrain-steps 650 --set train.lr_scale.temp=0.2`' in changed
    # runs made without the change are not mixed into a table with it, nor the other way round
    (tmp_path / "ablation.json").write_text(json.dumps({"MLM + ITM": [_row(steps=650)]}))
    with pytest.raises(SystemExit, match="holds runs made with no --set, not this run's settings"):
        main(["--out", str(tmp_path), "--pretrain-steps", "650", "--set", sets[0], "--table", str(path)])
    (tmp_path / "ablation.json").write_text(json.dumps({"MLM + ITM": [_row(steps=650, set=sets)]}))
    with pytest.raises(SystemExit, match="holds runs made with --set train.lr_scale.temp=0.2"):
        main(["--out", str(tmp_path), "--pretrain-steps", "650", "--table", str(path)])
    # a key the rows switch, or no recipe key at all, is refused before anything runs
    with pytest.raises(SystemExit, match="train.hard_negatives is what the rows switch"):
        main(["--out", str(tmp_path / "x"), "--set", "train.hard_negatives=false", "--table", str(path)])
    for key in ("train.seed=3", "train.max_steps=10", "output_dir=x"):  # each run sets these itself
        with pytest.raises(SystemExit, match="each run sets"):
            main(["--out", str(tmp_path / "x"), "--set", key, "--table", str(path)])
    with pytest.raises(SystemExit, match="unknown recipe keys in train"):
        main(["--out", str(tmp_path / "x"), "--set", "train.temperature=0.2", "--table", str(path)])
    assert not (tmp_path / "x").exists() and path.read_text() == text


def test_ablation_settings_reach_each_rows_recipe():
    from albef.cli.ablation import ROWS, with_settings
    from albef.recipes import load_recipe

    base = load_recipe(None, ["train.lr=5e-4"])
    r = with_settings(base, ["train.lr_scale.temp=0.2", "train.warmup_steps=7"])
    assert r.train.lr_scale == {"temp": 0.2} and r.train.warmup_steps == 7 and r.train.lr == 5e-4
    assert with_settings(base, []) is base and base.train.lr_scale == {}
    assert all(k in vars(r.train) for flags in ROWS.values() for k in flags)  # rows switch train keys


def test_ablation_refuses_runs_of_another_temperature_rate(tmp_path, monkeypatch):
    from albef.cli.ablation import main
    from albef.cli.mainjob import SCALES

    table, done = str(tmp_path / "t.md"), tmp_path / "ablation.json"
    args = ["--out", str(tmp_path), "--pretrain-steps", "650", "--seeds", "0", "--row", "MLM + ITM", "--table", table]
    # runs scored before the rate was recorded trained with the job's own, which set none
    old = {k: v for k, v in _row(steps=650).items() if k != "lr_scale"}
    done.write_text(json.dumps({"MLM + ITM": [old]}))
    main(args)
    assert "| 1 | 80.00 ± 0.00 |" in (tmp_path / "t.md").read_text()
    # or none but their own --set
    done.write_text(json.dumps({"MLM + ITM": [{**old, "set": ["train.lr_scale.temp=0.2"], "txt_r1": 4.0}]}))
    main(args + ["--set", "train.lr_scale.temp=0.2"])
    changed = (
        (tmp_path / "t.md").read_text().split("<!-- ablation-table-650-steps-train.lr_scale.temp-0.2:start -->")[1]
    )
    assert "| 4.00 ± 0.00 |" in changed
    # a run recorded with another rate is refused, --set or not
    done.write_text(json.dumps({"MLM + ITM": [_row(steps=650, lr_scale={"temp": 0.2})]}))
    with pytest.raises(SystemExit, match='train.lr_scale \\{"temp": 0.2\\}, this run\'s recipe has \\{\\}'):
        main(args)
    # a job whose own recipe slows the temperature does not take unrecorded runs of the plain one
    monkeypatch.setitem(SCALES["ablation"], "temp_lr", 1e-4)
    done.write_text(json.dumps({"MLM + ITM": [old]}))
    with pytest.raises(SystemExit, match='train.lr_scale \\{\\}, this run\'s recipe has \\{"temp": 0.2\\}'):
        main(args)
