"""Model structure, the pretraining step and its invariants, on the tiny preset."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from albef.checkpoints.convert import from_authors, to_authors
from albef.config import ALBEFConfig, VisionConfig, get_preset
from albef.models.albef import ALBEF
from albef.models.fast import make_plain
from albef.models.fusion import Positions
from albef.models.vit import VisionTransformer, resize_pos_embed, sincos_pos_embed
from albef.training.pretrain import ALBEFPretrainer, PretrainDraws

from helpers import text_batch


def test_presets_and_config_round_trip(tmp_path):
    for name in ("albef-base", "albef-small", "albef-tiny"):
        cfg = get_preset(name)
        cfg.save(tmp_path / "config.json")
        assert ALBEFConfig.load(tmp_path / "config.json") == cfg
    base = get_preset("albef-base")
    assert (base.vision.width, base.vision.depth, base.text.num_layers, base.text.fusion_layer) == (768, 12, 12, 6)
    heads = (base.embed_dim, base.queue_size, base.momentum, base.temp, base.vision.image_size)
    assert heads == (256, 65536, 0.995, 0.07, 256)
    with pytest.raises(ValueError, match="fusion_layer"):
        tiny = get_preset("albef-tiny").to_dict()
        ALBEFConfig.from_dict({**tiny, "text": {**tiny["text"], "fusion_layer": 9}})
    with pytest.raises(ValueError, match="unknown ALBEF config keys"):
        ALBEFConfig.from_dict({"nope": 1})


def test_base_model_has_the_papers_size():
    # ViT-B/16 (86M) + BERT-base without pooler/token types (~109M) + 6 cross-attentions (~21M)
    with torch.device("meta"):
        model = ALBEF(get_preset("albef-base"))
    n = sum(p.numel() for p in model.parameters())
    assert 205e6 < n < 215e6, n


def test_head_init_is_the_authors_by_default_and_normal_on_request():
    # the authors' vision_proj, text_proj and itm_head are plain nn.Linear (PyTorch's default:
    # weight and bias uniform in ±1/sqrt(fan_in)); their MLM head is BERT's (N(0, 0.02), zero bias)
    torch.manual_seed(0)
    m = ALBEF(get_preset("albef-small"))
    for lin in (m.vision_proj, m.text_proj, m.itm_head):
        bound = 1 / math.sqrt(lin.in_features)
        assert 0.9 * bound < lin.weight.abs().max() <= bound
        assert lin.bias.abs().max() <= bound and lin.bias.all()  # biases drawn too, not zeroed
        assert abs(float(lin.weight.detach().std()) - bound / math.sqrt(3)) < 0.1 * bound
    dense = m.mlm_head.transform.dense
    assert abs(float(dense.weight.detach().std()) - 0.02) < 0.001 and not dense.bias.any()

    cfg = get_preset("albef-small")
    cfg.head_init = "normal"
    m = ALBEF(cfg)
    for lin in (m.vision_proj, m.text_proj, m.itm_head):
        assert abs(float(lin.weight.detach().std()) - 0.02) < 0.002 and not lin.bias.any()
    with pytest.raises(ValueError, match="head_init"):
        ALBEFConfig(head_init="xavier")


def test_cross_attention_starts_from_berts_init_unless_asked_for_pytorchs():
    def spreads(m):  # each fusion layer's cross-attention query weights, and the rest of the text side
        cross = [float(layer.crossattention.self.query.weight.detach().std()) for layer in m.text_encoder.fusion_layers]
        own = float(m.text_encoder.text_layers[0].attention.self.query.weight.detach().std())
        return cross, own

    torch.manual_seed(0)
    cross, own = spreads(ALBEF(get_preset("albef-small")))
    assert all(abs(c - 0.02) < 0.002 for c in cross) and abs(own - 0.02) < 0.002  # the authors': all BERT's
    cfg = get_preset("albef-small")
    cfg.cross_attention_init = "default"
    torch.manual_seed(0)
    m = ALBEF(cfg)
    cross, own = spreads(m)
    bound = 1 / math.sqrt(m.text_encoder.fusion_layers[0].crossattention.self.query.in_features)
    assert all(abs(c - bound / math.sqrt(3)) < 0.1 * bound for c in cross)  # nn.Linear's uniform ±1/sqrt(fan_in)
    assert abs(own - 0.02) < 0.002  # only the cross-attention changes
    assert m.text_encoder.fusion_layers[0].crossattention.output.dense.bias.any()  # drawn, not zeroed
    with pytest.raises(ValueError, match="cross_attention_init"):
        ALBEFConfig(cross_attention_init="xavier")


def test_multimodal_equals_text_then_fuse(tiny_model):
    model = tiny_model.eval()
    ids, mask = text_batch(3, 9)
    image_embeds = model.encode_image(torch.randn(3, 3, 32, 32))
    full = model.encode_multimodal(ids, mask, image_embeds)
    staged = model.fuse(model.encode_text(ids, mask), mask, image_embeds)
    torch.testing.assert_close(full, staged)
    plain = make_plain(copy.deepcopy(model))  # the fast model's real tokens are the plain model's
    real = mask.bool()
    torch.testing.assert_close(full[real], plain.encode_multimodal(ids, mask, image_embeds)[real])
    torch.testing.assert_close(staged[real], plain.fuse(plain.encode_text(ids, mask), mask, image_embeds)[real])
    # a precomputed image context read by rows out of order (their queries regrouped by image)
    # gives the same as re-projecting the chosen images
    ctx = model.image_context(image_embeds)
    order = torch.tensor([2, 0, 2])
    torch.testing.assert_close(
        model.fuse(model.encode_text(ids, mask), mask, ctx.tile(0, order)),
        model.fuse(model.encode_text(ids, mask), mask, image_embeds[order]),
    )


def test_padding_does_not_change_real_tokens(tiny_model):
    model = tiny_model.eval()
    ids, mask = text_batch(2, 6)
    image_embeds = model.encode_image(torch.randn(2, 3, 32, 32))
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], 1)
    a = model.encode_multimodal(ids, mask, image_embeds)
    b = model.encode_multimodal(padded_ids, padded_mask, image_embeds)[:, :6]
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()])


def test_attention_probe_path_matches_sdpa_and_keeps_gradients(tiny_model):
    model = tiny_model.eval()
    ids, mask = text_batch(2, 7)
    images = torch.randn(2, 3, 32, 32)
    fast = model.itm_logits(model.encode_multimodal(ids, mask, model.encode_image(images)))
    attn = model.text_encoder.encoder.layer[3].crossattention.self
    attn.save_attention = True
    slow = model.itm_logits(model.encode_multimodal(ids, mask, model.encode_image(images)))
    torch.testing.assert_close(fast, slow)
    slow[:, 1].sum().backward()
    amap = attn.attention_map
    assert amap.shape == (2, 2, 7, 17) and amap.grad is not None and amap.grad.abs().sum() > 0
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 2, 7))


def test_vit_attention_probe_matches(tiny_model):
    vit = tiny_model.visual_encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    a = vit(x)
    vit.blocks[1].attn.save_attention = True
    torch.testing.assert_close(vit(x), a)
    assert vit.blocks[1].attn.attention_map.shape == (2, 2, 17, 17)


def test_resize_pos_embed_keeps_cls_and_is_identity_at_same_size():
    pe = torch.randn(1, 17, 8)
    assert resize_pos_embed(pe, 16) is pe
    big = resize_pos_embed(pe, 36)
    assert big.shape == (1, 37, 8) and torch.equal(big[:, 0], pe[:, 0])
    const = torch.cat([torch.zeros(1, 1, 2), torch.full((1, 16, 2), 3.0)], 1)
    torch.testing.assert_close(resize_pos_embed(const, 64)[:, 1:], torch.full((1, 64, 2), 3.0))


def test_sincos_positions_follow_the_closed_form_and_stay_trainable():
    grid, dim = 4, 16
    pe = sincos_pos_embed(grid, dim)  # [16, 16]: columns in the first half, rows in the second
    for p in range(grid * grid):
        r, c = divmod(p, grid)  # patches are row-major
        for i in range(dim // 4):
            w = 10000 ** (-i / (dim / 4))
            expect = [math.sin(c * w), math.cos(c * w), math.sin(r * w), math.cos(r * w)]
            got = [pe[p, i], pe[p, dim // 4 + i], pe[p, dim // 2 + i], pe[p, 3 * dim // 4 + i]]
            assert [float(g) for g in got] == pytest.approx(expect, abs=1e-6)
    assert len({tuple(row.tolist()) for row in pe}) == grid * grid  # every patch has its own place
    cfg = VisionConfig(image_size=32, patch_size=8, width=16, depth=1, num_heads=2, pos_embed_init="sincos")
    vit = VisionTransformer(cfg)
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros(16)) and torch.equal(vit.pos_embed[0, 1:], pe)
    assert vit.pos_embed.requires_grad
    with pytest.raises(ValueError, match="pos_embed_init"):
        VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=16, depth=1, num_heads=2, pos_embed_init="x"))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(4, 6)


def _step(trainer, B=4, L=10, alpha=0.4, generator=None):
    ids, mask = text_batch(B, L)
    return trainer(
        torch.randn(B, 3, 32, 32), ids, mask, alpha=alpha, generator=generator or torch.Generator().manual_seed(0)
    )


def test_backward_reaches_every_trainable_parameter_and_no_momentum_one(tiny_config):
    trainer = ALBEFPretrainer(ALBEF(tiny_config))
    out = _step(trainer)
    out.loss.backward()
    for name, p in trainer.named_parameters():
        if name.startswith("model_m."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert out.itm.logits.shape == (12, 2) and out.itm.labels.tolist() == [1] * 4 + [0] * 8
    assert torch.isfinite(out.loss)


def test_teacher_has_no_itm_head_or_temperature_and_moves_by_ema(tiny_config):
    trainer = ALBEFPretrainer(ALBEF(tiny_config))
    names = {n for n, _ in trainer.model_m.named_parameters()}
    assert not any(n.startswith(("itm_head", "temp")) for n in names)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.01)
    t0 = {n: p.clone() for n, p in trainer.model_m.named_parameters()}
    _step(trainer)
    student = dict(trainer.model.named_parameters())
    for n, p in trainer.model_m.named_parameters():
        torch.testing.assert_close(p, 0.995 * t0[n] + 0.005 * student[n])


def test_batch_size_one_trains(tiny_config):
    tiny_config.queue_size = 8
    trainer = ALBEFPretrainer(ALBEF(tiny_config))
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        out = _step(trainer, B=1)
        assert torch.isfinite(out.loss)
        assert out.itm.labels.tolist() == [1]  # no negative exists in a batch of one
        opt.zero_grad()
        out.loss.backward()
        opt.step()


@pytest.mark.parametrize("every_image_has_a_negative_text", [True, False])
def test_shared_fusion_pass_equals_separate_passes(tiny_config, every_image_has_a_negative_text):
    """The student's ITM pairs and masked captions share one fusion pass: same logits and same
    gradients as the reference's separate passes (positives+negatives, then MLM) over all tokens,
    made by the plain model. With a negative text for every image those rows read the images'
    keys/values untiled (ImageContext.tile), like the positives and the masked captions; else they
    are gathered."""
    torch.manual_seed(0)
    trainer = ALBEFPretrainer(ALBEF(tiny_config)).double()
    model = trainer.model
    plain = make_plain(copy.deepcopy(model))
    ids, mask = text_batch(4, 10)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out = trainer(images, ids, mask, 0.4, generator=torch.Generator().manual_seed(5), enqueue=False)
    if not every_image_has_a_negative_text:  # replay with one negative text and one negative image missing
        d = out.draws
        neg_text, neg_image = d.neg_text_idx.clone(), d.neg_image_idx.clone()
        neg_text[0], neg_image[2] = -1, -1
        out = trainer(
            images,
            ids,
            mask,
            0.4,
            enqueue=False,
            draws=PretrainDraws(neg_image, neg_text, d.mlm_input_ids, d.mlm_labels),
        )
        assert len(out.itm.labels) == 4 + 3 + 3
    d = out.draws
    assert (d.mlm_labels != -100).sum(1).unique().numel() > 1  # ragged: rows mask different counts
    rows = torch.arange(4)
    has_img, has_txt = d.neg_image_idx >= 0, d.neg_text_idx >= 0
    text_rows = torch.cat([rows, rows[has_img], d.neg_text_idx[has_txt]])
    image_rows = torch.cat([rows, d.neg_image_idx[has_img], rows[has_txt]])
    torch.testing.assert_close(out.itm.text_rows, text_rows)
    torch.testing.assert_close(out.itm.image_rows, image_rows)
    image_embeds, text_embeds = plain.encode_image(images), plain.encode_text(ids, mask)
    itm = plain.itm_logits(plain.fuse(text_embeds[text_rows], mask[text_rows], image_embeds[image_rows]))
    masked = d.mlm_labels != -100
    mlm = plain.mlm_logits(plain.fuse(plain.encode_text(d.mlm_input_ids, mask), mask, image_embeds)[masked])
    torch.testing.assert_close(out.itm.logits, itm)
    torch.testing.assert_close(out.mlm.logits, mlm)
    params = [p for p in model.parameters() if p.requires_grad]
    probe = torch.randn(mlm.shape, dtype=torch.float64)
    shared = torch.autograd.grad(out.itm.logits.sum() + (out.mlm.logits * probe).sum(), params, allow_unused=True)
    separate = torch.autograd.grad(
        itm.sum() + (mlm * probe).sum(), [p for p in plain.parameters() if p.requires_grad], allow_unused=True
    )
    for (name, _), a, b in zip(model.named_parameters(), shared, separate, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    "setting, parts",
    [
        (True, (True, True)),
        ("all", (True, True)),
        ("vision", (True, False)),
        (False, (False, False)),
        ("none", (False, False)),
    ],
)
def test_grad_checkpointing_settings(tiny_model, setting, parts):
    tiny_model.set_grad_checkpointing(setting)
    assert (tiny_model.visual_encoder.grad_checkpointing, tiny_model.text_encoder.grad_checkpointing) == parts
    with pytest.raises(ValueError, match="'vision'"):
        tiny_model.set_grad_checkpointing("text")


def test_a_batch_with_no_masked_token_trains(tiny_config):
    """Every MLM position slot is then -1 (none), in the student's shared pass and the teacher's."""
    trainer = ALBEFPretrainer(ALBEF(tiny_config))
    ids, mask = text_batch(4, 10)
    no_mask = PretrainDraws(mlm_input_ids=ids.clone(), mlm_labels=torch.full_like(ids, -100))
    out = trainer(torch.randn(4, 3, 32, 32), ids, mask, 0.4, draws=no_mask, generator=torch.Generator().manual_seed(0))
    assert out.mlm.loss.item() == 0.0 and out.mlm.logits.shape[0] == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert trainer.model.itm_head.weight.grad.abs().sum() > 0


def test_pretraining_step_under_bf16_autocast(tiny_config):
    """The GPU's mixed precision, here on the CPU: bf16 products through every custom path
    (packing, recomputed GELU/LayerNorm, shared fusion pass), float32 gradients close to the
    float32 step's."""

    def step(amp: bool):
        torch.manual_seed(0)
        trainer = ALBEFPretrainer(ALBEF(tiny_config))
        ids, mask = text_batch(4, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = trainer(torch.randn(4, 3, 32, 32), ids, mask, 0.4, generator=torch.Generator().manual_seed(5))
        out.loss.backward()
        return out, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    ref, ref_grads = step(False)
    out, grads = step(True)
    assert out.itm.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
    cos = torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0)
    assert cos > 0.999  # 0.99999 here


