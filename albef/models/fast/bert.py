"""The text encoder's fast forward: subclasses of the plain :mod:`albef.models.bert` modules that
:func:`albef.models.fast.make_fast` swaps in (same parameters, no new state).

Against the plain layers, a fast layer

- runs on the real tokens of a padded batch, [T, H], padding only around attention
  (:class:`~albef.models.fast.packing.Packing`);
- reads the image's cross-attention keys/values from an
  :class:`~albef.models.fast.context.ImageContext` projected once, possibly tiled;
- in the last layer, computes only the positions whose output is read
  (:class:`~albef.models.fast.packing.LastRows`);
- keeps the feed-forward's pre-activation alone for the backward (:mod:`.recompute`);
- on the CPU in training, computes attention explicitly so that its dropout uses the cheaper
  mask of :mod:`.dropout`, and in bfloat16 on the CPU outside training too (:mod:`.attention`).

The embeddings look the words up with a :class:`~albef.models.fast.tied.TiedGrad` when given one,
and the MLM head recomputes its LayerNorm and hands its weight gradient to that lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from albef.models.bert import BertLayer, Embeddings, ImageInput, MLMHead, MultiHeadAttention, TextEncoder, padding_mask
from albef.models.fast.attention import attention, written_out_is_faster
from albef.models.fast.context import KV, Grouping, ImageContext
from albef.models.fast.dropout import dropout
from albef.models.fast.packing import LastRows, Packing
from albef.models.fast.recompute import gelu_linear, layer_norm_linear
from albef.models.fast.tied import TiedGrad, embedding_lookup


class FastMultiHeadAttention(MultiHeadAttention):
    def project_kv(self, context: Tensor, packing: Packing | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values [B, h, N, d] of ``context`` [B, N, D] (or its real tokens [T, D])."""
        k, v = self.key(context), self.value(context)
        if packing is not None:
            return packing.pad_heads(k, self.num_heads), packing.pad_heads(v, self.num_heads)
        return self.heads(k), self.heads(v)

    def attend_to(self, x: Tensor, kv: KV, packing: Packing | None = None) -> Tensor:
        """Queries from ``x`` [B, L, H] (with ``packing``: its real tokens [T, H]) against given
        keys and values -> the same layout as ``x``."""
        q = self.query(x)
        q = self.heads(q) if packing is None else packing.pad_heads(q, self.num_heads)  # [B, h, L, d]
        out = self.attend(q, kv.keys, kv.values, kv.mask) if kv.tiling is None else self._attend_tiled(q, kv)
        return out.transpose(1, 2).flatten(2) if packing is None else packing.pack_heads(out)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # -> [B, h, L, d]
        p = self.dropout if self.training else 0.0
        # SDPA's CPU kernel has no dropout: with p > 0 it runs this same math with PyTorch's
        # slower mask and a fully-masked-row check; spelled out, the mask is albef's (dropout.py)
        if not (self.save_attention or (p > 0 and q.device.type == "cpu")):
            if p == 0 and written_out_is_faster(q):  # bf16 on the CPU (attention.py)
                return attention(q, k, v, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        attn = self.probabilities(q, k, mask)  # [B, h, L, N]
        if self.save_attention:
            self.keep_map(attn)
        return dropout(attn, p) @ v

    def _attend_tiled(self, q: Tensor, kv: KV) -> Tensor:
        """Rows ``t * B + b`` (t < tiles) read image b: their queries are laid side by side per
        image, [B, h, tiles * L, d], against the B images' keys/values as they are."""
        if self.save_attention:
            raise ValueError("attention maps are not kept for a tiled image batch")
        k, v, mask, tiling = kv
        tiles, extra = tiling.tiles, tiling.extra
        B = k.shape[0]
        n, (_, h, L, d) = tiles * B, q.shape
        qa = q[:n].view(tiles, B, h, L, d).permute(1, 2, 0, 3, 4).reshape(B, h, tiles * L, d)
        out = self.attend(qa, k, v, mask).view(B, h, tiles, L, d).permute(2, 0, 1, 3, 4).reshape(n, h, L, d)
        if extra.numel() == 0:
            return out
        # per-row copies where attention dropout is drawn (the draws of that layout, as ever), and
        # where one image's many rows would pad every other image's group to more than twice the rows
        if (self.training and self.dropout > 0) or tiling.groups.padded > 2 * len(extra):
            m = None if mask is None else mask.index_select(0, extra)
            rest = self.attend(q[n:], k.index_select(0, extra), v.index_select(0, extra), m)
        else:
            rest = self._attend_grouped(q[n:], k, v, mask, tiling.groups)
        return torch.cat([out, rest]) if n else rest

    def _attend_grouped(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, g: Grouping) -> Tensor:
        """Rows [n, h, L, d] reading images by ``g``: each image's rows' queries side by side,
        [U, h, size * L, d] (zeros where a group is short), against the U images' keys/values, not
        a copy of them per row (the copy costs more than the attention at retrieval's k)."""
        n, h, L, d = q.shape
        U, C = len(g.images), g.size
        qg = q.new_zeros(U, C, h, L, d).index_put((g.group, g.slot), q.index_select(0, g.order))
        qg = qg.permute(0, 2, 1, 3, 4).reshape(U, h, C * L, d)
        if U != k.shape[0] or not torch.equal(g.images, torch.arange(U, device=g.images.device)):
            k, v = k.index_select(0, g.images), v.index_select(0, g.images)
            mask = None if mask is None else mask.index_select(0, g.images)
        out = self.attend(qg, k, v, mask).view(U, h, C, L, d).transpose(1, 2)  # [U, C, h, L, d]
        return out[g.group, g.slot].index_select(0, g.inverse)


class FastBertLayer(BertLayer):
    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        packing: Packing | None = None,
        cross: KV | None = None,
        last: LastRows | None = None,
        recompute: bool = True,
    ) -> Tensor:
        """``x`` [B, L, H], or its real tokens [T, H] with ``packing``; ``cross``: the image's keys
        and values (fusion layers). With ``last``, only those positions are computed: the output is
        [B, P, H], or the [S, H] positions that exist when they are ragged. ``recompute``: the
        feed-forward keeps its pre-activation alone for the backward (off in a checkpointed layer,
        which keeps nothing anyway)."""
        if last is None:
            x = self._self_attention(x, mask, packing)
        else:
            x, packing = self._self_attention_at(x, mask, packing, last)
        if self.crossattention is not None:
            ca = self.crossattention
            x = ca.output(ca.self.attend_to(x, cross, packing), x)
        if not recompute:
            return self.output(self.intermediate(x), x)
        out = self.output  # = output(intermediate(x), x), GELU(h) not kept
        return out.LayerNorm(out.dropout(gelu_linear(out.dense, self.intermediate.dense(x))) + x)

    def _self_attention(self, x: Tensor, mask: Tensor, packing: Packing | None) -> Tensor:
        sa = self.attention
        kv = KV(*sa.self.project_kv(x, packing), mask)
        return sa.output(sa.self.attend_to(x, kv, packing), x)

    def _self_attention_at(
        self, x: Tensor, mask: Tensor, packing: Packing | None, last: LastRows
    ) -> tuple[Tensor, Packing | None]:
        """Self-attention of ``last``'s positions against every token: their rows ([B, P, H], or
        [S, H] with ``last.ragged``) and the packing they are in from here on."""
        sa = self.attention
        kv = KV(*sa.self.project_kv(x, packing), mask)
        index = last.positions.clamp(min=0)
        if packing is None:
            x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, P, H]
            x = x if last.ragged is None else last.ragged.pack(x)
        else:
            rows = packing.locate(index)  # [B * P]
            x = x.index_select(0, rows if last.ragged is None else rows[last.ragged.index])
            x = x if last.ragged is not None else x.view(*index.shape, x.shape[-1])
        return sa.output(sa.self.attend_to(x, kv, last.ragged), x), last.ragged


