"""The authors' downstream data files and image folders work unchanged.

Each fixture writes files exactly as the authors' loaders read them: SNLI-VE names Flickr30K images
by bare id (``image_root/<id>.jpg``), VQA splits its images over ``vqa_root`` (COCO) and ``vg_root``
(Visual Genome) by each entry's ``"dataset"``, NLVR2 and retrieval join ``image_root``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from albef.cli import main as cli_main
from albef.cli.train import finetune as _finetune
from albef.data.classification import read_classification
from albef.data.retrieval import read_retrieval_train
from albef.data.vqa import read_vqa

from helpers import bare_recipe


def finetune(argv: list[str]) -> int:
    """``albef finetune`` on a recipe of just its task: the tests set what they need as overrides."""
    out = Path(next(a for a in argv if a.startswith("output_dir=")).removeprefix("output_dir="))
    return _finetune([argv[0], "--config", bare_recipe(out.parent, argv[0]), *argv[1:]])


TINY = [
    "model.preset=albef-tiny",
    "train.max_steps=1",
    "train.batch_size=2",
    "train.epochs=1",
    "data.num_workers=0",
    "train.device=cpu",
    "train.log_every=1",
]


def _image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), (40 * i % 256, 90, 200 - 30 * i % 200)).save(path)


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


VE_IDS = ["2248275918", "3637013", "1000092795", "4004129181"]
LABELS = ["entailment", "neutral", "contradiction", "entailment"]


@pytest.fixture
def ve_layout(tmp_path):
    """SNLI-VE: ``data/ve_*.json`` with bare ids; the Flickr30K ``<id>.jpg`` files in one folder."""
    images = tmp_path / "flickr30k" / "flickr30k-images"
    for i, name in enumerate(VE_IDS):
        _image(images / f"{name}.jpg", i)
    ann = [
        {"image": name, "sentence": f"Two dogs play number {i}.", "label": LABELS[i]} for i, name in enumerate(VE_IDS)
    ]
    _json(tmp_path / "data" / "ve_train.json", ann)
    _json(tmp_path / "data" / "ve_test.json", ann)
    return tmp_path, images


COCO = ["train2014/COCO_train2014_000000458752.jpg", "val2014/COCO_val2014_000000262148.jpg"]
VG = ["image/2377346.jpg", "image/107899.jpg"]
TEST = ["test2015/COCO_test2015_000000262144.jpg", "test2015/COCO_test2015_000000524289.jpg"]


@pytest.fixture
def vqa_layout(tmp_path):
    """VQA: COCO images under ``vqa_root``, Visual Genome under ``vg_root``; train entries of both
    datasets, test entries (``"dataset": "vqa"``, ``question_id``, no answer)."""
    vqa_root, vg_root = tmp_path / "mscoco", tmp_path / "visual-genome"
    for i, p in enumerate(COCO + TEST):
        _image(vqa_root / p, i)
    for i, p in enumerate(VG):
        _image(vg_root / p, i + 5)
    d = tmp_path / "data"
    _json(
        d / "vqa_train.json",
        [
            {
                "question_id": 458752000 + i,
                "question": "What is this photo taken looking through?",
                "answer": ["net", "net", "netting", "net", "net", "net", "mesh", "net", "net", "net"],
                "image": p,
                "dataset": "vqa",
            }
            for i, p in enumerate(COCO)
        ],
    )
    _json(
        d / "vg_qa.json",
        [{"dataset": "vg", "question": "What color is the clock?", "answer": "green", "image": p} for p in VG],
    )
    _json(
        d / "vqa_test.json",
        [
            {
                "question_id": 262144000 + i,
                "question": "Is the ball flying towards the batter?",
                "image": p,
                "dataset": "vqa",
            }
            for i, p in enumerate(TEST)
        ],
    )
    _json(d / "answer_list.json", ["net", "netting", "mesh", "green", "yes", "no"])
    return tmp_path, vqa_root, vg_root


# -- readers ---------------------------------------------------------------------------------------


def test_ve_bare_ids_resolve_to_jpg_files(ve_layout):
    root, images = ve_layout
    records, bad = read_classification(root / "data" / "ve_train.json", str(images), "ve")
    assert not bad and [r.image for r in records] == [str(images / f"{n}.jpg") for n in VE_IDS]
    assert all(Path(r.image).is_file() for r in records) and [r.label for r in records] == [2, 1, 0, 2]
    # names that already carry an extension, integer ids and sub-folders are kept working
    _json(
        root / "mixed.json",
        [
            {"image": "2248275918.jpg", "sentence": "a", "label": "neutral"},
            {"image": 3637013, "sentence": "b", "label": "neutral"},
            {"image": "sub.dir/1000092795", "sentence": "c", "label": "neutral"},
            {"image": "x/4004129181.png", "sentence": "d", "label": "neutral"},
        ],
    )
    mixed, bad = read_classification(root / "mixed.json", str(images), "ve")
    assert not bad and [r.image for r in mixed] == [
        str(images / "2248275918.jpg"),
        str(images / "3637013.jpg"),
        str(images / "sub.dir" / "1000092795.jpg"),
        str(images / "x" / "4004129181.png"),
    ]


def test_vqa_entries_resolve_under_their_dataset_root(vqa_layout):
    root, vqa_root, vg_root = vqa_layout
    d = root / "data"
    records, bad = read_vqa(
        [d / "vqa_train.json", d / "vg_qa.json"], None, train=True, vqa_root=str(vqa_root), vg_root=str(vg_root)
    )
    assert not bad
    assert [r.image for r in records] == [str(vqa_root / p) for p in COCO] + [str(vg_root / p) for p in VG]
    assert all(Path(r.image).is_file() for r in records)
    assert records[0].answers == ("net", "netting", "mesh") and records[0].weights == pytest.approx((0.8, 0.1, 0.1))
    assert records[2].answers == ("green",) and records[2].weights == (0.5,)
    test, bad = read_vqa(d / "vqa_test.json", None, train=False, vqa_root=str(vqa_root), vg_root=str(vg_root))
    assert not bad and [r.image for r in test] == [str(vqa_root / p) for p in TEST]
    assert [r.question_id for r in test] == [262144000, 262144001]
    # a root left unset falls back to image_root; a test entry without "dataset" is a VQA entry
    _json(root / "nodataset.json", [{"image": TEST[0], "question": "why?", "question_id": 1}])
    fallback, _ = read_vqa(
        [d / "vg_qa.json", root / "nodataset.json"], str(root / "common"), train=False, vqa_root=str(vqa_root)
    )
    assert [r.image for r in fallback] == [str(root / "common" / p) for p in VG] + [str(vqa_root / TEST[0])]


def test_nlvr_and_retrieval_join_image_root_like_the_authors(tmp_path):
    nlvr_root = tmp_path / "NLVR2"
    pairs = [
        ["images/train/0/train-10171-0-img0.png", "images/train/0/train-10171-0-img1.png"],
        ["dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png"],
    ]
    for i, p in enumerate(x for pair in pairs for x in pair):
        _image(nlvr_root / p, i)
    _json(
        tmp_path / "nlvr_train.json",
        [
            {"images": pair, "sentence": "The left image has two dogs.", "label": label}
            for pair, label in zip(pairs, ["True", "False"], strict=True)
        ],
    )
    recs, bad = read_classification(tmp_path / "nlvr_train.json", str(nlvr_root), "nlvr")
    assert not bad and [r.image for r in recs] == [tuple(str(nlvr_root / p) for p in pair) for pair in pairs]
    assert [r.label for r in recs] == [1, 0]
    flickr = tmp_path / "flickr30k"
    _image(flickr / "flickr30k-images" / "1000092795.jpg", 0)
    _json(
        tmp_path / "flickr30k_train.json",
        [{"caption": "two young guys", "image": "flickr30k-images/1000092795.jpg", "image_id": "1000092795"}],
    )
    recs, bad = read_retrieval_train(tmp_path / "flickr30k_train.json", str(flickr))
    assert not bad and Path(recs[0].image).is_file()


# -- training and evaluation through the CLI ------------------------------------------------------


def test_ve_trains_and_evaluates_on_the_authors_layout(ve_layout, tmp_path):
    root, images = ve_layout
    out = tmp_path / "run_ve"
    assert (
        finetune(
            [
                "ve",
                f"data.train_files=[{root / 'data' / 've_train.json'}]",
                f"data.image_root={images}",
                f"output_dir={out}",
                *TINY,
            ]
        )
        == 0
    )
    assert not (out / "bad_samples.txt").exists()
    assert (
        cli_main(
            [
                "evaluate",
                "ve",
                "--model",
                str(out / "checkpoint_last.pt"),
                "--data",
                str(root / "data" / "ve_test.json"),
                "--image-root",
                str(images),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "m.json").read_text())["n"] == len(VE_IDS)


@pytest.mark.slow
def test_vqa_trains_and_evaluates_on_the_authors_layout(vqa_layout, tmp_path):
    root, vqa_root, vg_root = vqa_layout
    d, out = root / "data", tmp_path / "run_vqa"
    # batch 2 of 4 entries: the sampler's step may hold either dataset, so train on each alone too
    for files in ([d / "vqa_train.json", d / "vg_qa.json"], [d / "vg_qa.json"]):
        assert (
            finetune(
                [
                    "vqa",
                    f"data.train_files=[{','.join(map(str, files))}]",
                    f"data.vqa_root={vqa_root}",
                    f"data.vg_root={vg_root}",
                    f"output_dir={out}",
                    *TINY,
                    "--overwrite",
                ]
            )
            == 0
        )
        assert not (out / "bad_samples.txt").exists()
    assert (
        cli_main(
            [
                "evaluate",
                "vqa",
                "--model",
                str(out / "checkpoint_last.pt"),
                "--data",
                str(d / "vqa_test.json"),
                "--answers",
                str(d / "answer_list.json"),
                "--vqa-root",
                str(vqa_root),
                "--vg-root",
                str(vg_root),
                "--k",
                "3",
                "--device",
                "cpu",
                "--results",
                str(tmp_path / "res.json"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "res.json").read_text())
    assert [r["question_id"] for r in res] == [262144000, 262144001]


# -- a missing image names the full path looked for ------------------------------------------------


def test_missing_ve_image_names_its_full_path(ve_layout, tmp_path):
    root, images = ve_layout
    missing = images / f"{VE_IDS[1]}.jpg"
    missing.unlink()
    two = _json(tmp_path / "ve_two.json", json.loads((root / "data" / "ve_train.json").read_text())[:2])
    out = tmp_path / "run_missing"
    assert finetune(["ve", f"data.train_files=[{two}]", f"data.image_root={images}", f"output_dir={out}", *TINY]) == 0
    assert str(missing) in (out / "bad_samples.txt").read_text()  # training: skipped (replaced) and named
    with pytest.raises(ValueError, match=re.escape(str(missing))):  # evaluation: an error naming it
        cli_main(
            [
                "evaluate",
                "ve",
                "--model",
                str(out / "checkpoint_last.pt"),
                "--data",
                str(two),
                "--image-root",
                str(images),
                "--device",
                "cpu",
            ]
        )


@pytest.mark.slow
def test_missing_vg_image_names_its_full_path(vqa_layout, tmp_path):
    root, vqa_root, vg_root = vqa_layout
    missing = vg_root / VG[0]
    missing.unlink()
    d, out = root / "data", tmp_path / "run_missing"
    assert (
        finetune(
            [
                "vqa",
                f"data.train_files=[{d / 'vg_qa.json'}]",
                f"data.vqa_root={vqa_root}",
                f"data.vg_root={vg_root}",
                f"output_dir={out}",
                *TINY,
            ]
        )
        == 0
    )
    assert str(missing) in (out / "bad_samples.txt").read_text()
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        cli_main(
            [
                "evaluate",
                "vqa",
                "--model",
                str(out / "checkpoint_last.pt"),
                "--data",
                str(d / "vg_qa.json"),
                "--answers",
                str(d / "answer_list.json"),
                "--vqa-root",
                str(vqa_root),
                "--vg-root",
                str(vg_root),
                "--device",
                "cpu",
            ]
        )