def test_replayed_draws_reproduce_a_step(tiny_config):
    a = ALBEFPretrainer(ALBEF(tiny_config))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    ids, mask = text_batch(4, 10)
    images = torch.randn(4, 3, 32, 32)
    out1 = a(images, ids, mask, 0.4, generator=torch.Generator().manual_seed(5))
    b = ALBEFPretrainer(ALBEF(tiny_config))
    b.load_state_dict(state)
    d = out1.draws
    torch.manual_seed(123)  # replay must not depend on any random state
    replay = PretrainDraws(d.neg_image_idx, d.neg_text_idx, d.mlm_input_ids, d.mlm_labels)
    out2 = b(images, ids, mask, 0.4, draws=replay)
    losses = out1.losses()
    for name, loss in out2.losses().items():
        torch.testing.assert_close(loss, losses[name], rtol=0, atol=0)
    # and a different draw gives a different step
    out3 = b(images, ids, mask, 0.4, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(out3.draws.mlm_labels, d.mlm_labels)


def test_retrieval_objective_excludes_same_id_negatives(tiny_config):
    trainer = ALBEFPretrainer(ALBEF(tiny_config, mlm_head=False), mlm=False, with_idx=True)
    ids, mask = text_batch(4, 8)
    idx = torch.tensor([1, 1, 2, 3])
    for seed in range(10):
        out = trainer(torch.randn(4, 3, 32, 32), ids, mask, 0.4, idx=idx, generator=torch.Generator().manual_seed(seed))
        for b, j in enumerate(out.draws.neg_image_idx.tolist()):
            assert idx[b] != idx[j]
        assert out.mlm is None and "loss_mlm" not in out.losses()
    assert trainer.queue.idx_queue[0, :4].tolist() == [1, 1, 2, 3]


def test_authors_key_conversion_round_trips(tiny_config):
    trainer = ALBEFPretrainer(ALBEF(tiny_config))
    sd = trainer.state_dict()
    authors = to_authors(sd)
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in authors
    assert "text_encoder_m.cls.predictions.decoder.weight" in authors and "visual_encoder_m.pos_embed" in authors
    back = from_authors({"model": authors})
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    broken = dict(authors)
    broken["text_encoder.cls.predictions.decoder.weight"] = broken["text_encoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="differs from the word"):
        from_authors(broken)


def test_mlm_logits_only_at_masked_positions_equal_full_projection(tiny_config):
    trainer = ALBEFPretrainer(ALBEF(tiny_config))
    out = _step(trainer)
    plain = make_plain(copy.deepcopy(trainer.model))
    labels = out.draws.mlm_labels
    ids, mask = text_batch(4, 10)
    hidden = plain.encode_multimodal(out.draws.mlm_input_ids, mask, out.student.image_embeds)
    full = plain.mlm_logits(hidden)
    torch.testing.assert_close(out.mlm.logits, full[labels != -100])
    ce = F.cross_entropy(full.view(-1, full.shape[-1]), labels.view(-1))  # reference: CE over all, ignore -100
    torch.testing.assert_close(out.mlm.ce, ce)


def test_mean_text_pooling_option(tiny_config):
    tiny_config.text_pooling = "mean"
    model = ALBEF(tiny_config).eval()
    ids, mask = text_batch(3, 7)
    with torch.no_grad():
        emb = model.encode_text(ids, mask)
        feat = model.text_feat(emb, mask)
        m = mask.unsqueeze(-1).float()
        expected = F.normalize(model.text_proj((emb * m).sum(1) / m.sum(1)), dim=-1)
    torch.testing.assert_close(feat, expected)
    with pytest.raises(ValueError, match="attention mask"):
        model.text_feat(emb)
    with pytest.raises(ValueError, match="text_pooling"):
        ALBEFConfig.from_dict({**tiny_config.to_dict(), "text_pooling": "max"})


def test_ablation_switches(tiny_config):
    ids, mask = text_batch(4, 10)
    images = torch.randn(4, 3, 32, 32)

    def run(**flags):
        torch.manual_seed(0)
        trainer = ALBEFPretrainer(ALBEF(tiny_config), **flags)
        return trainer(images, ids, mask, 0.4, generator=torch.Generator().manual_seed(1))

    no_itc = run(itc=False)
    torch.testing.assert_close(no_itc.loss, no_itc.itm.loss + no_itc.mlm.loss)
    uniform = run(hard_negatives=False)
    torch.testing.assert_close(uniform.itm.weights_t2i, 1.0 - torch.eye(4))
    onehot = run(itc_distill=False)
    torch.testing.assert_close(onehot.itc.targets_i2t[:, :4], torch.eye(4))
    assert run(mlm_distill=False).mlm.distill is None and run().mlm.distill is not None


def test_last_layer_on_chosen_positions_equals_the_full_pass(tiny_model):
    """``positions`` (fast model) computes the last layer for a few tokens: same values and
    gradients as the plain model computing every token and picking them (what ITM's [CLS] and
    MLM's masked tokens use)."""
    model = tiny_model.eval().double()
    plain = make_plain(copy.deepcopy(model))
    ids = torch.tensor([[101, 1037, 2417, 4418, 2006, 0], [101, 2000, 2001, 2002, 2003, 2004]])
    mask = (ids > 0).long()
    img = model.encode_image(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    full = plain.encode_multimodal(ids, mask, img)
    torch.testing.assert_close(model.itm_cls(model.encode_text(ids, mask), mask, img), full[:, :1])
    torch.testing.assert_close(plain.itm_cls(plain.encode_text(ids, mask), mask, img), full[:, :1])
    masked = torch.tensor([[False, True, False, False, True, False], [False, False, True, False, False, False]])
    positions, keep = Positions.of(masked)
    assert positions.tolist() == [[1, 4], [2, -1]] and keep.tolist() == [[True, True], [True, False]]
    part = model.encode_multimodal(ids, mask, img, positions=positions)
    torch.testing.assert_close(part[keep], full[masked])
    torch.testing.assert_close(Positions(positions, keep).read(full), full[masked])
    assert (part[~keep] == 0).all()  # -1: a ragged row's missing slot, not computed
    unpadded = torch.ones_like(mask)  # the same ragged positions on a batch with no padding to skip
    torch.testing.assert_close(
        model.encode_multimodal(ids, unpadded, img, positions=positions)[keep],
        plain.encode_multimodal(ids, unpadded, img)[masked],
    )
    g_full = torch.autograd.grad(full[masked].square().sum(), img)[0]
    part = model.encode_multimodal(ids, mask, img, positions=positions)
    g_part = torch.autograd.grad(part[keep].square().sum(), img)[0]
    torch.testing.assert_close(g_part, g_full)
    none = Positions.of(torch.zeros(2, 6, dtype=torch.bool))
    assert none.index.shape == (2, 1) and not none.keep.any()
