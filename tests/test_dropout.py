"""albef's CPU dropout: PyTorch's dropout semantics with a cheaper mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from albef.models.fast.bert import FastMultiHeadAttention
from albef.models.fast.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    n = 200_001  # odd: the last int64 word is half used
    y = dropout(torch.ones(n), p, training=True)
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # binomial, five standard deviations
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_gradient_is_the_mask_times_the_scale():
    x = torch.randn(3, 50, 7, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    y.sum().backward()
    keep = y.detach() != 0
    torch.testing.assert_close(x.grad, keep.float() / 0.7)
    torch.testing.assert_close(y.detach(), x.detach() * keep / 0.7)


def test_seeded_repeatable_and_masks_independent():
    torch.manual_seed(5)
    a = keep_mask((64, 64), 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, keep_mask((64, 64), 0.5))
    b = keep_mask((64, 64), 0.5)
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) < 5 * 0.5 / 64  # a fresh draw, not the same bits again


def test_identity_when_off_and_module_form():
    x = torch.randn(4, 5)
    assert torch.equal(dropout(x, 0.5, training=False), x)
    assert torch.equal(dropout(x, 0.0, training=True), x)
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    m = Dropout(0.2).eval()
    assert torch.equal(m(x), x) and isinstance(m, torch.nn.Dropout)


def test_attention_dropout_drops_probabilities():
    """Training on CPU: softmax(q k^T / sqrt(d)), masked keys at zero, then the mask the
    generator gives next, scaled by 1 / (1 - p), times v."""
    torch.manual_seed(0)
    att = FastMultiHeadAttention(8, 2, 8, dropout=0.4).train()
    x = torch.randn(3, 5, 8)
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    mask = pad[:, None, None, :].bool()
    torch.manual_seed(7)
    out = att(x, x, mask)
    q, k, v = (att.heads(lin(x)) for lin in (att.query, att.key, att.value))
    probs = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~mask, float("-inf")).softmax(-1)
    torch.manual_seed(7)
    keep = keep_mask(probs.shape, 0.4)
    expected = ((probs * keep / 0.6) @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        att.eval()(x, x, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    )


@pytest.mark.parametrize("kind", ["causal", "none"])
def test_attention_dropout_with_a_causal_mask_or_none(kind):
    torch.manual_seed(0)
    att = FastMultiHeadAttention(8, 2, 8, dropout=0.3).train()
    x = torch.randn(2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None] if kind == "causal" else None
    torch.manual_seed(3)
    out = att(x, x, mask)
    q, k, v = (att.heads(lin(x)) for lin in (att.query, att.key, att.value))
    scores = q @ k.transpose(-2, -1) / 2.0
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.manual_seed(3)
    keep = keep_mask((2, 2, 4, 4), 0.3)
    torch.testing.assert_close(out, ((scores.softmax(-1) * keep / 0.7) @ v).transpose(1, 2).flatten(2))


def test_inplace_module_is_pytorchs():
    torch.manual_seed(0)
    x = torch.ones(1000)
    y = Dropout(0.5, inplace=True).train()(x)
    assert y is x and set(x.unique().tolist()) == {0.0, 2.0}
