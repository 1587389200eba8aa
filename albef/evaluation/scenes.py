"""What each half of ALBEF does on held-out emoji scenes (:mod:`albef.data.scenes`).

* :func:`evaluate_twins` — the relation/attribute test: each image's true caption against each of
  its altered twins (relation swapped, an object changed, a count changed, a colour changed). A
  pair is won when the true caption scores higher: by the ITC cosine of ``image_feat`` and
  ``text_feat`` (the unimodal half: one vector per image, one per text) and by the ITM head's match
  probability (the fusion half, which reads the image through cross-attention). Accuracy per kind
  of twin and overall; ties count one half; chance is 50 % per pair. A blind control scores the
  same pairs against another scene's image: what each head gets from the texts alone.
* :func:`evaluate_pointing` — Grad-CAM pointing: the ITM Grad-CAM map of the object's name
  (:func:`albef.gradcam.gradcam_itm`) scores every object box of the scene
  (:func:`albef.gradcam.box_scores`, through :func:`albef.evaluation.grounding.evaluate_grounding`);
  correct when the best box is the named object's. Chance is the mean of 1 / number of objects.
  Also the pointing game (Zhang et al., 2016): a hit when the map's maximum lies in the named
  object's box. Two chances: a point drawn uniformly (the box's share of the image), and a map
  that finds objects but not which one is named (a point on one of the scene's objects at random:
  1 / objects, the bar that says the name was read).
* :func:`oracle_pointing` — the same scoring of a *perfect* patch-level map (each patch's share of
  the named object's box): the ceiling the patch grid leaves to Grad-CAM, used to choose the image
  and patch size.
* retrieval: the scenes' ``retrieval_test*.json`` are the authors' evaluation format; read them
  with :func:`albef.data.retrieval.read_retrieval_eval` and score them with
  :func:`albef.evaluation.retrieval.evaluate_retrieval` (ITC alone vs ITC + ITM).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from albef.data.annotations import read_annotations, require_entries, resolve_image
from albef.text import clean_text

CHANCE_PAIR = 50.0


@dataclass(frozen=True)
class TwinCase:
    image: str
    caption: str
    twins: tuple[tuple[str, str], ...]  # (kind, altered caption)
    split: str
    scene_id: str


def read_twins(
    files: str | Path | Sequence[str | Path],
    image_root: str | Path | None,
    cleaning: str = "albef",
    max_words: int | None = None,
) -> list[TwinCase]:
    """The cases of ``twins_test.json`` (``{"image", "caption", "twins": [{"kind", "caption"}], "split"}``),
    captions cleaned like every evaluation text; a bad entry is an error."""

    def parse(entry: dict, where: str) -> TwinCase:
        tw = entry.get("twins")
        if not isinstance(tw, list) or not tw:
            raise ValueError("'twins' must be a non-empty list of {'kind', 'caption'}")
        pairs = []
        for i, t in enumerate(tw):
            if not isinstance(t, dict) or not isinstance(t.get("kind"), str):
                raise ValueError(f"twin {i} must be an object with a 'kind' and a 'caption'")
            pairs.append((t["kind"], clean_text(t.get("caption"), f"twin {i}", cleaning, max_words)))
        return TwinCase(
            resolve_image(entry.get("image"), None if image_root is None else str(image_root)),
            clean_text(entry.get("caption"), "'caption'", cleaning, max_words),
            tuple(pairs),
            str(entry.get("split", "test")),
            str(entry.get("scene_id", where)),
        )

    records, bad = read_annotations(files, parse)
    require_entries(len(records), files, "twin evaluation")
    if bad:
        raise ValueError("the twin set has bad entries:\n  " + "\n  ".join(map(str, bad[:20])))
    return records


@torch.no_grad()
def pair_scores(
    model,
    images: Sequence[str] | Tensor,
    texts: Sequence[str],
    pairs_image: Sequence[int],
    pairs_text: Sequence[int],
    tokenizer,
    transform=None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    max_length: int = 30,
) -> tuple[Tensor, Tensor]:
    """ITC cosine and ITM match probability of each (image, text) pair: two [P] float tensors.

    ``images``: paths (through ``transform``) or a pixel tensor; every image and text is encoded once.
    """
    from albef.data.pretrain import read_image

    model.eval()
    if isinstance(images, Tensor):
        chunks = list(images.split(batch_size))
    else:
        chunks = [
            torch.stack([transform(read_image(p)) for p in images[i : i + batch_size]])
            for i in range(0, len(images), batch_size)
        ]
    image_embeds = torch.cat([model.encode_image(c.to(device)) for c in chunks])
    image_feat = model.image_feat(image_embeds).float()
    tok = tokenizer(list(texts), max_length=max_length, padding="longest")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    text_embeds = torch.cat(
        [model.encode_text(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    )
    text_feat = model.text_feat(text_embeds, mask).float()
    pi = torch.as_tensor(list(pairs_image), dtype=torch.long, device=image_feat.device)
    pt = torch.as_tensor(list(pairs_text), dtype=torch.long, device=image_feat.device)
    cos = (image_feat[pi] * text_feat[pt]).sum(-1)
    itm = []
    for s in range(0, len(pi), batch_size):
        i, t = pi[s : s + batch_size], pt[s : s + batch_size]
        fused = model.fuse(text_embeds[t], mask[t], image_embeds[i])
        itm.append(model.itm_logits(fused).float().softmax(-1)[:, 1])
    return cos.cpu(), (torch.cat(itm) if itm else cos.new_zeros(0)).cpu()


def _accuracy(wins: Sequence[float]) -> float:
    return 100.0 * sum(wins) / len(wins) if wins else float("nan")


def _win(true: float, twin: float) -> float:
    return 1.0 if true > twin else (0.5 if true == twin else 0.0)


def evaluate_twins(
    model,
    cases: Sequence[TwinCase],
    tokenizer,
    transform,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    max_length: int = 30,
    blind: bool = True,
) -> dict:
    """Accuracy (%) of ITC and of ITM at preferring each image's caption to each of its twins.

    Returns ``{"chance": 50.0, "n": {kind: pairs, "overall": pairs}, "itc": {kind: %, "overall": %},
    "itm": {...}, "per_split": {split: {"n", "itc", "itm", ...}}}``. ``blind`` adds ``"itc_blind"`` and
    ``"itm_blind"``: the same comparisons scored against another case's image (the next one, whose
    scene neither caption describes), the preference a head has from the texts alone. A head reads
    the image only as far as it beats its blind score: a random model's ITC, say, sides with the
    true caption of count twins about as often with the wrong image (the twin's extra "two").
    """
    if not cases:
        raise ValueError("no twin cases: nothing to evaluate")
    images = sorted({c.image for c in cases})
    if blind and len(images) < 2:
        raise ValueError("the blind control needs at least two images")
    img_ix = {p: i for i, p in enumerate(images)}
    texts: list[str] = []
    txt_ix: dict[str, int] = {}
    for c in cases:
        for t in (c.caption, *(cap for _, cap in c.twins)):
            if t not in txt_ix:
                txt_ix[t] = len(texts)
                texts.append(t)
    views = [("", [img_ix[c.image] for c in cases])]
    if blind:  # the next case with another image
        other = []
        for i, c in enumerate(cases):
            n = len(cases)
            j = next(k % n for k in range(i + 1, i + 1 + n) if cases[k % n].image != c.image)
            other.append(img_ix[cases[j].image])
        views.append(("_blind", other))
    pi, pt = [], []
    for _, ims in views:
        for c, im in zip(cases, ims, strict=True):
            for t in (c.caption, *(cap for _, cap in c.twins)):
                pi.append(im)
                pt.append(txt_ix[t])
    cos, itm = pair_scores(model, images, texts, pi, pt, tokenizer, transform, batch_size, device, max_length)
    wins: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    k = 0
    for suffix, _ in views:
        for c in cases:
            true_k = k
            k += 1
            for kind, _ in c.twins:
                for head, score in (("itc", cos), ("itm", itm)):
                    w = _win(float(score[true_k]), float(score[k]))
                    for split in ("all", c.split):
                        wins[split][head + suffix][kind].append(w)
                        wins[split][head + suffix]["overall"].append(w)
                k += 1

    def table(split: str) -> dict:
        d = wins[split]
        return {
            "n": {kind: len(v) for kind, v in d["itc"].items()},
            **{head: {kind: _accuracy(v) for kind, v in d[head].items()} for head in d},
        }

    out = {"chance": CHANCE_PAIR, **table("all")}
    out["per_split"] = {s: table(s) for s in sorted({c.split for c in cases})}
    return out


def evaluate_pointing(
    model,
    records: Sequence,
    tokenizer,
    transform,
    layer: int | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    alpha: float = 0.5,
) -> tuple[dict, list]:
    """Grad-CAM (ITM) pointing among the scene's object boxes: accuracy and chance, overall and per
    split, and every prediction (:class:`albef.evaluation.grounding.GroundingPrediction`).

    ``records``: :func:`albef.evaluation.grounding.read_grounding` of ``grounding_test.json``. The
    candidates are the exact, non-overlapping object boxes, so IoU >= 0.5 means the right box.
    ``layer``: the text layer whose cross-attention Grad-CAM reads (default
    :func:`albef.gradcam.default_gradcam_layer`); the result names it (``"layer"``).
    """
    from albef.evaluation.grounding import evaluate_grounding
    from albef.gradcam import default_gradcam_layer

    layer = default_gradcam_layer(model) if layer is None else layer
    metrics, preds = evaluate_grounding(model, records, tokenizer, transform, "itm", layer, batch_size, device, alpha)
    return {**metrics, **_chance(records), "pointing_game": pointing_game(preds), "layer": layer}, preds


def pointing_game(preds: Sequence) -> dict:
    """Hits (%) of the maps' maxima in the named boxes, overall and per split, with chance (the mean
    share of the image the boxes cover) and ``chance_object`` (the mean of 1 / objects).
    ``preds``: :class:`~albef.evaluation.grounding.GroundingPrediction`.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> rec = NS(image=None, box=[0, 0, 4, 4], split="seen", image_hw=(8, 8), candidates=[[0, 0, 4, 4]])
        >>> heat = torch.zeros(2, 2); heat[0, 0] = 1.0                    # top-left patch
        >>> out = pointing_game([NS(record=rec, heatmap=heat)])
        >>> out["accuracy"], out["chance"]
        (100.0, 25.0)
    """
    from PIL import Image

    from albef.gradcam import upsample_heatmap

    hits: dict[str, list[float]] = defaultdict(list)
    areas: dict[str, list[float]] = defaultdict(list)
    objects: list[float] = []
    sizes: dict[str, tuple[int, int]] = {}  # a scene has several referents: each image's header read once
    for p in preds:
        r = p.record
        hw = getattr(r, "image_hw", None) or sizes.get(r.image)
        if hw is None:
            with Image.open(r.image) as im:  # the header only: PIL decodes pixels lazily
                hw = sizes[r.image] = (im.height, im.width)
        H, W = hw
        heat = upsample_heatmap(p.heatmap, H, W)
        y, x = divmod(int(heat.argmax()), W)
        bx, by, bw, bh = r.box
        hits[r.split].append(100.0 * (bx <= x < bx + bw and by <= y < by + bh))
        areas[r.split].append(100.0 * bw * bh / (H * W))
        objects.append(100.0 / len(r.candidates))
    n = max(1, sum(len(v) for v in hits.values()))
    return {
        "accuracy": sum(sum(v) for v in hits.values()) / n,
        "chance": sum(sum(v) for v in areas.values()) / n,
        "chance_object": sum(objects) / n,
        "per_split": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "chance_per_split": {k: sum(v) / len(v) for k, v in sorted(areas.items())},
    }


def _chance(records: Sequence) -> dict:
    by_split: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_split[r.split].append(100.0 / len(r.candidates))
    return {
        "chance": sum(sum(v) for v in by_split.values()) / max(1, len(records)),
        "chance_per_split": {s: sum(v) / len(v) for s, v in sorted(by_split.items())},
    }


def oracle_heatmap(box: Sequence[float], image_height: int, image_width: int, grid: int) -> Tensor:
    """The best patch-level map of a box: each of the ``grid`` x ``grid`` patches' covered share."""
    x, y, w, h = box
    ys = torch.linspace(0, image_height, grid + 1)
    xs = torch.linspace(0, image_width, grid + 1)
    cover_y = (ys[1:].clamp(max=y + h) - ys[:-1].clamp(min=y)).clamp(min=0)
    cover_x = (xs[1:].clamp(max=x + w) - xs[:-1].clamp(min=x)).clamp(min=0)
    return (cover_y[:, None] * cover_x[None, :]) / ((image_height / grid) * (image_width / grid))