class FastEmbeddings(Embeddings):
    def forward(self, input_ids: Tensor, tie: TiedGrad | None = None) -> Tensor:  # [B, L] -> [B, L, H]
        """``tie``: the lookup's backward also makes the tied MLM decoder's weight gradient."""
        words = self.word_embeddings
        return self.finish(embedding_lookup(input_ids, words.weight, words.padding_idx, tie))


class FastTextEncoder(TextEncoder):
    """:class:`~albef.models.bert.TextEncoder` on the real tokens, with a reusable image context.

    The image may also be a precomputed :class:`ImageContext`; ``positions`` [B, P] computes the
    last layer for those positions only ([B, P, H]; -1 pads a row with fewer: nothing is computed
    there and the output is 0). A requested attention map (Grad-CAM) turns packing off, so that
    the map's padding rows are the plain model's.
    """

    def image_context(self, image: ImageInput, image_mask: Tensor | None = None) -> ImageContext:
        """Project the cross-attention keys/values of every fusion layer once."""
        images = [image] if isinstance(image, Tensor) else list(image)
        kvs = [
            layer.crossattention.self.project_kv(images[i % len(images)]) for i, layer in enumerate(self.fusion_layers)
        ]
        return ImageContext(
            [k for k, _ in kvs], [v for _, v in kvs], None if image_mask is None else padding_mask(image_mask)
        )

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, tie: TiedGrad | None = None) -> Tensor:
        return self._run(self.text_layers, self.embeddings(input_ids, tie), attention_mask, None)

    def fuse(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        image: ImageInput | ImageContext,
        image_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        context = image if isinstance(image, ImageContext) else self.image_context(image, image_mask)
        return self._run(self.fusion_layers, hidden, attention_mask, context, positions)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image: ImageInput | ImageContext,
        image_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image, image_mask, positions)

    def _run(
        self,
        layers: Sequence[FastBertLayer],
        x: Tensor,
        attention_mask: Tensor,
        context: ImageContext | None,
        positions: Tensor | None = None,
    ) -> Tensor:
        if positions is not None and self.causal:
            raise ValueError("positions are for bidirectional layers (the causal mask is per query row)")
        mask = self.self_mask(attention_mask)
        packing = None if self._saving_attention() else Packing.of(attention_mask)
        last = None if positions is None else LastRows.of(positions)
        if packing is not None:
            x = packing.pack(x)  # [T, H]
        for i, layer in enumerate(layers):
            cross = None if layer.crossattention is None else context.layer(i)
            at = last if i == len(layers) - 1 else None
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(layer, x, mask, packing, cross, at, False, use_reentrant=False)
            else:
                x = layer(x, mask, packing, cross, at)
        if last is not None:
            return last.output(x)  # [B, P, H]
        return x if packing is None else packing.pad(x)  # [B, L, H]

    def _saving_attention(self) -> bool:
        # A requested attention map keeps its padding rows as the plain model computes them (Grad-CAM
        # masks them out, but the map is public); those rows depend on every earlier layer's padding
        return any(
            blk.self.save_attention
            for layer in self.encoder.layer
            for blk in (layer.attention, layer.crossattention)
            if blk is not None
        )


