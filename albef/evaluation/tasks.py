"""Evaluation of the reasoning tasks: VQA (answer ranking) and SNLI-VE / NLVR2 (accuracy).

Under torchrun each rank takes a contiguous share of the records; the results are gathered, so
every rank returns what one process computes over all of them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from albef.api import tokenize_answers
from albef.data.pretrain import PretrainRecord, read_image
from albef.distributed import all_reduce_sum, gather_lists, rank_slice
from albef.evaluation.vqa_metric import vqa_accuracy
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA, rank_answers
from albef.text import Tokenizer


class _EvalDataset(Dataset):
    """Images (one or a pair) through the test transform; an unreadable image is an error."""

    def __init__(self, records: Sequence[PretrainRecord], transform):
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        paths = rec.image_paths
        px = [self.transform(read_image(p)) for p in paths]
        return (torch.stack(px) if len(px) > 1 else px[0]), i


def _batches(records, transform, batch_size: int, num_workers: int):
    return DataLoader(_EvalDataset(records, transform), batch_size=batch_size, num_workers=num_workers)


def _require(records: Sequence, what: str) -> None:
    if not records:  # the readers name the files (albef.data.annotations.require_entries)
        raise ValueError(f"no {what} records: nothing to evaluate (the evaluation file holds no entry)")


def _position_limit(model: torch.nn.Module) -> int:
    # the authors cut VQA test questions, SNLI-VE and NLVR2 texts nowhere: only BERT's positions bound them
    return model.config.text.max_position_embeddings


@torch.no_grad()
def evaluate_vqa(
    model: ALBEFForVQA,
    records,
    answer_list: Sequence[str],
    tokenizer: Tokenizer,
    transform,
    k: int = 128,
    scoring: str = "albef",
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    max_question_len: int | None = None,
) -> tuple[dict, list[dict]]:
    """Answers ``[{"question_id", "answer"}]`` (the evaluation server's format) and, where the
    records carry answers, accuracy overall and per question type."""
    records = list(records)
    _require(records, "VQA")
    model.eval()
    ans = tokenize_answers(tokenizer, answer_list)
    ans_ids, ans_mask = ans.input_ids.to(device), ans.attention_mask.to(device)
    records = list(records)
    mine = records[rank_slice(len(records))]
    picked = []  # this rank's best answer index per record, in order
    for px, idx in _batches(mine, transform, batch_size, num_workers):
        recs = [mine[int(i)] for i in idx]
        q = tokenizer(
            [r.captions[0] for r in recs], max_length=max_question_len or _position_limit(model), padding="longest"
        ).to(device)
        states = model.encode_question(px.to(device), q.input_ids, q.attention_mask)
        ranked = rank_answers(model, states, q.attention_mask, ans_ids, ans_mask, k, scoring)["ranked_ids"]
        picked += ranked[:, 0].tolist()
    results, scores = [], defaultdict(list)
    for r, b in zip(records, gather_lists(picked), strict=True):
        results.append({"question_id": r.question_id, "answer": answer_list[b]})
        if r.answers:
            acc = vqa_accuracy(answer_list[b], r.answers)
            scores["overall"].append(acc)
            if r.question_type:
                scores[r.question_type].append(acc)
    metrics = {k_: 100.0 * sum(v) / len(v) for k_, v in scores.items()}
    metrics["n"] = len(results)
    return metrics, results


@torch.no_grad()
def evaluate_classification(
    model: ALBEFForClassification,
    records,
    tokenizer: Tokenizer,
    transform,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    max_length: int | None = None,
) -> dict:
    """Accuracy (the authors' ``argmax == label``) over all records."""
    records = list(records)
    _require(records, "classification")
    model.eval()
    mine = records[rank_slice(len(records))]
    correct = 0
    for px, idx in _batches(mine, transform, batch_size, num_workers):
        recs = [mine[int(i)] for i in idx]
        t = tokenizer(
            [r.captions[0] for r in recs], max_length=max_length or _position_limit(model), padding="longest"
        ).to(device)
        px = px.to(device)
        images = px if model.num_images == 1 else [px[:, 0], px[:, 1]]
        pred = model(images, t.input_ids, t.attention_mask).argmax(-1).cpu()
        correct += int((pred == torch.tensor([r.label for r in recs])).sum())
    correct = int(all_reduce_sum(torch.tensor(float(correct), device=device)))
    return {"accuracy": 100.0 * correct / max(1, len(records)), "n": len(records)}


def vqa_baselines(train_q: list[dict], test_q: list[dict]) -> dict[str, dict]:
    """Per question type: the number of answers the type has in training (``answers``), uniform
    chance over them (``chance``, %), and the type's most common training answer (``majority``)
    with its VQA accuracy on ``test_q`` (``majority_accuracy``, %; None without test questions).

    The report needs them because easy-VQA's types differ in difficulty: two answers for yes/no,
    three shapes, eight colours, so one overall figure hides a type at chance.

    Example:
        >>> tr = [{"question_type": "shape", "answer": [a]} for a in ("circle", "circle", "triangle")]
        >>> vqa_baselines(tr, [{"question_type": "shape", "answer": ["triangle"]}])["shape"]["majority"]
        'circle'
    """
    out: dict[str, dict] = {}
    for t in sorted({q.get("question_type") for q in train_q} - {None}):
        answers = [q["answer"][0] for q in train_q if q.get("question_type") == t]
        top = most_common_answer(answers)
        tested = [vqa_accuracy(top, q["answer"]) for q in test_q if q.get("question_type") == t]
        out[t] = {
            "answers": len(set(answers)),
            "chance": 100.0 / len(set(answers)),
            "majority": top,
            "majority_accuracy": 100.0 * sum(tested) / len(tested) if tested else None,
        }
    return out


def most_common_answer(answers: list[str]) -> str:
    """The most frequent answer; ties go to the first alphabetically, so every process agrees.

    Example:
        >>> most_common_answer(["no", "yes", "yes", "no"])
        'no'
    """
    counts = Counter(answers)
    return min(counts, key=lambda a: (-counts[a], a))
