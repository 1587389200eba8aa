"""``albef data refcoco``: the authors' RefCOCO+ files (REFER refs, dets.json, cocos.json) -> grounding JSON."""

from __future__ import annotations

import json
import pickle

import pytest

from albef.data.cli import main as data_main
from albef.data.refcoco import convert_refcoco, load_plain_pickle
from albef.evaluation.grounding import read_grounding

# ref_id -> (image_id, ann_id, split, ground-truth bbox)
REFS = {
    10: (1, 100, "val", [10, 20, 30, 40]),
    11: (1, 101, "testA", [50, 5, 20, 25.5]),
    12: (2, 102, "testB", [1, 2, 3, 4]),
    13: (3, 103, "testB", [0, 0, 8, 8]),  # image 3 has no detections
    14: (2, 104, "train", [4, 4, 4, 4]),  # not in the authors' metrics
}
DETS = {
    "1": [[10, 20, 30, 40, 0.9], [0, 0, 5, 5, 0.5], [3, 3, 0, 4, 0.1]],  # the last has no area
    "2": [[1, 2, 3, 4, 0.7], [2, 2, 9, 9, 0.2]],
}
COCOS = {"1": [[10, 20, 30, 40], [50, 5, 20, 25.5]], "2": [[1, 2, 3, 4]], "3": [[0, 0, 8, 8]]}


