"""``albef parity DIR``: recompute reference test vectors and compare.

A parity folder (format of ``shared/parity``, see its README) holds a ``config.json``, state
dicts in the authors' key names and ``<task>_io.pt`` files with inputs, replayed random draws
and the outputs the reference computed in float64. Every recorded output is recomputed here and
compared; one line is printed per output. Errors are reported as the largest absolute
difference and the normwise relative error ``max|ours − ref| / max|ref|``.

Models are built as everywhere, fast (:mod:`albef.models.fast`); whole hidden-state tensors, whose
padding positions only the plain model computes as the reference does, are compared from the
plain model, and from the fast one at the real tokens. ``--plain`` checks the plain model alone.

Example:
    >>> from albef.cli.parity import run_parity
    >>> checks = run_parity("../shared/parity", dtypes=("float64",))   # doctest: +SKIP
    >>> all(c.ok for c in checks)                                        # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from albef.checkpoints.convert import adapt_pos_embed, from_authors, to_authors
from albef.config import ALBEFConfig, TextConfig, VisionConfig
from albef.models.albef import ALBEF
from albef.models.fast import is_fast, make_fast, make_plain
from albef.models.tasks import ALBEFForClassification, ALBEFForVQA, rank_answers
from albef.training.finetune import ClassifierTrainer, VQATrainer
from albef.training.objectives import soft_cross_entropy
from albef.training.pretrain import ALBEFPretrainer, PretrainDraws

TOLERANCE = {"float64": 1e-8, "float32": 1e-4}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class Check:
    name: str
    dtype: str
    max_abs: float
    rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return (
            f"{status} {self.dtype:7s} {self.name:70s} max_abs={self.max_abs:.3e} rel={self.rel:.3e} "
            f"(tol {self.tol:.0e})"
        )


def compare(name: str, ours: Any, ref: Any, dtype: str) -> Check:
    ours_t = torch.as_tensor(ours).detach().double().cpu()
    ref_t = torch.as_tensor(ref).detach().double().cpu()
    if ours_t.shape != ref_t.shape:
        return Check(
            f"{name} (shape {tuple(ours_t.shape)} != {tuple(ref_t.shape)})",
            dtype,
            float("inf"),
            float("inf"),
            TOLERANCE[dtype],
        )
    if ours_t.numel() == 0:
        return Check(name, dtype, 0.0, 0.0, TOLERANCE[dtype])
    diff = (ours_t - ref_t).abs().max().item()
    scale = ref_t.abs().max().item()
    rel = diff / scale if scale > 0 else diff
    if diff != diff:  # NaN anywhere
        diff = rel = float("inf")
    return Check(name, dtype, diff, rel, TOLERANCE[dtype])


def config_from_parity(meta: dict[str, Any]) -> ALBEFConfig:
    """Our config for a parity folder's ``config.json`` (run resolution, recorded BERT config)."""
    b, v, h = meta["bert_text_encoder"], meta["vit"], meta["heads"]
    vision = VisionConfig(
        image_size=v["img_size_run"],
        patch_size=v["patch_size"],
        width=v["embed_dim"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_ratio=v["mlp_ratio"],
        qkv_bias=v["qkv_bias"],
        layer_norm_eps=v["layer_norm_eps"],
    )
    text = TextConfig(
        vocab_size=b["vocab_size"],
        hidden_size=b["hidden_size"],
        num_layers=b["num_hidden_layers"],
        fusion_layer=b["fusion_layer"],
        num_heads=b["num_attention_heads"],
        intermediate_size=b["intermediate_size"],
        max_position_embeddings=b["max_position_embeddings"],
        layer_norm_eps=b["layer_norm_eps"],
        hidden_dropout=b["hidden_dropout_prob"],
        attention_dropout=b["attention_probs_dropout_prob"],
        encoder_width=b["encoder_width"],
        pad_token_id=b.get("pad_token_id", 0),
        type_vocab_size=b["type_vocab_size"] if b.get("add_type_embeddings", True) else 0,
    )
    return ALBEFConfig(
        vision=vision,
        text=text,
        embed_dim=h["embed_dim"],
        temp=h["temp_init"],
        queue_size=h["queue_size"],
        momentum=h["momentum"],
        mlm_probability=h["mlm_mask_prob"],
        max_text_len=h["pretrain_max_txt_len"],
        add_sep=True,
        text_cleaning="blip",
    )


def _load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: cannot be read as a tensor file ({e})") from e


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _sums(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.stack([v.double().sum(), (v.double() ** 2).sum()]) for k, v in sd.items() if v.is_floating_point()}


class _Task:
    """Everything one ``<task>_io.pt`` needs: the model state and the comparisons."""

    def __init__(self, root: Path, meta: dict[str, Any], task: str, dtype: str, fast: bool = True):
        self.root, self.meta, self.dtype = root, meta, dtype
        self.fast = fast  # check the fast model too (else the plain one alone)
        self.torch_dtype = DTYPES[dtype]
        self.cfg = config_from_parity(meta)
        self.io = _load(root / f"{task}_io.pt")
        self.authors_sd = _load(root / f"{task}_state_dict.pt")
        self.checks: list[Check] = []

    def check(self, name: str, ours: Any, ref: Any) -> None:
        self.checks.append(compare(name, ours, ref, self.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        sd = {k: v.double() if v.is_floating_point() else v for k, v in self.authors_sd.items()}
        return adapt_pos_embed(from_authors(sd), self.cfg.vision.num_patches)

    def t(self, x: Tensor) -> Tensor:
        return x.to(self.torch_dtype) if x.is_floating_point() else x


def _pretrain_step(
    task: _Task,
    mlm: bool,
    retrieval: bool,
    rec: dict,
    draws_in: dict,
    inputs: dict,
    io: dict,
    key: str,
    per_alpha: dict,
    fast: bool,
):
    model = ALBEF(task.cfg, mlm_head=mlm, fast=fast)
    trainer = ALBEFPretrainer(model, mlm=mlm, with_idx=retrieval, hard_negative_eps=0.0).to(task.torch_dtype)
    trainer.load_state_dict(task.state_dict(), strict=True)
    before = io.get("momentum_param_sums_before_update")
    if before is not None and key == next(iter(per_alpha)) and not fast:
        task.check("momentum_param_sums_before_update (all tensors)", _stack_sums(trainer, before), _stack_ref(before))
    draws = PretrainDraws(
        draws_in["neg_image_idx"], draws_in["neg_text_idx"], draws_in.get("mlm_input_ids"), draws_in.get("mlm_labels")
    )
    trainer.train()
    out = trainer(
        task.t(inputs["image"]),
        inputs["input_ids"],
        inputs["attention_mask"],
        alpha=float(rec["alpha"]),
        idx=inputs["image_id"] if retrieval else None,
        draws=draws,
    )
    return trainer, out


def _pretrain_like(task: _Task, mlm: bool) -> None:
    """Shared by the pretraining and the retrieval-training vectors."""
    io, retrieval = task.io, not mlm
    inputs, draws_in, outputs = io["inputs"], io["draws"], io["outputs"]
    per_alpha: dict[str, Any] = io["per_alpha"]
    results = {}
    for key, rec in per_alpha.items():
        # the plain model computes every position, padding included (its hidden states are
        # compared below); the fast one computes only what the losses read — the real tokens, and
        # in the last layer [CLS] and the masked ones: check its numbers too
        for fast in (True, False) if task.fast else (False,):
            trainer, out = _pretrain_step(task, mlm, retrieval, rec, draws_in, inputs, io, key, per_alpha, fast)
            tag = " [real tokens only; last layer: [CLS]/masked only]" if fast else ""
            clean = rec.get("float64_clean", {})
            task.check(f"per_alpha/{key}/loss_itc{tag}", out.itc.loss, clean.get("loss_itc", rec["loss_itc"]))
            task.check(f"per_alpha/{key}/loss_itm{tag}", out.itm.loss, rec["loss_itm"])
            task.check(f"per_alpha/{key}/loss{tag}", out.loss, clean.get("loss", rec["loss"]))
            if mlm:
                task.check(f"per_alpha/{key}/loss_mlm{tag}", out.mlm.loss, rec["loss_mlm"])
                task.check(f"per_alpha/{key}/mlm_ce{tag}", out.mlm.ce, rec["mlm_ce"])
            if fast:
                task.check(f"outputs/itm_logits{tag}", out.itm.logits, outputs["itm_logits"])
                if mlm:
                    task.check(f"outputs/mlm_logits_masked{tag}", out.mlm.logits, outputs["mlm_logits_masked"])
        results[key] = (trainer, out)
        for name, ours in (("sim_i2t_targets", out.itc.targets_i2t), ("sim_t2i_targets", out.itc.targets_t2i)):
            task.check(f"per_alpha/{key}/{name}", ours, clean.get(name, rec[name]))

    # Everything under outputs/ is alpha-independent: read it from the run with distillation on.
    trainer, out = max(results.values(), key=lambda r: r[1].alpha)
    B = inputs["input_ids"].shape[0]
    s, m, itc, itm = out.student, out.teacher, out.itc, out.itm
    with torch.no_grad():  # every position of the scored pairs' fusion pass (the plain model's run)
        text, mask = s.text_embeds[itm.text_rows], inputs["attention_mask"][itm.text_rows]
        fused = trainer.model.fuse(text, mask, s.image_embeds[itm.image_rows])
    for name, ours in [
        ("image_embeds", s.image_embeds),
        ("text_embeds", s.text_embeds),
        ("image_feat", s.image_feat),
        ("text_feat", s.text_feat),
        ("image_embeds_m", m.image_embeds),
        ("text_embeds_m", m.text_embeds),
        ("image_feat_m", m.image_feat),
        ("text_feat_m", m.text_feat),
        ("sim_i2t", itc.sim_i2t),
        ("sim_t2i", itc.sim_t2i),
        ("sim_i2t_m", itc.sim_i2t_m),
        ("sim_t2i_m", itc.sim_t2i_m),
        ("fused_pos_last_hidden", fused[:B]),
        ("fused_neg_last_hidden", fused[B:]),
        ("itm_logits", itm.logits),
        ("itm_labels", itm.labels),
        ("loss_itm", itm.loss),
        ("image_queue_after", trainer.queue.image_queue),
        ("text_queue_after", trainer.queue.text_queue),
        ("queue_ptr_after", trainer.queue.queue_ptr),
    ]:
        task.check(f"outputs/{name}", ours, outputs[name])
    if "temp" in outputs:
        task.check("outputs/temp", trainer.model.temp, outputs["temp"])
    if retrieval:
        task.check("outputs/idx_queue_after", trainer.queue.idx_queue, outputs["idx_queue_after"])
        pos = torch.eq(
            inputs["image_id"].view(-1, 1),
            torch.cat([inputs["image_id"].view(1, -1), torch.as_tensor(task.authors_sd["idx_queue"])], dim=1),
        ).double()
        task.check(
            "outputs/multi_positive_targets (recomputed from the recorded ids)",
            pos / pos.sum(1, keepdim=True),
            outputs["multi_positive_targets"],
        )
    # The reference hands these rows to multinomial; compare the distributions they define.
    for name, w in [("weights_t2i", itm.weights_t2i), ("weights_i2t", itm.weights_i2t)]:
        ref = draws_in[name]
        task.check(f"draws/{name} (row-normalised)", w / w.sum(1, keepdim=True), ref / ref.sum(1, keepdim=True))
    if mlm:
        task.check(
            "outputs/mlm_masked_positions", out.draws.mlm_labels.ne(-100).nonzero(), outputs["mlm_masked_positions"]
        )
        task.check("outputs/mlm_logits_masked", out.mlm.logits, outputs["mlm_logits_masked"])
        task.check("outputs/mlm_logits_m_masked", out.mlm.logits_m, outputs["mlm_logits_m_masked"])
        distill = soft_cross_entropy(out.mlm.logits, out.mlm.logits_m.softmax(-1))
        for key, rec in per_alpha.items():
            if "mlm_distill" in rec:
                task.check(f"per_alpha/{key}/mlm_distill", distill, rec["mlm_distill"])
    # Momentum parameters after the single update of this step.
    authors_m = to_authors({k: v for k, v in trainer.state_dict().items()}, pretrain_layout=mlm)
    for name, ref in io.get("momentum_after_update", {}).items():
        if name.endswith("[rows]"):
            rows = io["momentum_after_update"]["word_embedding_row_ids"]
            task.check(f"momentum_after_update/{name}", authors_m[name.removesuffix("[rows]")][rows], ref)
        elif name != "word_embedding_row_ids":
            task.check(f"momentum_after_update/{name}", authors_m[name], ref)
    sums = _sums(authors_m)
    ref_sums = io["momentum_param_sums_after_update"]
    missing = sorted(set(ref_sums) - set(sums))
    if missing:
        raise KeyError(f"momentum tensors recorded by the reference but absent here: {missing[:5]}")
    task.check(
        "momentum_param_sums_after_update (all tensors)", torch.stack([sums[k] for k in ref_sums]), _stack_ref(ref_sums)
    )


def _stack_ref(ref: dict[str, Tensor]) -> Tensor:
    return torch.stack([torch.as_tensor(v) for v in ref.values()])


def _stack_sums(trainer: ALBEFPretrainer, ref: dict[str, Tensor]) -> Tensor:
    sums = _sums(to_authors(trainer.state_dict(), pretrain_layout=trainer.mlm))
    return torch.stack([sums[k] for k in ref])


def _classifier(task: _Task, num_images: int) -> None:
    """SNLI-VE (one image, 3 classes) and NLVR2 (two images, 2 classes, shared cross-attention)."""
    io = task.io
    inputs, outputs = io["inputs"], io["outputs"]
    images = [task.t(inputs["image"])] if num_images == 1 else [task.t(inputs["image0"]), task.t(inputs["image1"])]
    num_classes = outputs["logits"].shape[1]
    for key, rec in io["per_alpha"].items():
        model = ALBEFForClassification(task.cfg, num_classes, num_images, fast=task.fast)
        # LAVIS 1.0.2's NLVR2 teacher runs the student text encoder (see ALBEF.md section 9)
        trainer = ClassifierTrainer(model, task.cfg.momentum, lavis_teacher_text_encoder=num_images == 2)
        trainer.to(task.torch_dtype).load_state_dict(task.state_dict(), strict=True)
        trainer.train()
        out = trainer(
            images if num_images == 2 else images[0],
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["label"],
            alpha=float(rec["alpha"]),
        )
        task.check(f"per_alpha/{key}/loss", out.loss, rec["loss"])
        task.check(f"per_alpha/{key}/logits_m", out.logits_m, rec["logits_m"])
        task.check("outputs/logits", out.logits, outputs["logits"])
    embeds = model.encode_images(images)
    names = ["image_embeds"] if num_images == 1 else ["image0_embeds", "image1_embeds"]
    for name, e in zip(names, embeds, strict=True):
        task.check(f"outputs/{name}", e, outputs[name])
    _hidden_both_ways(
        task,
        "outputs/encoder_last_hidden",
        outputs["encoder_last_hidden"],
        inputs["attention_mask"],
        lambda: model.text_encoder(inputs["input_ids"], inputs["attention_mask"], embeds),
        model,
    )
    _momentum_sums(task, trainer)


def _hidden_both_ways(
    task: _Task, name: str, ref: Tensor, mask: Tensor, run: Callable[[], Tensor], model: torch.nn.Module
) -> None:
    """A whole hidden-state tensor: every position as the reference computes it (padding
    included), from the plain model, and the real tokens from the fast one, which skips padding."""
    task.check(name, run_plain(model, run), ref)
    if task.fast:
        real = mask.bool()
        task.check(f"{name} [real tokens only]", run()[real], ref[real])


def run_plain(model: torch.nn.Module, run: Callable[[], Tensor]) -> Tensor:
    """``run()`` with ``model`` plain, whether it was fast or not (and left as it was)."""
    fast = is_fast(model)
    make_plain(model)
    try:
        return run()
    finally:
        if fast:
            make_fast(model)


def _vqa(task: _Task) -> None:
    io = task.io
    inp, train = io["inputs"], io["train"]
    images = task.t(inp["image"])
    for key, rec in train["per_alpha"].items():
        model = ALBEFForVQA(task.cfg, fast=task.fast)
        trainer = VQATrainer(model, task.cfg.momentum, label_smoothing=0.1)  # LAVIS smooths; the authors don't
        trainer.to(task.torch_dtype).load_state_dict(task.state_dict(), strict=True)
        trainer.train()
        out = trainer(
            images,
            inp["question_input_ids"],
            inp["question_attention_mask"],
            inp["answer_input_ids"],
            inp["answer_attention_mask"],
            task.t(inp["answer_weights"]),
            inp["n_answers"],
            alpha=float(rec["alpha"]),
        )
        task.check(f"train/per_alpha/{key}/per_answer_loss", out.per_answer_loss, rec["per_answer_loss"])
        task.check(f"train/per_alpha/{key}/loss", out.loss, rec["loss"])
    task.check("train/outputs/image_embeds", model.visual_encoder(images), train["outputs"]["image_embeds"])
    _hidden_both_ways(
        task,
        "train/outputs/question_states",
        train["outputs"]["question_states"],
        inp["question_attention_mask"],
        lambda: model.encode_question(images, inp["question_input_ids"], inp["question_attention_mask"]),
        model,
    )
    logp = out.logits[:, :-1].log_softmax(-1)
    targets = inp["answer_targets"][:, 1:]
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
    task.check("train/outputs/answer_token_logprob", tok, train["outputs"]["answer_token_logprob"])
    _momentum_sums(task, trainer)
    model.eval()
    ref = io["rank"]
    q, qm = out.question_states.detach(), inp["question_attention_mask"]
    ids, mask, k = inp["answer_list_input_ids"], inp["answer_list_attention_mask"], int(inp["k_test"])
    lavis = rank_answers(model, q, qm, ids, mask, k, scoring="lavis", label_smoothing=0.1)
    for name, ours in [
        ("first_token_logits", lavis["first_token_logits"]),
        ("prob_first_token", lavis["prob_first_token"]),
        ("topk_probs", lavis["topk_probs"]),
        ("topk_ids", lavis["topk_ids"]),
        ("candidate_loss", lavis["candidate_nll"]),
        ("log_probs_sum", lavis["log_probs_sum"]),
        ("pred_answer_idx", lavis["ranked_ids"][:, 0]),
    ]:
        task.check(f"rank/{name}", ours, ref[name])
    authors = rank_answers(model, q, qm, ids, mask, k, scoring="albef")
    off = ref["official_formula"]
    task.check(
        "rank/official_formula/candidate_answer_loss_no_smoothing",
        authors["candidate_nll"],
        off["candidate_answer_loss_no_smoothing"],
    )
    task.check("rank/official_formula/log_probs_sum", authors["log_probs_sum"], off["log_probs_sum"])
    task.check("rank/official_formula/rerank_probs", authors["scores"], off["rerank_probs"])
    task.check("rank/official_formula/rerank_answer_idx", authors["ranked_ids"], off["rerank_answer_idx"])


def _momentum_sums(task: _Task, trainer: torch.nn.Module) -> None:
    ref = task.io.get("momentum_param_sums_after_update")
    if ref is None:
        return
    sums = _sums(to_authors(trainer.state_dict(), pretrain_layout=False))
    missing = sorted(set(ref) - set(sums))
    if missing:
        raise KeyError(f"momentum tensors recorded by the reference but absent here: {missing[:5]}")
    task.check("momentum_param_sums_after_update (all tensors)", torch.stack([sums[k] for k in ref]), _stack_ref(ref))


TASKS: dict[str, Callable[[_Task], None]] = {
    "pretrain": lambda t: _pretrain_like(t, mlm=True),
    "retrieval": lambda t: _pretrain_like(t, mlm=False),
    "vqa": _vqa,
    "nlvr": lambda t: _classifier(t, num_images=2),
    "ve": lambda t: _classifier(t, num_images=1),
}


def run_parity(
    root: str | Path,
    dtypes: tuple[str, ...] = ("float64", "float32"),
    tasks: tuple[str, ...] | None = None,
    plain: bool = False,
) -> list[Check]:
    """Recompute every supported task's vectors in each dtype; return the comparisons. ``plain``:
    the plain model alone (not the fast one that models are built as)."""
    root = Path(root)
    meta_path = root / "config.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: DIR must be a parity folder (config.json + *_io.pt)")
    meta = json.loads(meta_path.read_text())
    present = [t for t in TASKS if (root / f"{t}_io.pt").exists() and (tasks is None or t in tasks)]
    if not present:
        raise FileNotFoundError(f"{root}: no <task>_io.pt for any supported task ({', '.join(TASKS)})")
    checks: list[Check] = []
    for dtype in dtypes:
        for name in present:
            task = _Task(root, meta, name, dtype, fast=not plain)
            TASKS[name](task)
            checks += [Check(f"{name}: {c.name}", c.dtype, c.max_abs, c.rel, c.tol) for c in task.checks]
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef parity", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="parity folder (config.json, <task>_state_dict.pt, <task>_io.pt)")
    p.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    p.add_argument("--task", action="append", choices=list(TASKS), help="only these tasks (repeatable)")
    p.add_argument(
        "--plain",
        action="store_true",
        help="check the plain model alone (albef.models without the speedups of albef.models.fast)",
    )
    args = p.parse_args(argv)
    dtypes = tuple(DTYPES) if args.dtype == "both" else (args.dtype,)
    torch.manual_seed(0)
    checks = run_parity(args.dir, dtypes, tuple(args.task) if args.task else None, plain=args.plain)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
