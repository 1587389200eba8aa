"""VQA answer ranking with shared work (``rank_answers``) against the plain per-candidate formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from albef.config import get_preset
from albef.models.tasks import ALBEFForVQA, rank_answers

CLS, SEP = 101, 102


def _model(seed: int = 0) -> ALBEFForVQA:
    torch.manual_seed(seed)
    model = ALBEFForVQA(get_preset("albef-tiny")).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than BERT's init: peaked, distinct scores to rank
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def _answers(n: int, seed: int, starts: tuple[int, ...] = (CLS,)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct answers of 1-5 tokens from a small vocabulary (so they share prefixes):
    ``start tokens [SEP]``, padded with 0 to the longest."""
    g = torch.Generator().manual_seed(seed)
    seen, rows = set(), []
    while len(rows) < n:
        words = tuple(
            int(w) for w in torch.randint(2000, 2006, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        )
        start = starts[len(rows) % len(starts)]
        if (start, words) not in seen:
            seen.add((start, words))
            rows.append([start, *words, SEP])
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    return ids, (ids != 0).long()


def _questions(model: ALBEFForVQA, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    L = 7
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    ids[:, 0] = CLS
    lengths = torch.tensor([L] + [int(x) for x in torch.randint(2, L + 1, (B - 1,), generator=g)])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    images = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return model.encode_question(images, ids * mask, mask), mask


@torch.no_grad()
def _plain_rank(model, q, qm, ids, mask, k, scoring, label_smoothing=0.0):
    """The straightforward formula (the authors' and LAVIS's): the first-token pass, then every
    candidate decoded in full against its question's states repeated k times, log-probabilities
    of its tokens summed."""
    B = q.shape[0]
    start = ids[:1, :1].expand(B, 1)
    first = model.answer_logits(start, torch.ones_like(start), q, qm)[:, 0]
    prob_first = first.softmax(-1)[:, ids[:, 1]]
    topk_probs, topk_ids = prob_first.topk(k, dim=1)
    cand_ids, cand_mask = ids[topk_ids.reshape(-1)], mask[topk_ids.reshape(-1)]
    logits = model.answer_logits(cand_ids, cand_mask, q.repeat_interleave(k, 0), qm.repeat_interleave(k, 0))
    logp = logits.log_softmax(-1)
    nll = torch.zeros(B * k, dtype=logp.dtype)
    for c in range(B * k):
        for t in range(int(cand_mask[c].sum()) - 1):  # position t predicts token t + 1
            y = cand_ids[c, t + 1]
            nll[c] += -(1 - label_smoothing) * logp[c, t, y] - label_smoothing * logp[c, t].mean()
    nll = nll.view(B, k)
    if scoring == "albef":
        score = topk_probs.log() - nll
        probs, order = score.softmax(-1).topk(k, dim=1)
    else:
        score = -nll
        probs, order = score.topk(k, dim=1)
    return {
        "ranked_ids": topk_ids.gather(1, order),
        "scores": probs,
        "first_token_logits": first,
        "prob_first_token": prob_first,
        "topk_probs": topk_probs,
        "topk_ids": topk_ids,
        "candidate_nll": nll,
        "log_probs_sum": score,
    }


def _assert_same(ours: dict, plain: dict) -> None:
    assert ours.keys() == plain.keys()
    for name in ("topk_ids", "ranked_ids"):
        assert torch.equal(ours[name], plain[name]), name
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("scoring,smoothing", [("albef", 0.0), ("corrected", 0.0), ("lavis", 0.1)])
@pytest.mark.parametrize("k", [5, 40])
def test_shared_ranking_matches_the_per_candidate_formula_float64(scoring, smoothing, k):
    model = _model()
    q, qm = _questions(model, 3, seed=1)
    ids, mask = _answers(40, seed=2)
    assert len(set(mask.sum(1).tolist())) >= 4  # answers of different lengths
    ours = rank_answers(model, q, qm, ids, mask, k, scoring=scoring, label_smoothing=smoothing)
    _assert_same(ours, _plain_rank(model, q, qm, ids, mask, k, scoring, smoothing))


@pytest.mark.parametrize("scoring,smoothing", [("albef", 0.0), ("corrected", 0.0), ("lavis", 0.1)])
def test_default_label_smoothing_is_the_scorings_own(scoring, smoothing):
    # LAVIS's ranking loss fixes its smoothing at 0.1, so `--scoring lavis` must rank with it
    model = _model()
    q, qm = _questions(model, 3, seed=1)
    ids, mask = _answers(40, seed=2)
    _assert_same(
        rank_answers(model, q, qm, ids, mask, 8, scoring=scoring),
        _plain_rank(model, q, qm, ids, mask, 8, scoring, smoothing),
    )
    if smoothing:  # and the smoothing is not a no-op on these candidates
        unsmoothed = rank_answers(model, q, qm, ids, mask, 8, scoring=scoring, label_smoothing=0.0)
        assert not torch.allclose(
            unsmoothed["scores"], rank_answers(model, q, qm, ids, mask, 8, scoring=scoring)["scores"]
        )


def test_shared_ranking_in_small_head_chunks_and_with_two_start_tokens():
    model = _model(1)
    q, qm = _questions(model, 2, seed=3)
    ids, mask = _answers(12, seed=4, starts=(CLS, 1996))
    for chunk in (1, 3):
        ours = rank_answers(model, q, qm, ids, mask, 12, scoring="lavis", label_smoothing=0.1, head_chunk=chunk)
        _assert_same(ours, _plain_rank(model, q, qm, ids, mask, 12, "lavis", 0.1))


def test_shared_ranking_projects_each_question_once_per_layer():
    model = _model()
    B, k = 3, 20
    q, qm = _questions(model, B, seed=1)
    ids, mask = _answers(30, seed=2)
    rows = []
    hooks = [
        layer.crossattention.self.key.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1]))
        for layer in model.text_decoder.encoder.layer
    ]
    decoded = []  # tokens through the decoder's first self-attention query projection
    hooks.append(
        model.text_decoder.encoder.layer[0].attention.self.query.register_forward_hook(
            lambda m, a, out: decoded.append(a[0].shape[0])
        )
    )
    try:
        r = rank_answers(model, q, qm, ids, mask, k)
    finally:
        for h in hooks:
            h.remove()
    assert rows == [q.shape[:2]] * len(model.text_decoder.encoder.layer)
    # one start token per question, then the distinct prefixes; an answer's last token is not decoded
    cand = ids[r["topk_ids"].reshape(-1)]
    lengths = mask[r["topk_ids"].reshape(-1)].sum(1)
    prefixes = {(c // k, tuple(cand[c, : t + 1].tolist())) for c in range(B * k) for t in range(1, int(lengths[c]) - 1)}
    assert sum(decoded) == B + len(prefixes)
    assert sum(decoded) < int((lengths - 1).sum())


def test_shared_ranking_under_float32_matches_closely():
    model = _model().float()
    q, qm = _questions(model.double(), 2, seed=5)
    model.float()
    ids, mask = _answers(25, seed=6)
    ours = rank_answers(model, q.float(), qm, ids, mask, 10, scoring="lavis", label_smoothing=0.1)
    plain = _plain_rank(model, q.float(), qm, ids, mask, 10, "lavis", 0.1)
    assert torch.equal(ours["topk_ids"], plain["topk_ids"])
    torch.testing.assert_close(ours["candidate_nll"], plain["candidate_nll"].float(), rtol=1e-5, atol=1e-4)
    assert F.cosine_similarity(ours["first_token_logits"], plain["first_token_logits"]).min() > 0.99999
