"""The BERT text encoder whose upper layers fuse the image through cross-attention.

Parameter names follow Hugging Face's ``BertModel`` (``embeddings.*``,
``encoder.layer.N.{attention,crossattention,intermediate,output}``) because the authors'
checkpoints use them; the code is ours. Layers ``0 .. fusion_layer-1`` are text-only, layers
``fusion_layer ..`` insert cross-attention between self-attention and the feed-forward block.

Image context: cross-attention keys and values depend only on the image and the layer, so
:meth:`TextEncoder.image_context` projects them once and every fusion pass over the same images
(the ITM positives, both kinds of negatives, MLM) reuses them by index instead of re-projecting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.config import TextConfig

ImageInput = Tensor | Sequence[Tensor]


@dataclass
class ImageContext:
    """Cross-attention keys/values of every fusion layer for a batch of image sequences.

    ``keys[i]`` / ``values[i]``: [B, heads, N, head_dim] for fusion layer ``fusion_layer + i``.
    ``mask``: boolean [B, 1, 1, N] (True = attend) or None when every image token is valid.
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor | None = None

    def select(self, index: Tensor) -> "ImageContext":
        """Rows ``index`` of the batch (differentiable: gradients flow back to the projections)."""
        return ImageContext(
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
            None if self.mask is None else self.mask.index_select(0, index),
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


def padding_mask(attention_mask: Tensor) -> Tensor:
    """[B, L] 0/1 mask -> boolean [B, 1, 1, L] (True = attend), the form SDPA takes."""
    return attention_mask[:, None, None, :].bool()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with BERT's ``query``/``key``/``value`` projections.

    With ``save_attention`` set (Grad-CAM), the probabilities are computed explicitly, kept in
    ``attention_map`` and retain their gradient after ``backward()``.
    """

    def __init__(self, hidden: int, num_heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout = dropout
        self.save_attention = False
        self.attention_map: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, h, L, d]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.key(context)), self._heads(self.value(context))

    def forward(self, x: Tensor, mask: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q = self._heads(self.query(x))
        k, v = self.project_kv(x) if kv is None else kv
        p = self.dropout if self.training else 0.0
        if self.save_attention:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            attn = scores.softmax(-1)  # [B, h, L, N]
            if attn.requires_grad:
                attn.retain_grad()
            elif torch.is_grad_enabled():  # frozen weights: still let Grad-CAM differentiate the map
                attn.requires_grad_(True)
            self.attention_map = attn
            out = F.dropout(attn, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).flatten(2)  # [B, L, H]


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)`` (BERT's ``*Output`` blocks)."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, kv_width, cfg.attention_dropout)
        self.output = AddNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.output(self.self(x, mask, kv), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_attention: bool):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        self.crossattention = AttentionBlock(cfg, cfg.encoder_width) if cross_attention else None
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor, cross_kv: tuple[Tensor, Tensor] | None = None,
                cross_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """[B, L, H] -> [B, L, H], or [B, P, H] for ``positions`` [B, P]: every token still serves
        as a key/value of the self-attention, but only those positions are computed on (queries,
        cross-attention, feed-forward) — what a last layer needs when only a few outputs are read."""
        if positions is None:
            x = self.attention(x, mask)
        else:
            kv = self.attention.self.project_kv(x)
            x = self.attention(x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])), mask, kv)
        if self.crossattention is not None:
            x = self.crossattention(x, cross_mask, cross_kv)
        return self.output(self.intermediate(x), x)


class Embeddings(nn.Module):
    """Word + absolute position (+ token type 0) embeddings.

    ALBEF feeds single sentences only, so of a token-type table just row 0 is ever added (the
    authors' ``xbert.py``); ``type_vocab_size=0`` leaves the table out (LAVIS).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = (nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
                                      if cfg.type_vocab_size else None)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor) -> Tensor:  # [B, L] -> [B, L, H]
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {L} tokens exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate it in the tokenizer")
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[:L]
        return self.dropout(self.LayerNorm(x))


