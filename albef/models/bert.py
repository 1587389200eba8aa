"""The BERT text encoder whose upper layers fuse the image through cross-attention.

Parameter names follow Hugging Face's ``BertModel`` (``embeddings.*``,
``encoder.layer.N.{attention,crossattention,intermediate,output}``) because the authors'
checkpoints use them; the code is ours. Layers ``0 .. fusion_layer-1`` are text-only, layers
``fusion_layer ..`` insert cross-attention between self-attention and the feed-forward block.

Image context: cross-attention keys and values depend only on the image and the layer, so
:meth:`TextEncoder.image_context` projects them once and every fusion pass over the same images
(the ITM positives, both kinds of negatives, MLM) reuses them by index instead of re-projecting.

Padding: a batch of captions is padded to its longest, and a third or more of its positions are
often padding. No output reads a padding position (it is masked out as a key; ITC and ITM read
[CLS], MLM the masked tokens), and everything in a layer but attention works token by token, so
the layers run on the real tokens alone (:class:`Packing`: projections, feed-forward, LayerNorm,
dropout) and pad only around attention (the embeddings still run on the padded batch). The real
tokens' values are the same; the hidden states at padding positions come back as zeros, where
the reference leaves whatever its padded computation gave. ``TextEncoder.unpad = False`` computes
every position as the reference does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.config import TextConfig
from albef.models.dropout import Dropout, dropout
from albef.models.recompute import gelu_linear, layer_norm_linear
from albef.models.tied import TiedGrad, embedding_lookup

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
    tiles: int = 0  # see tile()
    extra: Tensor | None = None

    def select(self, index: Tensor) -> "ImageContext":
        """Rows ``index`` of the batch (differentiable: gradients flow back to the projections)."""
        if self.tiles:
            raise ValueError("select() of a tiled ImageContext")
        return ImageContext(
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
            None if self.mask is None else self.mask.index_select(0, index),
        )

    def tile(self, tiles: int, extra: Tensor) -> "ImageContext":
        """The batch ``tiles`` times over in order, then rows ``extra``: what ``select(cat([arange(B)]
        * tiles + [extra]))`` gives, without copying the tiled keys/values. Attention regroups those
        rows' queries by image instead (cross-attention queries do not attend to each other), and
        gradients reach the keys/values without a scatter."""
        return ImageContext(self.keys, self.values, self.mask, tiles, extra)

    @property
    def batch_size(self) -> int:
        n = self.keys[0].shape[0] if self.keys else 0
        return n * self.tiles + len(self.extra) if self.tiles else n


@dataclass
class Packing:
    """The real tokens of a padded batch: the per-token work runs on [T, ...] instead of [B, L, ...].

    Example:
        >>> pk = Packing.of(torch.tensor([[1, 1, 0], [1, 0, 0]]))
        >>> pk.index.tolist(), pk.pack(torch.arange(6).view(2, 3)).tolist()
        ([0, 1, 3], [0, 1, 3])
        >>> pk.pad(torch.tensor([5, 6, 7])).tolist()
        [[5, 6, 0], [7, 0, 0]]
    """

    index: Tensor  # [T] flat positions b * L + i of the real tokens, ascending
    batch: int
    length: int
    rows: Tensor = field(init=False)  # [T] b of each real token
    cols: Tensor = field(init=False)  # [T] i of each real token

    def __post_init__(self) -> None:
        self.rows, self.cols = self.index // self.length, self.index % self.length
        self._head_rows: dict[int, Tensor] = {}  # heads -> [T * heads] rows of [B * heads * L, d]

    @classmethod
    def of(cls, attention_mask: Tensor) -> "Packing | None":
        """None when no position is padding (nothing to gain)."""
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
        if index.numel() == attention_mask.numel():
            return None
        return cls(index, attention_mask.shape[0], attention_mask.shape[1])

    def pack(self, x: Tensor) -> Tensor:  # [B, L, ...] -> [T, ...]
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:  # [T, ...] -> [B, L, ...], zeros at padding
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])

    def pad_heads(self, x: Tensor, heads: int) -> Tensor:  # [T, H] -> [B, h, L, H / h], zeros at padding
        # written straight into attention's layout: the head split costs no copy of its own
        out = x.new_zeros(self.batch, heads, self.length, x.shape[-1] // heads)
        out.transpose(1, 2)[self.rows, self.cols] = x.view(x.shape[0], heads, x.shape[-1] // heads)
        return out

    def pack_heads(self, x: Tensor) -> Tensor:  # [B, h, L, d] -> [T, h * d]
        B, h, L, d = x.shape
        if x.transpose(1, 2).is_contiguous():  # [B, L, h, d] in memory (SDPA's output): token rows
            return self.pack(x.transpose(1, 2).reshape(B, L, h * d))
        # rows of d, one per (token, head): a plain row gather, where indexing the transposed view
        # with (rows, cols) took 2.5x as long forward and backward
        rows = self._head_rows.get(h)
        if rows is None:
            heads = torch.arange(h, device=x.device)
            rows = self._head_rows[h] = ((self.rows[:, None] * h + heads) * L + self.cols[:, None]).reshape(-1)
        return x.reshape(B * h * L, d).index_select(0, rows).view(-1, h * d)

    def locate(self, positions: Tensor) -> Tensor:
        """[B, P] positions -> [B * P] rows of the packed tensor; a padding position maps to row 0
        (its output is unspecified, as a padding position's always is)."""
        rows = torch.zeros(self.batch * self.length, dtype=torch.long, device=self.index.device)
        rows[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        offsets = torch.arange(self.batch, device=positions.device)[:, None] * self.length
        return rows[(positions + offsets).reshape(-1)]


def set_unpad(module: nn.Module, enabled: bool) -> None:
    """Switch :class:`Packing` on or off in every text encoder inside ``module``.

    Off, every padding position is computed as the reference computes it (parity checks of
    whole hidden-state tensors); on (the default), only the real tokens are.
    """
    for m in module.modules():
        if isinstance(m, TextEncoder):
            m.unpad = enabled


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

    def _keep_map(self, attn: Tensor) -> None:
        if attn.requires_grad:
            attn.retain_grad()
        elif torch.is_grad_enabled():  # frozen weights: still let Grad-CAM differentiate the map
            attn.requires_grad_(True)
        self.attention_map = attn

    def _heads(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, h, L, d]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, context: Tensor, packing: Packing | None = None) -> tuple[Tensor, Tensor]:
        k, v = self.key(context), self.value(context)
        if packing is not None:  # [T, H] -> [B, h, L, d]
            return packing.pad_heads(k, self.num_heads), packing.pad_heads(v, self.num_heads)
        return self._heads(k), self._heads(v)

    def forward(self, x: Tensor, mask: Tensor | None, kv: tuple | None = None,
                packing: Packing | None = None) -> Tensor:
        """[B, L, H] -> [B, L, H]; with ``packing``, [T, H] real tokens -> [T, H]. ``kv``: given
        keys and values, ``(k, v)``, or ``(k, v, tiles, extra)`` (:meth:`ImageContext.tile`)."""
        q = self.query(x)
        q = self._heads(q) if packing is None else packing.pad_heads(q, self.num_heads)
        k, v = self.project_kv(x, packing) if kv is None else kv[:2]
        if kv is not None and len(kv) == 4:
            out = self._attend_tiled(q, k, v, mask, *kv[2:])
        else:
            out = self._attend(q, k, v, mask)
        return out.transpose(1, 2).flatten(2) if packing is None else packing.pack_heads(out)  # [B, L, H] / [T, H]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # -> [B, h, L, d]
        p = self.dropout if self.training else 0.0
        # SDPA's CPU kernel has no dropout: with p > 0 it runs this same math with PyTorch's
        # slower mask and a fully-masked-row check; spelled out, the mask is albef's (dropout.py)
        if self.save_attention or (p > 0 and q.device.type == "cpu"):
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:  # finite, so a row with no key left is uniform, not NaN (no real token has one)
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            attn = scores.softmax(-1)  # [B, h, L, N]
            if self.save_attention:
                self._keep_map(attn)
            return dropout(attn, p) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    def _attend_tiled(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, tiles: int,
                      extra: Tensor) -> Tensor:
        """Rows ``t * B + b`` (t < tiles) read image b: their queries are laid side by side per
        image, [B, h, tiles * L, d], against the B images' keys/values as they are."""
        if self.save_attention:
            raise ValueError("attention maps are not kept for a tiled image batch")
        B = k.shape[0]
        n, (_, h, L, d) = tiles * B, q.shape
        qa = q[:n].view(tiles, B, h, L, d).permute(1, 2, 0, 3, 4).reshape(B, h, tiles * L, d)
        out = self._attend(qa, k, v, mask).view(B, h, tiles, L, d).permute(2, 0, 1, 3, 4).reshape(n, h, L, d)
        if extra.numel() == 0:
            return out
        m = None if mask is None else mask.index_select(0, extra)
        rest = self._attend(q[n:], k.index_select(0, extra), v.index_select(0, extra), m)
        return torch.cat([out, rest])


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)`` (BERT's ``*Output`` blocks)."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor, gelu: bool = False) -> Tensor:
        """``gelu``: ``h`` is a pre-activation; GELU(h) is taken here, and not kept for the backward
        (:func:`~albef.models.recompute.gelu_linear`)."""
        return self.LayerNorm(self.dropout(gelu_linear(self.dense, h) if gelu else self.dense(h)) + residual)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, kv_width, cfg.attention_dropout)
        self.output = AddNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None, kv: tuple | None = None,
                packing: Packing | None = None) -> Tensor:
        return self.output(self.self(x, mask, kv, packing), x)


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

    def forward(self, x: Tensor, mask: Tensor, cross_kv: tuple | None = None,
                cross_mask: Tensor | None = None, positions: Tensor | None = None,
                packing: Packing | None = None, queries: Packing | None = None, recompute: bool = True) -> Tensor:
        """[B, L, H] -> [B, L, H], or [B, P, H] for ``positions`` [B, P]: every token still serves
        as a key/value of the self-attention, but only those positions are computed on (queries,
        cross-attention, feed-forward) — what a last layer needs when only a few outputs are read.
        With ``packing`` the input is the real tokens [T, H], and so is the output unless
        ``positions`` are given. ``queries`` (``Packing.of(positions >= 0)``) packs a ragged
        set of positions (-1 = none): the output is then the [S, H] positions that exist.
        ``recompute``: the feed-forward keeps its pre-activation alone for the backward (off in a
        checkpointed layer, which keeps nothing anyway)."""
        if positions is None:
            x = self.attention(x, mask, packing=packing)
        else:
            kv = self.attention.self.project_kv(x, packing)
            index = positions.clamp(min=0)
            if packing is None:
                x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, P, H]
                x = x if queries is None else queries.pack(x)
            else:
                rows = packing.locate(index)  # [B * P]
                x = x.index_select(0, rows if queries is None else rows[queries.index])
                x = x if queries is not None else x.view(*positions.shape, x.shape[-1])
            x = self.attention(x, mask, kv, queries)  # [B, P, H] or [S, H] from here on
            packing = queries
        if self.crossattention is not None:
            x = self.crossattention(x, cross_mask, cross_kv, packing)
        if not recompute:
            return self.output(self.intermediate(x), x)
        return self.output(self.intermediate.dense(x), x, gelu=True)  # = output(intermediate(x), x)


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
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor, tie: TiedGrad | None = None) -> Tensor:  # [B, L] -> [B, L, H]
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {L} tokens exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate it in the tokenizer")
        x = embedding_lookup(input_ids, self.word_embeddings.weight, self.word_embeddings.padding_idx, tie)
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
        self.unpad = True  # run on the real tokens only (see the module docstring)
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
        packing = Packing.of(attention_mask) if self.unpad and not self._saving_attention() else None
        # a ragged set of positions (-1 = none) is packed; one position per row never is: -1 there is
        # zeroed at the end instead, which spares ITM's [CLS] pass a host sync on a GPU (nonzero)
        queries = None if positions is None or positions.shape[1] == 1 else Packing.of(positions >= 0)
        if packing is not None:
            x = packing.pack(x)  # [T, H]
        for i, layer in enumerate(layers):
            kv = None
            if layer.crossattention is not None:
                kv = (context.keys[i], context.values[i])
                if context.tiles:
                    kv += (context.tiles, context.extra)
            cross_mask = None if context is None else context.mask
            last = i == len(layers) - 1
            pos, qs = (positions, queries) if last else (None, None)
            if self.grad_checkpointing and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, kv, cross_mask, pos, packing, qs, False,
                                                      use_reentrant=False)
            else:
                x = layer(x, mask, kv, cross_mask, pos, packing, qs)
        if queries is not None:
            x = queries.pad(x)  # [B, P, H], zeros where a row has no position
        elif positions is not None:
            x = x.masked_fill((positions < 0).unsqueeze(-1), 0.0)
        elif packing is not None:
            x = packing.pad(x)
        return x

    def _saving_attention(self) -> bool:
        # A requested attention map keeps its padding rows as the reference computes them (Grad-CAM
        # masks them out, but the map is public); those rows depend on every earlier layer's padding
        return any(blk.self.save_attention for layer in self.encoder.layer
                   for blk in (layer.attention, layer.crossattention) if blk is not None)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, tie: TiedGrad | None = None) -> Tensor:
        """Text-only layers: [B, L] ids -> [B, L, H]. ``tie``: see :mod:`albef.models.tied`."""
        x = self.embeddings(input_ids, tie)
        return self._run(self.encoder.layer[: self.cfg.fusion_layer], x, attention_mask, None)

    def fuse(self, hidden: Tensor, attention_mask: Tensor, image: ImageInput | ImageContext,
             image_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Fusion layers from a text hidden state [B, L, H] -> [B, L, H]; with ``positions``
        [B, P] only those outputs, [B, P, H] (e.g. ``zeros(B, 1)``: the [CLS] that ITM reads).
        A ragged set pads ``positions`` with -1: nothing is computed there and the output is 0."""
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

    def forward(self, hidden: Tensor, word_embeddings: Tensor, tie: TiedGrad | None = None) -> Tensor:  # [.., H] -> [.., V]
        t = self.transform  # = F.linear(t(hidden), word_embeddings, bias); see layer_norm_linear
        return layer_norm_linear(t.LayerNorm, F.gelu(t.dense(hidden)), word_embeddings, self.bias, tie)
