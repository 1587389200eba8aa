"""Grounding: box ranking and accuracy by hand, Grad-CAM plumbing, the CLI and overlays."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import albef.evaluation.grounding as G
from albef.checkpoints import save_pretrained
from albef.cli import main as cli_main
from albef.data.transforms import test_transform as make_test_transform
from albef.gradcam import gradcam_itc, gradcam_itm
from albef.text import Tokenizer


@pytest.fixture
def grounding_data(tmp_path):
    for i in range(2):
        Image.new("RGB", (32, 32), (40, 40, 40)).save(tmp_path / f"img{i}.png")
    cells = [[0, 0, 16, 16], [16, 0, 16, 16], [0, 16, 16, 16], [16, 16, 16, 16]]
    entries = [
        {
            "image": "img0.png",
            "text": "the top right one",
            "ref_id": 1,
            "box": [16, 0, 16, 16],
            "candidates": cells,
            "split": "val",
        },
        {
            "image": "img0.png",
            "text": "the bottom left one",
            "ref_id": 2,
            "box": [0, 16, 16, 16],
            "candidates": cells,
            "split": "val",
        },
        {
            "image": "img1.png",
            "text": "the top left one",
            "ref_id": 3,
            "box": [2, 2, 16, 16],
            "candidates": cells,
            "split": "testA",
        },
    ]
    (tmp_path / "g.json").write_text(json.dumps(entries))
    return tmp_path


def test_box_accuracy_by_hand(grounding_data, tiny_model, monkeypatch):
    # A fixed 4x4 heat map, hot in the top-right quadrant: every expression picks cell 1.
    hot = torch.zeros(4, 4)
    hot[0:2, 2:4] = 1.0
    monkeypatch.setattr(G, "gradcam_itm", lambda model, px, ids, mask, layer: hot.expand(len(px), 4, 4))
    records = G.read_grounding(grounding_data / "g.json", str(grounding_data))
    metrics, preds = G.evaluate_grounding(tiny_model, records, Tokenizer(), make_test_transform(32))
    assert [p.best for p in preds] == [1, 1, 1]
    # IoU with the ground truth: 1 (correct), 0 (wrong), and [16,0,16,16] vs [2,2,16,16]: 28/484 (wrong)
    assert [round(p.iou, 4) for p in preds] == [1.0, 0.0, round(28 / 484, 4)]
    assert metrics["accuracy"] == pytest.approx(100 / 3)
    assert metrics["per_split"] == {"testA": 0.0, "val": 50.0}


def test_gradcam_maps_are_nonnegative_on_the_patch_grid(tiny_model):
    ids = torch.tensor([[101, 1037, 2417, 4418, 0]])
    mask = (ids > 0).long()
    px = torch.randn(1, 3, 32, 32)
    for fn in (gradcam_itm, gradcam_itc):
        heat = fn(tiny_model.eval(), px, ids, mask)
        assert heat.shape == (1, 4, 4) and (heat >= 0).all()
    assert all(p.grad is None for p in tiny_model.parameters())


def test_gradcam_itm_matches_the_authors_formula(tiny_model):
    """attention x relu(grad), masked by the text mask, mean over heads then over text tokens."""
    model = tiny_model.eval()
    ids = torch.tensor([[101, 1037, 2417, 0], [101, 2000, 2001, 2002]])
    mask = (ids > 0).long()
    px = torch.randn(2, 3, 32, 32)
    layer = model.text_encoder.encoder.layer[3].crossattention.self
    layer.save_attention = True
    fused = model.encode_multimodal(ids, mask, model.encode_image(px))
    model.itm_logits(fused)[:, 1].sum().backward()
    a, g = layer.attention_map.detach(), layer.attention_map.grad
    layer.save_attention = False
    model.zero_grad()
    m = mask[:, None, :, None].float()
    expected = ((a[..., 1:] * m) * (g[..., 1:].clamp(min=0) * m)).mean(1).mean(1).view(2, 4, 4)
    torch.testing.assert_close(gradcam_itm(model, px, ids, mask, layer=3), expected)


def test_evaluate_grounding_cli_writes_metrics_and_overlays(grounding_data, tiny_model, tmp_path, capsys):
    save_pretrained(tiny_model, tmp_path / "m")
    argv = ["evaluate", "grounding", "--model", str(tmp_path / "m"), "--data", str(grounding_data / "g.json")]
    argv += ["--image-root", str(grounding_data), "--overlays", str(tmp_path / "ov"), "--device", "cpu"]
    assert cli_main([*argv, "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 3
    drawn = sorted((tmp_path / "ov").glob("*.png"))
    assert len(drawn) == 3
    assert "accuracy" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overlays .* 3 file"):  # another run's overlays are kept
        cli_main([*argv, "--out", str(tmp_path / "r2.json")])
    assert not (tmp_path / "r2.json").exists()
    (tmp_path / "ov" / "grounding_007_ok.png").write_bytes(b"")  # an overlay the new run will not draw
    (tmp_path / "ov" / "notes.txt").write_text("mine")
    assert cli_main([*argv, "--out", str(tmp_path / "r2.json"), "--n-overlays", "2", "--overwrite"]) == 0
    assert len(list((tmp_path / "ov").glob("grounding_*.png"))) == 2  # none of the earlier run's outlives it
    assert (tmp_path / "ov" / "notes.txt").read_text() == "mine"  # files of other names are left alone


def test_gradcam_itm_default_layer_keeps_the_authors_relative_depth(tiny_model):
    """The authors' layer 8 of BERT-base (fusion from 6: the third of six fusion layers), and the
    layer a third of the way into the fusion layers of other text encoders; the default is what
    gradcam_itm uses when no layer is given."""
    from dataclasses import replace

    from albef.config import get_preset
    from albef.gradcam import default_gradcam_layer, gradcam_layer_for

    base = get_preset("albef-base").text
    assert gradcam_layer_for(base) == 8
    assert gradcam_layer_for(get_preset("albef-small").text) == 4  # fusion 3-5: the second of three
    assert gradcam_layer_for(replace(base, fusion_layer=9)) == 10  # fusion 9-11
    assert gradcam_layer_for(replace(base, fusion_layer=11)) == 11  # a single fusion layer
    ids = torch.tensor([[101, 1037, 2417, 0]])
    px, mask = torch.randn(1, 3, 32, 32), (ids > 0).long()
    layer = default_gradcam_layer(tiny_model)
    torch.testing.assert_close(gradcam_itm(tiny_model, px, ids, mask), gradcam_itm(tiny_model, px, ids, mask, layer))


def test_gradcam_itc_defaults_to_the_authors_block():
    """The authors' ITC mode: block 8 of the 12-block ViT (--block_num 8); loss = diag(sim) / temp,
    cam = attention [CLS] row x relu(its gradient), mean over heads."""
    from albef import ALBEF
    from albef.config import ALBEFConfig, get_preset

    d = get_preset("albef-tiny").to_dict()
    d["vision"]["depth"] = 12
    model = ALBEF(ALBEFConfig.from_dict(d)).eval()
    ids = torch.tensor([[101, 1037, 2417, 0], [101, 2000, 2001, 2002]])
    mask = (ids > 0).long()
    px = torch.randn(2, 3, 32, 32)
    attn = model.visual_encoder.blocks[8].attn
    attn.save_attention = True
    image_feat = model.image_feat(model.encode_image(px))
    text_feat = torch.nn.functional.normalize(model.text_proj(model.encode_text(ids, mask)[:, 0]), dim=-1)
    ((image_feat @ text_feat.T) / model.temp).diag().sum().backward()
    a, g = attn.attention_map.detach(), attn.attention_map.grad
    attn.save_attention = False
    model.zero_grad()
    expected = (a[:, :, 0, 1:] * g[:, :, 0, 1:].clamp(min=0)).mean(1).view(2, 4, 4)
    torch.testing.assert_close(gradcam_itc(model, px, ids, mask), expected)
    assert not torch.allclose(gradcam_itc(model, px, ids, mask, block=11), expected)
    with pytest.raises(ValueError, match="blocks 0-11"):
        gradcam_itc(model, px, ids, mask, block=12)


def test_grounding_trains_on_whole_resized_images(tmp_path):
    """The authors' grounding transform resizes (no random crop: it could cut the referred object
    out); the other fine-tuning tasks crop."""
    from torchvision import transforms as T

    from albef.data.cli import write_shapes
    from albef.recipes import load_recipe
    from albef.training.loop import TrainRun

    write_shapes(tmp_path, n=8, image_size=32, seed=1)
    (tmp_path / "g.json").write_text(
        json.dumps([{"image": f"images/{i:06d}.png", "text": "a shape", "ref_id": i} for i in range(8)])
    )
    steps = {}
    for task, train in (("grounding", "g.json"), ("retrieval", "retrieval_train.json")):
        recipe = load_recipe(
            None,
            [
                f"task={task}",
                "model.preset=albef-tiny",
                "model.overrides={queue_size: 16}",
                f"data.train_files=[{tmp_path / train}]",
                f"data.image_root={tmp_path}",
                "data.num_workers=0",
                "train.batch_size=4",
                "train.device=cpu",
                f"output_dir={tmp_path / task}",
            ],
        )
        steps[task] = [type(t) for t in TrainRun(recipe).data.dataset.transform.transforms]
    assert steps["grounding"][:2] == [T.Resize, T.RandomHorizontalFlip]
    assert steps["retrieval"][:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