class _Layers(nn.Module):
    def __init__(self, layers: list[BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """BERT with cross-attention from ``fusion_layer`` on.

    ``encode_text`` runs the text-only layers, ``fuse`` the fusion layers starting from a hidden
    state, ``forward`` both (the "multimodal" pass). The image may be one sequence [B, N, D],
    a list of them (fusion layer ``l`` then reads image ``(l - fusion_layer) % len(list)``, the
    NLVR2 layout), or a precomputed :class:`ImageContext`. ``causal=True`` makes the
    self-attention causal (the VQA answer decoder).

    Example:
        >>> from albef.config import get_preset
        >>> enc = TextEncoder(get_preset("albef-tiny").text)
        >>> ids, mask = torch.tensor([[101, 2000, 2001]]), torch.ones(1, 3, dtype=torch.long)
        >>> enc(ids, mask, torch.randn(1, 17, 32)).shape
        torch.Size([1, 3, 32])
    """

    def __init__(self, cfg: TextConfig, causal: bool = False):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.embeddings = Embeddings(cfg)
        self.encoder = _Layers([BertLayer(cfg, i >= cfg.fusion_layer) for i in range(cfg.num_layers)])
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT's initialisation: normal(0, 0.02) for linears and embeddings.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def fusion_layers(self) -> list[BertLayer]:
        return list(self.encoder.layer[self.cfg.fusion_layer:])

    def _self_mask(self, attention_mask: Tensor) -> Tensor:
        mask = padding_mask(attention_mask)  # [B, 1, 1, L]
        if self.causal:
            L = attention_mask.shape[1]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        return mask

    def image_context(self, image: ImageInput, image_mask: Tensor | None = None) -> ImageContext:
        """Project the cross-attention keys/values of every fusion layer once."""
        images = [image] if isinstance(image, Tensor) else list(image)
        keys, values = [], []
        for i, layer in enumerate(self.fusion_layers):
            k, v = layer.crossattention.self.project_kv(images[i % len(images)])
            keys.append(k)
            values.append(v)
        return ImageContext(keys, values, None if image_mask is None else padding_mask(image_mask))

    def _run(self, layers: Sequence[BertLayer], x: Tensor, attention_mask: Tensor,
             context: ImageContext | None, positions: Tensor | None = None) -> Tensor:
        mask = self._self_mask(attention_mask)
        if positions is not None and self.causal:
            raise ValueError("positions are for bidirectional layers (the causal mask is per query row)")
        for i, layer in enumerate(layers):
            kv = None
            if layer.crossattention is not None:
                kv = (context.keys[i], context.values[i])
            cross_mask = None if context is None else context.mask
            pos = positions if i == len(layers) - 1 else None
            if self.grad_checkpointing and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, kv, cross_mask, pos, use_reentrant=False)
            else:
                x = layer(x, mask, kv, cross_mask, pos)
        return x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text-only layers: [B, L] ids -> [B, L, H]."""
        x = self.embeddings(input_ids)
        return self._run(self.encoder.layer[: self.cfg.fusion_layer], x, attention_mask, None)

    def fuse(self, hidden: Tensor, attention_mask: Tensor, image: ImageInput | ImageContext,
             image_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Fusion layers from a text hidden state [B, L, H] -> [B, L, H]; with ``positions``
        [B, P] only those outputs, [B, P, H] (e.g. ``zeros(B, 1)``: the [CLS] that ITM reads)."""
        context = image if isinstance(image, ImageContext) else self.image_context(image, image_mask)
        return self._run(self.fusion_layers, hidden, attention_mask, context, positions)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image: ImageInput | ImageContext,
                image_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """All layers (text then fusion): [B, L] ids -> [B, L, H] (or [B, P, H], see :meth:`fuse`)."""
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image, image_mask, positions)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """BERT's masked-LM head; the decoder matrix is the word-embedding table, passed in.

    Keeping the tie outside the module (the owner passes its own table) means a deep copy of
    a model, such as the momentum teacher, stays tied to its own embeddings.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:  # [.., H] -> [.., V]
        return F.linear(self.transform(hidden), word_embeddings, self.bias)
