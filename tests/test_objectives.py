"""The pretraining objectives against closed forms and invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from albef.training.momentum import FeatureQueue, momentum_update
from albef.training.objectives import (
    hard_negative_weights,
    itc_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
    soft_cross_entropy,
)


def test_itc_alpha0_empty_queue_is_symmetric_infonce():
    B, D = 6, 8
    img, txt = F.normalize(torch.randn(B, D), dim=1), F.normalize(torch.randn(B, D), dim=1)
    img_m, txt_m = F.normalize(torch.randn(B, D), dim=1), F.normalize(torch.randn(B, D), dim=1)
    temp = torch.tensor(0.07)
    out = itc_loss(img, txt, img_m, txt_m, torch.empty(D, 0), torch.empty(D, 0), temp, alpha=0.0)
    # Hand-written InfoNCE: each image against the momentum texts and vice versa, label = own index.
    labels = torch.arange(B)
    expected = (F.cross_entropy(img @ txt_m.T / temp, labels) + F.cross_entropy(txt @ img_m.T / temp, labels)) / 2
    torch.testing.assert_close(out.loss, expected)


def test_itc_logits_are_float32_under_bf16_autocast():
    """The similarities and softmaxes stay in float32 inside autocast: from float32 features the loss
    is the float64 closed form to float32 accuracy (a bf16 product would be off by ~1e-2), and
    bf16 features give float32 logits."""
    B, D, Q = 8, 16, 64
    g = torch.Generator().manual_seed(0)
    f = lambda n: F.normalize(torch.randn(n, D, generator=g), dim=1)  # noqa: E731
    iq, tq = f(Q).T.contiguous(), f(Q).T.contiguous()
    img, txt, img_m, txt_m = f(B), f(B), f(B), f(B)
    temp = torch.tensor(0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = itc_loss(img, txt, img_m, txt_m, iq, tq, temp, alpha=0.4)
        low = itc_loss(*(x.bfloat16() for x in (img, txt, img_m, txt_m)), iq, tq, temp, alpha=0.4)
    d = lambda x: x.double()  # noqa: E731
    onehot = torch.eye(B, B + Q, dtype=torch.float64)
    losses = []
    for a, b_m, b_q, a_m in ((img, txt_m, tq, img_m), (txt, img_m, iq, txt_m)):
        sim = d(a) @ torch.cat([d(b_m).T, d(b_q)], 1) / 0.07
        sim_m = d(a_m) @ torch.cat([d(b_m).T, d(b_q)], 1) / 0.07
        targets = 0.4 * sim_m.softmax(1) + 0.6 * onehot
        losses.append(-(sim.log_softmax(1) * targets).sum(1).mean())
    expected = (losses[0] + losses[1]) / 2
    assert out.sim_i2t.dtype == low.sim_i2t.dtype == low.loss.dtype == torch.float32
    assert abs(out.loss.double() - expected) < 1e-5
    assert abs(low.loss.double() - expected) < 5e-2  # only the features' bf16 rounding


def test_itc_targets_mix_softmax_and_positives():
    B, D, Q = 3, 4, 6
    f = lambda n: F.normalize(torch.randn(n, D), dim=1)  # noqa: E731
    iq, tq = f(Q).T, f(Q).T
    img, txt, img_m, txt_m = f(B), f(B), f(B), f(B)
    out = itc_loss(img, txt, img_m, txt_m, iq, tq, torch.tensor(0.1), alpha=0.4)
    sim_m = img_m @ torch.cat([txt_m.T, tq], 1) / 0.1
    onehot = torch.zeros(B, B + Q)
    onehot[range(B), range(B)] = 1
    torch.testing.assert_close(out.targets_i2t, 0.4 * sim_m.softmax(1) + 0.6 * onehot)
    torch.testing.assert_close(out.targets_i2t.sum(1), torch.ones(B))


def test_itc_id_aware_targets_spread_over_same_id_entries():
    D = 4
    f = lambda n: F.normalize(torch.randn(n, D), dim=1)  # noqa: E731
    idx = torch.tensor([7, 7, 3])
    idx_queue = torch.tensor([[3, 9, 7, -100]])
    out = itc_loss(f(3), f(3), f(3), f(3), f(4).T, f(4).T, torch.tensor(0.07), 0.0, idx, idx_queue)
    # row 0 (id 7): batch 0, batch 1, queue slot 2 -> 1/3 each
    assert torch.allclose(out.targets_i2t[0], torch.tensor([1, 1, 0, 0, 0, 1, 0]) / 3)
    assert torch.allclose(out.targets_t2i[2], torch.tensor([0, 0, 1, 1, 0, 0, 0]) / 2)


def test_soft_cross_entropy_with_onehot_is_cross_entropy():
    logits = torch.randn(5, 7)
    labels = torch.randint(7, (5,))
    torch.testing.assert_close(
        soft_cross_entropy(logits, F.one_hot(labels, 7).float()), F.cross_entropy(logits, labels)
    )


@pytest.mark.parametrize("trial", range(20))
def test_hard_negatives_never_pick_a_positive(trial):
    g = torch.Generator().manual_seed(trial)
    B = 1 + trial % 9
    ids = torch.randint(0, 3, (B,), generator=g)
    positive = ids[:, None] == ids[None, :]
    sim = torch.randn(B, B, generator=g) * 20
    for eps in (0.0, 1e-4):
        w = hard_negative_weights(sim, positive, eps)
        picks = sample_hard_negatives(w, g)
        for b in range(B):
            if (~positive[b]).any():
                assert picks[b] >= 0 and not positive[b, picks[b]]
            else:  # nothing to pick: no negative rather than a crash or the positive
                assert picks[b] == -1


def test_hard_negative_weights_default_is_the_authors_retrieval_formula():
    # salesforce/ALBEF model_retrieval.py: softmax(sim[:, :bs] + 1e-4), then same-id entries set to 0
    sim = torch.randn(6, 6, dtype=torch.float64) * 5
    idx = torch.tensor([1, 1, 2, 3, 3, 3])
    same = idx.view(-1, 1) == idx.view(1, -1)
    authors = torch.exp(sim + 1e-4) / torch.exp(sim + 1e-4).sum(1, keepdim=True)
    authors[same] = 0
    torch.testing.assert_close(hard_negative_weights(sim, same), authors, rtol=1e-12, atol=0)
    # and the retrieval and grounding tasks use that default
    from albef.config import get_preset
    from albef.recipes import load_recipe
    from albef.training.tasks import get_task

    for task in ("retrieval", "grounding", "pretrain"):
        trainer = get_task(task).build_trainer(get_preset("albef-tiny"), load_recipe(None, [f"task={task}"]))
        assert trainer.hard_negative_eps == 0.0


def test_hard_negative_weights_blip_option():
    # BLIP's form, train.hard_negative_eps=1e-4: softmax(sim) + 1e-4 outside, then the positives zeroed
    sim = torch.randn(4, 4)
    eye = torch.eye(4, dtype=torch.bool)
    w = hard_negative_weights(sim, eye, eps=1e-4)
    expected = torch.exp(sim) / torch.exp(sim).sum(1, keepdim=True) + 1e-4
    expected[eye] = 0
    torch.testing.assert_close(w, expected)


def test_hard_negatives_batch_size_one_and_bad_weights():
    weights = hard_negative_weights(torch.randn(1, 1), torch.eye(1, dtype=torch.bool))
    assert sample_hard_negatives(weights).tolist() == [-1]
    eye = torch.eye(3, dtype=torch.bool)
    for bad in (float("nan"), float("inf"), -float("inf")):
        sim = torch.randn(3, 3)
        sim[1] = bad
        picks = sample_hard_negatives(hard_negative_weights(sim, eye))
        assert all(0 <= p < 3 and p != i for i, p in enumerate(picks.tolist()))
    # fp16 overflow: softmax in the half dtype would be NaN; weights stay usable
    sim = torch.full((3, 3), 6e4, dtype=torch.float16)
    picks = sample_hard_negatives(hard_negative_weights(sim, eye))
    assert all(p != i for i, p in enumerate(picks.tolist()))


def test_mask_tokens_never_touches_pad_or_cls_and_follows_80_10_10():
    g = torch.Generator().manual_seed(0)
    B, L, V = 400, 40, 30522
    ids = torch.randint(1000, V, (B, L), generator=g)
    ids[:, 0] = 101
    ids[:, 30:] = 0
    masked_ids, labels = mask_tokens(ids, V, 103, (0, 101), 0.15, g)
    masked = labels != -100
    assert not masked[:, 0].any() and not masked[:, 30:].any()
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(masked_ids[~masked], ids[~masked])
    n_eligible = B * 29
    n = masked.sum().item()
    p = 0.15
    assert abs(n - p * n_eligible) < 5 * math.sqrt(n_eligible * p * (1 - p))
    to_mask = (masked_ids[masked] == 103).sum().item()
    unchanged = (masked_ids[masked] == ids[masked]).sum().item()
    random = n - to_mask - unchanged
    for count, share in ((to_mask, 0.8), (unchanged, 0.1), (random, 0.1)):
        assert abs(count - share * n) < 5 * math.sqrt(n * share * (1 - share)) + 5


def test_mask_tokens_is_reproducible_from_the_generator():
    ids = torch.randint(1000, 2000, (4, 12))
    a = mask_tokens(ids, 30522, 103, (0, 101), 0.15, torch.Generator().manual_seed(3))
    b = mask_tokens(ids, 30522, 103, (0, 101), 0.15, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_mlm_loss_distillation_mix_and_empty_mask():
    logits, teacher = torch.randn(5, 11, requires_grad=True), torch.randn(5, 11)
    labels = torch.randint(11, (5,))
    loss, ce, distill = mlm_loss(logits, labels, teacher, 0.4)
    expected_distill = -(teacher.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, 0.6 * F.cross_entropy(logits, labels) + 0.4 * expected_distill)
    empty, _, _ = mlm_loss(logits[:0], labels[:0], teacher[:0], 0.4)
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph


def test_queue_wraps_around_and_checks_batch_multiple():
    q = FeatureQueue(embed_dim=3, size=8)
    q.queue_ptr[0] = 6
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    before = q.image_queue.clone()
    q.enqueue(a, b)
    assert int(q.queue_ptr) == 0
    torch.testing.assert_close(q.image_queue[:, 6:], a.T)
    torch.testing.assert_close(q.text_queue[:, 6:], b.T)
    torch.testing.assert_close(q.image_queue[:, :6], before[:, :6])
    q.enqueue(a, b)
    assert int(q.queue_ptr) == 2
    with pytest.raises(ValueError, match="multiple of the global batch size 3"):
        q.enqueue(torch.randn(3, 3), torch.randn(3, 3))


def test_queue_with_ids_requires_them():
    q = FeatureQueue(2, 4, with_idx=True)
    assert (q.idx_queue == -100).all()
    q.enqueue(torch.randn(2, 2), torch.randn(2, 2), torch.tensor([5, 6]))
    assert q.idx_queue[0, :2].tolist() == [5, 6]
    with pytest.raises(ValueError, match="pass idx"):
        q.enqueue(torch.randn(2, 2), torch.randn(2, 2))


def test_momentum_update_is_the_ema_formula():
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    momentum_update(student, teacher, 0.995)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.995 * t0[k] + 0.005 * student.state_dict()[k])


def test_enqueue_inside_forward_equals_enqueue_after_backward():
    """The training loop enqueues after the backward (the ITC products then read the queue buffers
    in place); a direct call enqueues inside the forward, on copies. Same losses, gradients and queue."""
    from albef.config import get_preset
    from albef.models.albef import ALBEF
    from albef.training.pretrain import ALBEFPretrainer

    torch.manual_seed(0)
    cfg = get_preset("albef-tiny")
    a = ALBEFPretrainer(ALBEF(cfg)).train()
    b = ALBEFPretrainer(ALBEF(cfg)).train()
    b.load_state_dict(a.state_dict())
    images = torch.randn(4, 3, 32, 32)
    ids = torch.randint(1000, 2000, (4, 7))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    results = []
    for trainer, inside in ((a, True), (b, False)):
        losses = []
        for step in range(3):  # later steps read what the earlier ones enqueued
            torch.manual_seed(step)
            gen = torch.Generator().manual_seed(step)
            out = trainer(images + step, ids, mask, alpha=0.4, generator=gen, enqueue=inside)
            trainer.zero_grad()
            out.loss.backward()
            if not inside:
                trainer.queue.enqueue(out.teacher.image_feat, out.teacher.text_feat)
            losses.append(out.loss.detach())
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append(
            (torch.stack(losses), grads, trainer.queue.image_queue.clone(), trainer.queue.text_queue.clone())
        )
    (la, ga, qia, qta), (lb, gb, qib, qtb) = results
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(qia, qib, rtol=0, atol=0)
    torch.testing.assert_close(qta, qtb, rtol=0, atol=0)
    assert int(a.queue.queue_ptr) == int(b.queue.queue_ptr) == (3 * 4) % cfg.queue_size


def test_the_lavis_nlvr_teacher_option_reaches_the_trainer_from_a_recipe():
    from albef.config import get_preset
    from albef.recipes import load_recipe
    from albef.training.tasks import get_task

    for on in (False, True):
        recipe = load_recipe(None, ["task=nlvr", f"train.lavis_teacher_text_encoder={str(on).lower()}"])
        assert get_task("nlvr").build_trainer(get_preset("albef-tiny"), recipe).lavis_teacher_text_encoder is on
    for task in ("ve", "retrieval"):  # LAVIS's bug is NLVR2's alone
        with pytest.raises(ValueError, match="train.lavis_teacher_text_encoder = True: must be false for this task"):
            load_recipe(None, [f"task={task}", "train.lavis_teacher_text_encoder=true"])
