"""Downstream models: VQA (answer decoder), SNLI-VE and NLVR2 (classifiers).

Parameter names follow the authors' fine-tuned checkpoints: ``visual_encoder``, ``text_encoder``,
``text_decoder`` (their ``text_decoder.bert``), ``decoder_head`` (their
``text_decoder.cls.predictions``), ``cls_head.{0,2}``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.config import ALBEFConfig
from albef.models.albef import ALBEF, apply_speedups
from albef.models.bert import MLMHead, TextEncoder, padding_mask
from albef.models.vit import VisionTransformer


def decoder_config(cfg: ALBEFConfig, num_layers: int | None = None):
    """The VQA decoder: BERT layers with cross-attention to the question states in every layer."""
    t = cfg.text
    return dataclasses.replace(
        t, num_layers=num_layers or t.num_layers - t.fusion_layer, fusion_layer=0, encoder_width=t.hidden_size
    )


class ALBEFForVQA(nn.Module):
    """Question encoder (all text layers over the image) + causal answer decoder.

    Example:
        >>> from albef.config import get_preset
        >>> vqa = ALBEFForVQA(get_preset("albef-tiny"))
        >>> ids, mask = torch.tensor([[101, 2054]]), torch.ones(1, 2, dtype=torch.long)
        >>> q = vqa.encode_question(torch.randn(1, 3, 32, 32), ids, mask)
        >>> q.shape
        torch.Size([1, 2, 32])
    """

    def __init__(self, config: ALBEFConfig, decoder_layers: int | None = None, fast: bool = True):
        """``fast``: apply :func:`albef.models.fast.make_fast` (same parameters, same values)."""
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(config.text)
        dec = decoder_config(config, decoder_layers)
        self.text_decoder = TextEncoder(dec, causal=True)
        self.decoder_head = MLMHead(dec)
        if fast:
            apply_speedups(self)

    def encode_question(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, Lq, H] question states: the multimodal encoder over the question and the image."""
        return self.text_encoder(input_ids, attention_mask, self.visual_encoder(images))

    def answer_logits(
        self, answer_ids: Tensor, answer_mask: Tensor, question_states: Tensor, question_mask: Tensor
    ) -> Tensor:
        """Next-token logits [N, La, V] of answers given (repeated) question states."""
        hidden = self.text_decoder(answer_ids, answer_mask, question_states, question_mask)
        return self.decoder_head(hidden, self.text_decoder.embeddings.word_embeddings.weight)


