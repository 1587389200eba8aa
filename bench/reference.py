"""The reference peer for bench/compare.py: LAVIS 1.0.2's ALBEF, built offline at our sizes.

LAVIS's top-level package imports every model, data set and task it has (video, NLP extras, hub
downloads). We register empty parent packages instead so that only the ALBEF modules and what
they import are loaded, point its BERT tokenizer at our bundled bert-base-uncased vocabulary, and
build its models with their own constructors from random initialisation (``from_pretrained`` would
download DeiT and BERT weights).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

from albef.config import ALBEFConfig
from albef.recipes import TrainSection

VOCAB = Path(__file__).resolve().parents[1] / "albef" / "assets" / "bert-base-uncased-vocab.txt"


def _stub_package(name: str, path: Path) -> None:
    """Register ``name`` as a package at ``path`` without running its ``__init__``."""
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod


@functools.cache
def import_lavis():
    """The LAVIS ALBEF modules, with the tokenizer redirected to the local vocabulary."""
    root = Path(importlib.util.find_spec("lavis").submodule_search_locations[0])
    for name in ("lavis", "lavis.common", "lavis.models", "lavis.models.albef_models"):
        _stub_package(name, root.joinpath(*name.split(".")[1:]))
    import transformers

    tokenizer_cls = transformers.BertTokenizer
    if not getattr(tokenizer_cls, "_albef_offline", False):
        original = tokenizer_cls.from_pretrained.__func__

        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            if name == "bert-base-uncased":
                return cls(vocab_file=str(VOCAB), do_lower_case=True)
            return original(cls, name, *args, **kwargs)

        tokenizer_cls.from_pretrained = from_pretrained
        tokenizer_cls._albef_offline = True
    from lavis.models.base_model import BaseModel

    sys.modules["lavis.models"].BaseModel = BaseModel  # the registry checks model classes against it
    # AlbefBase lives in the albef_models package's __init__, which we stubbed: load it by path
    init = root / "models" / "albef_models" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "lavis.models.albef_models", init, submodule_search_locations=[str(init.parent)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lavis.models.albef_models"] = mod
    spec.loader.exec_module(mod)
    from lavis.models import med, vit
    from lavis.models.albef_models import albef_pretrain, albef_retrieval, albef_vqa

    return types.SimpleNamespace(
        AlbefBase=mod.AlbefBase,
        compute_sim_matrix=mod.compute_sim_matrix,
        AlbefPretrain=albef_pretrain.AlbefPretrain,
        AlbefRetrieval=albef_retrieval.AlbefRetrieval,
        AlbefVQA=albef_vqa.AlbefVQA,
        med=med,
        vit=vit,
    )


def _vit(L, cfg: ALBEFConfig) -> nn.Module:
    v = cfg.vision
    enc = L.vit.VisionTransformerEncoder(
        img_size=v.image_size,
        patch_size=v.patch_size,
        embed_dim=v.width,
        depth=v.depth,
        num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio,
        qkv_bias=v.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=v.layer_norm_eps),
    )
    enc.vision_width = v.width
    return enc


def _bert_config(L, cfg: ALBEFConfig, num_layers: int | None = None, fusion_layer: int | None = None):
    import json

    base = json.loads((Path(L.med.__file__).parent.parent / "configs/models/med_config_albef.json").read_text())
    t = cfg.text
    base.update(
        hidden_size=t.hidden_size,
        num_hidden_layers=num_layers or t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        encoder_width=t.encoder_width,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps,
        fusion_layer=t.fusion_layer if fusion_layer is None else fusion_layer,
    )
    return L.med.BertConfig(**base)


def build_pretrain(L, cfg: ALBEFConfig) -> nn.Module:
    text = L.med.BertForMaskedLM(_bert_config(L, cfg))
    return L.AlbefPretrain(
        _vit(L, cfg),
        text,
        queue_size=cfg.queue_size,
        embed_dim=cfg.embed_dim,
        temp=cfg.temp,
        momentum=cfg.momentum,
        alpha=TrainSection.alpha,  # the distillation weight is the recipe's (0.4, the authors')
        max_txt_len=cfg.max_text_len,
    )


def build_retrieval(L, cfg: ALBEFConfig) -> nn.Module:
    text = L.med.XBertEncoder(_bert_config(L, cfg), add_pooling_layer=False)
    return L.AlbefRetrieval(_vit(L, cfg), text, queue_size=cfg.queue_size, embed_dim=cfg.embed_dim)


def build_vqa(L, cfg: ALBEFConfig, decoder_layers: int) -> nn.Module:
    text = L.med.XBertEncoder(_bert_config(L, cfg), add_pooling_layer=False)
    decoder = L.med.BertLMHeadModel(_bert_config(L, cfg, num_layers=decoder_layers, fusion_layer=0))
    return L.AlbefVQA(_vit(L, cfg), text, decoder, max_txt_len=35)


class GalleryLoader:
    """What LAVIS's ``compute_sim_matrix`` reads: ``loader.dataset.{text,image}`` and batches."""

    def __init__(self, images: torch.Tensor, texts: list[str], batch_size: int = 64):
        self.dataset = types.SimpleNamespace(text=texts, image=list(range(len(images))))
        self._images, self._bs = images, batch_size

    def __iter__(self):
        for b in self._images.split(self._bs):
            yield {"image": b}
