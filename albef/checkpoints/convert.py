"""Key-name conversion between the authors' checkpoints and this package.

The authors' names and ours differ only by a few prefixes:

===========================================  ==========================================
authors (pretraining / downstream)           ours (:class:`ALBEFPretrainer` state dict)
===========================================  ==========================================
``visual_encoder.*``                         ``model.visual_encoder.*``
``text_encoder.bert.*`` / ``text_encoder.*`` ``model.text_encoder.*``
``text_encoder.cls.predictions.*``           ``model.mlm_head.*``
``vision_proj``, ``text_proj``, ``itm_head``  ``model.*``
``temp``                                     ``model.temp``
``<name>_m.*`` (momentum twins)              ``model_m.<name>.*``
``image_queue``, ``text_queue``,             ``queue.*``
``idx_queue``, ``queue_ptr``
===========================================  ==========================================

Dropped on the way in, because they carry no information of their own: the MLM decoder weight
and bias (tied to the word embeddings and to ``predictions.bias``; checked equal) and BERT's
``embeddings.position_ids`` buffer (``arange``). A leading ``module.`` (a DDP-wrapped save) is
stripped.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from albef.models.vit import resize_pos_embed

_QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
_MOMENTUM = ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "text_decoder", "cls_head")


def unwrap_checkpoint(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside an authors' file: ``{"model": sd, ...}`` or a bare ``sd``."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict (or {{'model': state_dict}}) of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _student_key(key: str) -> str | None:
    """Authors' student key (no prefix handling of ``_m``) -> our ``ALBEF`` key, None = drop."""
    key = key.replace("text_encoder.bert.", "text_encoder.", 1)
    if key.endswith("embeddings.position_ids"):
        return None
    if key.startswith("text_encoder.cls.predictions.decoder."):
        return None  # tied to the word embeddings / predictions.bias
    if key.startswith("text_encoder.cls.predictions."):
        return "mlm_head." + key.removeprefix("text_encoder.cls.predictions.")
    key = key.replace("text_decoder.bert.", "text_decoder.", 1)
    if key.startswith("text_decoder.cls.predictions.decoder."):
        return None  # tied to the decoder's word embeddings / predictions.bias
    if key.startswith("text_decoder.cls.predictions."):
        return "decoder_head." + key.removeprefix("text_decoder.cls.predictions.")
    return key


def from_authors(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Authors' state dict (pretraining or downstream layout) -> :class:`ALBEFPretrainer` keys.

    Example:
        >>> from_authors({"text_encoder.bert.embeddings.LayerNorm.bias": torch.zeros(2),
        ...               "visual_encoder_m.cls_token": torch.zeros(1, 1, 2)}).keys()
        dict_keys(['model.text_encoder.embeddings.LayerNorm.bias', 'model_m.visual_encoder.cls_token'])
    """
    sd = unwrap_checkpoint(sd)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _QUEUE_KEYS:
            out["queue." + key] = value
            continue
        prefix = "model."
        m = re.match(r"^(\w+?)_m\.(.*)$", key)
        if m and m.group(1) in _MOMENTUM:
            prefix, key = "model_m.", f"{m.group(1)}.{m.group(2)}"
        new = _student_key(key)
        if new is not None:
            out[prefix + new] = value
    _check_ties(sd)
    return out


def _check_ties(sd: dict[str, Tensor]) -> None:
    for module in ("text_encoder", "text_decoder"):
        for twin in ("", "_m"):
            for bert in ("bert.", ""):
                dec = sd.get(f"{module}{twin}.cls.predictions.decoder.weight")
                emb = sd.get(f"{module}{twin}.{bert}embeddings.word_embeddings.weight")
                if dec is not None and emb is not None and not torch.equal(dec, emb):
                    raise ValueError(
                        f"{module}{twin}.cls.predictions.decoder.weight differs from the word "
                        "embeddings; ALBEF ties them, so this checkpoint cannot be represented"
                    )


def to_authors(sd: dict[str, Tensor], pretrain_layout: bool = True) -> dict[str, Tensor]:
    """Inverse of :func:`from_authors`, re-creating the tied and buffer keys the authors save.

    ``pretrain_layout=True`` writes ``text_encoder.bert.*`` and the MLM head
    (``text_encoder.cls.*``), as the authors' pretraining checkpoints do; otherwise the
    downstream layout (plain ``text_encoder.*``).
    """
    out: dict[str, Tensor] = {}
    bert = "bert." if pretrain_layout else ""
    for key, value in sd.items():
        if key.startswith("queue."):
            out[key.removeprefix("queue.")] = value
            continue
        twin = ""
        if key.startswith("model_m."):
            key, twin = key.removeprefix("model_m."), "_m"
        else:
            key = key.removeprefix("model.")
        head, _, rest = key.partition(".")
        if head in ("mlm_head", "decoder_head"):
            module = "text_encoder" if head == "mlm_head" else "text_decoder"
            out[f"{module}{twin}.cls.predictions.{rest}"] = value
            if rest == "bias":
                out[f"{module}{twin}.cls.predictions.decoder.bias"] = value
        elif head in ("text_encoder", "text_decoder"):
            infix = bert if head == "text_encoder" else "bert."  # the VQA decoder is a BertLMHeadModel
            out[f"{head}{twin}.{infix}{rest}"] = value
            if rest == "embeddings.word_embeddings.weight":
                out[f"{head}{twin}.cls.predictions.decoder.weight"] = value
            if rest == "embeddings.position_embeddings.weight":
                out[f"{head}{twin}.{infix}embeddings.position_ids"] = torch.arange(value.shape[0]).unsqueeze(0)
        else:
            out[f"{head}{twin}.{rest}" if rest else f"{head}{twin}"] = value
    if not pretrain_layout:
        out = {k: v for k, v in out.items() if not k.startswith(("text_encoder.cls.", "text_encoder_m.cls."))}
    return out


def adapt_pos_embed(sd: dict[str, Tensor], num_patches: int) -> dict[str, Tensor]:
    """Resize every ``*visual_encoder.pos_embed`` in ``sd`` to ``num_patches`` (bicubic)."""
    return {k: resize_pos_embed(v, num_patches) if k.endswith("visual_encoder.pos_embed") else v for k, v in sd.items()}
