"""One word-embedding gradient for the lookup and the tied MLM decoder (albef.models.fast.tied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import albef.models.fast.tied as tied
from albef.models.albef import ALBEF
from albef.models.fast.recompute import tied_linear
from albef.models.fast.tied import TiedGrad, embedding_lookup
from albef.training.pretrain import ALBEFPretrainer

from helpers import text_batch


def _plain_and_tied(n_rows: int, dtype=torch.float64, backwards: int = 1):
    """Gradient of the table through plain autograd and through a tie, after ``backwards``
    backwards over the same graph; whether each of the tie's decoder steps deferred."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, 4, dtype=dtype, generator=g)
    ids = torch.tensor([[1, 2, 0, 2]])
    probe = torch.randn(n_rows, 10, dtype=dtype, generator=g)
    grads, deferred = [], []
    for tie in (None, TiedGrad()):
        w = table.clone().requires_grad_()
        h = embedding_lookup(ids, w, 0, tie)  # [1, 4, 4]; id 0 is padding
        x = (h.flatten(0, 1).sum(0) * torch.arange(1, n_rows + 1, dtype=dtype)[:, None]).tanh()  # [n, 4]
        logits = tied_linear(x, w, tie) if tie is not None else F.linear(x, w)
        if tie is not None:  # record whether the decoder's term was handed over
            orig = tie.defer
            tie.defer = lambda dy, a, orig=orig: deferred.append(orig(dy, a)) or deferred[-1]
        loss = (logits * probe).sum()
        for i in range(backwards):
            loss.backward(retain_graph=i < backwards - 1)
        grads.append(w.grad)
    return grads, deferred


@pytest.mark.parametrize("n_rows, defers", [(2, True), (3, False)])  # V*H/(V+H) = 40/14 = 2.9 rows
def test_table_gradient_equals_plain_autograd(n_rows, defers):
    (plain, with_tie), deferred = _plain_and_tied(n_rows)
    assert deferred == [defers]
    torch.testing.assert_close(with_tie, plain, rtol=0, atol=1e-15)
    assert plain[0].abs().sum() > 0  # the decoder reaches the padding row; the lookup does not


def test_pretraining_step_gradients_are_bit_equal_to_plain_autograd(tiny_config, monkeypatch):
    def grads(defer: bool):
        if not defer:
            monkeypatch.setattr(tied.TiedGrad, "defer", lambda self, dy, a: False)
        torch.manual_seed(0)
        trainer = ALBEFPretrainer(ALBEF(tiny_config))
        ids, mask = text_batch(4, 10)
        out = trainer(torch.randn(4, 3, 32, 32), ids, mask, 0.4, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        monkeypatch.undo()
        return {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    calls = []
    real = tied.TiedGrad.defer
    monkeypatch.setattr(tied.TiedGrad, "defer", lambda self, dy, a: calls.append(1) or real(self, dy, a))
    a = grads(True)
    assert calls  # the MLM decoder handed its term to the lookup
    b = grads(False)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_backward_that_does_not_reach_the_lookup_keeps_the_decoders_gradient():
    """The lookup's output is not in the loss, or the backward asks for other inputs only: the
    decoder makes its own gradient (the engine says the lookup's step will not run)."""
    x = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(F.linear(x, w).square().sum(), w)[0]
    tie = TiedGrad()
    embedding_lookup(torch.tensor([1, 2]), w, None, tie)  # its output is not in the loss
    tied_linear(x, w, tie).square().sum().backward()
    torch.testing.assert_close(w.grad, plain, rtol=0, atol=0)

    w.grad = None
    xs = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    tie = TiedGrad()
    h = embedding_lookup(torch.tensor([1, 2]), w, None, tie)
    loss = tied_linear(h * xs, w, tie).square().sum()
    (gx,) = torch.autograd.grad(loss, xs, retain_graph=True)  # not the table: no error, nothing deferred
    assert not tie.pending and torch.isfinite(gx).all()
    loss.backward()  # the table's gradient, whole, in a later backward over the same graph
    h2 = F.embedding(torch.tensor([1, 2]), w)
    torch.testing.assert_close(w.grad, torch.autograd.grad(F.linear(h2 * xs, w).square().sum(), w)[0])


def test_a_backward_that_raised_leaves_nothing_for_the_next():
    ids, x = torch.tensor([1, 2]), torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(F.linear(F.embedding(ids, w) * x, w).square().sum(), w)[0]
    tie = TiedGrad()
    h = embedding_lookup(ids, w, None, tie)
    fail = [True]

    def once(g):  # between the decoder's step and the lookup's
        if fail.pop() if fail else False:
            raise RuntimeError("boom")
        return g

    h.register_hook(once)
    loss = tied_linear(h * x, w, tie).square().sum()
    with pytest.raises(RuntimeError, match="boom"):
        loss.backward(retain_graph=True)
    assert tie.pending  # the decoder had deferred
    w.grad = None
    loss.backward()
    torch.testing.assert_close(w.grad, expected)  # the dead backward's factors were not added


@pytest.mark.parametrize("decoder_first", [True, False])
def test_lookup_and_decoder_side_by_side_in_either_order(decoder_first):
    """Not upstream of each other: whichever backward runs first, the table's gradient is whole."""
    ids, x = torch.tensor([1, 2, 2]), torch.randn(2, 4, dtype=torch.float64)
    table = torch.randn(10, 4, dtype=torch.float64)
    grads = []
    for tie in (None, TiedGrad()):
        w = table.clone().requires_grad_()
        if decoder_first:  # created first, so its backward runs last
            logits = tied_linear(x, w, tie) if tie else F.linear(x, w)
            h = embedding_lookup(ids, w, None, tie)
        else:
            h = embedding_lookup(ids, w, None, tie)
            logits = tied_linear(x, w, tie) if tie else F.linear(x, w)
        (logits.square().sum() + h.sum()).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-15)


def test_a_second_backward_over_the_same_graph_adds_the_same_gradient():
    (plain, _), _ = _plain_and_tied(2)
    (_, twice), deferred = _plain_and_tied(2, backwards=2)
    assert deferred == [True, True]  # each backward hands the decoder's term to its own lookup step
    torch.testing.assert_close(twice, 2 * plain)


def test_without_grad_or_tie_it_is_the_plain_lookup():
    w = torch.randn(10, 4, requires_grad=True)
    ids = torch.tensor([3, 0, 3])
    with torch.no_grad():
        assert torch.equal(embedding_lookup(ids, w, 0, TiedGrad()), F.embedding(ids, w, 0))
    out = embedding_lookup(ids, w, 0, None)
    assert out.grad_fn.name() == "EmbeddingBackward0"


def test_a_model_copied_after_a_step_gets_a_fresh_tie(tiny_config):
    """The fast model keeps the latest tie between encode_text and mlm_logits; a deep copy (the
    momentum teacher) or a pickle of it must not carry that forward's autograd node along."""
    import copy
    import pickle

    model = ALBEF(tiny_config)
    ids, mask = text_batch(2, 6)
    model.mlm_logits(model.encode_text(ids, mask)).sum().backward()
    assert model._tie.lookup is not None
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin._tie is not model._tie and twin._tie.lookup is None and not twin._tie.pending
        twin.mlm_logits(twin.encode_text(ids, mask)).sum().backward()  # and it trains
