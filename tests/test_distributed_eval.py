"""VQA, SNLI-VE and grounding evaluation split across 2 gloo processes == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef.checkpoints.pretrained import save_pretrained
from albef.cli import main as cli_main
from albef.config import get_preset
from albef.data.cli import write_shapes
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # each case: torchrun with 2 gloo ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("deval")
    write_shapes(d, n=9, image_size=32, seed=7)
    imgs = [f"images/{i:06d}.png" for i in range(9)]
    words = ["red", "blue", "green", "round", "square"]
    (d / "vqa.json").write_text(
        json.dumps(
            [
                {
                    "image": imgs[i],
                    "question": f"is the {words[i % 5]} shape big?",
                    "answer": ["yes", "no", "yes"][: 1 + i % 3],
                    "question_id": i,
                    "question_type": ["color", "shape"][i % 2],
                }
                for i in range(9)
            ]
        )
    )
    (d / "answers.json").write_text(json.dumps(["yes", "no", "red", "blue", "round"]))
    labels = ["entailment", "neutral", "contradiction"]
    (d / "ve.json").write_text(
        json.dumps(
            [{"image": imgs[i], "sentence": f"a {words[i % 5]} shape", "label": labels[i % 3]} for i in range(9)]
        )
    )
    cells = [[0, 0, 16, 16], [16, 0, 16, 16], [0, 16, 16, 16], [16, 16, 16, 16]]
    (d / "g.json").write_text(
        json.dumps(
            [
                {
                    "image": imgs[i],
                    "text": f"the {words[i % 5]} one",
                    "ref_id": i,
                    "box": cells[i % 4],
                    "candidates": cells,
                    "split": ["val", "testA"][i % 2],
                }
                for i in range(5)
            ]
        )
    )
    cfg = get_preset("albef-tiny")
    torch.manual_seed(0)
    save_pretrained(ALBEFForVQA(cfg), d / "vqa_model")
    save_pretrained(ALBEFForClassification(cfg, 3), d / "ve_model")
    save_pretrained(ALBEF(cfg), d / "model")
    return d


CASES = {
    "vqa": lambda d: [
        "vqa",
        "--model",
        str(d / "vqa_model"),
        "--data",
        str(d / "vqa.json"),
        "--answers",
        str(d / "answers.json"),
        "--k",
        "3",
    ],
    "ve": lambda d: ["ve", "--model", str(d / "ve_model"), "--data", str(d / "ve.json"), "--batch-size", "2"],
    "grounding": lambda d: ["grounding", "--model", str(d / "model"), "--data", str(d / "g.json"), "--batch-size", "2"],
}


@pytest.mark.parametrize("what", list(CASES))
def test_two_gloo_processes_give_the_same_results(data, tmp_path, what):
    args = ["evaluate", *CASES[what](data), "--image-root", str(data), "--device", "cpu"]

    def extra(tag: str) -> list[str]:
        answers = ["--results", str(tmp_path / f"{tag}_answers.json")] if what == "vqa" else []
        return ["--out", str(tmp_path / f"{tag}.json"), *answers]

    assert cli_main([*args, *extra("one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "albef.cli",
            *args,
            *extra("two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one report: the two processes formed a group (alone, each would print and evaluate everything)
    assert proc.stdout.count("accuracy" if what != "vqa" else "VQA on") == 1, proc.stdout
    one, two = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("one", "two"))
    assert one == two and one["n"] == (5 if what == "grounding" else 9)
    if what == "vqa":  # every question answered once, in the input order
        a, b = (json.loads((tmp_path / f"{t}_answers.json").read_text()) for t in ("one", "two"))
        assert a == b and [r["question_id"] for r in a] == list(range(9))
