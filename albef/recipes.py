"""Training recipes: YAML files mapped onto dataclasses, with ``key.sub=value`` overrides.

Example:
    >>> r = load_recipe(None, ["model.preset=albef-tiny", "train.lr=3e-4", "data.train_files=[a.json]"])
    >>> r.model.preset, r.train.lr, r.data.train_files
    ('albef-tiny', 0.0003, ['a.json'])
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from albef.config import ALBEFConfig, get_preset


@dataclass
class ModelSection:
    preset: str = "albef-base"
    overrides: dict[str, Any] = field(default_factory=dict)  # nested dict merged into the preset
    init: str | None = None  # checkpoint to start from (authors' .pth, a run's checkpoint, a model folder)
    # the authors' pretraining starts the text side from bert-base-uncased and the ViT from DeiT-B/16
    text_init: str | None = None  # a Hugging Face BERT folder for the text side, or "minilm"
    # a timm/DeiT ViT state dict for the image side, or "dinov2-small" (albef.checkpoints.dinov2)
    vision_init: str | None = None

    def build_config(self) -> ALBEFConfig:
        base = get_preset(self.preset).to_dict()
        return ALBEFConfig.from_dict(_merge(base, self.overrides))

    def check_sources(self) -> None:
        """Fail before any work when a file the recipe starts from is not there, naming it and what
        it must hold. Weights are never downloaded: the recipe names local files."""
        if self.init and not Path(self.init).exists():
            raise FileNotFoundError(
                f"model.init: {self.init} not found. It must be an authors' checkpoint (.pth, e.g. ALBEF.pth), "
                "a run's checkpoint or run folder, or an albef model folder; set model.init=PATH or model.init=null"
            )
        from albef.checkpoints import dinov2

        if self.vision_init == dinov2.NAME:
            dinov2.onnx_path()  # the package is installed, or a clear error
        elif self.vision_init and not Path(self.vision_init).is_file():
            raise FileNotFoundError(
                f"model.vision_init: {self.vision_init} not found. It must be a timm/DeiT ViT state dict "
                "(.pth, bare or {'model': ...}, or .safetensors) of the preset's ViT, e.g. DeiT-B/16's "
                "deit_base_patch16_224-b5f2ef4d.pth for albef-base; set model.vision_init=PATH, or "
                "model.vision_init=null to start the ViT from random weights"
            )
        if self.text_init and self.text_init != "minilm":
            folder = Path(self.text_init)
            weights = [folder / n for n in ("model.safetensors", "pytorch_model.bin")]
            if not (folder / "config.json").is_file() or not any(w.is_file() for w in weights):
                what = "not found" if not folder.exists() else "is not a complete Hugging Face BERT folder"
                raise FileNotFoundError(
                    f"model.text_init: {folder} {what}. It must be a Hugging Face BERT folder holding config.json "
                    "and model.safetensors or pytorch_model.bin (bert-base-uncased for albef-base, e.g. saved "
                    "with transformers' save_pretrained); set model.text_init=PATH, or model.text_init=null to "
                    "start the text side from random weights"
                )


@dataclass
class DataSection:
    train_files: list[str] = field(default_factory=list)
    image_root: str | None = None
    # validation split, scored after every epoch (the authors' val_file); the best epoch is kept as
    # checkpoint_best.pt (retrieval, grounding, ve, nlvr)
    val_files: list[str] = field(default_factory=list)
    val_image_root: str | None = None  # None: image_root
    # VQA only, the authors' two roots: "dataset": "vqa" entries' images under vqa_root (COCO),
    # "vg" entries' under vg_root (Visual Genome); None: image_root
    vqa_root: str | None = None
    vg_root: str | None = None
    max_words: int | None = None  # None: the text cleaning's own limit (30 words albef, 50 blip)
    text_cleaning: str | None = None  # None: the model config's
    # training text cut at model.max_text_len tokens: None as the authors (pretraining, text
    # assignment and VQA questions cut; retrieval, grounding, SNLI-VE and NLVR2 captions not), true
    # for every task (bounded memory), false for none
    truncate_text: bool | None = None
    # RandomResizedCrop's scale range; None: the task's, as the authors: (0.2, 1) for pretraining and
    # text assignment, (0.5, 1) for retrieval, VQA, SNLI-VE and NLVR2 (see crop_scale_for)
    crop_scale: tuple[float, float] | None = None
    # RandomResizedCrop(crop_scale) before the flip; None: the task's, as the authors (grounding resizes
    # the whole image instead, every other task crops)
    random_crop: bool | None = None
    # the horizontal flip of the authors' training transforms; false where captions say left/right
    hflip: bool = True
    randaugment: bool = True
    # RandomAugment's two uint8 wrap-arounds, as the authors' (Sharpness specks, AutoContrast whitening
    # every channel whose minimum is above 0); false: clipped values and PIL's autocontrast
    randaugment_wrap: bool = True
    # an image file cut short is used as far as it goes, the rest black, as the authors' datasets load
    # it (PIL's LOAD_TRUNCATED_IMAGES); false: skipped and counted among the bad samples
    load_truncated_images: bool = True
    num_workers: int = 4
    # shuffle runs of this many consecutive entries as units, so they share a batch
    # (albef.data.sampler; the scenes' siblings: 2); 1 shuffles entries, as the authors
    group_size: int = 1
    max_bad_fraction: float = 0.01
    min_seen_for_bad_check: int = 1000
    # WebDataset shards instead of train_files (see albef.data.shards): a brace pattern, a folder
    # written by `albef data shards`, or a list of either
    shards: str | list[str] | None = None
    epoch_samples: int | None = None  # samples per epoch; default: the count the shards record
    resampled: bool = False  # draw shards with replacement (web scale) instead of exact epochs
    shuffle_buffer: int = 1000


@dataclass
class TrainSection:
    epochs: int = 30
    batch_size: int = 64  # per rank, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_epochs: int = 20  # authors' unit: 100 iterations of epoch 0 each
    schedule: str = "albef"  # or "cosine" (per step, warmup_steps)
    warmup_steps: int = 0
    weight_decay: float = 0.02
    alpha: float = 0.4
    # α ramps up over this many epochs; None: the task's, as the authors: 0 for SNLI-VE, 1 otherwise
    alpha_ramp_epochs: float | None = None
    max_grad_norm: float | None = None
    # fp32 | bf16 | fp16 | auto: autocast (float32 weights and AdamW state). bf16 on CUDA and the CPU
    # (fast where the CPU has AVX512_BF16 / AMX); fp16 CUDA only; auto: bf16 on native-bf16 hardware, else fp32
    precision: str = "fp32"
    # fp32 matmuls and convolutions in TF32 on Ampere and newer GPUs: what the authors' float32 runs
    # did (PyTorch 1.8, whose default it was); false for full float32. No effect on the CPU
    tf32: bool = True
    # recompute encoder blocks in the backward: true (all), "vision" (the ViT's only) or false; on
    # the CPU the loop then also hands the step's freed heap back to the OS (albef.heap)
    grad_checkpointing: bool | str = False
    # AdamW inside the backward, gradients freed as they are complete: the same update without
    # ever holding every gradient (albef.training.optim). "auto": wherever it gives the ordinary
    # update (one process, no accumulation, clipping or fp16 loss scaling); true / false to force
    optimizer_in_backward: bool | str = "auto"
    # glibc's heap keeps the memory a step frees for the next step instead of unmapping it, a few per
    # cent of a CPU step (albef.heap). "auto": on the CPU without gradient checkpointing
    keep_freed_memory: bool | str = "auto"
    compile: bool = False
    fsdp: bool = False  # shard the transformer blocks of student and teacher (albef.training.fsdp)
    seed: int = 42
    device: str = "auto"
    checkpoint_every: int = 1000  # optimizer steps; 0: only at the end of each epoch
    log_every: int = 50
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)
    # parameter-name prefix -> learning-rate multiplier, longest prefix wins (e.g. a pretrained text
    # side learning slower: {"text_encoder.embeddings": 0.1, "text_encoder.encoder.layer.0": 0.1}); the
    # reference has one rate for all
    lr_scale: dict[str, float] = field(default_factory=dict)
    # added to the hard-negative sampling weights after the softmax: 0 is the authors' (their retrieval
    # model adds 1e-4 *inside* the softmax, which changes nothing); 1e-4 is BLIP's softmax(sim) + 1e-4
    hard_negative_eps: float = 0.0
    distill: bool = True  # momentum distillation in fine-tuning (VQA, SNLI-VE, NLVR2)
    # teacher tensors model.init has no momentum copy of while it fills the student's (all but the fresh
    # head for a text-assignment checkpoint under NLVR2): "authors" keeps them as the model was built,
    # since the authors copy the teacher before loading; "student" sets them equal to the loaded student
    teacher_init: str = "authors"
    # pretraining ablation switches (the paper's Table 1): all on is ALBEF
    itc: bool = True
    hard_negatives: bool = True
    itc_distill: bool = True
    mlm_distill: bool = True
    label_smoothing: float = 0.0  # VQA answer loss: 0 (authors), 0.1 (LAVIS)
    # NLVR2 distillation: true reproduces LAVIS 1.0.2's bug, the momentum branch running the student's
    # text encoder; false (the authors') runs the teacher's
    lavis_teacher_text_encoder: bool = False
    # validation (data.val_files): the metric that picks the best epoch (None: the task's, as the
    # authors: retrieval r_mean of ITC + ITM, grounding / ve / nlvr accuracy), the ITM re-ranking
    # shortlist of retrieval (the authors' k_test: 256 COCO, 128 Flickr30K), the evaluation batch
    select_metric: str | None = None
    k_test: int = 256
    val_batch_size: int = 64


@dataclass
class Recipe:
    """A training run, whatever its task: the model, the data, the optimisation, the output folder.

    Stored whole in every checkpoint; ``albef train RECIPE.yaml key.sub=value ...`` builds one."""

    task: str = "pretrain"  # pretrain | retrieval | grounding | vqa | ve | nlvr | nlvr_pretrain
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/pretrain"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        recipe = _build(cls, d, "")
        _check(recipe)
        return recipe


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"recipe section {where or '(top)'} must be a mapping, not {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown recipe keys in {where or '(top)'}: {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        sub = fields[k].default_factory if fields[k].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            kwargs[k] = _build(sub, v, f"{where}{k}.")
        else:
            kwargs[k] = _coerce(v, str(fields[k].type), f"{where}{k}")
    return cls(**kwargs)


#: strings a key accepts (for ``bool | str`` keys: the string besides true / false)
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("pretrain", "retrieval", "grounding", "vqa", "ve", "nlvr", "nlvr_pretrain"),
    "data.text_cleaning": ("albef", "blip"),
    "train.schedule": ("albef", "cosine"),
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "train.teacher_init": ("authors", "student"),
    "train.grad_checkpointing": ("vision",),
    "train.optimizer_in_backward": ("auto",),
    "train.keep_freed_memory": ("auto",),
}


def _coerce(v: Any, type_name: str, key: str) -> Any:
    """``v`` as the field's type, or an error naming the key and what it accepts. Booleans are
    YAML's own (``true``/``false``): a string such as ``"false"`` is refused, never read as true."""
    options = [t.strip() for t in type_name.split("|")]
    for t in options:
        if t == "None" and v is None:
            return None
        if t == "bool" and isinstance(v, bool):
            return v
        if t == "int" and not isinstance(v, bool):
            if isinstance(v, int):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
                return int(v)
        if t == "float" and not isinstance(v, bool):
            if isinstance(v, (int, float)):
                return float(v)
            if isinstance(v, str):  # YAML reads "3e-4" (no dot) as a string
                try:
                    return float(v)
                except ValueError:
                    pass
        if t == "str" and isinstance(v, str) and (key not in CHOICES or v in CHOICES[key]):
            return v
        if t.startswith("list[") and isinstance(v, (list, str)):
            return [v] if isinstance(v, str) else v
        if t.startswith("tuple[") and isinstance(v, (list, tuple)):
            return tuple(v)
        if t.startswith("dict[") and isinstance(v, dict):
            return v
    raise ValueError(
        f"recipe key {key}: {'empty' if v is None else repr(v)} is not allowed; give {_allowed(options, key)}"
    )


