"""The Pipeline API, Grad-CAM box scoring and `albef predict`, on the tiny preset."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from albef.api import Pipeline, Processor
from albef.checkpoints import save_pretrained
from albef.cli import main as cli_main
from albef.data.cli import write_shapes
from albef.gradcam import box_iou, box_scores


@pytest.fixture
def gallery(tmp_path):
    write_shapes(tmp_path, n=6, image_size=32, seed=4)
    return [tmp_path / "images" / f"{i:06d}.png" for i in range(6)]


@pytest.fixture
def pipe(tiny_model):
    return Pipeline(tiny_model, device="cpu")


def test_similarity_and_match_agree_with_the_model(pipe, gallery):
    texts = ["A red circle.", "a blue square on the left"]
    sims = pipe.similarity(gallery[:3], texts)
    assert sims.shape == (3, 2)
    px = pipe.processor.images(gallery[:3])
    tok = pipe.processor.texts(texts)
    m = pipe.model
    with torch.no_grad():
        expected = m.image_feat(m.encode_image(px)) @ m.text_feat(m.encode_text(tok.input_ids, tok.attention_mask)).T
    torch.testing.assert_close(sims, expected)
    # paths, PIL images and normalised tensors are interchangeable
    pil = [Image.open(p) for p in gallery[:3]]
    torch.testing.assert_close(pipe.similarity(pil, texts), sims)
    torch.testing.assert_close(pipe.similarity(px, texts), sims)
    p = pipe.match(gallery[:2], texts)
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    with pytest.raises(ValueError, match="one to one"):
        pipe.match(gallery[:3], texts)


def test_retrieve_reranks_the_itc_shortlist_by_itm(pipe, gallery):
    hits = pipe.retrieve("a green triangle", gallery, k=4, top=4)
    sims = pipe.similarity(gallery, ["a green triangle"])[:, 0]
    shortlist = set(sims.topk(4).indices.tolist())
    assert {h.index for h in hits} == shortlist
    for h in hits:  # each re-rank score is the pair's own ITM probability
        assert h.itm == pytest.approx(pipe.match([gallery[h.index]], ["a green triangle"]).item(), abs=1e-5)
    assert [h.itm for h in hits] == sorted((h.itm for h in hits), reverse=True)
    itc_only = pipe.retrieve("a green triangle", gallery, k=4, top=2, rerank=False)
    assert [h.index for h in itc_only] == sims.topk(2).indices.tolist() and itc_only[0].itm is None


def test_a_bfloat16_pipeline_scores_in_float32(tiny_model, gallery):
    """bfloat16 features compared in bfloat16 would round the cosines to ~3 digits and tie the
    shortlist; the scores come out in float32, equal to the float32 product of those features."""
    pipe = Pipeline(tiny_model.to(torch.bfloat16), device="cpu")
    texts = ["a green triangle", "a red circle"]
    sims = pipe.similarity(gallery, texts)
    assert sims.dtype == torch.float32
    expected = pipe.encode_image(gallery).float() @ pipe.encode_text(texts).float().T
    torch.testing.assert_close(sims, expected, rtol=0, atol=0)
    hits = pipe.retrieve("a green triangle", gallery, k=4, top=4, rerank=False)
    assert [h.index for h in hits] == sims[:, 0].topk(4).indices.tolist()


def test_bad_inputs_get_clear_errors(pipe, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="x.png: not a readable image"):
        pipe.encode_image([tmp_path / "x.png"])
    with pytest.raises(ValueError, match="empty after cleaning"):
        pipe.encode_text(["?!"])


def test_box_scores_and_iou_by_hand():
    heat = torch.zeros(4, 6)
    heat[1:3, 2:4] = 1.0  # a 2x2 hot block
    boxes = torch.tensor([[2.0, 1.0, 2.0, 2.0], [0.0, 0.0, 6.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    scores = box_scores(heat, boxes)
    torch.testing.assert_close(scores, torch.tensor([4 / 2.0, 4 / 24**0.5, 0.0]))
    iou = box_iou(boxes[:2], torch.tensor([[2.0, 1.0, 2.0, 2.0], [3.0, 2.0, 6.0, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([1.0, 6 / (24 + 24 - 6)]))


@pytest.mark.slow
def test_ground_and_predict_cli(tiny_model, gallery, tmp_path, capsys):
    pipe = Pipeline(tiny_model, device="cpu")
    res = pipe.ground(gallery[0], "a red circle", boxes=[[0, 0, 16, 16], [16, 16, 16, 16]])
    g = tiny_model.config.vision.grid_size
    assert res.heatmap.shape == (g, g) and res.heatmap_image.shape == (32, 32)
    assert res.best_box == int(res.box_scores.argmax())
    assert all(p.grad is None for p in tiny_model.parameters())  # Grad-CAM leaves no gradients behind
    save_pretrained(tiny_model, tmp_path / "m")
    assert (
        cli_main(
            [
                "predict",
                "gradcam",
                "--model",
                str(tmp_path / "m"),
                "--image",
                str(gallery[0]),
                "--text",
                "a red circle",
                "--out",
                str(tmp_path / "o.png"),
                "--box",
                "0,0,16,16",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "o.png").size == (32, 32)
    gradcam = ["predict", "gradcam", "--model", str(tmp_path / "m"), "--image", str(gallery[0]), "--text", "a cat"]
    drawn = (tmp_path / "o.png").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite to replace it"):  # the first overlay is kept
        cli_main([*gradcam, "--out", str(tmp_path / "o.png")])
    assert (tmp_path / "o.png").read_bytes() == drawn
    assert cli_main([*gradcam, "--out", str(tmp_path / "o.png"), "--overwrite"]) == 0
    assert (tmp_path / "o.png").read_bytes() != drawn and Image.open(tmp_path / "o.png").format == "PNG"
    assert cli_main([*gradcam, "--out", str(tmp_path / "sub" / "o.jpg")]) == 0  # its folder made, the suffix's format
    assert Image.open(tmp_path / "sub" / "o.jpg").format == "JPEG"
    capsys.readouterr()
    with pytest.raises(SystemExit):  # refused before the model is loaded, as the next two
        cli_main([*gradcam[:3], str(tmp_path / "none"), *gradcam[4:], "--out", str(tmp_path / "p.png"), "--box", "0,a"])
    assert "--box takes x,y,w,h" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*gradcam[:3], str(tmp_path / "none"), *gradcam[4:], "--out", str(tmp_path / "p.psd")])
    assert "Pillow cannot write PSD files" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "predict",
                "score",
                "--model",
                str(tmp_path / "m"),
                "--image",
                str(gallery[0]),
                "--text",
                "a red circle",
                "--text",
                "a dog",
            ]
        )
        == 0
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    printed = [float(r[-1]) for r in rows]  # the ITM column, one row per text
    expected = Pipeline.from_pretrained(tmp_path / "m", device="cpu").match([gallery[0]] * 2, ["a red circle", "a dog"])
    assert printed == pytest.approx(expected.tolist(), abs=1e-3)


def test_processor_for_saved_model_keeps_the_tokenizer_convention(tiny_model, tmp_path):
    tiny_model.config.add_sep = True
    save_pretrained(tiny_model, tmp_path / "m")
    proc = Processor.for_model(tiny_model, tmp_path / "m")
    assert proc.texts("a dog").input_ids[0, -1].item() == 102
