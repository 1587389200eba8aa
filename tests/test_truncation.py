"""Where the authors cut text by tokens and where they do not (their tokenizer calls):
Pretrain.py, Pretrain_nlvr.py and VQA.py training pass ``truncation=True, max_length=25``;
Retrieval.py and Grounding.py training pass ``max_length=30`` without ``truncation`` (nothing is cut);
NLVR.py, VE.py and VQA test questions pass no length at all; Retrieval.py evaluation cuts at 30."""

from __future__ import annotations

import pytest
import torch

from albef.config import get_preset
from albef.data.pretrain import PretrainCollator
from albef.recipes import load_recipe
from albef.text import Tokenizer
from albef.training.tasks import get_task, text_max_length

# a caption of 30 words (the cleaning limit) that is 32 WordPiece tokens long with [CLS]
LONG = " ".join(["a"] * 28 + ["skateboarding", "giraffe"])


def _collated_length(task: str, *overrides: str) -> int:
    recipe = load_recipe(None, [f"task={task}", *overrides])
    cfg = get_preset("albef-base")
    cfg.max_text_len = 30 if task in ("retrieval", "grounding") else 25  # the recipes' values
    collate = PretrainCollator(Tokenizer(), text_max_length(task, cfg, recipe.data.truncate_text))
    item = {"image": torch.zeros(3, 4, 4), "caption": LONG, "index": 0, "bad": [], "idx": 0, "label": 0}
    return int(collate([item]).attention_mask.sum())


def test_the_long_caption_is_longer_than_every_limit():
    assert len(Tokenizer()(LONG).input_ids[0]) > 30


@pytest.mark.parametrize(
    "task, expected",
    [("pretrain", 25), ("nlvr_pretrain", 25), ("retrieval", None), ("grounding", None), ("ve", None), ("nlvr", None)],
)
def test_training_text_is_cut_where_the_authors_cut(task, expected):
    full = len(Tokenizer()(LONG).input_ids[0])
    assert _collated_length(task) == (expected or full)


def test_vqa_questions_are_cut_at_max_text_len_in_training():
    from albef.data.vqa import VQACollator

    cfg = get_preset("albef-base")
    collate = VQACollator(Tokenizer(), text_max_length("vqa", cfg))
    batch = collate(
        [
            {
                "image": torch.zeros(3, 4, 4),
                "caption": LONG,
                "answers": ["yes[SEP]"],
                "weights": [1.0],
                "index": 0,
                "bad": [],
            }
        ]
    )
    assert batch.question_mask.sum() == 25 == cfg.max_text_len


def test_truncate_text_option_cuts_every_task_or_none():
    assert _collated_length("retrieval", "data.truncate_text=true") == 30
    assert _collated_length("pretrain", "data.truncate_text=false") == len(Tokenizer()(LONG).input_ids[0])
    assert get_task("retrieval").name == "retrieval"


def test_ve_and_nlvr_evaluation_text_is_not_cut(monkeypatch):
    """VE / NLVR2 test sentences reach the model whole (VE.py / NLVR.py tokenise without a length)."""
    import albef.evaluation.tasks as T
    from albef.models.tasks import ALBEFForClassification

    seen = []
    real = Tokenizer.__call__

    def spy(self, texts, max_length=None, **kw):
        out = real(self, texts, max_length=max_length, **kw)
        seen.append(out.attention_mask.sum(1).max().item())
        return out

    monkeypatch.setattr(Tokenizer, "__call__", spy)
    model = ALBEFForClassification(get_preset("albef-tiny"), 3)
    from albef.data.classification import ClassificationRecord

    rec = ClassificationRecord("x.png", (LONG,), "test", 0)
    monkeypatch.setattr(
        T, "_batches", lambda records, transform, bs, nw: [(torch.zeros(1, 3, 32, 32), torch.tensor([0]))]
    )
    T.evaluate_classification(model, [rec], Tokenizer(), None)
    assert seen[-1] == len(Tokenizer()(LONG).input_ids[0])
