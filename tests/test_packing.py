"""Running the text encoders on the real tokens only (``Packing``) computes what the padded
computation computes at every real token, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from albef.models import dropout as dropout_module
from albef.models.albef import ALBEF
from albef.models.bert import Packing, set_unpad
from albef.models.tasks import ALBEFForVQA
from albef.training.finetune import VQATrainer
from albef.training.pretrain import ALBEFPretrainer

from conftest import text_batch


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


@pytest.fixture
def dropout_keeping_all(tiny_config, monkeypatch):
    """Dropout on (so training takes the CPU's explicit attention path, and every dropout scales
    by 1 / (1 - p)) with a mask that keeps everything: the same in the padded and packed runs."""
    monkeypatch.setattr(dropout_module, "keep_mask", lambda shape, p, dtype=torch.bool: torch.ones(shape, dtype=dtype))
    tiny_config.text.hidden_dropout = tiny_config.text.attention_dropout = 0.1
    return tiny_config


def _pretrain_step(cfg, unpad: bool, checkpointing: bool = False):
    torch.manual_seed(0)
    trainer = ALBEFPretrainer(ALBEF(cfg)).double().train()
    set_unpad(trainer, unpad)
    trainer.model.set_grad_checkpointing(checkpointing)
    ids, mask = text_batch(4, 12)
    assert (mask == 0).sum() > 10  # the batch really is padded
    out = trainer(torch.randn(4, 3, 32, 32, dtype=torch.float64), ids, mask, alpha=0.4,
                  generator=torch.Generator().manual_seed(3), enqueue=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in trainer.named_parameters() if p.grad is not None}
    return out, grads, mask


@pytest.mark.parametrize("dropout", [False, True])
def test_unpadded_pretraining_step_equals_the_padded_one(tiny_config, dropout, request):
    cfg = request.getfixturevalue("dropout_keeping_all") if dropout else tiny_config
    ref, ref_grads, mask = _pretrain_step(cfg, unpad=False)
    for checkpointing in (False, True):
        out, grads, _ = _pretrain_step(cfg, unpad=True, checkpointing=checkpointing)
        for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_logits", "mlm_logits", "mlm_logits_m",
                     "text_feat", "text_feat_m"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
        real = mask.bool()
        torch.testing.assert_close(out.text_embeds[real], ref.text_embeds[real], rtol=1e-12, atol=1e-12)
        assert (out.text_embeds[~real] == 0).all() and (ref.text_embeds[~real] != 0).any()
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dropout", [False, True])
def test_unpadded_causal_decoder_equals_the_padded_one(tiny_config, dropout, request):
    """VQA: padded questions in the encoder, padded answers in the causal decoder."""
    cfg = request.getfixturevalue("dropout_keeping_all") if dropout else tiny_config

    def step(unpad: bool):
        torch.manual_seed(0)
        trainer = VQATrainer(ALBEFForVQA(cfg)).double().train()
        set_unpad(trainer, unpad)
        q_ids, q_mask = text_batch(2, 7)
        a_ids, a_mask = text_batch(3, 5, generator=torch.Generator().manual_seed(2))
        out = trainer(torch.randn(2, 3, 32, 32, dtype=torch.float64), q_ids, q_mask, a_ids, a_mask,
                      torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64), torch.tensor([2, 1]), alpha=0.4)
        out.loss.backward()
        return out, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    ref, ref_grads = step(False)
    out, grads = step(True)
    torch.testing.assert_close(out.per_answer_loss, ref.per_answer_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_attention_maps_keep_their_padding_rows(tiny_model):
    """Grad-CAM reads whole maps: with a map requested the encoder computes every position."""
    model = tiny_model.eval()
    ids, mask = text_batch(2, 7)
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    attn = model.text_encoder.encoder.layer[3].crossattention.self
    attn.save_attention = True
    model.encode_multimodal(ids, mask, img)
    map_with_unpad_on = attn.attention_map
    set_unpad(model, False)
    model.encode_multimodal(ids, mask, img)
    torch.testing.assert_close(map_with_unpad_on, attn.attention_map)
