"""Bad text and bad annotation files: rejected at load time, naming the file, the entry and the fix.

Training skips and names a bad entry (and resumes past it); evaluation refuses it (skipping would
change the benchmark); a file that cannot be read at all, or holds nothing to evaluate, is an
error naming the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from albef.checkpoints import save_pretrained
from albef.cli import main as cli_main
from albef.config import get_preset
from albef.data.annotations import read_annotations
from albef.data.classification import read_classification
from albef.data.cli import write_shapes
from albef.data.pretrain import parse_pretrain_entry
from albef.data.retrieval import read_retrieval_eval, read_retrieval_train
from albef.data.vqa import read_answer_list, read_vqa
from albef.evaluation.grounding import read_grounding
from albef.models.albef import ALBEF
from albef.text import BadTextError, Tokenizer, check_text, clean_text

SURROGATE = json.loads('"\\udcc3"')  # what surrogateescape decoding of a stray byte gives
CELLS = [[0, 0, 16, 16], [16, 0, 16, 16]]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes(d, n=16, image_size=32, seed=2, test=4)
    save_pretrained(ALBEF(get_preset("albef-tiny")), d / "model")
    return d


def _write(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries))  # ensure_ascii: the surrogate is written as a \udcc3 escape
    return path


# -- the class of text the tokenizer cannot take ------------------------------------------------------


@pytest.mark.parametrize(
    "value, reason",
    [
        (f"a dog {SURROGATE} running", "lone surrogate '\\udcc3' at character 6"),
        ("\ud83d alone", "lone surrogate"),  # a high surrogate without its pair
        (3, "must be a string, not int"),
        (["a dog"], "must be a string, not list"),
        (None, "is missing"),
        ("?!...", "empty after cleaning"),
        ("\x00\x01", "empty after cleaning"),  # control characters only: the tokenizer drops them all
        ("\u200b \ufeff", "empty after cleaning"),  # format characters only
        ("\t\n", "empty after cleaning"),
    ],
)
def test_clean_text_rejects_text_the_tokenizer_cannot_take(value, reason):
    with pytest.raises(BadTextError, match="'caption'.*" + reason.replace("\\", "\\\\").replace("?", "\\?")):
        clean_text(value, "'caption'")


def test_what_clean_text_accepts_the_tokenizer_encodes():
    tok = Tokenizer()
    texts = ["a\x00b dog", "caf\u00e9 \U0001f600 smile", "\ufffe odd", "\u2028line", "a\x1b[31m red", "zero\u200bwidth"]
    cleaned = [clean_text(t) for t in texts]
    ids = tok(cleaned, padding="none", return_tensors=False).input_ids
    assert all(len(x) > 1 for x in ids)  # [CLS] and at least one token each
    with pytest.raises(BadTextError, match="lone surrogate"):
        check_text("x" + SURROGATE)


# -- training: skipped, named, and the run trains and resumes -----------------------------------------


def test_readers_skip_and_name_every_kind_of_bad_training_text(tmp_path):
    entries = [
        {"image": "a.png", "caption": "a red circle"},
        {"image": "b.png", "caption": f"a {SURROGATE} square"},
        {"image": "c.png", "caption": ["a blue square", 7]},
        {"image": "d.png", "caption": ["two cats", f"x{SURROGATE}"]},
        {"image": "e.png", "caption": "\x00"},
        {"image": "f.png", "caption": ["", "a green one"]},
    ]
    path = _write(tmp_path / "p.json", entries)
    records, bad = read_annotations(path, parse_pretrain_entry(str(tmp_path)))
    assert [r.captions for r in records] == [("a red circle",), ("a green one",)]
    assert [b.where for b in bad] == [f"{path}[{i}]" for i in (1, 2, 3, 4)]
    assert "'caption' holds a lone surrogate" in bad[0].reason and "'caption'[1] must be a string" in bad[1].reason
    assert "'caption'[1] holds a lone surrogate" in bad[2].reason and "empty after cleaning" in bad[3].reason

    train = _write(
        tmp_path / "r.json",
        [
            {"image": "a.png", "caption": "a dog", "image_id": 1},
            {"image": "a.png", "caption": SURROGATE, "image_id": 1},
        ],
    )
    records, bad = read_retrieval_train(train, str(tmp_path))
    assert len(records) == 1 and bad[0].where == f"{train}[1]" and "lone surrogate" in bad[0].reason
    ve = _write(
        tmp_path / "ve.json",
        [
            {"image": "1", "sentence": "a dog", "label": "neutral"},
            {"image": "2", "sentence": SURROGATE, "label": "neutral"},
            {"image": "3", "sentence": 12, "label": "neutral"},
        ],
    )
    records, bad = read_classification(ve, str(tmp_path), "ve")
    assert len(records) == 1 and [b.where for b in bad] == [f"{ve}[1]", f"{ve}[2]"]
    vqa = _write(
        tmp_path / "vqa.json",
        [
            {"image": "a.png", "question": "what?", "answer": "red"},
            {"image": "a.png", "question": "is it red", "answer": ["yes", SURROGATE]},
            {"image": "a.png", "question": "is it red", "answer": 5},
        ],
    )
    records, bad = read_vqa(vqa, str(tmp_path), train=True)
    assert len(records) == 1 and "'answer'[1] holds a lone surrogate" in bad[0].reason
    assert "'answer' must be a string, not int" in bad[1].reason


@pytest.mark.slow
def test_a_surrogate_caption_is_skipped_named_and_the_run_resumes(tmp_path, caplog, capsys):
    data = tmp_path / "data"
    path = write_shapes(data, n=128, image_size=16, seed=4)
    entries = json.loads(path.read_text())
    entries.insert(5, {"image": entries[5]["image"], "caption": f"a red {SURROGATE} circle"})
    _write(path, entries)  # 1 bad in 129: under the default 1 % limit
    out = tmp_path / "run"
    args = [
        "pretrain",
        "model.preset=albef-tiny",
        "model.overrides={queue_size: 16}",
        f"data.train_files=[{path}]",
        f"data.image_root={data}",
        "data.num_workers=0",
        "train.device=cpu",
        "train.batch_size=4",
        "train.log_every=1",
        "train.checkpoint_every=0",
        f"output_dir={out}",
    ]
    with caplog.at_level(logging.WARNING):
        assert cli_main([*args, "train.max_steps=2"]) == 0
    assert f"{path}[5]: 'caption' holds a lone surrogate" in caplog.text
    capsys.readouterr()
    assert cli_main([*args, "train.max_steps=4", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["global_step"] == 4


# -- evaluation: a bad entry is an error naming it ----------------------------------------------------


def test_evaluation_readers_refuse_a_surrogate_naming_file_and_entry(tmp_path):
    ret = _write(
        tmp_path / "ret.json",
        [{"image": "a.png", "caption": ["a dog", "a cat"]}, {"image": "b.png", "caption": ["a cow", f"x {SURROGATE}"]}],
    )
    with pytest.raises(ValueError, match=r"ret.json\[1\]: 'caption'\[1\] holds a lone surrogate.*fix"):
        read_retrieval_eval(ret, str(tmp_path))
    # a non-string caption of a list is refused too (it used to be dropped, changing the benchmark)
    _write(ret, [{"image": "a.png", "caption": ["a dog", "a cat"]}, {"image": "b.png", "caption": ["a cow", None]}])
    with pytest.raises(ValueError, match=r"ret.json\[1\]: 'caption'\[1\] must be a string, not null"):
        read_retrieval_eval(ret, str(tmp_path))
    grd = _write(
        tmp_path / "g.json",
        [
            {"image": "a.png", "text": "the left one", "box": CELLS[0], "candidates": CELLS},
            {"image": "a.png", "text": SURROGATE, "box": CELLS[0], "candidates": CELLS},
        ],
    )
    with pytest.raises(ValueError, match=r"g.json\[1\]: 'text' holds a lone surrogate"):
        read_grounding(grd, str(tmp_path))
    nlvr = _write(
        tmp_path / "nlvr.json",
        [
            {"images": ["a.png", "b.png"], "sentence": "a dog", "label": "True"},
            {"images": ["a.png", "b.png"], "sentence": SURROGATE, "label": "True"},
        ],
    )
    records, bad = read_classification(nlvr, str(tmp_path), "nlvr")
    assert bad[0].where == f"{nlvr}[1]" and "'sentence' holds a lone surrogate" in bad[0].reason
    answers = _write(tmp_path / "answers.json", ["red", SURROGATE])
    with pytest.raises(ValueError, match=r"answers.json\[1\]: answer holds a lone surrogate"):
        read_answer_list(answers)


@pytest.mark.parametrize("task", ["retrieval", "grounding", "vqa", "ve", "nlvr"])
def test_evaluate_cli_names_a_surrogate_entry(shapes, tmp_path, task):
    img = "images/000000.png"
    good = {
        "retrieval": {"image": img, "caption": ["a dog"]},
        "grounding": {"image": img, "text": "the left one", "box": CELLS[0], "candidates": CELLS},
        "vqa": {"image": img, "question": "what color", "question_id": 1},
        "ve": {"image": img, "sentence": "a dog", "label": "neutral"},
        "nlvr": {"images": [img, img], "sentence": "a dog", "label": "True"},
    }[task]
    field = {"retrieval": "caption", "grounding": "text", "vqa": "question"}.get(task, "sentence")
    bad = {**good, field: [f"x {SURROGATE}"] if task == "retrieval" else f"x {SURROGATE}"}
    data = _write(tmp_path / f"{task}.json", [good, bad])
    extra = ["--answers", str(_write(tmp_path / "a.json", ["red", "blue"]))] if task == "vqa" else []
    with pytest.raises(ValueError, match=rf"{task}.json\[1\]: '{field}'(\[0\])? holds a lone surrogate"):
        cli_main(
            [
                "evaluate",
                task,
                "--model",
                str(shapes / "model"),
                "--data",
                str(data),
                "--image-root",
                str(shapes),
                "--device",
                "cpu",
                *extra,
            ]
        )


@pytest.mark.parametrize("task", ["retrieval", "grounding", "vqa", "ve", "nlvr"])
def test_evaluate_cli_on_an_empty_list_says_nothing_to_evaluate(shapes, tmp_path, task):
    data = _write(tmp_path / "empty.json", [])
    extra = ["--answers", str(_write(tmp_path / "a.json", ["red", "blue"]))] if task == "vqa" else []
    with pytest.raises(ValueError, match=r"empty.json: no entries, nothing to evaluate"):
        cli_main(
            [
                "evaluate",
                task,
                "--model",
                str(shapes / "model"),
                "--data",
                str(data),
                "--image-root",
                str(shapes),
                "--device",
                "cpu",
                *extra,
            ]
        )


# -- annotation files that could not be read ----------------------------------------------------------


def test_a_non_utf8_json_list_names_the_file_and_byte(tmp_path):
    path = tmp_path / "latin1.json"
    data = '[{"image": "a.png", "caption": "un caf\u00e9"}]'.encode("latin-1")
    path.write_bytes(data)
    at = data.index(b"\xe9")
    with pytest.raises(ValueError, match=rf"latin1.json: not UTF-8 text: byte {at} .*must be UTF-8"):
        read_annotations(path, parse_pretrain_entry(None))


def test_a_non_utf8_json_line_is_skipped_and_named(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        b'{"image": "a.png", "caption": "a dog"}',
        b'{"image": "b.png", "caption": "caf\xe9"}',
        b'{"image": "c.png", "caption": "a cat"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, bad = read_annotations(path, parse_pretrain_entry(None))
    assert [r.captions for r in records] == [("a dog",), ("a cat",)]
    offset = len(lines[0]) + 1 + lines[1].index(b"\xe9")
    assert bad[0].where == f"{path}:2" and f"byte {offset}" in bad[0].reason and "UTF-8" in bad[0].reason


@pytest.mark.parametrize(
    "text", ['[{"image": "a.png", "caption": "a dog"}]', '{"image": "a.png", "caption": "a dog"}\n']
)
def test_a_byte_order_mark_is_accepted(tmp_path, text):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, bad = read_annotations(path, parse_pretrain_entry(None))
    assert not bad and records[0].captions == ("a dog",)
    answers = tmp_path / "answers.json"
    answers.write_bytes(b"\xef\xbb\xbf" + b'["yes", "no"]')
    assert read_answer_list(answers) == ["yes", "no"]


def test_a_top_level_object_is_an_error_saying_what_was_found(tmp_path, shapes, capsys):
    wrapped = _write(tmp_path / "wrapped.json", {"info": {}, "annotations": [{"image": "a.png", "caption": "a dog"}]})
    with pytest.raises(
        ValueError,
        match=r"wrapped.json: expected a JSON list of entries or JSON Lines.*found a JSON "
        r"object with keys 'info', 'annotations'; its 'annotations' holds a list",
    ):
        read_annotations(wrapped, parse_pretrain_entry(None))
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"image": "a.png", "caption": "a dog"}, indent=2))
    with pytest.raises(
        ValueError, match=r"single.json: .*keys 'image', 'caption'; if it is one entry, wrap it in \[ \]"
    ):
        read_annotations(single, parse_pretrain_entry(None))
    one_line = tmp_path / "one.jsonl"  # one entry on one line is JSON Lines
    one_line.write_text(json.dumps({"image": "a.png", "caption": "a dog"}) + "\n")
    assert len(read_annotations(one_line, parse_pretrain_entry(None))[0]) == 1
    # through the CLI: the run stops before any work, naming the file
    with pytest.raises(SystemExit):
        cli_main(
            [
                "pretrain",
                "model.preset=albef-tiny",
                f"data.train_files=[{wrapped}]",
                f"data.image_root={shapes}",
                "data.num_workers=0",
                "train.device=cpu",
                "train.max_steps=1",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
    assert "wrapped.json: expected a JSON list" in capsys.readouterr().err


def test_a_file_of_only_bad_entries_says_why(tmp_path):
    path = _write(tmp_path / "allbad.json", [{"image": "a.png", "caption": SURROGATE}, {"caption": "no image"}])
    with pytest.raises(
        ValueError,
        match=r"no valid entry in .*allbad.json: all 2 are bad(.|\n)*allbad.json\[0\]: "
        r"'caption' holds a lone surrogate",
    ):
        read_annotations(path, parse_pretrain_entry(None))