@pytest.fixture
def refer(tmp_path):
    d = tmp_path / "refcoco+"
    d.mkdir()
    refs = [
        {
            "ref_id": r,
            "ann_id": a,
            "image_id": i,
            "split": s,
            "category_id": 1,
            "sent_ids": [r * 10],
            "sentences": [{"sent_id": r * 10, "sent": f"thing {r}", "raw": f"Thing {r}", "tokens": ["thing"]}],
            "file_name": f"COCO_train2014_{i:012d}_{a}.jpg",
        }
        for r, (i, a, s, _) in REFS.items()
    ]
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {
        "images": [
            {"id": i, "height": 100, "width": 100, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in (1, 2, 3)
        ],
        "annotations": [
            {"id": a, "image_id": i, "bbox": box, "category_id": 1, "area": box[2] * box[3]}
            for i, a, _, box in REFS.values()
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (d / "instances.json").write_text(json.dumps(instances))
    (d / "dets.json").write_text(json.dumps(DETS))
    (d / "cocos.json").write_text(json.dumps(COCOS))

    def expr(r, text):
        return {"image": f"train2014/COCO_train2014_{REFS[r][0]:012d}.jpg", "text": text, "ref_id": r}

    (tmp_path / "refcoco+_val.json").write_text(json.dumps([expr(10, "the man on the left"), expr(10, "left guy")]))
    (tmp_path / "refcoco+_test.json").write_text(
        json.dumps([expr(11, "woman in red"), expr(12, "small dog"), expr(13, "the cat"), expr(14, "a train ref")])
    )
    return tmp_path


def _files(root):
    return [root / "refcoco+_val.json", root / "refcoco+_test.json"]


def test_detections_protocol_copies_boxes_and_names_splits_as_the_authors(refer):
    out = refer / "out.json"
    counts = convert_refcoco(_files(refer), refer / "refcoco+", out)
    entries = json.loads(out.read_text())
    # one entry per expression: ref 10 twice; ref 13 (no detections) and ref 14 (train) skipped
    assert [(e["ref_id"], e["text"]) for e in entries] == [
        (10, "the man on the left"),
        (10, "left guy"),
        (11, "woman in red"),
        (12, "small dog"),
    ]
    for e in entries:
        image_id, _, split, box = REFS[e["ref_id"]]
        assert e["box"] == box
        assert e["split"] == split + "_d"
        assert e["image"] == f"train2014/COCO_train2014_{image_id:012d}.jpg"
        assert e["candidates"] == [d[:4] for d in DETS[str(image_id)] if d[2] > 0 and d[3] > 0]
    assert counts == {
        "written": 4,
        "no_candidates": 1,
        "other_split": 1,
        "dropped_boxes": 1,
        "val_d": 2,
        "testA_d": 1,
        "testB_d": 1,
    }


def test_ground_truth_protocol_uses_cocos_and_plain_split_names(refer):
    out = refer / "out_gt.json"
    counts = convert_refcoco(_files(refer), refer / "refcoco+", out, candidates="gt")
    entries = json.loads(out.read_text())
    assert [e["ref_id"] for e in entries] == [10, 10, 11, 12, 13]  # image 3 has COCO boxes
    assert {e["split"] for e in entries} == {"val", "testA", "testB"}
    for e in entries:
        image_id, _, split, box = REFS[e["ref_id"]]
        assert (e["box"], e["split"], e["candidates"]) == (box, split, COCOS[str(image_id)])
    assert counts["no_candidates"] == 0 and counts["testB"] == 2


def test_the_grounding_evaluator_reads_the_output(refer):
    out = refer / "out.json"
    convert_refcoco(_files(refer), refer / "refcoco+", out)
    records = read_grounding(out, "/data/coco")
    assert len(records) == 4
    r = records[2]
    assert (r.ref_id, r.split, r.box) == (11, "testA_d", (50.0, 5.0, 20.0, 25.5))
    assert r.image == "/data/coco/train2014/COCO_train2014_000000000001.jpg"
    assert r.candidates == ((10.0, 20.0, 30.0, 40.0), (0.0, 0.0, 5.0, 5.0))


class _Opens:
    """Unpickling this would call open(path, "w")."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_refs_pickle_may_not_name_a_class_or_function(refer):
    touched = refer / "created_by_unpickling"
    refs_path = refer / "refcoco+" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps([{"ref_id": 10, "x": _Opens(str(touched))}], protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: it names .*open.*refusing to load"):
        convert_refcoco(_files(refer), refer / "refcoco+", refer / "out.json")
    assert not touched.exists()
    from collections import OrderedDict

    refs_path.write_bytes(pickle.dumps([OrderedDict(ref_id=10)]))
    with pytest.raises(ValueError, match=r"collections\.OrderedDict"):
        load_plain_pickle(refs_path)


def test_python2_pickles_of_plain_data_load(tmp_path):
    # [{'split': 'val', 'sent': 'caf\xc3\xa9'}] as Python 2's cPickle writes it (byte strings)
    p = tmp_path / "refs(unc).p"
    p.write_bytes(b"\x80\x02]q\x00}q\x01(U\x05splitU\x03valU\x04sentU\x05caf\xc3\xa9ua.")
    assert load_plain_pickle(p) == [{"split": "val", "sent": "café"}]


def test_a_ref_id_absent_from_the_refs_is_an_error_naming_the_file(refer):
    (refer / "refcoco+_val.json").write_text(json.dumps([{"image": "x.jpg", "text": "who", "ref_id": 999}]))
    with pytest.raises(ValueError, match=r"refcoco\+_val\.json\[0\]: ref_id 999 is not in .*refs\(unc\)\.p"):
        convert_refcoco(_files(refer), refer / "refcoco+", refer / "out.json")
    assert not (refer / "out.json").exists()


@pytest.mark.parametrize("missing", ["dets.json", "refs(unc).p", "instances.json"])
def test_a_missing_file_is_named(refer, missing):
    (refer / "refcoco+" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing.replace('(', '.').replace(')', '.')} not found"):
        convert_refcoco(_files(refer), refer / "refcoco+", refer / "out.json")


def test_cli(refer, capsys):
    out = refer / "cli.json"
    argv = ["refcoco", *map(str, _files(refer)), "--refer", str(refer / "refcoco+"), "--out", str(out)]
    assert data_main(argv) == 0
    cap = capsys.readouterr()
    assert "wrote 4 expressions" in cap.out and "val_d 2" in cap.out
    assert "skipped 1 expressions whose image has no candidate box" in cap.err
    with pytest.raises(SystemExit):  # an existing output is kept unless told
        data_main([*argv, "--candidates", "gt"])
    assert "exists: give another --out, or --overwrite" in capsys.readouterr().err
    assert data_main([*argv, "--candidates", "gt", "--overwrite"]) == 0
    assert {e["split"] for e in json.loads(out.read_text())} == {"val", "testA", "testB"}
