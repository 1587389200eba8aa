"""``albef data refcoco``: RefCOCO+ in the authors' files -> the grounding evaluator's JSON.

Reads the authors' expression files (``refcoco+_val.json``, ``refcoco+_test.json``: entries
``{"image", "text", "ref_id"}``), the REFER toolkit's ``refs(unc).p`` and ``instances.json`` (each
ref's image, annotation and split; the annotation's ``bbox`` is the ground-truth box) and the
candidate boxes keyed by image id: ``dets.json`` (detections, the default) or ``cocos.json`` (the
COCO ground-truth boxes, ``candidates="gt"``). Writes one self-contained entry per expression,
``{"image", "text", "ref_id", "box", "candidates", "split"}``, for ``albef evaluate grounding``.

The split is the ref's (``val``, ``testA``, ``testB``); with detections it gets the authors' metric
suffix (``val_d``, ``testA_d``, ``testB_d``), so the per-split accuracies carry the authors' names.
Refs of other splits (``train``) are not in the authors' metrics and are skipped and counted, as
are expressions whose image has no candidate box. ``refs(unc).p`` is read with an unpickler that
builds nothing but lists, dicts, strings and numbers.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from albef.checkpoints.files import atomic_write_text
from albef.data.annotations import read_json_file

EVAL_SPLITS = ("val", "testA", "testB")
PROTOCOLS = {"dets": "dets.json", "gt": "cocos.json"}


class _PlainUnpickler(pickle.Unpickler):
    """Builds only the pickle format's own types; any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names the class or function {module}.{name}")


