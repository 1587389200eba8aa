"""What ITM is trained on and what the fusion knows of relations, read from a scene pretraining checkpoint.

    .venv/bin/python bench/fusion_probe.py runs/main/pretrain/checkpoint_last.pt \\
        --pretrain-data runs/main/pretrain_data.json --data data

1. **ITM's negatives.** On batches drawn from the pretraining data (uniformly, as the job's sampler
   draws them), the weights ITM's hard negatives are sampled from, as the pretraining computes them
   (:func:`albef.training.objectives.hard_negative_weights`: softmax over the batch of the student's
   features against the momentum model's, divided by the learned temperature, the positive left
   out), summed by what the negative is to the positive scene: a caption of the same meaning (a
   false negative), the same two emoji in another arrangement or count (only the layout tells
   them apart), one emoji shared, none shared, a single emoji. Beside them the same shares for a
   negative drawn uniformly (the ablation's rows without hard negatives).
2. **Relations in the fusion.** Each held-out caption with its relation word masked, the MLM
   head's score of the word against its opposite (left/right, above/below), per test subset:
   50 % is chance; a fusion that knows where each named object is gets it right.

Writes ``--out`` (JSON) and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
KINDS = ("same meaning (false negative)", "same pair, other layout or count", "one emoji shared", "none shared")
SINGLE = "a single emoji"


def _teacher(ckpt: dict, model: torch.nn.Module) -> torch.nn.Module:
    """The momentum model of a pretraining checkpoint, as an inference model (its encoders and projections)."""
    from albef.models.albef import ALBEF

    teacher = ALBEF(model.config)
    sd = {k.removeprefix("model_m."): v for k, v in ckpt["model"].items() if k.startswith("model_m.")}
    missing, unexpected = teacher.load_state_dict(sd, strict=False)
    if unexpected or any(not (k.startswith(("itm_head", "mlm_head")) or k == "temp") for k in missing):
        raise ValueError(f"not a pretraining checkpoint's momentum model: missing {missing}, unexpected {unexpected}")
    return teacher.eval()


def _kind(a, b) -> str:
    """What scene ``b`` is to scene ``a`` (each ``(meaning, {emoji})`` or None for a single emoji)."""
    if b is None:
        return SINGLE
    if b[0] == a[0]:
        return KINDS[0]
    if b[1] == a[1]:
        return KINDS[1]
    return KINDS[2] if b[1] & a[1] else KINDS[3]


def negative_mix(model, teacher, rows, scenes, root: Path, batches: int, batch: int, seed: int = 0) -> dict:
    """Shares (%) of ITM's negative-sampling weight by kind, for hard and for uniform negatives."""
    from albef.data.pretrain import load_image
    from albef.data.scene_grammar import semantic_key
    from albef.data.transforms import test_transform
    from albef.text import Tokenizer
    from albef.training.objectives import hard_negative_weights

    cfg = model.config
    tok, tf = Tokenizer(add_sep=cfg.add_sep), test_transform(cfg.vision.image_size)

    def info(row):
        s = scenes.get(row["image"])
        if s is None:
            return None
        return semantic_key(s["a"], s["count_a"], s["relation"], s["b"], s["count_b"]), {s["a"], s["b"]}

    rng = random.Random(seed)
    hard = {"image -> text": Counter(), "text -> image": Counter()}
    uniform, n = Counter(), 0
    for _ in range(batches):
        rows_b = [rows[i] for i in rng.sample(range(len(rows)), batch)]
        caps = [rng.choice(r["caption"]) if isinstance(r["caption"], list) else r["caption"] for r in rows_b]
        images = torch.stack([tf(load_image(root / r["image"])) for r in rows_b])
        t = tok(caps, max_length=cfg.max_text_len)
        with torch.no_grad():
            feats = []
            for m in (model, teacher):
                feats.append(m.image_feat(m.encode_image(images)))
                feats.append(m.text_feat(m.encode_text(t.input_ids, t.attention_mask), t.attention_mask))
            img, txt, img_m, txt_m = feats
            eye = torch.eye(batch, dtype=torch.bool)
            w = {
                "image -> text": hard_negative_weights(img @ txt_m.T / model.temp, eye),
                "text -> image": hard_negative_weights(txt @ img_m.T / model.temp, eye),
            }
        infos = [info(r) for r in rows_b]
        for i, a in enumerate(infos):
            if a is None:  # the shares are of the scenes' negatives
                continue
            n += 1
            for j, b in enumerate(infos):
                if j != i:
                    k = _kind(a, b)
                    uniform[k] += 1 / (batch - 1)
                    for d in hard:
                        hard[d][k] += float(w[d][i, j] / w[d][i].sum())
    if n == 0:
        raise ValueError("no scene among the samples drawn: is --pretrain-data a scene pretraining's data?")
    pct = lambda c: {k: round(100 * c[k] / n, 1) for k in (*KINDS, SINGLE)}  # noqa: E731
    shares = {d: pct(c) for d, c in hard.items()}
    return {"scenes": n, "temp": float(model.temp.detach()), **shares, "uniform": pct(uniform)}


