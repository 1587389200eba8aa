"""``albef data easyvqa DIR``: the easy-VQA data set (the ``easy-vqa`` package on PyPI, MIT
licence, by Victor Zhou) in the authors' VQA format.

Writes ``images/{train,test}/N.png`` (64 px), ``vqa_train.json`` (``{"image", "question",
"answer": [a], "dataset": "vqa", "question_id", "question_type"}``), ``vqa_test.json`` (the same
with answers kept for local scoring), ``answer_list.json`` (its 13 answers) and ``LICENSE.md``.
Idempotent: existing files are kept. The package is installed from the index when missing.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from albef.checkpoints.files import atomic_write_bytes, atomic_write_text

SHAPES = {"circle", "rectangle", "triangle"}
LICENSE = """# easy-VQA

Images, questions and answers from easy-VQA by Victor Zhou (https://github.com/vzhou842/easy-VQA),
distributed in the `easy-vqa` package on PyPI under the MIT License, Copyright (c) 2019 Victor Zhou.
Converted to the ALBEF authors' VQA format by `albef data easyvqa`.
"""


def _easy_vqa():
    try:
        return importlib.import_module("easy_vqa")
    except ImportError:
        pass
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "easy-vqa==1.0"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            "could not install the 'easy-vqa' package from the package index (is it reachable?):\n"
            + proc.stderr[-2000:]
        )
    importlib.invalidate_caches()
    return importlib.import_module("easy_vqa")


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def build_easyvqa(out: str | Path) -> dict[str, int]:
    """Convert easy-VQA into ``out``; returns counts."""
    ev = _easy_vqa()
    out = Path(out)
    counts = {}
    for split, get_q, get_paths in (
        ("train", ev.get_train_questions, ev.get_train_image_paths),
        ("test", ev.get_test_questions, ev.get_test_image_paths),
    ):
        questions, answers, image_ids = get_q()
        paths = get_paths()
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for image_id, src in paths.items():
            dst = out / "images" / split / f"{image_id}.png"
            if not dst.exists():  # whole or absent: a file that exists is taken as done
                atomic_write_bytes(dst, Path(src).read_bytes())
        entries = [
            {
                "image": f"images/{split}/{i}.png",
                "question": q,
                "answer": [a],
                "dataset": "vqa",
                "question_id": n,
                "question_type": question_type(a),
            }
            for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
        ]
        target = out / f"vqa_{split}.json"
        if not target.exists():
            atomic_write_text(target, json.dumps(entries))
        counts[split] = len(entries)
    if not (out / "answer_list.json").exists():
        atomic_write_text(out / "answer_list.json", json.dumps(ev.get_answers()))
    (out / "LICENSE.md").write_text(LICENSE)
    return counts