def load_plain_pickle(path: str | Path) -> Any:
    """The object in a pickle file that holds only the pickle format's own types (lists, dicts,
    tuples, sets, strings, bytes and numbers).

    Anything that names a class or function (which unpickling would import and call) is refused
    with an error naming the file. Python 2 strings are decoded as UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is the REFER toolkit's refs file (refcoco+/refs(unc).p)")
    data = path.read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: {e}, and this file should hold only lists, dicts, strings and numbers (as the REFER "
            "toolkit's refs(unc).p does): refusing to load it. Use the refs(unc).p distributed with the REFER data"
        ) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); download it again") from None


def _file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return path


def _boxes(raw: Any, where: str) -> tuple[list[list[float]], int]:
    """Candidate boxes ``[x, y, w, h]`` (the first four numbers of each entry, or a ``bbox``
    field) and how many without area were dropped (they can never be the authors' choice)."""
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of boxes, found a {type(raw).__name__}")
    boxes, dropped = [], 0
    for i, b in enumerate(raw):
        if isinstance(b, dict):
            b = b.get("bbox", b.get("box"))
        if not (isinstance(b, list) and len(b) >= 4 and all(isinstance(v, (int, float)) for v in b[:4])):
            raise ValueError(f"{where}[{i}]: expected a box [x, y, w, h, ...], found {b!r}")
        if b[2] <= 0 or b[3] <= 0:
            dropped += 1
            continue
        boxes.append([float(v) for v in b[:4]])
    return boxes, dropped


def _refs_index(refs_path: Path) -> dict[int, dict]:
    refs = load_plain_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, found a {type(refs).__name__}")
    index = {}
    for i, ref in enumerate(refs):
        if not (isinstance(ref, dict) and all(k in ref for k in ("ref_id", "ann_id", "image_id", "split"))):
            raise ValueError(f"{refs_path}[{i}]: not a REFER ref (a dict with ref_id, ann_id, image_id, split)")
        index[ref["ref_id"]] = ref
    return index


def _ann_boxes(instances_path: Path) -> dict[int, Any]:
    instances = read_json_file(instances_path)
    anns = instances.get("annotations") if isinstance(instances, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{instances_path}: expected the REFER instances.json, an object with an 'annotations' list")
    return {a["id"]: a.get("bbox") for a in anns if isinstance(a, dict) and "id" in a}


def convert_refcoco(
    annotations: str | Path | Sequence[str | Path],
    refer_dir: str | Path,
    out: str | Path,
    candidates: str = "dets",
    candidates_file: str | Path | None = None,
    split_by: str = "unc",
) -> dict[str, int]:
    """Write the grounding evaluator's JSON for the authors' RefCOCO+ expression files.

    ``refer_dir`` is the authors' ``data/refcoco+``: ``refs(unc).p``, ``instances.json`` and the
    candidates, ``dets.json`` (``candidates="dets"``) or ``cocos.json`` (``"gt"``);
    ``candidates_file`` names another. Returns counts: ``written``, ``no_candidates`` and
    ``other_split`` (skipped expressions), ``dropped_boxes`` (candidates without area) and one per
    split written.

    Example:
        >>> counts = convert_refcoco(["refcoco+_val.json", "refcoco+_test.json"], "data/refcoco+",
        ...                          "refcoco+_grounding.json")  # doctest: +SKIP
        >>> sorted(k for k in counts if k.endswith("_d"))  # doctest: +SKIP
        ['testA_d', 'testB_d', 'val_d']
    """
    if candidates not in PROTOCOLS:
        raise ValueError(f"candidates must be 'dets' (detections, dets.json) or 'gt' (cocos.json), not {candidates!r}")
    files = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
    if not files:
        raise ValueError("no annotation file given: pass the authors' refcoco+_val.json and/or refcoco+_test.json")
    refer = Path(refer_dir)
    refs_path = _file(refer / f"refs({split_by}).p", f"the REFER toolkit's refs file; is {refer} its refcoco+ folder?")
    inst_path = _file(refer / "instances.json", f"the REFER toolkit's annotations; is {refer} its refcoco+ folder?")
    cand_path = Path(candidates_file) if candidates_file else refer / PROTOCOLS[candidates]
    _file(cand_path, f"the candidate boxes keyed by image id (the authors' {PROTOCOLS[candidates]})")
    for f in files:
        _file(Path(f), "the authors' expression file, e.g. refcoco+_val.json")

    refs = _refs_index(refs_path)
    ann_boxes = _ann_boxes(inst_path)
    by_image = read_json_file(cand_path)
    if not isinstance(by_image, dict):
        raise ValueError(f"{cand_path}: expected an object of candidate box lists keyed by image id")
    suffix = "_d" if candidates == "dets" else ""

    entries: list[dict] = []
    counts: Counter[str] = Counter()
    cand_cache: dict[str, list[list[float]]] = {}
    for f in files:
        expressions = read_json_file(f)
        if not isinstance(expressions, list):
            raise ValueError(f"{f}: expected the authors' JSON list of {{'image', 'text', 'ref_id'}} entries")
        for i, e in enumerate(expressions):
            where = f"{f}[{i}]"
            if not (isinstance(e, dict) and all(k in e for k in ("image", "text", "ref_id"))):
                raise ValueError(f"{where}: expected an object with 'image', 'text' and 'ref_id'")
            ref_id = e["ref_id"]
            ref = refs.get(ref_id)
            if ref is None and isinstance(ref_id, str) and ref_id.isdigit():
                ref = refs.get(int(ref_id))
            if ref is None:
                raise ValueError(
                    f"{where}: ref_id {ref_id!r} is not in {refs_path}; the expression file and the REFER "
                    "annotations are from different data sets: use the refcoco+ refs(unc).p with the authors' "
                    "refcoco+ files"
                )
            if ref["split"] not in EVAL_SPLITS:
                counts["other_split"] += 1
                continue
            box = ann_boxes.get(ref["ann_id"])
            if box is None:
                raise ValueError(
                    f"{inst_path}: no annotation {ref['ann_id']} (the box of ref {ref['ref_id']} in {refs_path}): "
                    "use the instances.json from the same REFER folder"
                )
            gt, bad = _boxes([box], f"{inst_path} annotation {ref['ann_id']} bbox")
            if bad:
                raise ValueError(
                    f"{inst_path}: annotation {ref['ann_id']} (ref {ref['ref_id']}) has a box without area"
                )
            key = str(ref["image_id"])
            if key not in cand_cache:
                cand_cache[key], dropped = _boxes(by_image.get(key, []), f"{cand_path}[{key!r}]")
                counts["dropped_boxes"] += dropped
            if not cand_cache[key]:
                counts["no_candidates"] += 1
                continue
            split = ref["split"] + suffix
            entries.append(
                {
                    "image": e["image"],
                    "text": e["text"],
                    "ref_id": ref["ref_id"],
                    "box": gt[0],
                    "candidates": cand_cache[key],
                    "split": split,
                }
            )
            counts[split] += 1
    if not entries:
        raise ValueError(
            f"no expression written from {', '.join(map(str, files))}: "
            f"{counts['no_candidates']} have no candidate box in {cand_path}, {counts['other_split']} are "
            f"not in {'/'.join(EVAL_SPLITS)}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(entries))
    return {"written": len(entries), "no_candidates": 0, "other_split": 0, "dropped_boxes": 0, **counts}