def answer_nll(
    logits: Tensor,
    answer_ids: Tensor,
    pad_id: int = 0,
    label_smoothing: float = 0.0,
    teacher_logits: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Per-answer loss [N]: summed over answer tokens (position t predicts token t + 1).

    ``(1 − α)·Σ_t CE + α·Σ_t H(softmax(teacher), student)``; ``label_smoothing`` 0 is the authors',
    0.1 LAVIS's. The first position ([CLS], the start token) is never a target.
    """
    shifted = logits[:, :-1]
    labels = answer_ids[:, 1:].masked_fill(answer_ids[:, 1:] == pad_id, -100)
    ce = F.cross_entropy(shifted.transpose(1, 2), labels, reduction="none", label_smoothing=label_smoothing).sum(1)
    if teacher_logits is None or alpha == 0:
        return ce
    full = torch.promote_types(shifted.dtype, torch.float32)  # float32 under CPU autocast (float64 stays)
    distill = -(F.log_softmax(shifted.to(full), -1) * F.softmax(teacher_logits[:, :-1].to(full), -1)).sum(-1)
    distill = (distill * (labels != -100)).sum(1)
    return (1 - alpha) * ce + alpha * distill


@torch.no_grad()
def rank_answers(
    model: ALBEFForVQA,
    question_states: Tensor,
    question_mask: Tensor,
    answer_ids: Tensor,
    answer_mask: Tensor,
    k: int,
    scoring: str = "albef",
    label_smoothing: float | None = None,
    head_chunk: int = 512,
) -> dict[str, Tensor]:
    """Rank a fixed answer list for each question (the authors' two-stage procedure).

    Stage 1: the first answer token's probability picks ``k`` candidates. Stage 2: each
    candidate's full answer log-likelihood. ``scoring="albef"`` (default) scores
    ``log p(first token) − NLL(answer)`` — the first token counted twice, as the authors do —
    and softmaxes over the k; ``"corrected"`` counts it once (``−NLL``); ``"lavis"`` is
    ``−NLL`` too, with LAVIS's label smoothing in the NLL (``label_smoothing``: by default 0.1
    for ``"lavis"``, whose ranking loss fixes it there, and 0 otherwise). Returns ``ranked_ids`` [B, k]
    (answer-list indices, best first), ``scores`` and the intermediate values.

    The scores are those of running the decoder on every candidate against its question's states
    repeated k times (what the authors and LAVIS do), with the shared work done once
    (:class:`_PrefixDecoder`): each question's cross-attention keys/values are projected once per
    layer; a causal decoder's state at a position depends only on the tokens up to it, so the
    candidates of a question form a prefix tree and each distinct prefix (the start token: the
    stage-1 pass itself) is decoded once, one position at a time over all questions, without
    padding; the last token of an answer predicts nothing and is never decoded. The vocabulary
    head runs on the distinct prefixes, ``head_chunk`` of them at a time. The model is used as in
    evaluation (no dropout).
    """
    if scoring not in ("albef", "corrected", "lavis"):
        raise ValueError(f"scoring must be 'albef', 'corrected' or 'lavis', not {scoring!r}")
    if label_smoothing is None:
        label_smoothing = 0.1 if scoring == "lavis" else 0.0
    B, dev = question_states.shape[0], question_states.device
    k = min(k, answer_ids.shape[0])
    dec = _PrefixDecoder(model, question_states, question_mask)
    # level 0: the start token of each question (every distinct first token of the list, usually [CLS] alone)
    starts, start_of = answer_ids[:, 0].unique(return_inverse=True)  # [S], [n_answers]
    S = len(starts)
    root_q = torch.arange(B, device=dev).repeat_interleave(S)
    root_h = dec.level(starts.repeat(B), root_q, [])  # [B * S, H]
    root_logits = model.decoder_head(root_h, model.text_decoder.embeddings.word_embeddings.weight)
    first_logits = root_logits.view(B, S, -1)[:, start_of[0]]  # answer_ids[0, 0] starts every answer
    prob_first = first_logits.to(torch.promote_types(first_logits.dtype, torch.float32)).softmax(-1)
    prob_first = prob_first.index_select(1, answer_ids[:, 1])  # [B, n_answers]
    topk_probs, topk_ids = prob_first.topk(k, dim=1)

    cand = topk_ids.reshape(-1)  # question-major [B*k]
    cand_ids = answer_ids[cand]
    lengths = answer_mask[cand].sum(1)  # real tokens; position t < length - 1 predicts token t + 1
    cand_q = torch.arange(B, device=dev).repeat_interleave(k)
    depth = int(lengths.max()) - 1  # positions that predict something: 0 .. depth - 1
    nodes = torch.zeros(B * k, max(depth, 1), dtype=torch.long, device=dev)  # each candidate's prefix at each position
    nodes[:, 0] = cand_q * S + start_of[cand]
    nll = torch.zeros(B * k, dtype=torch.promote_types(root_logits.dtype, torch.float32), device=dev)
    for t in range(depth):
        live = (lengths - 1 > t).nonzero().squeeze(1)  # candidates with a target at position t + 1
        h = None
        if t > 0:  # the distinct prefixes (question, tokens 0..t) of those candidates, question-major
            keys = torch.cat([cand_q[live, None], cand_ids[live, : t + 1]], 1)
            uniq, inverse = keys.unique(dim=0, return_inverse=True)
            nodes[live, t] = inverse
            rep = live.new_empty(len(uniq)).scatter_(0, inverse, live)  # a candidate through each prefix
            h = dec.level(uniq[:, -1], uniq[:, 0], [nodes[rep, s] for s in range(t)])
        nll[live] += _token_nll(
            model,
            nodes[live, t],
            cand_ids[live, t + 1],
            label_smoothing,
            head_chunk,
            hidden=h,
            logits=root_logits if h is None else None,
        )
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
        "first_token_logits": first_logits,
        "prob_first_token": prob_first,
        "topk_probs": topk_probs,
        "topk_ids": topk_ids,
        "candidate_nll": nll,
        "log_probs_sum": score,
    }


def _token_nll(
    model: ALBEFForVQA,
    node: Tensor,
    target: Tensor,
    label_smoothing: float,
    chunk: int,
    hidden: Tensor | None = None,
    logits: Tensor | None = None,
) -> Tensor:
    """Per-token loss of ``answer_nll`` (cross-entropy, label smoothing, a padding target counting 0)
    of ``target`` [M] under the next-token distribution of prefix ``node`` [M]: rows of ``logits``,
    or of the head over ``hidden`` [N, H], computed ``chunk`` prefixes at a time."""
    n = len(hidden) if hidden is not None else len(logits)
    out = None
    for a in range(0, n, chunk):
        part = (
            logits[a : a + chunk]
            if hidden is None
            else model.decoder_head(hidden[a : a + chunk], model.text_decoder.embeddings.word_embeddings.weight)
        )
        # at least float32, as cross_entropy under autocast
        logp = part.to(torch.promote_types(part.dtype, torch.float32)).log_softmax(-1)
        if out is None:
            out = logp.new_zeros(len(node))
        sel = ((node >= a) & (node < a + len(part))).nonzero().squeeze(1)
        rows = node[sel] - a
        loss = -logp[rows, target[sel]]
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(-1)[rows]
        out[sel] = loss.masked_fill(target[sel] == 0, 0.0)
    return out


class _PrefixDecoder:
    """The answer decoder run one position at a time over a prefix tree of answers.

    ``level(tokens, question, ancestors)`` decodes the prefixes of the next position: ``tokens``
    [N] their last tokens, ``question`` [N] (ascending) the question each belongs to,
    ``ancestors[s]`` [N] the index of each one's prefix at position s among that position's
    (earlier ``level`` calls). The self-attention keys/values of each position are kept for the
    next; the cross-attention keys/values of every layer are the question states' projections,
    made once, and each question's new prefixes are attended to them together.
    """

    def __init__(self, model: ALBEFForVQA, question_states: Tensor, question_mask: Tensor):
        self.enc = model.text_decoder
        self.cross_kv = []  # [layer] (keys, values) [B, h, Lq, d] of the question states
        for layer in self.enc.encoder.layer:
            ca = layer.crossattention.self
            self.cross_kv.append((ca.heads(ca.key(question_states)), ca.heads(ca.value(question_states))))
        self.cross_mask = padding_mask(question_mask)  # [B, 1, 1, Lq]
        self.B = question_states.shape[0]
        self.kv: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.enc.encoder.layer]  # [layer][position]

    def level(self, tokens: Tensor, question: Tensor, ancestors: list[Tensor]) -> Tensor:
        emb, t, N = self.enc.embeddings, len(ancestors), len(tokens)
        if t >= emb.position_embeddings.num_embeddings:
            raise ValueError(f"answers longer than max_position_embeddings {emb.position_embeddings.num_embeddings}")
        x = emb.word_embeddings.weight[tokens]
        if emb.token_type_embeddings is not None:
            x = x + emb.token_type_embeddings.weight[0]
        x = emb.dropout(emb.LayerNorm(x + emb.position_embeddings.weight[t]))  # [N, H]
        # each question's prefixes side by side as the queries of one cross-attention row
        counts = torch.bincount(question, minlength=self.B)
        slot = torch.arange(N, device=x.device) - (counts.cumsum(0) - counts)[question]
        width = int(counts.max())
        for i, layer in enumerate(self.enc.encoder.layer):
            sa = layer.attention.self
            h, d = sa.num_heads, sa.head_dim
            q, k, v = (lin(x).view(N, h, 1, d) for lin in (sa.query, sa.key, sa.value))
            past = list(zip(self.kv[i], ancestors, strict=True))  # each earlier position's keys/values, its prefix
            keys = torch.cat([kk[a] for (kk, _), a in past] + [k], 2)  # [N, h, t + 1, d]
            values = torch.cat([vv[a] for (_, vv), a in past] + [v], 2)
            self.kv[i].append((k, v))
            x = layer.attention.output(F.scaled_dot_product_attention(q, keys, values).view(N, h * d), x)
            ca = layer.crossattention.self
            cq = ca.query(x)
            grid = cq.new_zeros(self.B, width, h * d)
            grid[question, slot] = cq
            out = F.scaled_dot_product_attention(
                grid.view(self.B, width, h, d).transpose(1, 2), *self.cross_kv[i], attn_mask=self.cross_mask
            )
            out = out.transpose(1, 2).reshape(self.B, width, h * d)[question, slot]
            x = layer.crossattention.output(out, x)
            x = layer.output(layer.intermediate(x), x)
        return x


def share_cross_attention_kv(encoder: TextEncoder) -> None:
    """NLVR2: in each pair of fusion layers (f + 2i, f + 2i + 1) the first uses the second's
    cross-attention key and value projections (the same modules: one set of weights, two names)."""
    f, n = encoder.cfg.fusion_layer, encoder.cfg.num_layers
    for i in range((n - f) // 2):
        a = encoder.encoder.layer[f + 2 * i].crossattention.self
        b = encoder.encoder.layer[f + 2 * i + 1].crossattention.self
        a.key, a.value = b.key, b.value


class ALBEFForClassification(nn.Module):
    """Multimodal [CLS] -> Linear-ReLU-Linear classifier (SNLI-VE: 3 classes, one image).

    With ``num_images=2`` it is the NLVR2 model: every fusion layer is duplicated, the pair
    shares its cross-attention keys/values, and even/odd copies attend to image 0/1.
    """

    def __init__(self, config: ALBEFConfig, num_classes: int, num_images: int = 1, fast: bool = True):
        """``fast``: apply :func:`albef.models.fast.make_fast` (same parameters, same values)."""
        super().__init__()
        self.config = config
        self.num_images = num_images
        t = config.text
        if num_images == 2:
            t = dataclasses.replace(t, num_layers=t.fusion_layer + 2 * (t.num_layers - t.fusion_layer))
        elif num_images != 1:
            raise ValueError("num_images must be 1 (SNLI-VE) or 2 (NLVR2)")
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(t)
        if num_images == 2:
            share_cross_attention_kv(self.text_encoder)
        H = t.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, num_classes))
        if fast:
            apply_speedups(self)

    def encode_images(self, images: Tensor | list[Tensor]) -> list[Tensor]:
        if self.num_images == 1:
            return [self.visual_encoder(images if isinstance(images, Tensor) else images[0])]
        both = self.visual_encoder(torch.cat(list(images)))  # one ViT pass over both images
        return list(both.chunk(2))

    def forward(self, images: Tensor | list[Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class logits [B, num_classes]; ``images`` is [B, 3, H, W] or a pair of them (NLVR2)."""
        hidden = self.text_encoder(input_ids, attention_mask, self.encode_images(images))
        return self.cls_head(hidden[:, 0])


class ALBEFForTextAssignment(nn.Module):
    """NLVR2's extra pretraining: given two images and a text, does the text describe the first,
    the second, or neither (labels 0, 1, 2)? The NLVR2 encoder layout with a 3-way linear head;
    ``vision_proj`` only ranks the negative images (it gets no gradient, so it is frozen)."""

    def __init__(self, config: ALBEFConfig, fast: bool = True):
        super().__init__()
        self.config = config
        base = ALBEFForClassification(config, 2, num_images=2, fast=fast)
        self.visual_encoder, self.text_encoder = base.visual_encoder, base.text_encoder
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim).requires_grad_(False)
        self.ta_head = nn.Linear(config.text.hidden_size, 3)

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``images`` [B, 3, H, W], text b describes image b. Returns ``(logits [B, 3], labels [B])``."""
        embeds = self.visual_encoder(images)
        B = embeds.shape[0]
        with torch.no_grad():
            feat = F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)
            w = (feat @ feat.T / 0.07).softmax(1)
            w.fill_diagonal_(0)
            u = torch.rand(B, 2, generator=generator, device=embeds.device)
            two = (u[:, 0] <= 1 / 3) & (B >= 3)  # the authors: one negative with probability 2/3
            first = u[:, 1] > 0.5
            rows = torch.arange(B, device=embeds.device)
            neg = torch.multinomial(w, 2 if B >= 3 else 1, generator=generator) if B > 1 else rows[:, None]
            a = torch.where(two, neg[:, 0], torch.where(first, rows, neg[:, 0]))
            b = torch.where(two, neg[:, -1], torch.where(first, neg[:, 0], rows))
            labels = torch.where(two, 2, torch.where(first, 0, 1))
        hidden = self.text_encoder(input_ids, attention_mask, [embeds[a], embeds[b]])
        return self.ta_head(hidden[:, 0]), labels


#: classes of the classification tasks (their label names: :data:`albef.data.classification.LABELS`)
NUM_CLASSES = {"ve": 3, "nlvr": 2}


def task_model(task: str, config: ALBEFConfig) -> nn.Module:
    """The model a training task trains (a run's checkpoint holds it as ``model.*``).

    >>> from albef.config import get_preset
    >>> type(task_model("vqa", get_preset("albef-tiny"))).__name__
    'ALBEFForVQA'
    """
    if task == "pretrain":
        return ALBEF(config)
    if task in ("retrieval", "grounding"):
        return ALBEF(config, mlm_head=False)
    if task == "vqa":
        return ALBEFForVQA(config)
    if task in NUM_CLASSES:
        return ALBEFForClassification(config, NUM_CLASSES[task], num_images=2 if task == "nlvr" else 1)
    if task == "nlvr_pretrain":
        return ALBEFForTextAssignment(config)
    raise ValueError(f"unknown task {task!r}")
