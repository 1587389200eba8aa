"""The momentum teacher of a fine-tuning run started from a pretrained checkpoint.

The authors build the task model (``copy_params()`` at construction: teacher = student), then
``load_state_dict(strict=False)``: every ``*_m`` tensor the checkpoint has overwrites the teacher,
and only what it lacks (the teacher's task head, fresh like the student's) stays a copy of the
student. Each test here uses a pretraining checkpoint whose momentum copies *differ* from its
student, finds the expected source of every teacher tensor by the authors' key names, and
checks the tensor and the load report.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch

from albef.checkpoints.convert import to_authors
from albef.checkpoints.loading import (
    TEACHER_FROM_STUDENT,
    LoadReport,
    load_albef,
    read_state_dict,
)
from albef.config import ALBEFConfig
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForTextAssignment, ALBEFForVQA
from albef.training.finetune import ClassifierTrainer, TextAssignmentTrainer, VQATrainer
from albef.training.pretrain import ALBEFPretrainer


def _pretraining_checkpoint(cfg: ALBEFConfig, tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    """An authors-format pretraining checkpoint file whose ``*_m`` tensors are not the student's."""
    pre = ALBEFPretrainer(ALBEF(cfg))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pre.model_m.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    sd = to_authors(pre.state_dict())
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": sd, "epoch": 29}, path)  # as the authors' Pretrain.py saves it
    return str(path), sd


def _authors_teacher_key(key: str, f: int, layout: str) -> str:
    """Our teacher key -> the authors' pretraining key it should come from (per the authors' scripts)."""
    head, _, sub = key.removeprefix("model_m.").partition(".")
    layer = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", sub)
    if head == "text_encoder" and layout == "nlvr" and layer and int(layer[1]) >= f:
        sub = f"encoder.layer.{f + (int(layer[1]) - f) // 2}.{layer[2]}"  # each fusion layer twice
    if head == "text_decoder":  # VQA.py: text_encoder_m layer f + i -> text_decoder_m layer i
        head = "text_encoder"
        if layer:
            sub = f"encoder.layer.{f + int(layer[1])}.{layer[2]}"
    if head in ("text_encoder", "text_decoder"):
        return f"{head}_m.bert.{sub}"
    if head in ("mlm_head", "decoder_head"):
        return f"text_encoder_m.cls.predictions.{sub}"
    return f"{head}_m.{sub}"  # visual_encoder, vision_proj, text_proj; cls_head_m is in no checkpoint


def _check_teacher(trainer, report: LoadReport, sd: dict[str, torch.Tensor], layout: str) -> tuple[set[str], set[str]]:
    """Every teacher tensor equals the checkpoint's ``*_m`` tensor when the checkpoint has one of that
    shape, else the student's; the report lists both kinds. Returns (loaded, from_student)."""
    f = trainer.model.config.text.fusion_layer
    student = trainer.model.state_dict()
    loaded, copied = set(), set()
    for name, t in trainer.model_m.state_dict().items():
        key = "model_m." + name
        src = sd.get(_authors_teacher_key(key, f, layout))
        if src is not None and src.shape == t.shape:
            assert torch.equal(t, src), key
            if t.is_floating_point() and t.numel() > 1 and "position_ids" not in name:
                assert not torch.equal(t, student[name]), f"{key} is the student's, not the checkpoint's"
            loaded.add(key)
        else:
            assert torch.equal(t, student[name]), key
            copied.add(key)
    assert set(report.teacher_loaded) == loaded
    # what the checkpoint lacks for the teacher it lacks for the student too (fresh heads)
    assert set(report.teacher_from_student) == copied and not report.teacher_as_built
    assert all(report.initialised[k] == TEACHER_FROM_STUDENT for k in copied)
    text = str(report)
    assert (
        f"teacher: {len(loaded)} tensors loaded from the checkpoint's momentum copies, "
        f"{len(copied)} copied from the student"
    ) in text
    for k in report.teacher_from_student[:3]:  # named in the text
        assert k in text
    return loaded, copied


