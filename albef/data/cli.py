"""``albef data shapes DIR``: write a generated image–caption set in the authors' JSON format.

PNG files of coloured shapes and, with paths relative to DIR: ``pretrain.json``
(``[{"image", "caption"}]``), ``retrieval_train.json`` (``[{"image", "caption", "image_id"}]``,
two phrasings per image), ``retrieval_test.json`` (``[{"image", "caption": [...]}]``) from
the last ``--test`` images, and ``ve_{train,test}.json`` / ``nlvr_{train,test}.json`` whose
labels follow from the pictures' colours — the data of the CPU recipes and of the tests.
``--corrupt K`` adds K broken entries to exercise bad-data handling: a truncated PNG (which
training reads as far as it goes, as the authors do, unless ``data.load_truncated_images=false``),
a text file named .png and a missing file (skipped and counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from albef.data.synthetic import COLORS, render_shapes
from albef.outputs import finish_build, start_build

#: what :func:`write_shapes` writes: annotation files and images
SHAPES_FILES = (
    *("pretrain.json", "retrieval_train.json", "retrieval_test.json", "ve_*.json", "nlvr_*.json"),
    *("images/[0-9]*.png", "images/bad_*.png"),
)


def shapes_settings(n: int, image_size: int = 64, seed: int = 0, corrupt: int = 0, test: int = 0) -> dict:
    """What a generated shapes set is built from (recorded beside it: albef.outputs.start_build)."""
    return {"kind": "shapes", "n": n, "image_size": image_size, "seed": seed, "corrupt": corrupt, "test": test}


def _rephrase(caption: str) -> str:
    _, color, shape, _, _, place = caption.split(" ")
    return f"the {shape} on the {place} is {color}"


def write_shapes(
    out: str | Path,
    n: int,
    image_size: int = 64,
    seed: int = 0,
    corrupt: int = 0,
    test: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` PNGs and the JSON files under ``out``; returns the pretraining JSON path. A set
    ``out`` holds that was built with other settings is refused unless ``overwrite``
    (:func:`albef.outputs.start_build`)."""
    out = Path(out)
    settings = shapes_settings(n, image_size, seed, corrupt, test)
    start_build(out, settings, SHAPES_FILES, overwrite)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, captions = render_shapes(n, image_size, torch.Generator().manual_seed(seed))
    entries = []
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        rel = f"images/{i:06d}.png"
        arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(arr).save(out / rel)
        entries.append({"image": rel, "caption": cap})
    for k in range(corrupt):
        rel = f"images/bad_{k:03d}.png"
        kind = k % 3
        if kind == 0:  # truncated PNG
            data = (out / entries[k % n]["image"]).read_bytes()
            (out / rel).write_bytes(data[: len(data) // 2])
        elif kind == 1:  # not an image at all
            (out / rel).write_text("this is not a PNG\n")
        else:  # missing file
            rel = f"images/missing_{k:03d}.png"
        entries.append({"image": rel, "caption": f"broken sample {k}"})
    path = out / "pretrain.json"
    path.write_text(json.dumps(entries, indent=0))
    clean = entries[:n]
    train, held = clean[: n - test], clean[n - test :]
    (out / "retrieval_train.json").write_text(
        json.dumps(
            [
                {"image": e["image"], "caption": c, "image_id": i}
                for i, e in enumerate(train)
                for c in (e["caption"], _rephrase(e["caption"]))
            ],
            indent=0,
        )
    )
    (out / "retrieval_test.json").write_text(
        json.dumps([{"image": e["image"], "caption": [e["caption"], _rephrase(e["caption"])]} for e in held], indent=0)
    )
    _write_reasoning(out, train, "train", seed)
    _write_reasoning(out, held, "test", seed + 1)
    finish_build(out, settings)
    return path


def _write_reasoning(out: Path, entries: list[dict], split: str, seed: int) -> None:
    """SNLI-VE- and NLVR2-style sets whose labels follow from the pictures (colours are the facts)."""
    if not entries:
        return
    g = torch.Generator().manual_seed(seed)
    colors = sorted(COLORS)
    facts = [e["caption"].split(" ")[1] for e in entries]

    def other(c: str) -> str:
        return [x for x in colors if x != c][int(torch.randint(len(colors) - 1, (), generator=g))]

    ve, nlvr = [], []
    for e, color in zip(entries, facts, strict=True):
        ve.append({"image": e["image"], "sentence": f"there is a {color} shape", "label": "entailment"})
        ve.append({"image": e["image"], "sentence": f"there is a {other(color)} shape", "label": "contradiction"})
        ve.append({"image": e["image"], "sentence": "the shape was drawn by a child", "label": "neutral"})
    n = len(entries)
    for i in range(n):
        j = int(torch.randint(n, (), generator=g))
        true = bool(torch.rand((), generator=g) < 0.5)
        said = facts[i] if true else other(facts[i])
        nlvr.append(
            {
                "images": [entries[i]["image"], entries[j]["image"]],
                "sentence": f"the left image has a {said} shape",
                "label": str(true),
            }
        )
    (out / f"ve_{split}.json").write_text(json.dumps(ve, indent=0))
    (out / f"nlvr_{split}.json").write_text(json.dumps(nlvr, indent=0))


def _shards(args: argparse.Namespace) -> int:
    from albef.data.annotations import read_annotations
    from albef.data.pretrain import parse_pretrain_entry
    from albef.data.retrieval import read_retrieval_train
    from albef.data.shards import remove_shards, write_shards

    if args.format == "retrieval":
        records, bad = read_retrieval_train(args.files, args.image_root, args.max_words)
    else:
        records, bad = read_annotations(args.files, parse_pretrain_entry(args.image_root, args.max_words))
    for b in bad[:20]:
        print(f"skipped annotation {b}", file=sys.stderr)
    if args.overwrite:  # the old set's files, so that no stale shard stays beside the new index
        remove_shards(args.out)
    summary = write_shards(records, args.out, args.max_count)
    for m in summary["missing"][:20]:
        print(f"skipped missing image {m['image']}: {m['error']}", file=sys.stderr)
    print(
        f"wrote {summary['count']} samples in {len(summary['shards'])} shards to {args.out} "
        f"({len(bad)} bad annotation entries, {len(summary['missing'])} missing images skipped)"
    )
    return 0


def _refcoco(args: argparse.Namespace) -> int:
    from albef.data.refcoco import EVAL_SPLITS, convert_refcoco

    counts = convert_refcoco(args.files, args.refer, args.out, args.candidates, args.candidates_file, args.split_by)
    splits = ", ".join(f"{k} {v}" for k, v in counts.items() if k.startswith(EVAL_SPLITS))
    print(f"wrote {counts['written']} expressions to {args.out} ({splits})")
    if counts["no_candidates"]:
        print(
            f"skipped {counts['no_candidates']} expressions whose image has no candidate box "
            "(they are left out of the accuracy)",
            file=sys.stderr,
        )
    if counts["other_split"]:
        print(f"skipped {counts['other_split']} expressions of refs outside {'/'.join(EVAL_SPLITS)}", file=sys.stderr)
    if counts["dropped_boxes"]:
        print(f"dropped {counts['dropped_boxes']} candidate boxes without area", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("shapes", help="generated coloured shapes with captions")
    s.add_argument("dir")
    s.add_argument("--n", type=int, default=2048)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--corrupt", type=int, default=0, help="add this many broken entries")
    s.add_argument("--test", type=int, default=0, help="hold out this many images for retrieval_test.json")
    s.add_argument("--overwrite", action="store_true", help="replace a set DIR holds that was built otherwise")
    e = sub.add_parser("easyvqa", help="easy-VQA (PyPI package easy-vqa) in the authors' VQA format")
    e.add_argument("dir")
    r = sub.add_parser(
        "refcoco", help="the authors' RefCOCO+ files (REFER refs, dets.json/cocos.json) -> grounding evaluation JSON"
    )
    r.add_argument("files", nargs="+", help="the authors' refcoco+_val.json and/or refcoco+_test.json")
    r.add_argument("--refer", required=True, help="the folder of refs(unc).p, instances.json, dets.json, cocos.json")
    r.add_argument("--out", required=True, help="the grounding JSON to write")
    r.add_argument(
        "--candidates",
        choices=["dets", "gt"],
        default="dets",
        help="dets: detections (dets.json; splits val_d, testA_d, testB_d); gt: COCO boxes (cocos.json)",
    )
    r.add_argument("--candidates-file", default=None, help="a candidates file other than the folder's")
    r.add_argument("--split-by", default="unc", help="read the refs from refs(SPLIT_BY).p")
    m = sub.add_parser(
        "emoji",
        help="emoji images (Google, Twitter styles) with names: pretraining, "
        "retrieval split by emoji, grounding windows",
    )
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--windows", type=int, default=400, help="grounding training windows (test: half)")
    m.add_argument("--overwrite", action="store_true", help="replace a set DIR holds that was built otherwise")
    w = sub.add_parser("shards", help="JSON (pretraining or retrieval format) -> WebDataset tar shards")
    w.add_argument("files", nargs="+", help="the authors' JSON annotation files")
    w.add_argument("--out", required=True)
    w.add_argument("--image-root", default=None)
    w.add_argument(
        "--format",
        choices=["pretrain", "retrieval"],
        default="pretrain",
        help="retrieval keeps each entry's image id (id-aware ITC)",
    )
    w.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
    w.add_argument("--max-words", type=int, default=30)
    for q in (r, w):
        q.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    args = p.parse_args(argv)
    if args.what == "refcoco" and Path(args.out).exists() and not args.overwrite:
        p.error(f"{args.out} exists: give another --out, or --overwrite to replace it")
    from albef.data.shards import INDEX_NAME

    if args.what == "shards" and (Path(args.out) / INDEX_NAME).exists() and not args.overwrite:
        p.error(f"{args.out} already holds shards: give another --out, or --overwrite to replace them")
    if args.what == "shards":
        return _shards(args)
    if args.what == "refcoco":
        return _refcoco(args)
    if args.what == "emoji":
        from albef.data.emoji import build_emoji

        counts = build_emoji(args.dir, args.seed, args.windows, overwrite=args.overwrite)
        print(f"wrote the emoji data to {args.dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    if args.what == "easyvqa":
        from albef.data.easyvqa import build_easyvqa

        counts = build_easyvqa(args.dir)
        print(f"wrote easy-VQA to {args.dir}: {counts['train']} train and {counts['test']} test questions")
        return 0
    path = write_shapes(args.dir, args.n, args.image_size, args.seed, args.corrupt, args.test, args.overwrite)
    print(f"wrote {args.n + args.corrupt} entries to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
