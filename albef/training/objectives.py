"""ALBEF's objectives as plain functions: ITC with distillation targets, hard-negative
sampling for ITM, MLM masking and the distilled MLM loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-Σ_j targets[j] · log_softmax(logits)[j]``, in float32 from bf16/fp16
    inputs: CUDA autocast runs log_softmax in float32, CPU autocast would keep it in bfloat16."""
    return -(F.log_softmax(_full(logits), dim=-1) * _full(targets)).sum(-1).mean()


@dataclass
class ITCOutput:
    loss: Tensor
    sim_i2t: Tensor  # [B, B + Q] student image vs momentum texts (batch, then queue)
    sim_t2i: Tensor
    sim_i2t_m: Tensor  # same with momentum features on both sides
    sim_t2i_m: Tensor
    targets_i2t: Tensor
    targets_t2i: Tensor


def itc_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_m: Tensor,
    text_feat_m: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    temp: Tensor,
    alpha: float,
    idx: Tensor | None = None,
    idx_queue: Tensor | None = None,
) -> ITCOutput:
    """Image–text contrastive loss against momentum features and queues.

    Targets are ``alpha * softmax(sim_m) + (1 - alpha) * positives``. Without ``idx`` the
    positive of row b is column b; with ``idx`` (image ids) every batch or queue entry with the
    same id is a positive and the row is normalised to sum to 1 (retrieval fine-tuning).
    Queues are [embed_dim, Q] and are read as given; the backward reads them too, so enqueue after
    ``backward()`` or pass copies (:class:`ALBEFPretrainer` does when it enqueues itself).

    Under bf16/fp16 autocast the similarities, softmaxes and losses are computed in float32 from
    the (low-precision) features: a bf16 logit keeps 8 bits, so ``sim / 0.07`` would be rounded
    by up to 0.06 and the 65,536-way softmax with it. The cost is a [B, B+Q] float32 product.
    """
    with torch.autocast(image_feat.device.type, enabled=False):
        image_feat, text_feat, image_feat_m, text_feat_m = map(
            _full, (image_feat, text_feat, image_feat_m, text_feat_m)
        )
        return _itc(
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            image_queue,
            text_queue,
            _full(temp),
            alpha,
            idx,
            idx_queue,
        )


def _full(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _itc(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_m: Tensor,
    text_feat_m: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    temp: Tensor,
    alpha: float,
    idx: Tensor | None,
    idx_queue: Tensor | None,
) -> ITCOutput:
    sim_i2t = _against(image_feat, text_feat_m, text_queue) / temp  # [B, B+Q]
    sim_t2i = _against(text_feat, image_feat_m, image_queue) / temp
    with torch.no_grad():
        sim_i2t_m = _against(image_feat_m, text_feat_m, text_queue) / temp
        sim_t2i_m = _against(text_feat_m, image_feat_m, image_queue) / temp
        if idx is None:
            positives = torch.zeros_like(sim_i2t)
            positives.fill_diagonal_(1)
        else:
            idx = idx.view(-1, 1)
            idx_all = torch.cat([idx.T, idx_queue.to(idx.device)], dim=1)  # [1, B+Q]
            pos = (idx == idx_all).to(sim_i2t.dtype)
            positives = pos / pos.sum(1, keepdim=True)
        targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * positives
        targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * positives
    loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return ITCOutput(loss, sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets_i2t, targets_t2i)


def _against(feat: Tensor, batch_m: Tensor, queue: Tensor) -> Tensor:
    """``feat @ [batch_m.T | queue]`` [B, B+Q] without building the [D, B+Q] concatenation: the
    reference's copy of the whole queue (two 64 MB copies a step at 65,536 entries, kept alive for
    the backward) becomes a concatenation of the [B, B+Q] products."""
    return torch.cat([feat @ batch_m.T, feat @ queue.to(batch_m.dtype)], dim=1)


@torch.no_grad()
def hard_negative_weights(sim: Tensor, positive: Tensor, eps: float = 0.0) -> Tensor:
    """Sampling weights over the batch: ``softmax(sim) + eps``, zero on positives.

    ``eps=0`` gives the authors' weights: softmax, then the diagonal (pretraining) or the
    same-id entries (retrieval) set to 0; their retrieval model's ``softmax(sim + 1e-4)`` is the
    same distribution. ``eps=1e-4`` is BLIP's ``softmax(sim) + 1e-4``. Non-finite weights (fp16
    overflow, NaN features) become 0;
    a row left with no mass but with allowed entries falls back to uniform over them, so that
    sampling never fails. Rows with no allowed entry stay all-zero.
    """
    w = F.softmax(sim.float() if sim.dtype in (torch.float16, torch.bfloat16) else sim, dim=1) + eps
    w = torch.where(torch.isfinite(w) & ~positive, w, torch.zeros_like(w)).clamp_(min=0)
    empty = w.sum(1) <= 0
    if empty.any():
        w[empty] = (~positive[empty]).to(w.dtype)
    return w


@torch.no_grad()
def sample_hard_negatives(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from the weights of :func:`hard_negative_weights`: [B] indices.

    Rows without any candidate (batch size 1, or every entry shares the row's image id) get
    ``-1``; the ITM batch then simply has no negative for that row.
    """
    valid = weights.sum(1) > 0
    out = torch.full((weights.shape[0],), -1, dtype=torch.long, device=weights.device)
    if valid.any():
        out[valid] = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
    return out


@torch.no_grad()
def mask_tokens(
    input_ids: Tensor,
    vocab_size: int,
    mask_token_id: int,
    protected_ids: tuple[int, ...],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking as in the reference: Bernoulli(p) per token, never ``protected_ids``
    ([PAD], [CLS]); of the masked, 80% → [MASK], 10% → a random token of the whole vocabulary,
    10% unchanged. Returns ``(masked_ids, labels)`` with labels −100 where not masked.

    The draws are made in the reference's order (Bernoulli p, 0.8, 0.5, then randint), so the
    same generator state gives the same masks.
    """
    shape, dev = input_ids.shape, input_ids.device

    def bernoulli(p: float) -> Tensor:
        return torch.bernoulli(torch.full(shape, p, device=dev), generator=generator).bool()

    masked = bernoulli(probability)
    for tok in protected_ids:
        masked &= input_ids != tok
    labels = torch.where(masked, input_ids, IGNORE_INDEX)
    replaced = bernoulli(0.8) & masked
    randomised = bernoulli(0.5) & masked & ~replaced
    random_words = torch.randint(vocab_size, shape, device=dev, generator=generator)
    ids = torch.where(replaced, mask_token_id, input_ids)
    ids = torch.where(randomised, random_words, ids)
    return ids, labels


def mlm_loss(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Distilled MLM loss over the masked positions only.

    ``logits`` / ``teacher_logits``: [n_masked, V]; ``labels``: [n_masked].
    Returns ``(loss, ce, distill)`` with ``loss = (1 − α)·ce + α·distill``. With no masked token
    the loss is an exact zero that still belongs to the graph (the reference gives NaN).
    """
    if labels.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero, None
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None or alpha == 0:
        return ce, ce, None
    distill = soft_cross_entropy(logits, F.softmax(_full(teacher_logits), dim=-1))  # float32 targets
    return (1 - alpha) * ce + alpha * distill, ce, distill