def test_ve_teacher_keeps_the_checkpoints_momentum_encoders(tiny_config, tmp_path):
    path, sd = _pretraining_checkpoint(tiny_config, tmp_path)
    trainer = ClassifierTrainer(ALBEFForClassification(tiny_config, 3))
    report = load_albef(trainer, read_state_dict(path), path)
    loaded, copied = _check_teacher(trainer, report, sd, "ve")
    assert copied == {f"model_m.cls_head.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert any(k.startswith("model_m.visual_encoder.") for k in loaded)
    assert any(k.startswith("model_m.text_encoder.") for k in loaded)
    # the teacher's fresh head equals the student's fresh head (the authors' copy_params at init)
    assert torch.equal(trainer.model_m.cls_head[2].weight, trainer.model.cls_head[2].weight)


def test_vqa_teacher_decoder_comes_from_the_momentum_fusion_layers(tiny_config, tmp_path):
    # an image width unlike the text width: the decoder's cross-attention keys/values stay fresh,
    # and only those teacher tensors are copied from the student
    cfg = dataclasses.replace(
        tiny_config,
        vision=dataclasses.replace(tiny_config.vision, width=16),
        text=dataclasses.replace(tiny_config.text, encoder_width=16),
    )
    path, sd = _pretraining_checkpoint(cfg, tmp_path)
    trainer = VQATrainer(ALBEFForVQA(cfg))
    report = load_albef(trainer, read_state_dict(path), path)
    loaded, copied = _check_teacher(trainer, report, sd, "vqa")
    assert copied and all(
        re.search(r"^model_m\.text_decoder\..*crossattention\.self\.(key|value)\.weight$", k) for k in copied
    )
    assert {"model_m.decoder_head.bias", "model_m.text_decoder.embeddings.word_embeddings.weight"} <= loaded
    # same widths (the base model's case): the whole teacher comes from the checkpoint
    path, sd = _pretraining_checkpoint(tiny_config, tmp_path)
    trainer = VQATrainer(ALBEFForVQA(tiny_config))
    _, copied = _check_teacher(trainer, load_albef(trainer, read_state_dict(path), path), sd, "vqa")
    assert not copied


def test_retrieval_and_grounding_teacher_is_the_checkpoints_momentum_model(tiny_config, tmp_path):
    path, sd = _pretraining_checkpoint(tiny_config, tmp_path)
    trainer = ALBEFPretrainer(ALBEF(tiny_config, mlm_head=False), mlm=False, with_idx=True, clamp_temp=False)
    report = load_albef(trainer, read_state_dict(path), path)
    loaded, copied = _check_teacher(trainer, report, sd, "retrieval")
    assert not copied and {"model_m.vision_proj.weight", "model_m.text_proj.weight"} <= loaded


def test_nlvr_teacher_from_pretraining_and_from_text_assignment(tiny_config, tmp_path):
    path, sd = _pretraining_checkpoint(tiny_config, tmp_path)
    trainer = ClassifierTrainer(ALBEFForClassification(tiny_config, 2, num_images=2))
    report = load_albef(trainer, read_state_dict(path), path)
    _, copied = _check_teacher(trainer, report, sd, "nlvr")
    assert {k.split(".")[1] for k in copied} == {"cls_head"}
    t = trainer.model_m.text_encoder.encoder.layer
    f = tiny_config.text.fusion_layer
    assert t[f].crossattention.self.key is t[f + 1].crossattention.self.key  # sharing kept
    # from a text-assignment run's checkpoint (no teacher in it), teacher_from="student" (the option
    # train.teacher_init=student) copies the *loaded* student; the default is the next test's
    ta = TextAssignmentTrainer(ALBEFForTextAssignment(tiny_config))
    torch.save({"model": ta.state_dict(), "recipe": {}}, tmp_path / "checkpoint_last.pt")
    trainer = ClassifierTrainer(ALBEFForClassification(tiny_config, 2, num_images=2))
    report = load_albef(trainer, read_state_dict(tmp_path / "checkpoint_last.pt"), "ta", teacher_from="student")
    student = trainer.model.state_dict()
    for name, v in trainer.model_m.state_dict().items():
        assert torch.equal(v, student[name]), name
    for name, v in ta.model.text_encoder.state_dict().items():
        assert torch.equal(trainer.model_m.text_encoder.state_dict()[name], v), name
    assert not report.teacher_loaded
    assert set(report.teacher_from_student) == {"model_m." + k for k in trainer.model_m.state_dict()}
    assert "teacher: 0 tensors loaded" in str(report)


def test_training_loop_keeps_the_loaded_ve_teacher(tiny_config, tmp_path):
    from albef.data.cli import write_shapes
    from albef.recipes import load_recipe
    from albef.training.loop import TrainRun

    path, sd = _pretraining_checkpoint(tiny_config, tmp_path)
    write_shapes(tmp_path / "data", n=4, image_size=32, seed=1)
    rows = [{"image": f"images/{i:06d}.png", "sentence": f"shape {i}", "label": "entailment"} for i in range(4)]
    (tmp_path / "data" / "ve.json").write_text(json.dumps(rows))
    recipe = load_recipe(
        None,
        [
            "model.preset=albef-tiny",
            f"model.init={path}",
            f"data.image_root={tmp_path / 'data'}",
            f"data.train_files=[{tmp_path / 'data' / 've.json'}]",
            "data.num_workers=0",
            "train.batch_size=2",
            "train.device=cpu",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    recipe.task = "ve"
    run = TrainRun(recipe)
    _check_teacher(run.trainer, run.init_report, sd, "ve")


def test_nlvr_teacher_as_the_authors_starts_from_the_model_before_loading(tiny_config, tmp_path, caplog):
    # the authors' NLVR.py: copy_params() at construction, then the text-assignment checkpoint
    # (no momentum copies) into the student only: the teacher is the unloaded model
    from albef.data.cli import write_shapes
    from albef.recipes import load_recipe
    from albef.training.loop import TrainRun

    ta = TextAssignmentTrainer(ALBEFForTextAssignment(tiny_config))
    ckpt = tmp_path / "ta.pt"
    torch.save({"model": ta.state_dict(), "recipe": {}}, ckpt)
    torch.manual_seed(3)
    trainer = ClassifierTrainer(ALBEFForClassification(tiny_config, 2, num_images=2))
    built = {k: v.clone() for k, v in trainer.model_m.state_dict().items()}
    report = load_albef(trainer, read_state_dict(ckpt), "ta")  # teacher_from="built", the default
    heads = {"model_m." + k for k in built if k.startswith("cls_head.")}
    assert heads and set(report.teacher_from_student) == heads  # fresh in the student too: equal either way
    assert set(report.teacher_as_built) == {"model_m." + k for k in built} - heads
    for name, v in trainer.model_m.state_dict().items():
        assert torch.equal(v, built[name]), name
    student = trainer.model.state_dict()
    assert not torch.equal(student["visual_encoder.pos_embed"], built["visual_encoder.pos_embed"])  # loaded
    assert "kept as built" in str(report)

    # through a recipe: train.teacher_init picks it (the authors' by default), with a warning
    write_shapes(tmp_path / "data", n=4, image_size=32, seed=1)
    rows = [{"images": [f"images/{i:06d}.png"] * 2, "sentence": f"shape {i}", "label": True} for i in range(4)]
    (tmp_path / "data" / "nlvr.json").write_text(json.dumps(rows))
    base = [
        "model.preset=albef-tiny",
        f"model.init={ckpt}",
        f"data.image_root={tmp_path / 'data'}",
        f"data.train_files=[{tmp_path / 'data' / 'nlvr.json'}]",
        "data.num_workers=0",
        "train.batch_size=2",
        "train.device=cpu",
    ]
    for setting, kind in (("authors", "teacher_as_built"), ("student", "teacher_from_student")):
        recipe = load_recipe(None, [*base, f"train.teacher_init={setting}", f"output_dir={tmp_path / setting}"])
        recipe.task = "nlvr"
        with caplog.at_level("WARNING"):
            run = TrainRun(recipe)
        assert len(getattr(run.init_report, kind)) == len(built) - (len(heads) if kind == "teacher_as_built" else 0)
        assert ("teacher_init=student" in caplog.text) == (setting == "authors")
        caplog.clear()


def test_teacher_from_built_or_student_agree_on_checkpoints_with_momentum_copies(tiny_config, tmp_path):
    # the two starts differ only where the student is loaded and the teacher is not: on a
    # pretraining checkpoint (ours, and the LAVIS layout without token-type tables) they are equal
    path, sd = _pretraining_checkpoint(tiny_config, tmp_path)
    lavis = {k: v for k, v in sd.items() if "token_type_embeddings" not in k}
    assert len(lavis) < len(sd)
    for state in (sd, lavis):
        loaded = {}
        for how in ("built", "student"):
            torch.manual_seed(0)
            trainer = ClassifierTrainer(ALBEFForClassification(tiny_config, 3))
            report = load_albef(trainer, dict(state), "pretraining", teacher_from=how)
            assert not report.teacher_as_built
            loaded[how] = trainer.state_dict()
        for k, v in loaded["built"].items():
            assert torch.equal(v, loaded["student"][k]), k
        tt = "model_m.text_encoder.embeddings.token_type_embeddings.weight"
        assert (tt in loaded["built"]) and (state is sd or not loaded["built"][tt].any())  # zeroed as the student's
