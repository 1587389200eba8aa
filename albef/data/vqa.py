"""VQA data in the authors' format, and the easy-VQA converter.

Train: ``{"image", "question", "answer": [str] | str, "dataset": "vqa" | "vg"}``. An answer's
weight is its share of the annotators' answers for ``vqa`` entries (``count / n``), 0.5 for ``vg``
entries, as the authors compute it. Test: ``{"image", "question", "question_id"}`` (an ``answer``
field, when present, is used for local accuracy). ``answer_list.json``: the candidate answers.

Images, as in the authors' ``vqa_dataset``: an entry's ``image`` is joined to ``vqa_root`` (COCO)
when its ``dataset`` is ``"vqa"`` and to ``vg_root`` (Visual Genome) when it is ``"vg"``. An entry
without ``dataset`` (test files) is a VQA entry, as is any other value (the same rule as the answer
weights). A root left ``None`` falls back to ``image_root``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from albef.api import tokenize_answers
from albef.data.annotations import BadSample, read_annotations, read_json_file, require_entries, resolve_image
from albef.data.pretrain import PretrainDataset, PretrainRecord
from albef.text import BadTextError, Tokenizer, check_text, clean_text, has_tokens

# the authors' VQA test split keeps questions up to 50 words (30 in training) and cuts no tokens
TEST_QUESTION_WORDS = 50


@dataclass(frozen=True)
class VQARecord(PretrainRecord):
    answers: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    question_id: Any = None
    question_type: str | None = None


def answer_weights(answers: Sequence[str], dataset: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The authors' training targets: distinct answers weighted by their share (VQA) or 0.5 (VG)."""
    if dataset == "vg":
        return (answers[0],), (0.5,)
    w: dict[str, float] = {}
    for a in answers:
        w[a] = w.get(a, 0.0) + 1 / len(answers)
    return tuple(w), tuple(w.values())


def read_vqa(
    files: str | Sequence[str],
    image_root: str | None,
    train: bool,
    cleaning: str = "albef",
    max_words: int | None = None,
    vqa_root: str | None = None,
    vg_root: str | None = None,
) -> tuple[list[VQARecord], list[BadSample]]:
    """Read VQA entries. ``"dataset": "vg"`` entries' images are under ``vg_root``, all others'
    (``"vqa"``, or no ``dataset`` field) under ``vqa_root``; either root, when ``None``, is
    ``image_root``."""
    roots = {"vqa": image_root if vqa_root is None else vqa_root, "vg": image_root if vg_root is None else vg_root}

    def parse(entry: dict, where: str) -> VQARecord:
        image = resolve_image(entry.get("image"), roots["vg" if entry.get("dataset") == "vg" else "vqa"])
        q = clean_text(entry.get("question"), "'question'", cleaning, max_words, question=True)
        ans = entry.get("answer")
        ans = [] if ans is None else [ans] if not isinstance(ans, list) else ans
        for i, a in enumerate(ans):  # answers are tokenized (training) or compared (evaluation) as they are
            check_text(a, "'answer'" if len(ans) == 1 else f"'answer'[{i}]")
        if train and (not ans or not all(has_tokens(a) for a in ans)):
            raise ValueError("a training entry needs 'answer': a non-empty string or list of strings")
        # training: the authors' distinct answers and weights; evaluation: every annotator's answer, as
        # the official accuracy leaves each out in turn
        if not ans:
            answers, weights = (), ()
        elif train:
            answers, weights = answer_weights(ans, entry.get("dataset", "vqa"))
        else:
            answers, weights = tuple(ans), ()
        return VQARecord(
            image, (q,), where, answers, weights, entry.get("question_id", where), entry.get("question_type")
        )

    records, bad = read_annotations(files, parse)
    if not train:
        require_entries(len(records), files, "VQA evaluation")
    return records, bad


def read_answer_list(path: str | Path) -> list[str]:
    answers = read_json_file(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: expected a JSON list of answer strings")
    for i, a in enumerate(answers):  # every candidate is tokenized: one the tokenizer can't take fails it all
        try:
            if not has_tokens(check_text(a, "answer")):
                raise BadTextError(f"answer {a!r} is empty for the tokenizer")
        except BadTextError as e:
            raise ValueError(f"{path}[{i}]: {e}; fix or remove it") from None
    return answers


class VQADataset(PretrainDataset):
    """Items: image, cleaned question, answers and weights (the record's)."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        rec = self.records[item["index"]]
        item.update(answers=rec.answers, weights=rec.weights)
        return item


@dataclass
class VQABatch:
    images: Tensor
    question_ids: Tensor
    question_mask: Tensor
    answer_ids: Tensor  # every question's answers, question by question
    answer_mask: Tensor
    weights: Tensor
    n_answers: Tensor
    index: Tensor
    bad: list[BadSample] = field(default_factory=list)
    n_replaced: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VQABatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if f.name not in ("index", "bad", "n_replaced")
        }
        return dataclasses.replace(self, **moved)


class VQACollator:
    def __init__(self, tokenizer: Tokenizer, max_question_len: int = 35):
        self.tokenizer, self.max_question_len = tokenizer, max_question_len

    def __call__(self, items: list[dict]) -> VQABatch:
        q = self.tokenizer([it["caption"] for it in items], max_length=self.max_question_len, padding="longest")
        a = tokenize_answers(self.tokenizer, [x for it in items for x in it["answers"]])
        return VQABatch(
            torch.stack([it["image"] for it in items]),
            q.input_ids,
            q.attention_mask,
            a.input_ids,
            a.attention_mask,
            torch.tensor([w for it in items for w in it["weights"]]),
            torch.tensor([len(it["answers"]) for it in items]),
            torch.tensor([it["index"] for it in items]),
            [b for it in items for b in it["bad"]],
            sum(1 for it in items if it["bad"]),
        )


def build_vqa_train_dataset(
    files: Sequence[str],
    image_root: str | None,
    transform: Callable,
    seed: int,
    cleaning: str = "albef",
    vqa_root: str | None = None,
    vg_root: str | None = None,
    truncated_ok: bool = True,
    max_words: int | None = None,
):
    records, bad = read_vqa(files, image_root, True, cleaning, max_words=max_words, vqa_root=vqa_root, vg_root=vg_root)
    return VQADataset(records, transform, seed=seed, truncated_ok=truncated_ok), bad
