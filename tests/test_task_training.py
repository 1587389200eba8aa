"""VQA, SNLI-VE, NLVR2 and text-assignment training and evaluation end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albef.cli import main as cli_main
from albef.data.classification import read_classification
from albef.data.cli import write_shapes
from albef.data.vqa import answer_weights, read_vqa
from albef.evaluation.tasks import vqa_accuracy
from albef.models.tasks import ALBEFForTextAssignment

from helpers import bare_recipe


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_shapes(d, n=16, image_size=32, seed=5)
    imgs = [f"images/{i:06d}.png" for i in range(16)]
    vqa = [
        {
            "image": imgs[i],
            "question": "What color is the shape?",
            "answer": ["red", "red", "blue"],
            "dataset": "vqa",
            "question_id": i,
            "question_type": "color",
        }
        for i in range(16)
    ]
    vqa[3] = {"image": imgs[3], "question": "is it round?", "answer": "yes", "dataset": "vg", "question_id": 3}
    (d / "vqa.json").write_text(json.dumps(vqa))
    (d / "answers.json").write_text(json.dumps(["red", "blue", "yes", "no"]))
    labels = ["entailment", "neutral", "contradiction"]
    (d / "ve.json").write_text(
        json.dumps([{"image": imgs[i], "sentence": f"a shape number {i}", "label": labels[i % 3]} for i in range(16)])
    )
    (d / "nlvr.json").write_text(
        json.dumps(
            [
                {
                    "images": [imgs[i], imgs[(i + 1) % 16]],
                    "sentence": "the left one is red",
                    "label": "True" if i % 2 else "False",
                }
                for i in range(16)
            ]
        )
    )
    return d


def test_label_mappings_and_answer_weights(task_data):
    ve, bad = read_classification(task_data / "ve.json", str(task_data), "ve")
    assert not bad and [r.label for r in ve[:3]] == [2, 1, 0]  # entailment 2, neutral 1, contradiction 0
    nlvr, _ = read_classification(task_data / "nlvr.json", str(task_data), "nlvr")
    assert [r.label for r in nlvr[:2]] == [0, 1] and len(nlvr[0].image) == 2
    assert answer_weights(["red", "red", "blue"], "vqa") == (("red", "blue"), (2 / 3, 1 / 3))
    assert answer_weights(["yes"], "vg") == (("yes",), (0.5,))
    records, _ = read_vqa(task_data / "vqa.json", str(task_data), train=True)
    assert records[0].answers == ("red", "blue") and records[3].weights == (0.5,)
    # evaluation keeps every annotator's answer: the official accuracy leaves each out in turn
    records, _ = read_vqa(task_data / "vqa.json", str(task_data), train=False)
    assert records[0].answers == ("red", "red", "blue") and records[3].answers == ("yes",)
    assert vqa_accuracy("red", records[0].answers) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert vqa_accuracy("red", ["red"]) == 1
    # each annotator left out in turn: (1/3 + 1/3 + 2/3 + 2/3) / 4
    assert vqa_accuracy("red", ["red", "red", "blue", "x"]) == pytest.approx(0.5)


def _finetune(task: str, data: Path, out: Path, *extra: str) -> list[dict]:
    args = [
        "finetune",
        task,
        "--config",
        bare_recipe(out.parent, task),
        "model.preset=albef-tiny",
        "model.overrides={queue_size: 16}",
        f"data.image_root={data}",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.epochs=1",
        "train.lr=1e-4",
        "train.warmup_lr=1e-4",
        "train.warmup_epochs=1",
        "train.log_every=1",
        f"output_dir={out}",
        *extra,
    ]
    assert cli_main(args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_vqa_trains_and_evaluates(task_data, tmp_path):
    rows = _finetune("vqa", task_data, tmp_path / "vqa", f"data.train_files=[{task_data / 'vqa.json'}]")
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)
    assert (
        cli_main(
            [
                "evaluate",
                "vqa",
                "--model",
                str(tmp_path / "vqa" / "checkpoint_last.pt"),
                "--data",
                str(task_data / "vqa.json"),
                "--image-root",
                str(task_data),
                "--answers",
                str(task_data / "answers.json"),
                "--k",
                "3",
                "--results",
                str(tmp_path / "res.json"),
                "--out",
                str(tmp_path / "m.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "res.json").read_text())
    assert len(res) == 16 and set(res[0]) == {"question_id", "answer"}
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["overall"] <= 100


@pytest.mark.parametrize("task", ["ve", "nlvr"])
def test_classifiers_train_and_evaluate(task_data, tmp_path, task):
    rows = _finetune(task, task_data, tmp_path / task, f"data.train_files=[{task_data / f'{task}.json'}]")
    assert all(r["loss"] > 0 for r in rows)
    assert (
        cli_main(
            [
                "evaluate",
                task,
                "--model",
                str(tmp_path / task / "checkpoint_last.pt"),
                "--data",
                str(task_data / f"{task}.json"),
                "--image-root",
                str(task_data),
                "--out",
                str(tmp_path / "m.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 16


def test_text_assignment_then_nlvr(task_data, tmp_path):
    _finetune("nlvr_pretrain", task_data, tmp_path / "ta", f"data.train_files=[{task_data / 'pretrain.json'}]")
    # NLVR2 starts from the text-assignment checkpoint: already 2-image layout, head fresh
    rows = _finetune(
        "nlvr",
        task_data,
        tmp_path / "nlvr",
        f"data.train_files=[{task_data / 'nlvr.json'}]",
        f"model.init={tmp_path / 'ta' / 'checkpoint_last.pt'}",
    )
    assert rows


def test_text_assignment_pairs_and_labels():
    from albef.config import get_preset

    model = ALBEFForTextAssignment(get_preset("albef-tiny"))
    ids = torch.tensor([[101, 1037, 2417]] * 6)
    logits, labels = model(torch.randn(6, 3, 32, 32), ids, torch.ones_like(ids), torch.Generator().manual_seed(0))
    assert logits.shape == (6, 3) and set(labels.tolist()) <= {0, 1, 2}
    counts = torch.zeros(3)
    for s in range(200):  # labels 0 / 1 / 2 with probabilities 1/3 each, as the authors draw them
        _, lab = model(torch.randn(6, 3, 32, 32), ids, torch.ones_like(ids), torch.Generator().manual_seed(s))
        counts += torch.bincount(lab, minlength=3)
    assert ((counts / counts.sum() - 1 / 3).abs() < 0.05).all()


def test_easyvqa_converter_on_a_local_fixture(tmp_path, monkeypatch):
    import types

    from PIL import Image

    import albef.data.easyvqa as E

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(src / f"{i}.png")
    fake = types.SimpleNamespace(
        get_train_questions=lambda: (["what color is the shape?", "is there a circle?"], ["red", "yes"], [0, 1]),
        get_test_questions=lambda: (["what shape is it?"], ["circle"], [1]),
        get_train_image_paths=lambda: {0: str(src / "0.png"), 1: str(src / "1.png")},
        get_test_image_paths=lambda: {1: str(src / "1.png")},
        get_answers=lambda: ["red", "yes", "circle"],
    )
    monkeypatch.setattr(E, "_easy_vqa", lambda: fake)
    counts = E.build_easyvqa(tmp_path / "out")
    assert counts == {"train": 2, "test": 1}
    train = json.loads((tmp_path / "out" / "vqa_train.json").read_text())
    assert train[1] == {
        "image": "images/train/1.png",
        "question": "is there a circle?",
        "answer": ["yes"],
        "dataset": "vqa",
        "question_id": 1,
        "question_type": "yes/no",
    }
    assert (tmp_path / "out" / "images" / "test" / "1.png").exists()
    assert "MIT" in (tmp_path / "out" / "LICENSE.md").read_text()
    records, bad = read_vqa(tmp_path / "out" / "vqa_test.json", str(tmp_path / "out"), train=False)
    assert not bad and records[0].question_type == "shape"
    assert E.build_easyvqa(tmp_path / "out") == counts  # idempotent


def test_generated_reasoning_sets_follow_the_pictures(tmp_path):
    write_shapes(tmp_path, n=12, image_size=16, seed=3, test=4)
    caps = {e["image"]: e["caption"] for e in json.loads((tmp_path / "pretrain.json").read_text())}
    for e in json.loads((tmp_path / "ve_train.json").read_text()):
        color = caps[e["image"]].split(" ")[1]
        if e["label"] == "entailment":
            assert color in e["sentence"]
        elif e["label"] == "contradiction":
            assert color not in e["sentence"]
    for e in json.loads((tmp_path / "nlvr_test.json").read_text()):
        said = e["sentence"].split(" ")[-2]
        assert (said == caps[e["images"][0]].split(" ")[1]) == (e["label"] == "True")
