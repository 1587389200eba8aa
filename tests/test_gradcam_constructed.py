"""Grad-CAM on models whose weights are set by hand so that the right answer is known.

The image is a 4x4 grid of 8-px patches on black with a red quadrant and a blue quadrant; the
text is "red" or "blue". The weights make the model look for the named colour, so the heat map
of a correct Grad-CAM must sit on that colour's quadrant (and move when the text changes). This
checks the whole chain — which attention map, which gradient, the [CLS]/patch indexing and the
row-major grid reshape — against a case that does not depend on training.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from albef.config import ALBEFConfig, TextConfig, VisionConfig
from albef.gradcam import gradcam_itc, gradcam_itm
from albef.models.albef import ALBEF

RED, BLUE, GREEN = 2417, 2630, 2665  # bert-base-uncased ids of "red", "blue", "green"
CLS, SEP = 101, 102
COLOUR_OF = {RED: 0, GREEN: 1, BLUE: 2}  # token -> RGB channel


def _config() -> ALBEFConfig:
    return ALBEFConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=16, depth=1, num_heads=1),
        text=TextConfig(
            hidden_size=32,
            num_layers=2,
            fusion_layer=1,
            num_heads=1,
            intermediate_size=8,
            max_position_embeddings=8,
            encoder_width=16,
        ),
        embed_dim=4,
        queue_size=8,
        max_text_len=8,
    )


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


def _unit(n: int, *dims: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[list(dims)] = 1.0
    return v


@torch.no_grad()
def _identity_vit(model: ALBEF) -> None:
    """Patch embedding = mean R, G, B of the patch in dims 0-2; blocks add nothing."""
    vit = model.visual_encoder
    _zero(vit)
    for c in range(3):
        vit.patch_embed.proj.weight[c, c] = 1.0 / 64
    for norm in [vit.norm] + [m for b in vit.blocks for m in (b.norm1, b.norm2)]:
        norm.weight.fill_(1.0)


@torch.no_grad()
def colour_matching_itm_model() -> ALBEF:
    """ITM says "match" when the patches the [CLS] attends to have the colour the text names.

    Text dims: 0-2 the word's colour, 10 [CLS], 20-22 the word colour copied into [CLS] by the
    fusion layer's self-attention, 24-26 the colour the [CLS] read from the image by
    cross-attention, 30 the match unit the FFN computes and the ITM head reads.
    """
    model = ALBEF(_config(), mlm_head=False).eval()
    _identity_vit(model)
    enc = model.text_encoder
    _zero(enc)
    H = 32
    emb = enc.embeddings
    emb.word_embeddings.weight[CLS] = _unit(H, 10)
    emb.word_embeddings.weight[SEP] = _unit(H, 11)
    for tok, c in COLOUR_OF.items():
        emb.word_embeddings.weight[tok] = _unit(H, c)
    for m in enc.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
    fusion = enc.encoder.layer[1]
    # self-attention: [CLS] (dim 10) attends to the colour words, whose colour lands in dims 20-22
    sa = fusion.attention.self
    sa.query.weight[0, 10] = 3.0
    sa.key.weight[0, 0:3] = 3.0
    for c in range(3):
        sa.value.weight[c, c] = 1.0
        fusion.attention.output.dense.weight[20 + c, c] = 1.0
    # cross-attention: a query of colour c meets keys of colour c; the value carries the colour
    ca = fusion.crossattention.self
    for c in range(3):
        ca.query.weight[c, 20 + c] = 3.0
        ca.key.weight[c, c] = 3.0
        ca.value.weight[c, c] = 1.0
        fusion.crossattention.output.dense.weight[24 + c, c] = 1.0
    # FFN: unit c fires when the word's colour and the attended colour are both c
    for c in range(3):
        fusion.intermediate.dense.weight[c, 20 + c] = 1.0
        fusion.intermediate.dense.weight[c, 24 + c] = 1.0
        fusion.intermediate.dense.bias[c] = -4.5  # one colour alone stays below
        fusion.output.dense.weight[30, c] = 4.0
    model.itm_head.weight[1, 30] = 1.0
    return model


@torch.no_grad()
def colour_matching_itc_model() -> ALBEF:
    """The image [CLS] averages the patches (uniform attention) and carries their colours; the
    text feature is the named colour, so the similarity is the named colour's share of the image."""
    model = ALBEF(_config(), mlm_head=False).eval()
    _identity_vit(model)
    blk = model.visual_encoder.blocks[0]
    D = 16
    for c in range(3):  # q = k = 0: uniform attention; v copies the colour into dims 3-5
        blk.attn.qkv.weight[2 * D + c, c] = 1.0
        blk.attn.proj.weight[3 + c, c] = 4.0
    _zero(model.vision_proj)
    _zero(model.text_proj)
    for c in range(3):
        model.vision_proj.weight[c, 3 + c] = 1.0
        model.text_proj.weight[c, c] = 1.0
    enc = model.text_encoder
    _zero(enc)
    for tok, c in COLOUR_OF.items():
        enc.embeddings.word_embeddings.weight[tok] = _unit(32, c)
    for m in enc.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
    # text [CLS] -> mean pooling so the feature is the colour word's (no [CLS] training here)
    model.config.text_pooling = "mean"
    return model