def _allowed(options: list[str], key: str) -> str:
    words = {
        "bool": "true or false (unquoted)",
        "int": "an integer",
        "float": "a number",
        "None": "null",
        "str": " / ".join(CHOICES[key]) if key in CHOICES else "a string",
    }
    return " or ".join(words.get(t, t) for t in options)


def _check(recipe: Recipe) -> None:
    """Values a run cannot use, refused before any data is read or folder made."""
    d, t = recipe.data, recipe.train
    problems = []

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            problems.append(f"{key} = {value!r}: must be {allowed}")

    finite = math.isfinite
    for key, v in (
        ("train.epochs", t.epochs),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.log_every", t.log_every),
        ("train.k_test", t.k_test),
        ("train.val_batch_size", t.val_batch_size),
        ("data.shuffle_buffer", d.shuffle_buffer),
        ("data.group_size", d.group_size),
    ):
        need(v >= 1, key, "an integer >= 1", v)
    need(
        t.batch_size % max(1, d.group_size) == 0,
        "data.group_size",
        f"a divisor of train.batch_size ({t.batch_size}): a group is kept in one micro-batch",
        d.group_size,
    )
    need(
        t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null (every epoch) or an integer >= 1", t.max_steps
    )
    need(
        d.max_words is None or d.max_words >= 1,
        "data.max_words",
        "null (the text cleaning's own: 30 words albef, 50 blip) or an integer >= 1",
        d.max_words,
    )
    for key, v in (
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.warmup_epochs", t.warmup_epochs),
        ("train.warmup_steps", t.warmup_steps),
        ("data.num_workers", d.num_workers),
        ("data.min_seen_for_bad_check", d.min_seen_for_bad_check),
    ):
        need(v >= 0, key, "an integer >= 0" + (" (0: only at each epoch's end)" if "checkpoint" in key else ""), v)
    need(finite(t.lr) and t.lr > 0, "train.lr", "a number > 0", t.lr)
    for key, v in (
        ("train.min_lr", t.min_lr),
        ("train.warmup_lr", t.warmup_lr),
        ("train.weight_decay", t.weight_decay),
        ("train.hard_negative_eps", t.hard_negative_eps),
    ):
        need(finite(v) and v >= 0, key, "a number >= 0", v)
    ramp = t.alpha_ramp_epochs
    need(ramp is None or (finite(ramp) and ramp >= 0), "train.alpha_ramp_epochs", "null (the task's) or >= 0", ramp)
    need(0 <= t.alpha <= 1, "train.alpha", "a number in [0, 1]", t.alpha)
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", "a number in [0, 1)", t.label_smoothing)
    need(
        not t.lavis_teacher_text_encoder or recipe.task == "nlvr",
        "train.lavis_teacher_text_encoder",
        "false for this task (LAVIS's bug is in NLVR2's distillation only)",
        t.lavis_teacher_text_encoder,
    )
    need(
        t.max_grad_norm is None or (finite(t.max_grad_norm) and t.max_grad_norm > 0),
        "train.max_grad_norm",
        "null (no clipping) or a number > 0",
        t.max_grad_norm,
    )
    need(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "a fraction in [0, 1] (0.01 = 1 %)", d.max_bad_fraction)
    if d.crop_scale is not None:
        lo_hi = tuple(d.crop_scale)
        need(
            len(lo_hi) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lo_hi)
            and 0 < lo_hi[0] <= lo_hi[1] <= 1,
            "data.crop_scale",
            "null (the task's) or [low, high] with 0 < low <= high <= 1",
            list(lo_hi),
        )
    need(
        d.epoch_samples is None or d.epoch_samples >= 1,
        "data.epoch_samples",
        "null or an integer >= 1",
        d.epoch_samples,
    )
    need(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
        "train.device",
        "auto, cpu, cuda or cuda:N",
        t.device,
    )
    if problems:
        raise ValueError("recipe values out of range:\n  " + "\n  ".join(problems))


