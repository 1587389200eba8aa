"""Weakly supervised visual grounding: Grad-CAM heat maps ranking candidate boxes.

Data: JSON entries ``{"image", "text", "ref_id", "box": [x, y, w, h], "candidates": [[x, y, w, h],
...], "split"?}`` — the referring expression, its ground-truth box and the candidate boxes of the
image (for RefCOCO+ the detections the authors rank, ``dets.json``). A prediction is the
candidate with the highest ``sum(heat inside) / area**0.5`` on the heat map upsampled to the
image; it is correct when its IoU with the ground truth is at least 0.5.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from albef.data.annotations import read_annotations, require_entries, resolve_image
from albef.data.pretrain import read_image
from albef.gradcam import box_iou, box_scores, gradcam_itc, gradcam_itm, upsample_heatmap
from albef.models.albef import ALBEF
from albef.text import Tokenizer, clean_text


@dataclass(frozen=True)
class GroundingRecord:
    image: str
    text: str
    ref_id: object
    box: tuple[float, float, float, float]
    candidates: tuple[tuple[float, float, float, float], ...]
    split: str


def _box(b: object, what: str) -> tuple[float, float, float, float]:
    if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
        raise ValueError(f"{what} must be [x, y, w, h]")
    if b[2] <= 0 or b[3] <= 0:
        raise ValueError(f"{what} has no area: {b}")
    return tuple(float(v) for v in b)


def read_grounding(
    files: str | Sequence[str], image_root: str | None, cleaning: str = "albef", max_words: int | None = None
) -> list[GroundingRecord]:
    def parse(entry: dict, where: str) -> GroundingRecord:
        text = clean_text(entry.get("text"), "'text'", cleaning, max_words)
        cands = entry.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise ValueError("'candidates' must be a non-empty list of boxes")
        return GroundingRecord(
            resolve_image(entry.get("image"), image_root),
            text,
            entry.get("ref_id", where),
            _box(entry.get("box"), "'box'"),
            tuple(_box(c, f"candidate {i}") for i, c in enumerate(cands)),
            str(entry.get("split", "test")),
        )

    records, bad = read_annotations(files, parse)
    require_entries(len(records), files, "grounding evaluation")
    if bad:
        raise ValueError(
            "the grounding set has bad entries (fix them: skipping would change the benchmark):\n  "
            + "\n  ".join(map(str, bad[:20]))
        )
    return records


@dataclass
class GroundingPrediction:
    record: GroundingRecord
    heatmap: Tensor  # [grid, grid]
    scores: Tensor  # one per candidate
    best: int
    iou: float

    @property
    def correct(self) -> bool:
        return self.iou >= 0.5


def evaluate_grounding(
    model: ALBEF,
    records: Sequence[GroundingRecord],
    tokenizer: Tokenizer,
    transform,
    mode: str = "itm",
    layer: int | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    alpha: float = 0.5,
) -> tuple[dict, list[GroundingPrediction]]:
    """Accuracy (IoU ≥ 0.5) overall and per split, and every prediction."""
    if mode not in ("itm", "itc"):
        raise ValueError("mode must be 'itm' (cross-attention Grad-CAM) or 'itc' (ViT self-attention)")
    if not records:
        raise ValueError("no grounding records: nothing to evaluate (the evaluation file holds no entry)")
    model.eval()
    from albef.distributed import gather_lists, rank_slice

    mine = list(records)[rank_slice(len(records))]  # under torchrun: a share per rank, gathered below
    preds: list[GroundingPrediction] = []
    for s in range(0, len(mine), batch_size):
        chunk = mine[s : s + batch_size]
        pil = [read_image(r.image) for r in chunk]
        px = torch.stack([transform(p) for p in pil]).to(device)
        # not cut, as the authors' test tokenization (only BERT's position limit)
        tok = tokenizer(
            [r.text for r in chunk], max_length=model.config.text.max_position_embeddings, padding="longest"
        ).to(device)
        fn = gradcam_itm if mode == "itm" else gradcam_itc
        heat = fn(model, px, tok.input_ids, tok.attention_mask, layer).float().cpu()
        for r, img, h in zip(chunk, pil, heat, strict=True):
            scores = box_scores(upsample_heatmap(h, img.height, img.width), torch.tensor(r.candidates), alpha)
            best = int(scores.argmax())
            iou = float(box_iou(torch.tensor([r.candidates[best]]), torch.tensor([r.box]))[0])
            preds.append(GroundingPrediction(r, h, scores, best, iou))
    preds = gather_lists(preds)
    per_split: dict[str, list[bool]] = defaultdict(list)
    for p in preds:
        per_split[p.record.split].append(p.correct)
    acc = {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_split.items())}
    return {
        "accuracy": 100.0 * sum(p.correct for p in preds) / max(1, len(preds)),
        "per_split": acc,
        "n": len(preds),
        "mode": mode,
    }, preds


#: the names :func:`save_overlays` gives its files (``albef evaluate grounding`` refuses to mix two runs')
OVERLAY_NAMES = ("grounding_*_ok.png", "grounding_*_miss.png")


def save_overlays(preds: Sequence[GroundingPrediction], out_dir: str | Path, n: int = 8) -> list[Path]:
    """Heat-map overlay PNGs of the first ``n`` predictions (candidates white, chosen green)."""
    from albef.viz import overlay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(preds[:n]):
        img = read_image(p.record.image)
        heat = upsample_heatmap(p.heatmap, img.height, img.width)
        path = out / f"grounding_{i:03d}_{'ok' if p.correct else 'miss'}.png"
        labelled(overlay(img, heat, boxes=list(p.record.candidates), highlight=p.best), p.record.text).save(path)
        paths.append(path)
    return paths


def labelled(img: Image.Image, text: str, min_width: int = 256) -> Image.Image:
    """``img`` enlarged (nearest) to at least ``min_width`` px, with ``text`` on a strip below."""
    from PIL import ImageDraw

    k = max(1, -(-min_width // img.width))
    big = img.resize((img.width * k, img.height * k), Image.NEAREST)
    out = Image.new("RGB", (big.width, big.height + 18), (255, 255, 255))
    out.paste(big, (0, 0))
    ImageDraw.Draw(out).text((4, big.height + 3), text, fill=(0, 0, 0))
    return out
