"""Attention in bfloat16 on the CPU, spelled out and a slice of the batch at a time (the ViT's, and
the text encoder's outside training; in training the text's is spelled out for its dropout).

PyTorch's CPU kernel for ``scaled_dot_product_attention`` (flash attention) is slow in bfloat16
at this model's sizes, its backward most of all. Against ``softmax(q kᵀ / √d) v`` written out
(torch 2.14.1, AMD EPYC Zen 4, 2 threads, d = 64, forward + backward, [B, heads, N]):

- ViT-B at res 224, batch 4, [4, 12, 197]: SDPA 17.0 ms, written out 8.2 ms;
- albef-small at res 128, batch 32, [32, 3, 65]: 13.0 ms against 2.4 ms;
- ViT-B at res 384, batch 2, [2, 12, 577]: 57.8 ms against 36.3 ms;
- and forward alone, re-ranking 64 pairs in albef-base's fusion layers: cross-attention
  [64, 12, 30 -> 197] 12.8 against 11.7 ms, masked self-attention [64, 12, 30] 5.9 against
  4.2 ms, the last layer's [CLS] alone [64, 12, 1 -> 197] 8.9 against 1.7 ms.

Written out, the [B, h, N, N] scores are materialised; once they outgrow the cache the products
and the softmax turn memory-bound ([64, 12, 197]: 157 ms forward against SDPA's 72), so the
batch is cut into slices of at most :data:`SCORES_PER_SLICE` scores (the same shape: 47 ms
against SDPA's 87 in the same run; forward + backward 125 against 328).

The numbers are those of eager code under ``torch.autocast``, as the reference's timm ViT and
BERT compute them under LAVIS's mixed precision: the scores come out of a bfloat16 product
rounded to bfloat16, the softmax accumulates in float32 and returns bfloat16. SDPA keeps the
scores in float32, so its error is smaller: against float64, on scores of standard deviation
~4, the output's largest error is 0.15 here and 0.09 for SDPA, the gradients' 1.8 % and 1.0 %
of their largest entry. In float32, SDPA is as fast (13.8 against 16.2 ms at ViT-B's shape) and
keeps no [N, N] map for the backward, so float32 and other devices keep it.

Example:
    >>> q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.bfloat16) for _ in range(3))
    >>> out = attention(q, k, v)                      # [B, h, N, d]
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    >>> out.shape, bool((out.double() - ref).abs().max() < 0.05)
    (torch.Size([2, 3, 17, 8]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: scores computed at once (2 M: [4, 12, 197, 197] of ViT-B at batch 4, 3.7 MB in bfloat16)
SCORES_PER_SLICE = 1 << 21


def written_out_is_faster(q: Tensor) -> bool:
    """Whether :func:`attention` beats SDPA for these queries: bfloat16 on the CPU."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q kᵀ / √d) v`` ≤ :data:`SCORES_PER_SLICE` scores at a time: q [B, h, L, d],
    k and v [B, h, N, d], ``mask`` None or boolean [B or 1, 1, 1 or L, N] (True = attend; a row
    with no key left is uniform, as in the plain model's ``probabilities``) -> [B, h, L, d]."""
    B = q.shape[0]
    n = max(1, SCORES_PER_SLICE // max(q.shape[1] * q.shape[2] * k.shape[2], 1))
    outs = []
    for i in range(0, B, n):
        qs, ks, vs = q[i : i + n], k[i : i + n], v[i : i + n]
        # q scaled before the product: 1/√d is a power of two for d = 64, so exact in bfloat16
        scores = (qs * qs.shape[-1] ** -0.5) @ ks.transpose(-2, -1)
        if mask is not None:
            m = mask[i : i + n] if mask.shape[0] == B else mask
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        outs.append(scores.softmax(-1) @ vs)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
