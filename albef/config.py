"""Configuration dataclasses and named presets.

Configs are plain dataclasses serialised as JSON next to the weights (``config.json``), the way
Hugging Face does it, so a model folder is self-describing.

Example:
    >>> from albef.config import get_preset
    >>> cfg = get_preset("albef-base")
    >>> cfg.text.fusion_layer, cfg.vision.image_size
    (6, 256)
    >>> ALBEFConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class VisionConfig:
    """ViT image encoder (timm ``VisionTransformer`` layout, pre-norm, final LayerNorm)."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    in_chans: int = 3
    # "trunc_normal": timm's (the authors start from DeiT's trained positions instead);
    # "sincos": fixed 2-D sine-cosine values (MoCo v3, MAE), which tell a ViT trained from random
    # weights where each patch is from the first step. Both stay trainable.
    pos_embed_init: str = "trunc_normal"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextConfig:
    """BERT text encoder whose layers from ``fusion_layer`` on cross-attend to the image.

    Dropout defaults follow the authors' ``config_bert.json`` (0.1 on hidden states and
    attention probabilities).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layer: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    encoder_width: int = 768  # width of the image sequence the cross-attention reads
    pad_token_id: int = 0
    # The authors' BERT (xbert.py) keeps BERT's token-type table and adds its row 0 to every
    # token; LAVIS's re-hosting drops the table (0 here).
    type_vocab_size: int = 2


#: keys of configs written by earlier versions that no longer mean anything, dropped on reading:
#: ``alpha`` (the distillation weight, now only the recipe's ``train.alpha``)
LEGACY_KEYS = ("alpha",)


@dataclass
class ALBEFConfig:
    """The whole model plus the pretraining hyper-parameters stored with it.

    ``queue_size``, ``momentum`` and ``mlm_probability`` are used only by the training wrapper
    (:class:`albef.training.ALBEFPretrainer`); the inference model ignores them. The distillation
    weight α is the recipe's (``train.alpha``).
    ``add_sep`` and ``text_cleaning`` choose the tokenisation convention: the authors' (no
    ``[SEP]`` on a single sentence, their ``pre_caption``) by default, LAVIS's as an option.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    mlm_probability: float = 0.15
    max_text_len: int = 25
    add_sep: bool = False
    text_cleaning: str = "albef"
    text_pooling: str = "cls"  # ITC text embedding: "cls" (authors) or "mean" (for mean-pooled text encoders)
    # starting weights of the heads no checkpoint fills: "authors" (vision_proj, text_proj and itm_head
    # keep nn.Linear's default, uniform in ±1/sqrt(fan_in) with biases; the MLM head's transform BERT's
    # N(0, 0.02)) or "normal" (those three heads N(0, 0.02) with zero biases, the MLM transform at
    # nn.Linear's default: the main job's setting, with which its documented figures were measured)
    head_init: str = "authors"
    # starting weights of the fusion layers' cross-attention (no BERT checkpoint has them): "bert"
    # (the authors': BERT's N(0, 0.02), zero biases) or "default" (PyTorch's nn.Linear start, uniform in
    # ±1/sqrt(fan_in): 1.5-2.1 times BERT's spread at albef-small's widths, about as much at albef-base's;
    # a probe of the start's scale, docs/results.md "What the look needs"; with DINOv2's image tokens it
    # slowed ITM's start in one 400-step run: "DINOv2's tokens, the mirror image among ITM's negatives...")
    cross_attention_init: str = "bert"

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _sub_config(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _sub_config(TextConfig, self.text, "text")
        self.validate()

    def validate(self) -> None:
        v, t = self.vision, self.text
        problems = []
        if v.image_size % v.patch_size:
            problems.append(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.width % v.num_heads:
            problems.append(f"vision.width {v.width} is not divisible by num_heads {v.num_heads}")
        if t.hidden_size % t.num_heads:
            problems.append(f"text.hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}")
        if not 0 <= t.fusion_layer <= t.num_layers:
            problems.append(f"text.fusion_layer {t.fusion_layer} must lie in [0, num_layers={t.num_layers}]")
        if t.encoder_width != v.width:
            problems.append(f"text.encoder_width {t.encoder_width} must equal vision.width {v.width}")
        if self.text_pooling not in ("cls", "mean"):
            problems.append(f"text_pooling must be 'cls' or 'mean', not {self.text_pooling!r}")
        if self.head_init not in ("authors", "normal"):
            problems.append(f"head_init must be 'authors' or 'normal', not {self.head_init!r}")
        if self.cross_attention_init not in ("bert", "default"):
            problems.append(f"cross_attention_init must be 'bert' or 'default', not {self.cross_attention_init!r}")
        if self.text_cleaning not in ("albef", "blip"):
            problems.append(f"text_cleaning must be 'albef' or 'blip', not {self.text_cleaning!r}")
        if problems:
            raise ValueError("invalid ALBEF config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ALBEFConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in LEGACY_KEYS}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ALBEF config keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ALBEFConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected an ALBEF config.json") from e


def _base() -> ALBEFConfig:
    return ALBEFConfig()


def _small() -> ALBEFConfig:
    # CPU-sized model for the built-in demo: a 6-layer, 384-wide uncased BERT (the shape of
    # MiniLM-L6, so its weights can start the text side) and a 6-block ViT-Tiny-like encoder.
    return ALBEFConfig(
        vision=VisionConfig(image_size=128, patch_size=16, width=192, depth=6, num_heads=3),
        text=TextConfig(
            hidden_size=384, num_layers=6, fusion_layer=3, num_heads=12, intermediate_size=1536, encoder_width=192
        ),
        embed_dim=128,
        queue_size=4096,
        max_text_len=25,
    )


def _tiny() -> ALBEFConfig:
    # Unit-test model: every code path of the base model, milliseconds per step.
    return ALBEFConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2),
        text=TextConfig(
            hidden_size=32,
            num_layers=4,
            fusion_layer=2,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            encoder_width=32,
        ),
        embed_dim=16,
        queue_size=32,
        max_text_len=25,
    )


PRESETS = {"albef-base": _base, "albef-small": _small, "albef-tiny": _tiny}


def _sub_config(cls: type, d: dict[str, Any], name: str) -> Any:
    """``cls(**d)``, an unknown key named (a typo in ``model.overrides.vision.…`` would otherwise
    be a bare TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {name} config keys {unknown}; {name} takes {sorted(known)}")
    return cls(**d)


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` wherever two nested dicts (``to_dict()`` of two
    configs) differ; a key missing on one side has the value None there.

    >>> differences({"vision": {"width": 768}, "temp": 0.07}, {"vision": {"width": 384}, "temp": 0.07})
    [('vision.width', 768, 384)]
    """
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def get_preset(name: str) -> ALBEFConfig:
    """A fresh config for a named preset (``albef-base``, ``albef-small``, ``albef-tiny``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
