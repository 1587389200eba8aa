"""The speed layer: the plain model of :mod:`albef.models`, computed faster, same values.

``make_fast(model)`` swaps each plain module of ``model`` for its subclass here (in place: the
parameters, their names and the state dict stay as they are); models are built with it applied
(``ALBEF(config)``; ``ALBEF(config, fast=False)`` is the plain model), and ``make_plain`` undoes it.
What it changes, each tested against the plain computation (``tests/test_packing.py``,
``test_model.py``, ``test_recompute.py``, ``test_tied.py``, ``test_dropout.py``):

- the text layers run on the real tokens of a padded batch, padding only around attention
  (:mod:`.packing`); hidden states at padding positions come back as zeros;
- the image's cross-attention keys/values are projected once and reused by every fusion pass over
  the same images; rows that read the images in order attend to them without a gathered copy
  (:mod:`.context`, :meth:`.albef.FastALBEF.fuse_rows`);
- the last layer computes only the positions that are read: the [CLS] for ITM, the masked tokens
  for MLM (``positions=``, :meth:`~.albef.FastALBEF.itm_cls`);
- a linear layer after a GELU or a LayerNorm keeps the function's input, not its output, for the
  backward (:mod:`.recompute`);
- the word lookup and the MLM decoder (the same table) make one gradient between them (:mod:`.tied`);
- on the CPU, dropout draws its mask at a third of PyTorch's cost, and attention in training is
  computed explicitly to use it (:mod:`.dropout`);
- on the CPU in bfloat16, the ViT's attention is written out, a slice of the batch at a time,
  where PyTorch's kernel is slow (:mod:`.attention`);
- under autocast, the weight cast for a product serves its backward too (:mod:`.recompute`), and
  the MLM decoder runs in float32 when it has few rows (:class:`.bert.FastMLMHead`).

Example:
    >>> from albef.config import get_preset
    >>> from albef.models.albef import ALBEF
    >>> plain = ALBEF(get_preset("albef-tiny"), fast=False).eval()
    >>> ids, mask = torch.tensor([[101, 1037, 3899, 0]]), torch.tensor([[1, 1, 1, 0]])
    >>> images = torch.randn(1, 3, 32, 32)
    >>> reference = plain.match(images, ids, mask)
    >>> fast = make_fast(plain)                                # the same object, now fast
    >>> is_fast(fast), torch.allclose(fast.match(images, ids, mask), reference)
    (True, True)
"""

from __future__ import annotations

from typing import TypeVar

import torch  # noqa: F401 (the doctest's namespace)
from torch import nn

from albef.models.albef import ALBEF
from albef.models.bert import BertLayer, Embeddings, MLMHead, MultiHeadAttention, TextEncoder
from albef.models.fast.albef import FastALBEF
from albef.models.fast.bert import FastBertLayer, FastEmbeddings, FastMLMHead, FastMultiHeadAttention, FastTextEncoder
from albef.models.fast.context import ImageContext
from albef.models.fast.dropout import Dropout
from albef.models.fast.vit import FastAttention, FastBlock, FastVisionTransformer
from albef.models.vit import Attention, Block, VisionTransformer

__all__ = ["FastALBEF", "ImageContext", "is_fast", "make_fast", "make_plain"]

M = TypeVar("M", bound=nn.Module)

FAST: dict[type[nn.Module], type[nn.Module]] = {
    ALBEF: FastALBEF,
    TextEncoder: FastTextEncoder,
    BertLayer: FastBertLayer,
    MultiHeadAttention: FastMultiHeadAttention,
    Embeddings: FastEmbeddings,
    MLMHead: FastMLMHead,
    VisionTransformer: FastVisionTransformer,
    Block: FastBlock,
    Attention: FastAttention,
    nn.Dropout: Dropout,
}
PLAIN = {fast: plain for plain, fast in FAST.items()}


def make_fast(model: M) -> M:
    """Apply every speedup to ``model`` in place (any module holding ALBEF parts: a task model, a
    trainer) and return it. Nothing is added to its state: the swap only changes how it computes."""
    return _swap(model, FAST)


def make_plain(model: M) -> M:
    """Undo :func:`make_fast`: the plain model, as the paper draws it (in place)."""
    return _swap(model, PLAIN)


def is_fast(model: nn.Module) -> bool:
    return any(type(m) in PLAIN for m in model.modules())


def _swap(model: M, classes: dict[type[nn.Module], type[nn.Module]]) -> M:
    for m in model.modules():
        cls = classes.get(type(m))  # exact types: a subclass someone else wrote is left alone
        if cls is not None:
            m.__class__ = cls
    return model