def two_colour_image() -> torch.Tensor:
    """[1, 3, 32, 32]: red top-right quadrant, blue bottom-left quadrant, black elsewhere."""
    img = torch.zeros(1, 3, 32, 32)
    img[0, 0, 0:16, 16:32] = 1.0
    img[0, 2, 16:32, 0:16] = 1.0
    return img


QUADRANT = {RED: (slice(0, 2), slice(2, 4)), BLUE: (slice(2, 4), slice(0, 2))}


def _text(word: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[CLS, word, SEP]])
    return ids, torch.ones_like(ids)


def test_constructed_itm_model_matches_colours():
    model = colour_matching_itm_model()
    img = two_colour_image()
    probs = {w: model.match(img, *_text(w)).item() for w in (RED, BLUE, GREEN)}
    # both colours in the image match; green, absent, does not
    assert probs[RED] > 0.95 and probs[BLUE] > 0.95 and probs[GREEN] < 0.5


@pytest.mark.parametrize("word", [RED, BLUE])
def test_gradcam_itm_peaks_on_the_region_the_text_names(word):
    model = colour_matching_itm_model()
    heat = gradcam_itm(model, two_colour_image(), *_text(word), layer=1)[0]  # [4, 4]
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[QUADRANT[word]] = True
    assert heat[inside].min() > 0
    assert heat[inside].min() > 10 * heat[~inside].max()


@pytest.mark.parametrize("word", [RED, BLUE])
def test_gradcam_itc_peaks_on_the_region_the_text_names(word):
    model = colour_matching_itc_model()
    heat = gradcam_itc(model, two_colour_image(), *_text(word))[0]
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[QUADRANT[word]] = True
    assert heat[inside].min() > 0
    assert heat[inside].min() > 10 * heat[~inside].max()


def test_itm_diagnostic_credits_the_model_that_looks_at_the_image():
    """On the colour-matching model, ITM always prefers an image's own colour word; this model's ITC
    scores every pair alike (no projections), so ITC wins half the comparisons (ties)."""
    from albef.evaluation.retrieval import GalleryEmbeddings, itm_diagnostic

    model = colour_matching_itm_model().eval()
    images = torch.zeros(3, 3, 32, 32)
    for c in range(3):  # pure red, green, blue
        images[c, c] = 1.0
    words = [RED, GREEN, BLUE]  # caption c names image c's colour
    ids = torch.tensor([[CLS, w, SEP] for w in words])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ie, te = model.encode_image(images), model.encode_text(ids, mask)
        g = GalleryEmbeddings(ie, model.image_feat(ie), te, mask, model.text_feat(te, mask))
    d = itm_diagnostic(model, g, [[0], [1], [2]])
    assert d["pairs"] == 3
    assert d["itm_vs_random"] == d["itm_vs_hard"] == 1.0
    assert d["itc_vs_random"] == d["itc_vs_hard"] == 0.5
    # red and blue with their captions swapped: the only other caption is the right one, and ITM
    # prefers it every time
    keep = torch.tensor([0, 2])
    g2 = GalleryEmbeddings(g.image_embeds[keep], g.image_feat[keep], g.text_embeds[keep], mask[keep], g.text_feat[keep])
    d = itm_diagnostic(model, g2, [[1], [0]])
    assert d["itm_vs_random"] == d["itm_vs_hard"] == 0.0
