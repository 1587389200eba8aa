"""The BERT text encoder whose upper layers fuse the image through cross-attention.

Parameter names follow Hugging Face's ``BertModel`` (``embeddings.*``,
``encoder.layer.N.{attention,crossattention,intermediate,output}``) because the authors'
checkpoints use them; the code is ours. Layers ``0 .. fusion_layer-1`` are text-only, layers
``fusion_layer ..`` insert cross-attention between self-attention and the feed-forward block.

This is the model as the paper draws it, on padded ``[B, L, H]`` batches. The speedups (padding
skipped, image keys/values projected once, the last layer on a few positions, recomputed
activations, ...) are applied on top of it by :func:`albef.models.fast.make_fast`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from albef.config import TextConfig

ImageInput = Tensor | Sequence[Tensor]


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

    def heads(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, h, L, d]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """Queries from ``x`` [B, L, H], keys and values from ``context`` [B, N, D] (``x`` itself
        in self-attention); ``mask`` [B, 1, 1 or L, N], True = attend. -> [B, L, H]."""
        q = self.heads(self.query(x))  # [B, h, L, d]
        k = self.heads(self.key(context))  # [B, h, N, d]
        v = self.heads(self.value(context))
        return self.attend(q, k, v, mask).transpose(1, 2).flatten(2)  # [B, L, H]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # -> [B, h, L, d]
        p = self.dropout if self.training else 0.0
        if not self.save_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        attn = self.probabilities(q, k, mask)  # [B, h, L, N]
        self.keep_map(attn)
        return F.dropout(attn, p) @ v

    def probabilities(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:  # -> [B, h, L, N]
        scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
        if mask is not None:  # finite, so a row with no key left is uniform, not NaN (no real token has one)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(-1)

    def keep_map(self, attn: Tensor) -> None:
        if attn.requires_grad:
            attn.retain_grad()
        elif torch.is_grad_enabled():  # frozen weights: still let Grad-CAM differentiate the map
            attn.requires_grad_(True)
        self.attention_map = attn


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
    """Attention, then its output projection with dropout, residual and LayerNorm."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, kv_width, cfg.attention_dropout)
        self.output = AddNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention -> (cross-attention to the image, fusion layers only) -> feed-forward."""

    def __init__(self, cfg: TextConfig, cross_attention: bool):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        self.crossattention = AttentionBlock(cfg, cfg.encoder_width) if cross_attention else None
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor, image: Tensor | None = None, image_mask: Tensor | None = None) -> Tensor:
        """``x`` [B, L, H], ``mask`` [B, 1, 1 or L, L] over it; ``image`` [B, N, D] with
        ``image_mask`` [B, 1, 1, N] or None (every image token valid). -> [B, L, H]."""
        x = self.attention(x, x, mask)  # [B, L, H]
        if self.crossattention is not None:
            x = self.crossattention(x, image, image_mask)  # [B, L, H], queries from the text
        return self.output(self.intermediate(x), x)  # [B, L, H]


class Embeddings(nn.Module):
    """Word + absolute position (+ token type 0) embeddings.

    ALBEF feeds single sentences only, so of a token-type table just row 0 is ever added (the
    authors' ``xbert.py``); ``type_vocab_size=0`` leaves the table out (LAVIS).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor) -> Tensor:  # [B, L] -> [B, L, H]
        return self.finish(self.word_embeddings(input_ids))

    def finish(self, words: Tensor) -> Tensor:
        """The word vectors [B, L, H] plus token type 0 and positions, normalised, dropped out."""
        L = words.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {L} tokens exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}; truncate it in the tokenizer"
            )
        x = words
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
    state, ``forward`` both (the "multimodal" pass). The image may be one sequence [B, N, D] or a
    list of them (fusion layer ``l`` then reads image ``(l - fusion_layer) % len(list)``, the
    NLVR2 layout). ``causal=True`` makes the self-attention causal (the VQA answer decoder).

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
        self.grad_checkpointing = False  # recompute each layer in the backward (memory for time)
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

    @torch.no_grad()
    def reset_cross_attention(self) -> None:
        """Start the fusion layers' cross-attention from nn.Linear's default instead of BERT's
        N(0, 0.02) (``ALBEFConfig.cross_attention_init`` "default")."""
        for layer in self.fusion_layers:
            for m in layer.crossattention.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    @property
    def text_layers(self) -> list[BertLayer]:
        return list(self.encoder.layer[: self.cfg.fusion_layer])

    @property
    def fusion_layers(self) -> list[BertLayer]:
        return list(self.encoder.layer[self.cfg.fusion_layer :])

    def self_mask(self, attention_mask: Tensor) -> Tensor:
        """[B, L] 0/1 -> boolean [B, 1, 1, L], or [B, 1, L, L] when causal (True = attend)."""
        mask = padding_mask(attention_mask)
        if self.causal:
            L = attention_mask.shape[1]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        return mask

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text-only layers: [B, L] ids -> [B, L, H]."""
        x = self.embeddings(input_ids)  # [B, L, H]
        mask = self.self_mask(attention_mask)
        for layer in self.text_layers:
            x = self._layer(layer, x, mask)
        return x

    def fuse(
        self, hidden: Tensor, attention_mask: Tensor, image: ImageInput, image_mask: Tensor | None = None
    ) -> Tensor:
        """Fusion layers from a text hidden state [B, L, H] -> [B, L, H]."""
        images = [image] if isinstance(image, Tensor) else list(image)
        mask = self.self_mask(attention_mask)
        cross_mask = None if image_mask is None else padding_mask(image_mask)  # [B, 1, 1, N]
        x = hidden
        for i, layer in enumerate(self.fusion_layers):
            x = self._layer(layer, x, mask, images[i % len(images)], cross_mask)
        return x

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, image: ImageInput, image_mask: Tensor | None = None
    ) -> Tensor:
        """All layers (text then fusion): [B, L] ids -> [B, L, H]."""
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image, image_mask)

    def _layer(self, layer: BertLayer, x: Tensor, *args: Tensor | None) -> Tensor:
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(layer, x, *args, use_reentrant=False)
        return layer(x, *args)


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
