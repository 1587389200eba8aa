"""VQA, SNLI-VE and NLVR2 models: conversions from pretraining, weight sharing, ranking, saving."""

from __future__ import annotations

import pytest
import torch

from albef.api import VQAPipeline, tokenize_answers
from albef.checkpoints.convert import to_authors
from albef.checkpoints.loading import load_albef
from albef.checkpoints.pretrained import from_pretrained, save_pretrained
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA, answer_nll, rank_answers
from albef.text import Tokenizer
from albef.training.finetune import ClassifierTrainer, VQATrainer
from albef.training.pretrain import ALBEFPretrainer

from helpers import text_batch


def _pretrained(cfg):
    trainer = ALBEFPretrainer(ALBEF(cfg))
    return trainer, to_authors(trainer.state_dict())  # as the authors' ALBEF.pth holds it


def test_vqa_from_pretrained_builds_the_decoder_from_fusion_layers(tiny_config):
    pre, sd = _pretrained(tiny_config)
    vqa = VQATrainer(ALBEFForVQA(tiny_config))
    report = load_albef(vqa, sd)
    f = tiny_config.text.fusion_layer
    enc, dec = pre.model.text_encoder.encoder.layer, vqa.model.text_decoder.encoder.layer
    for i in range(tiny_config.text.num_layers - f):
        for (na, a), (nb, b) in zip(enc[f + i].state_dict().items(), dec[i].state_dict().items(), strict=True):
            assert na == nb and torch.equal(a, b), (i, na)
    assert torch.equal(vqa.model.decoder_head.bias, pre.model.mlm_head.bias)
    assert torch.equal(vqa.model_m.decoder_head.bias, pre.model_m.mlm_head.bias)
    assert torch.equal(
        vqa.model.text_decoder.embeddings.word_embeddings.weight,
        pre.model.text_encoder.embeddings.word_embeddings.weight,
    )
    dropped = set(report.dropped)
    assert {"model.itm_head.weight", "model.vision_proj.weight", "queue.image_queue", "model.temp"} <= dropped


def test_nlvr_from_pretrained_duplicates_fusion_layers_and_shares_kv(tiny_config):
    pre, sd = _pretrained(tiny_config)
    nlvr = ClassifierTrainer(ALBEFForClassification(tiny_config, 2, num_images=2))
    report = load_albef(nlvr, sd)
    f, n = tiny_config.text.fusion_layer, tiny_config.text.num_layers
    layers = nlvr.model.text_encoder.encoder.layer
    assert len(layers) == f + 2 * (n - f)
    for N in range(f, n):
        src = pre.model.text_encoder.encoder.layer[N].state_dict()
        for j in (0, 1):
            for name, v in layers[f + 2 * (N - f) + j].state_dict().items():
                assert torch.equal(v, src[name]), (N, j, name)
    assert any(k.startswith("model.cls_head.") for k in report.initialised)


def test_nlvr_shared_cross_attention_stays_shared_through_training(tiny_config):
    model = ALBEFForClassification(tiny_config, 2, num_images=2)
    trainer = ClassifierTrainer(model)
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = text_batch(3, 6)
    images = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    out = trainer(images, ids, mask, torch.tensor([0, 1, 1]), alpha=0.4)
    out.loss.backward()
    opt.step()
    f = tiny_config.text.fusion_layer
    sd = model.state_dict()
    for i in range((len(model.text_encoder.encoder.layer) - f) // 2):
        for w in ("key.weight", "key.bias", "value.weight", "value.bias"):
            a = sd[f"text_encoder.encoder.layer.{f + 2 * i}.crossattention.self.{w}"]
            b = sd[f"text_encoder.encoder.layer.{f + 2 * i + 1}.crossattention.self.{w}"]
            assert torch.equal(a, b)
        q0 = sd[f"text_encoder.encoder.layer.{f + 2 * i}.crossattention.self.query.weight"]
        q1 = sd[f"text_encoder.encoder.layer.{f + 2 * i + 1}.crossattention.self.query.weight"]
        assert not torch.equal(q0, q1)  # queries are not shared
    # the teacher keeps the same sharing
    t = trainer.model_m.text_encoder.encoder.layer
    assert t[f].crossattention.self.key is t[f + 1].crossattention.self.key


def test_task_models_round_trip_through_a_folder(tiny_config, tmp_path):
    for model in (
        ALBEFForVQA(tiny_config),
        ALBEFForClassification(tiny_config, 3),
        ALBEFForClassification(tiny_config, 2, 2),
    ):
        save_pretrained(model, tmp_path / "m")
        again = from_pretrained(tmp_path / "m")
        assert type(again) is type(model)
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k


def test_answer_nll_is_the_sum_of_token_negative_log_likelihoods():
    logits = torch.randn(2, 4, 110)
    ids = torch.tensor([[101, 5, 7, 102], [101, 3, 102, 0]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([-(logp[0, 0, 5] + logp[0, 1, 7] + logp[0, 2, 102]), -(logp[1, 0, 3] + logp[1, 1, 102])])
    torch.testing.assert_close(answer_nll(logits, ids), expected)


def test_rank_answers_scorings_agree_on_a_confident_model(tiny_config):
    model = ALBEFForVQA(tiny_config).eval()
    tok = Tokenizer()
    answers = tokenize_answers(tok, ["yes", "no", "two dogs", "red"])
    assert answers.input_ids[0].tolist()[:3] == [101, tok.convert_tokens_to_ids("yes"), 102]
    ids, mask = text_batch(2, 5)
    with torch.no_grad():
        q = model.encode_question(torch.randn(2, 3, 32, 32), ids, mask)
    a = rank_answers(model, q, mask, answers.input_ids, answers.attention_mask, k=4, scoring="albef")
    c = rank_answers(model, q, mask, answers.input_ids, answers.attention_mask, k=4, scoring="corrected")
    # authors' score = corrected score + log p(first token): check the identity
    torch.testing.assert_close(a["log_probs_sum"], c["log_probs_sum"] + a["topk_probs"].log())
    torch.testing.assert_close(a["scores"].sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="scoring"):
        rank_answers(model, q, mask, answers.input_ids, answers.attention_mask, k=2, scoring="x")


def test_vqa_pipeline_answers_from_the_list(tiny_config):
    pipe = VQAPipeline(ALBEFForVQA(tiny_config), device="cpu", answer_list=["yes", "no", "blue"], k=2)
    out = pipe.answer(torch.randn(2, 3, 32, 32), ["is it blue?", "what color is it?"])
    assert len(out) == 2 and all(o.answer in ("yes", "no", "blue") and len(o.candidates) == 2 for o in out)


def test_vqa_pipeline_reads_a_question_as_the_authors_test_split(tiny_config):
    # the authors' VQA test questions keep 50 words and are cut by tokens only at BERT's positions
    torch.manual_seed(0)
    pipe = VQAPipeline(ALBEFForVQA(tiny_config), device="cpu", answer_list=["yes", "no", "blue", "red"], k=4)
    words = [w for _ in range(8) for w in ("is", "the", "small", "ball", "blue", "or", "red")]  # 56 words
    image = torch.randn(1, 3, 32, 32)

    def scores(n):
        return dict(pipe.answer(image, " ".join(words[:n]))[0].candidates)

    assert scores(56) == scores(50)  # words past the 50th are dropped
    assert scores(50) != scores(30)  # words 31-50 are read


def test_the_classifier_heads_have_one_output_per_label():
    from albef.data.classification import LABELS
    from albef.models.tasks import NUM_CLASSES

    assert NUM_CLASSES == {task: len(labels) for task, labels in LABELS.items()}