def apply_override(d: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key.sub=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(
            f"override {assignment!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
            "quote the whole assignment for the shell, e.g. 'data.train_files=[a.json, b.json]'"
        ) from None
    node = d
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {p} is not a section")
    node[parts[-1]] = value


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from the defaults) and apply the overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"recipe {p} not found")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from e
    for o in overrides or []:
        apply_override(d, o)
    return Recipe.from_dict(d)


def crop_scale_for(recipe: Recipe) -> tuple[float, float]:
    """``data.crop_scale``, or the task's where it is null: the authors crop (0.2, 1) of the image
    area for pretraining and text assignment, (0.5, 1) for fine-tuning."""
    if recipe.data.crop_scale is not None:
        return tuple(recipe.data.crop_scale)
    return (0.2, 1.0) if recipe.task in ("pretrain", "nlvr_pretrain") else (0.5, 1.0)


def alpha_ramp_for(recipe: Recipe) -> float:
    """``train.alpha_ramp_epochs``, or the task's where it is null: the authors ramp α over the first
    epoch, except for SNLI-VE (its config's ``warm_up: False``)."""
    if recipe.train.alpha_ramp_epochs is not None:
        return recipe.train.alpha_ramp_epochs
    return 0.0 if recipe.task == "ve" else 1.0