def relation_mlm(model, twins_file: Path, image_root: Path, batch: int = 32) -> dict:
    """MLM accuracy (%) on each held-out caption's relation word against its opposite, per subset."""
    from albef.data.pretrain import load_image
    from albef.data.transforms import test_transform
    from albef.evaluation.scenes import read_twins
    from albef.text import Tokenizer

    cfg = model.config
    tok, tf = Tokenizer(add_sep=cfg.add_sep), test_transform(cfg.vision.image_size)
    ids = {w: tok(w, return_tensors=False).input_ids[0][1] for w in OPPOSITE}
    cases = []  # (image, caption with its relation word masked, the word, subset)
    for case in read_twins(twins_file, image_root):
        words = case.caption.split()
        rel = next((w for w in words if w in OPPOSITE), None)
        if rel is not None:
            cases.append((case.image, " ".join("[MASK]" if w == rel else w for w in words), rel, case.split))
    right, total = Counter(), Counter()
    for i in range(0, len(cases), batch):
        chunk = cases[i : i + batch]
        t = tok([c[1] for c in chunk], max_length=cfg.max_text_len)
        images = torch.stack([tf(load_image(c[0])) for c in chunk])
        with torch.no_grad():
            fused = model.fuse(
                model.encode_text(t.input_ids, t.attention_mask), t.attention_mask, model.encode_image(images)
            )
            logits = model.mlm_logits(fused[t.input_ids == tok.mask_token_id])  # one [MASK] per row: [n, vocab]
        for (_, _, rel, split), row in zip(chunk, logits, strict=True):
            for key in (split, "all"):
                right[key] += int(row[ids[rel]] > row[ids[OPPOSITE[rel]]])
                total[key] += 1
    return {k: {"accuracy": round(100 * right[k] / total[k], 1), "n": total[k]} for k in total}


def main(argv: list[str] | None = None) -> int:
    from albef.checkpoints.files import load_checkpoint
    from albef.checkpoints.pretrained import load_inference_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a scene pretraining run's checkpoint (student and momentum model)")
    p.add_argument("--pretrain-data", type=Path, required=True, help="the run's pretrain_data.json")
    p.add_argument("--data", type=Path, default=Path("data"), help="the main job's data folder")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, help="default: fusion_probe.json beside the checkpoint")
    p.add_argument("--skip-relations", action="store_true", help="the negatives only (no MLM probe)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = load_inference_model(args.checkpoint)
    teacher = _teacher(load_checkpoint(args.checkpoint), model)
    scenes = {"scenes/" + s["image"]: s for s in json.loads((args.data / "scenes" / "scenes.json").read_text())}
    rows = json.loads(args.pretrain_data.read_text())
    res = {
        "checkpoint": str(args.checkpoint),
        "negatives": negative_mix(model, teacher, rows, scenes, args.data, args.batches, args.batch),
    }
    if not args.skip_relations:
        res["relation_mlm"] = relation_mlm(model, args.data / "scenes" / "twins_test.json", args.data / "scenes")
    out = args.out or args.checkpoint.with_name("fusion_probe.json")
    out.write_text(json.dumps(res, indent=1))
    neg = res["negatives"]
    print(f"ITM's negatives, share of the sampling weight (%), {neg['scenes']} scenes, temperature {neg['temp']:.4f}")
    print("| negative | hard, image -> text | hard, text -> image | uniform |\n|---|---|---|---|")
    for k in (*KINDS, SINGLE):
        print(f"| {k} | {neg['image -> text'][k]} | {neg['text -> image'][k]} | {neg['uniform'][k]} |")
    mlm = res.get("relation_mlm", {})
    cells = ", ".join(f"{k} {v['accuracy']} ({v['n']})" for k, v in mlm.items())
    if mlm:
        print(f"MLM on the relation word (chance 50 %): {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
