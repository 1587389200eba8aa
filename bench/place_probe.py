"""Where one named object is: captions of a single object's place ("a cow at the top") added to the
main job's pretraining, and whether any part of the model learns to read that place.

    .venv/bin/python bench/place_probe.py build --data data
    .venv/bin/python bench/place_probe.py run runs/place --data data --share 0.5 [--pairs] [--steps N] \\
        [--recipe '{"model": {"overrides": {"vision": {"image_size": 128, "pos_embed_init": "sincos"}}}}']
    .venv/bin/python bench/place_probe.py score runs/place/pretrain/checkpoint_last.pt --data data

A relation ("A left of B") needs three links: image tokens that carry their place, a cross-attention
from a name to its object, and a comparison of two attended places. An absolute place needs only the
first two, and with a single object on the canvas only the first: a curriculum towards relations, and
a finer test of where the chain breaks (docs/results.md, "Where one object is").

``build`` writes ``DATA/place/``: ``train.json`` and ``test.json`` (``{"image", "caption", "word",
"kind"}``): ``single``, one emoji of the scenes alone on a 128 px canvas at a random place (one image
in ten held out), and ``scene``, a scene's caption of one of its two named groups when every object
of the group lies on one side (its centre outside the middle 16 % of the axis; the scenes' own split);
``twins.json``, each test caption against the same caption with the opposite place; ``pairs.json``,
units of two rows whose captions differ by the place word alone: an emoji and the same emoji at the
mirrored place, and a scene with its exchange sibling where the named object, in the other group's
slots, has the same count.

``run`` is the job's pretraining (``albef.cli.mainjob.scene_pretraining``, the same steps and batch)
with place rows added, ``--share`` times the number of scene rows, every single first; with
``--pairs`` the rows come from ``pairs.json`` and the sampler keeps each unit in one batch
(``data.group_size: 2``), so ITC, blind to the place word, hands ITM the caption that only the place
tells apart; where the job's sampler takes units of two anyway (``sibling_share`` > 0), place rows
without ``--pairs`` are paired at random. Then ``score``, and the main job's scene evaluation.

``score``: MLM's choice of the masked place word against its opposite; ITC and ITM on the place twins
(chance 50 %); and how well the place can be read linearly from the image's mean token, its [CLS] and
the fused state of the masked place word: a ridge classifier on standardised features (closed form)
and a fresh linear head trained by AdamW on the raw frozen features with the pretraining's learning
rate and as many examples as MLM sees masked place words in the default run; with the gap between the
two classes' mean states over the states' total spread, its sampling noise taken out (the share of the
state that says where; 0 where the classes' means differ no more than chance makes them). For a
single emoji the image alone says where it is; in a scene it says where both named groups are, and
only a fused state that looks at the named one can say more than the image's mean token does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

S = 128  # the job's image size (albef.cli.mainjob.IMAGE_SIZE)
PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def side(cx: float, cy: float, axis: str) -> str | None:
    """The side of the canvas a centre lies on along ``axis`` ("x" or "y"), None in the middle 16 %.

    >>> side(20, 64, "x"), side(64, 64, "x"), side(64, 110, "y")
    ('left', None, 'bottom')
    """
    v = cx if axis == "x" else cy
    if v < 0.42 * S:
        return "left" if axis == "x" else "top"
    if v > 0.58 * S:
        return "right" if axis == "x" else "bottom"
    return None


def _centre(boxes) -> tuple[float, float]:
    return sum(b[0] + b[2] / 2 for b in boxes) / len(boxes), sum(b[1] + b[3] / 2 for b in boxes) / len(boxes)


def _places(scene: dict) -> dict[tuple[str, str], tuple[str, int]]:
    """(name, axis) -> (side, count) for each named group lying wholly on one side of ``axis``."""
    groups: dict[str, list] = {}
    for o in scene["objects"]:
        if o["group"] in ("a", "b"):
            groups.setdefault(o["name"], []).append(o["box"])
    out = {}
    for name, boxes in groups.items():
        for axis in ("x", "y"):
            w = side(*_centre(boxes), axis)
            if w is not None and all(side(*_centre([b]), axis) == w for b in boxes):
                out[name, axis] = (w, len(boxes))
    return out


def build(data: Path, singles_per_emoji: int = 120, pairs_per_emoji: int = 60, seed: int = 0) -> dict:
    from PIL import Image

    from albef.data.scene_grammar import noun_phrase
    from albef.data.scene_layout import paste_in_slot

    rng = random.Random(seed)
    scenes = json.loads((data / "scenes" / "scenes.json").read_text())
    out = data / "place"
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "test": []}

    def row(image: str, name: str, count: int, w: str, kind: str) -> dict:
        return {"image": image, "caption": f"{noun_phrase(name, count)} {PLACE[w]}", "word": w, "kind": kind}

    for sc in scenes:
        for (name, _), (w, count) in _places(sc).items():
            rows["train" if sc["split"] == "train" else "test"].append(
                row(f"scenes/{sc['image']}", name, count, w, "scene")
            )
    train = [sc for sc in scenes if sc["split"] == "train"]
    image_of = {
        o["name"]: data / "emoji" / "images" / o["source"] / o["emoji_image"] for sc in train for o in sc["objects"]
    }
    emoji = {}
    for name, path in sorted(image_of.items()):
        with Image.open(path) as im:
            emoji[name] = im.convert("RGB")

    def draw(name: str, x: int, y: int, s: int, rel: str) -> list[int]:
        canvas = Image.new("RGB", (S, S), (255, 255, 255))
        box = paste_in_slot(canvas, emoji[name], [x, y, s, s])
        canvas.save(data / rel)
        return box

    k = 0
    for name in emoji:
        for i in range(singles_per_emoji):
            s = rng.randint(28, 38)
            rel = f"place/img/single-{k}.png"
            box, k = draw(name, rng.randint(4, S - 4 - s), rng.randint(4, S - 4 - s), s, rel), k + 1
            for axis in ("x", "y"):
                w = side(*_centre([box]), axis)
                if w is not None:
                    rows["test" if i % 10 == 0 else "train"].append(row(rel, name, 1, w, "single"))
    units = []  # rows 2i, 2i+1: the same named object on opposite sides
    for i in range(0, len(train) - 1, 2):
        a, b = train[i], train[i + 1]  # a scene and its exchange sibling
        pa, pb = _places(a), _places(b)
        for key, (w, count) in pa.items():
            # the counts stay with the slots in a sibling: only a group of the same count there
            # gives a caption that differs by the place word alone
            if key in pb and pb[key] == (OPPOSITE[w], count):
                units.append(
                    [
                        row(f"scenes/{a['image']}", key[0], count, w, "scene"),
                        row(f"scenes/{b['image']}", key[0], count, pb[key][0], "scene"),
                    ]
                )
    for name in emoji:
        for _ in range(pairs_per_emoji):
            s, axis = rng.randint(28, 38), rng.choice("xy")
            u, v = rng.randint(4, int(0.42 * S - s / 2) - 1), rng.randint(4, S - 4 - s)  # centre on one side
            unit = []
            for mirrored in (False, True):
                uu = S - u - s if mirrored else u
                x, y = (uu, v) if axis == "x" else (v, uu)
                rel = f"place/img/pair-{k}.png"
                box, k = draw(name, x, y, s, rel), k + 1
                unit.append(row(rel, name, 1, side(*_centre([box]), axis), "single"))
            units.append(unit)
    twins = [
        {
            "image": r["image"],
            "caption": r["caption"],
            "twins": [{"kind": "place", "caption": r["caption"].rsplit(" ", 1)[0] + " " + OPPOSITE[r["word"]]}],
            "split": r["kind"],
            "scene_id": str(i),
        }
        for i, r in enumerate(rows["test"])
    ]
    for name, value in (("train", rows["train"]), ("test", rows["test"]), ("pairs", units), ("twins", twins)):
        (out / f"{name}.json").write_text(json.dumps(value))
    counts = {split: dict(Counter(r["kind"] for r in r_)) for split, r_ in rows.items()}
    counts["pairs"] = dict(Counter(u[0]["kind"] for u in units))
    return counts


def _states(model, tok, tf, data: Path, rows: list[dict], batch: int = 64) -> dict[str, Tensor]:
    """For each row with its place word masked: the image's mean token and [CLS], the fused state of
    the [MASK], and MLM's logit of the word minus its opposite's."""
    from albef.data.pretrain import load_image

    ids = {w: tok(w, return_tensors=False).input_ids[0][1] for w in OPPOSITE}
    out: dict[str, list] = {"mean": [], "cls": [], "mask": [], "margin": []}
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        caps = [r["caption"].rsplit(" ", 1)[0] + " [MASK]" for r in chunk]  # the place word is the last
        t = tok(caps, max_length=model.config.max_text_len)
        with torch.no_grad():
            img = model.encode_image(torch.stack([tf(load_image(str(data / r["image"]))) for r in chunk]))
            fused = model.fuse(model.encode_text(t.input_ids, t.attention_mask), t.attention_mask, img)
            state = fused[t.input_ids == tok.mask_token_id]  # one [MASK] a row
            logits = model.mlm_logits(state)
        out["mean"].append(img[:, 1:].mean(1).float())
        out["cls"].append(img[:, 0].float())
        out["mask"].append(state.float())
        out["margin"].append(
            torch.stack([logits[j, ids[r["word"]]] - logits[j, ids[OPPOSITE[r["word"]]]] for j, r in enumerate(chunk)])
        )
    return {k: torch.cat(v) for k, v in out.items()}


def readout(
    xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, lr: float, steps: int, batch: int, seed: int = 0
) -> dict:
    """Held-out accuracy of a standardised ridge classifier (closed form) and of a fresh linear head
    trained by AdamW on the frozen features; the class-mean gap over the total spread."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = torch.cat([(xtr - mu) / sd, torch.ones(len(xtr), 1)], 1).double(), (2.0 * ytr - 1).double()
    w = torch.linalg.solve(a.T @ a + 10 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    ridge = ((torch.cat([(xte - mu) / sd, torch.ones(len(xte), 1)], 1).double() @ w > 0).long() == yte).double()
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], 2)
    with torch.no_grad():  # its start drawn from the seed too: the same figures from `run` and `score`
        bound = xtr.shape[1] ** -0.5
        head.weight.copy_((torch.rand(head.weight.shape, generator=g) * 2 - 1) * bound)
        head.bias.copy_((torch.rand(head.bias.shape, generator=g) * 2 - 1) * bound)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.02)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(head(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fresh = (head(xte).argmax(1) == yte).double()
    # ||mean_1 - mean_0||² overshoots by tr(cov_1)/n_1 + tr(cov_0)/n_0 on finite samples: taken out
    a1, a0 = xtr[ytr == 1], xtr[ytr == 0]
    gap2 = (a1.mean(0) - a0.mean(0)).pow(2).sum() - a1.var(0).sum() / len(a1) - a0.var(0).sum() / len(a0)
    gap = gap2.clamp(min=0).sqrt() / xtr.var(0).sum().sqrt()
    return {
        "ridge": round(100 * ridge.mean().item(), 1),
        "fresh_head": round(100 * fresh.mean().item(), 1),
        "gap_over_spread": round(gap.item(), 3),
    }


def score(model, data: Path, head_lr: float = 5e-4, head_examples: int = 940, head_batch: int = 2) -> dict:
    """``head_examples``: 650 steps x 32 samples x 4,000 / 13,280 place rows x 15 % masked, the masked
    place words MLM sees in ``run --share 0.5``."""
    from albef.data.transforms import test_transform
    from albef.evaluation.scenes import evaluate_twins, read_twins
    from albef.text import Tokenizer

    tok, tf = Tokenizer(add_sep=model.config.add_sep), test_transform(model.config.vision.image_size)
    test = json.loads((data / "place" / "test.json").read_text())
    if not test:
        raise ValueError(f"{data / 'place' / 'test.json'} holds no caption: build it from more scenes")
    twins = evaluate_twins(model, read_twins(data / "place" / "twins.json", str(data)), tok, tf)
    res: dict = {
        "twins": {k: {h: round(v[h]["place"], 1) for h in ("itc", "itm")} for k, v in twins["per_split"].items()}
    }
    states = {"test": _states(model, tok, tf, data, test)}
    res["mlm"] = {}
    for kind in ("single", "scene"):
        margin = states["test"]["margin"][[r["kind"] == kind for r in test]]
        res["mlm"][kind] = round(100 * (margin > 0).double().mean().item(), 1) if len(margin) else None
    every = json.loads((data / "place" / "train.json").read_text())
    for kind in ("single", "scene"):
        # the fit: every single, 3,000 scene captions (a fixed draw)
        train = random.Random(0).sample(
            [r for r in every if r["kind"] == kind], k=min(3000, sum(r["kind"] == kind for r in every))
        )
        res[f"{kind}_readout"] = {"x": None, "y": None}  # None: a small data set may lack a kind on an axis
        if not train:
            continue
        st = _states(model, tok, tf, data, train)
        for axis, words in (("x", ("left", "right")), ("y", ("top", "bottom"))):
            on_tr = torch.tensor([r["word"] in words for r in train])
            on_te = torch.tensor([r["kind"] == kind and r["word"] in words for r in test])
            ytr = torch.tensor([int(r["word"] == words[0]) for r in train])[on_tr]
            yte = torch.tensor([int(r["word"] == words[0]) for r in test])[on_te]
            if not on_te.any() or len(set(ytr.tolist())) < 2:  # both sides needed to fit
                continue
            res[f"{kind}_readout"][axis] = {
                k: readout(
                    st[k][on_tr],
                    ytr,
                    states["test"][k][on_te],
                    yte,
                    head_lr,
                    head_examples // head_batch,
                    head_batch,
                )
                for k in ("mean", "cls", "mask")
            }
    return res


def _singles_first(items: list, rng: random.Random, row=lambda x: x) -> list:
    """``items`` shuffled, then every single emoji's row (or unit, ``row`` its first row) first."""
    rng.shuffle(items)
    items.sort(key=lambda x: row(x)["kind"] != "single")  # stable: still shuffled among themselves
    return items


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from fusion_probe import relation_mlm
    from scene_variant import train_and_evaluate

    from albef.cli.mainjob import SCALES, scene_pretraining
    from albef.recipes import _merge

    s = {**SCALES["full"], "pretrain": args.steps, **args.scale}
    args.out.mkdir(parents=True, exist_ok=True)
    d = _merge(scene_pretraining(args.out, args.data, s, args.seed).to_dict(), args.recipe)
    train_file = Path(d["data"]["train_files"][0])
    rows = json.loads(train_file.read_text())
    n_scene = sum(r["image"].startswith("scenes/") for r in rows)
    rng = random.Random(args.seed + 7)
    if args.pairs or d["data"]["group_size"] == 2:
        # the sampler takes units of two rows: the job wrote its rows so (siblings, or random pairs)
        assert len(rows) % 2 == 0, "the job's pretraining rows come in units of two"
        if args.pairs:
            place = _singles_first(json.loads((args.data / "place" / "pairs.json").read_text()), rng, lambda u: u[0])
        else:  # single place rows, paired at random as the job pairs its loose rows
            flat = _singles_first(json.loads((args.data / "place" / "train.json").read_text()), rng)
            place = [flat[i : i + 2] for i in range(0, len(flat) - 1, 2)]
        place = [
            [{"image": r["image"], "caption": r["caption"]} for r in u]
            for u in place[: round(args.share * n_scene / 2)]
        ]
        n_place = 2 * len(place)
        units = place + [rows[i : i + 2] for i in range(0, len(rows), 2)]
        rng.shuffle(units)
        rows = [r for u in units for r in u]
        d["data"]["group_size"] = 2
    else:
        place = _singles_first(json.loads((args.data / "place" / "train.json").read_text()), rng)
        n_place = min(len(place), round(args.share * n_scene))
        rows = rows + [{"image": p["image"], "caption": p["caption"]} for p in place[:n_place]]
        rng.shuffle(rows)
    train_file.write_text(json.dumps(rows))
    model, sc, seconds, evaluation_s = train_and_evaluate(d, args.out, args.data, s["k"])
    res = {
        "share": args.share,
        "pairs": args.pairs,
        "place_rows": n_place,
        "rows": len(rows),
        "recipe": args.recipe,
        "steps": args.steps,
        "scale": args.scale,
        "seed": args.seed,
        "pretraining_s": round(seconds, 1),
        "place": score(model, args.data),
        "relation_mlm": relation_mlm(model, args.data / "scenes" / "twins_test.json", args.data / "scenes")["all"],
        "twins": sc["twins"],
        "pointing": sc["pointing"]["pointing_game"],
        "retrieval_all": sc["retrieval"]["all"],
        "evaluation_s": round(evaluation_s, 1),
    }
    (args.out / "place_probe.json").write_text(json.dumps(res, indent=1))
    return res


def _summary(res: dict) -> str:
    p = res["place"] if "place" in res else res
    lines = [
        f"MLM place word: single {p['mlm']['single']}, scene {p['mlm']['scene']}",
        "place twins ITC / ITM: " + ", ".join(f"{k} {v['itc']} / {v['itm']}" for k, v in p["twins"].items()),
    ]
    for kind, axis in ((k, a) for k in ("single", "scene") for a in ("x", "y")):
        r = p[f"{kind}_readout"][axis]
        if r is None:
            continue
        lines.append(
            f"{kind}, {axis}: "
            + "; ".join(
                f"{k} ridge {v['ridge']} head {v['fresh_head']} gap {v['gap_over_spread']}" for k, v in r.items()
            )
        )
    if "twins" in res and "place" in res:
        t, r = res["twins"], res["retrieval_all"]
        lines.append(f"relation twins ITC {t['itc']['swap']:.1f} ITM {t['itm']['swap']:.1f}")
        lines.append(f"MLM on the relation word {res['relation_mlm']['accuracy']}")
        lines.append(f"TR@1 {r['itc']['txt_r1']:.1f} -> {r['itm']['txt_r1']:.1f}")
        lines.append(f"IR@1 {r['itc']['img_r1']:.1f} -> {r['itm']['img_r1']:.1f}")
        lines.append(f"pointing {res['pointing']['accuracy']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write DATA/place/")
    b.add_argument("--data", type=Path, default=Path("data"))
    r = sub.add_parser("run", help="pretrain with place rows, then score")
    r.add_argument("out", type=Path)
    r.add_argument("--data", type=Path, default=Path("data"))
    r.add_argument("--share", type=float, default=0.5, help="place rows per scene row")
    r.add_argument("--pairs", action="store_true", help="place rows in units of two that differ by the place only")
    r.add_argument("--steps", type=int, default=650)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--recipe", type=json.loads, default={}, help="JSON merged into the pretraining recipe")
    r.add_argument("--scale", type=json.loads, default={}, help="JSON: entries of the main job's FULL scale")
    c = sub.add_parser("score", help="score a checkpoint")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--data", type=Path, default=Path("data"))
    args = p.parse_args(argv)
    if args.cmd == "build":
        print(build(args.data))
    elif args.cmd == "run":
        print(_summary(run(args)))
    else:
        from albef.checkpoints.pretrained import load_inference_model

        res = score(load_inference_model(args.checkpoint), args.data)
        (args.checkpoint.parent / "place_probe.json").write_text(json.dumps(res, indent=1))
        print(_summary(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
