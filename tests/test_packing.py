"""The fast model (albef.models.fast: real tokens only, shared image context, last layer on a few
positions, recomputed activations, tied gradient) computes what the plain model computes at every
real token, in values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from albef.models.albef import ALBEF
from albef.models.bert import MLMHead, TextEncoder
from albef.models.fast import dropout as dropout_module
from albef.models.fast import is_fast, make_fast, make_plain
from albef.models.fast.packing import Packing
from albef.models.tasks import ALBEFForVQA
from albef.training.finetune import VQATrainer

from helpers import assert_same_step, float64_pretraining_step, text_batch


def test_pack_pad_and_locate():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    pk = Packing.of(mask)
    assert pk.index.tolist() == [0, 1, 2, 4, 8, 9]
    x = torch.randn(3, 4, 5)
    packed = pk.pack(x)
    assert packed.shape == (6, 5)
    torch.testing.assert_close(pk.pad(packed), x * mask[..., None])  # padding comes back as zeros
    positions = torch.tensor([[2, 0], [0, 0], [1, 0]])
    rows = pk.locate(positions)
    torch.testing.assert_close(packed[rows].view(3, 2, 5), x.gather(1, positions[..., None].expand(-1, -1, 5)))
    y = torch.randn(6, 4)  # T = 6 real tokens, H = 4 in 2 heads
    heads = pk.pad_heads(y, 2)
    assert heads.shape == (3, 2, 4, 2) and heads.is_contiguous()
    torch.testing.assert_close(heads, pk.pad(y).view(3, 4, 2, 2).transpose(1, 2))
    torch.testing.assert_close(pk.pack_heads(heads), y)
    assert Packing.of(torch.ones(2, 3, dtype=torch.long)) is None  # nothing to skip


def test_make_fast_and_make_plain_swap_classes_not_state(tiny_config):
    torch.manual_seed(0)
    plain = ALBEF(tiny_config, fast=False)
    assert not is_fast(plain) and type(plain.text_encoder) is TextEncoder and type(plain.mlm_head) is MLMHead
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    torch.manual_seed(0)
    built_fast = ALBEF(tiny_config)  # the default
    assert is_fast(built_fast) and built_fast.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in built_fast.state_dict().items())  # same draws, same init
    fast = make_fast(plain)
    assert fast is plain and is_fast(fast) and isinstance(fast, ALBEF)
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())
    assert not is_fast(make_plain(fast)) and type(fast.text_encoder) is TextEncoder


@pytest.fixture
def dropout_keeping_all(tiny_config, monkeypatch):
    """Dropout on (so fast training takes the CPU's explicit attention path, and every dropout
    scales by 1 / (1 - p)) with masks that keep everything, in the fast model's dropout and in
    PyTorch's (the plain model's modules and SDPA): the same in both runs."""
    monkeypatch.setattr(dropout_module, "keep_mask", lambda shape, p, dtype=torch.bool: torch.ones(shape, dtype=dtype))
    sdpa, plain_dropout = F.scaled_dot_product_attention, F.dropout

    def keep_all(x, p=0.5, training=True, inplace=False):
        return x * (1.0 / (1.0 - p)) if training and p > 0 else plain_dropout(x, p, training, inplace)

    def attention_keeping_all(q, k, v, attn_mask=None, dropout_p=0.0, **kw):
        return sdpa(q, k, v, attn_mask=attn_mask, **kw) * (1.0 / (1.0 - dropout_p))

    monkeypatch.setattr(F, "dropout", keep_all)
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention_keeping_all)
    tiny_config.text.hidden_dropout = tiny_config.text.attention_dropout = 0.1
    return tiny_config


@pytest.mark.parametrize("dropout", [False, True])
def test_fast_pretraining_step_equals_the_plain_one(tiny_config, dropout, request):
    cfg = request.getfixturevalue("dropout_keeping_all") if dropout else tiny_config
    ref, ref_grads, mask = float64_pretraining_step(cfg, fast=False)
    for checkpointing in (False, True):
        out, grads, _ = float64_pretraining_step(cfg, fast=True, checkpointing=checkpointing)
        assert_same_step(out, ref, grads, ref_grads, rtol=1e-12, grad_rtol=1e-10)
        real = mask.bool()
        s, r = out.student.text_embeds, ref.student.text_embeds
        torch.testing.assert_close(s[real], r[real], rtol=1e-12, atol=1e-12)
        assert (s[~real] == 0).all() and (r[~real] != 0).any()


@pytest.mark.parametrize("dropout", [False, True])
def test_fast_causal_decoder_equals_the_plain_one(tiny_config, dropout, request):
    """VQA: padded questions in the encoder, padded answers in the causal decoder."""
    cfg = request.getfixturevalue("dropout_keeping_all") if dropout else tiny_config

    def step(fast: bool):
        torch.manual_seed(0)
        trainer = VQATrainer(ALBEFForVQA(cfg, fast=fast)).double().train()
        q_ids, q_mask = text_batch(2, 7)
        a_ids, a_mask = text_batch(3, 5, generator=torch.Generator().manual_seed(2))
        out = trainer(
            torch.randn(2, 3, 32, 32, dtype=torch.float64),
            q_ids,
            q_mask,
            a_ids,
            a_mask,
            torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64),
            torch.tensor([2, 1]),
            alpha=0.4,
        )
        out.loss.backward()
        return out, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    ref, ref_grads = step(False)
    out, grads = step(True)
    torch.testing.assert_close(out.per_answer_loss, ref.per_answer_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_fused_rows_equal_the_plain_models(tiny_model):
    """FusionRows through the fast model (groups in image order tiled, the rest gathered, the last
    layer on the read positions only) and through the plain one (one padded pass, then read)."""
    from albef.models.fusion import FusionRows, Positions

    fast = tiny_model.double().train()
    plain = make_plain(copy.deepcopy(fast))
    ids, mask = text_batch(3, 8)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masked = torch.rand(3, 8, generator=torch.Generator().manual_seed(4)) < 0.4
    masked &= mask.bool()

    def run(model):
        image_embeds, text = model.encode_image(images), model.encode_text(ids, mask)
        rows = FusionRows()
        rows.add("in_order", text, mask)
        rows.add("others", text[[2, 0]], mask[[2, 0]], images=torch.tensor([1, 1]))
        rows.add("again_in_order", text.flip(0), mask.flip(0), images=torch.arange(3))
        rows.add("tokens", text, mask, read=Positions.of(masked))
        out = model.fuse_rows(rows, image_embeds)
        g = torch.Generator().manual_seed(1)
        return out, sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in out.values())

    out, loss = run(fast)
    ref, ref_loss = run(plain)
    assert list(out) == ["in_order", "others", "again_in_order", "tokens"]
    for name in out:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-12, atol=1e-12, msg=name)
    assert out["tokens"].shape[0] == masked.sum()
    _assert_same_gradients(fast, loss, plain, ref_loss)


def test_attention_maps_keep_their_padding_rows(tiny_model):
    """Grad-CAM reads whole maps: with a map requested the fast encoder computes every position,
    and the map is the plain model's."""
    model = tiny_model.eval()
    ids, mask = text_batch(2, 7)
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    attn = model.text_encoder.encoder.layer[3].crossattention.self
    attn.save_attention = True
    model.encode_multimodal(ids, mask, img)
    fast_map = attn.attention_map
    make_plain(model)
    model.encode_multimodal(ids, mask, img)
    torch.testing.assert_close(fast_map, attn.attention_map)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(
    "reads",
    [
        ([2, 0, 2, 3, 2], [3, 0]),  # groups of 2-3 rows, image 1 read by none: regrouped by image
        ([2, 2, 2, 2, 2], [0, 3]),  # one image's rows would pad the layout past twice the rows: copied per row
    ],
)
def test_rows_reading_images_out_of_order_equal_the_plain_model(tiny_config, mode, reads):
    """Re-ranking's layout: no group reads the images in order; the rows' queries are regrouped by
    image instead of the keys copied per row, unless the groups are too uneven."""
    from albef.models.fusion import FusionRows

    fast = ALBEF(tiny_config).double()
    fast.train(mode == "train")
    plain = make_plain(copy.deepcopy(fast))
    ids, mask = text_batch(5, 8)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    def run(model):
        image_embeds, text = model.encode_image(images), model.encode_text(ids, mask)
        rows = FusionRows()
        rows.add("pairs", text, mask, images=torch.tensor(reads[0]))
        rows.add("more", text[:2], mask[:2], images=torch.tensor(reads[1]))
        out = model.fuse_rows(rows, image_embeds)
        return out, sum(v.square().sum() for v in out.values())

    (out, loss), (ref, ref_loss) = run(fast), run(plain)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-12, atol=1e-12, msg=name)
    _assert_same_gradients(fast, loss, plain, ref_loss)


def _assert_same_gradients(fast, loss, plain, ref_loss) -> None:
    loss.backward()
    ref_loss.backward()
    plain_params = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