#: at most this many positions, the MLM decoder runs in float32 under autocast (FastMLMHead)
FLOAT32_DECODER_ROWS = 64


class FastMLMHead(MLMHead):
    def forward(self, hidden: Tensor, word_embeddings: Tensor, tie: TiedGrad | None = None) -> Tensor:
        """= the plain head, keeping the LayerNorm's input alone for the backward; with ``tie`` the
        decoder's weight gradient may be left to the word lookup (:mod:`albef.models.fast.tied`).

        Under autocast, for at most :data:`FLOAT32_DECODER_ROWS` positions, the LayerNorm and
        the decoder run in float32: the decoder is the whole word table (23 M entries at
        BERT-base), and autocast's casts of it (forward and backward in the student, forward in
        the teacher) and of its bf16 gradient cost more than a float32 product on a few rows
        (albef-base, batch 4, 18 masked tokens: 0.15 s of a 3.1 s bf16 step), though not on
        many (albef-small at batch 32, 81 masked tokens: 0.04 s more). The logits are then float32."""
        t = self.transform
        h = F.gelu(t.dense(hidden))
        dev = h.device.type
        few_rows = h.numel() <= FLOAT32_DECODER_ROWS * h.shape[-1]
        if few_rows and torch.is_autocast_enabled(dev) and word_embeddings.dtype == torch.float32:
            with torch.autocast(dev, enabled=False):
                return layer_norm_linear(t.LayerNorm, h.float(), word_embeddings, self.bias, tie)
        return layer_norm_linear(t.LayerNorm, h, word_embeddings, self.bias, tie)