def oracle_pointing(
    records: Sequence,
    image_size: int,
    patch_size: int,
    alpha: float = 0.5,
    image_hw: tuple[int, int] | None = None,
    touched: bool = False,
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """Pointing accuracy (%) of :func:`oracle_heatmap` maps at a ``image_size / patch_size`` grid, scored
    as Grad-CAM's (bicubic upsampling, :func:`~albef.gradcam.box_scores`): the ceiling of the grid.

    Also the mean and minimum number of patches an object's box touches (``patches_per_object``)
    and covers by half or more (``patches_half_covered``), and the share (%) of the patches it touches
    that another object's box touches too (``shared_patch_share``: tokens that mix two objects).
    ``image_hw``: the records' image size (default: read from the first image). ``touched=True``:
    every patch the box touches counts 1 (a map that knows the patches, not how much of each is the
    object); ``noise``: add ``noise`` x N(0, 1) to every patch of the map (peak 1), clamped at 0 as
    Grad-CAM's maps are: a model that attends elsewhere too. The perfect map is right ~100 % at any
    grid; the noisy ones show what a coarse grid costs (measured on the emoji scenes, 1329 referents,
    noise 1.0, share/touched map: 4x4 74/81 %, 6x6 79/88 %, 8x8 82/92 %, 12x12 93/97 %, 16x16 98/99 %).
    """
    from PIL import Image

    from albef.gradcam import box_iou, box_scores, upsample_heatmap

    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    grid = image_size // patch_size
    if image_hw is None:
        with Image.open(records[0].image) as im:
            image_hw = (im.height, im.width)
    H, W = image_hw
    gen = torch.Generator().manual_seed(seed)
    right, n_touched, half, shared = [], [], [], []
    for r in records:
        patch_map = oracle_heatmap(r.box, H, W, grid)
        if touched:
            patch_map = (patch_map > 0).float()
        patch_map = patch_map / patch_map.max()
        if noise:
            patch_map = (patch_map + noise * torch.randn(patch_map.shape, generator=gen)).clamp(min=0)
        heat = upsample_heatmap(patch_map, H, W)
        scores = box_scores(heat, torch.tensor(r.candidates), alpha)
        best = int(scores.argmax())
        right.append(float(box_iou(torch.tensor([r.candidates[best]]), torch.tensor([r.box]))[0]) >= 0.5)
        cover = oracle_heatmap(r.box, H, W, grid)
        n_touched.append(int((cover > 0).sum()))
        half.append(int((cover >= 0.5).sum()))
        others = [oracle_heatmap(c, H, W, grid) > 0 for c in r.candidates if list(c) != list(r.box)]
        if others:
            mine = cover > 0
            shared.append(float((mine & torch.stack(others).any(0)).sum() / mine.sum().clamp(min=1)))
    n = max(1, len(records))
    return {
        "grid": grid,
        "accuracy": 100.0 * sum(right) / n,
        "patches_per_object": sum(n_touched) / n,
        "min_patches_per_object": min(n_touched, default=0),
        "patches_half_covered": sum(half) / n,
        "min_patches_half_covered": min(half, default=0),
        "shared_patch_share": 100.0 * sum(shared) / max(1, len(shared)),
        **_chance(records),
    }
