"""Compositional emoji scenes: where things are, said in words (``build_scenes``).

The emoji task of :mod:`albef.data.emoji` has one object per image, so nothing in it depends on
how words relate to places, and ITM and Grad-CAM have nothing to learn. Here a few real emoji
images are pasted on a plain canvas at known positions (the boxes are exact) and described by a
small grammar (:mod:`albef.data.scene_grammar`)::

    caption := NP(A) REL NP(B)
    NP(x)   := "a"/"an" NAME(x)  |  "two" PLURAL(NAME(x))
    REL     := "to the left of" | "to the right of" | "above" | "below"

e.g. "a cat face to the left of a red heart", "a star above two red hearts". A scene holds exactly
two different emoji that its caption names, A and B, at most one of them twice (2 or 3 objects),
and optionally distractors: other emoji the caption says nothing of (``distractors``). A group of two
copies lies across the relation's axis (stacked for left/right, side by side for above/below), so
the relation holds for every object: each A box ends before each B box begins along the axis,
and the centres differ more along it than across it. Every image has its caption and the
converse ("B to the right of A"), both true.

Training scenes can come in siblings (``siblings``): each followed by the same layout with A and B
exchanged, the pair a sampler keeps in one batch (``data.group_size: 2``) so that ITC's mined hard
negatives include the caption only the relation tells apart. In a short budget that starves ITM
of every other negative; the main job shuffles its scenes one by one (docs/results.md measures both).
With ``siblings="mirror"`` the sibling keeps the objects and counts and reflects their places, so
that its caption is the scene's swapped twin for every scene (the exchanged sibling's is only where
both counts are one).

Hard cases by construction (``twins_test.json``): each test image's caption and altered twins,
each false of the image and differing from the caption in one way only:

* ``swap``: A and B exchanged, relation kept ("B left of A" for "A left of B");
* ``object``: A or B replaced by an emoji not in the scene (from the same seen/held-out pool);
* ``count``: a group of one made two (1 -> 2 only: "a heart" where two are is arguably true);
* ``attribute``: a colour word of a name changed, where the new name is another emoji's
  ("red heart" -> "blue heart"); only for scenes that have one.

Splits (``splits.json``): a held-out set of emoji (``unseen_emoji``, default 10 %) never appears in
a training scene; a set of pairs of seen emoji (``unseen_pair``) is never put together in
training; ``seen`` test scenes are new layouts of pairs from training (the in-distribution
reference). Every seen emoji appears in training (A cycles through them). Test captions are
unique across the test subsets (up to the converse), so retrieval has one right image per text.

Files (paths relative to the output folder), in the authors' formats:

* ``pretrain.json`` ``{"image", "caption": [caption, converse]}``;
* ``retrieval_train.json`` ``{"image", "caption", "image_id"}`` (both captions, one entry each);
* ``retrieval_test.json`` and ``retrieval_test_{seen,unseen_pair,unseen_emoji}.json``
  ``{"image", "caption": [caption, converse]}``;
* ``grounding_train.json`` ``{"image", "text", "ref_id"}`` and ``grounding_test.json``
  ``{"image", "text", "ref_id", "box", "candidates", "split"}``: the text names an object that is
  alone of its kind in the scene, the candidates are all the scene's object boxes, ``split`` the
  test subset;
* ``twins_test.json`` ``{"image", "caption", "twins": [{"kind", "caption"}], "split", "scene_id"}``;
* ``scenes.json`` (every scene: objects, names, boxes, source image and style), ``splits.json``,
  ``config.json`` (the arguments), ``ATTRIBUTION.md`` (the emoji sources' licences).

Image and patch size (:data:`RECOMMENDED`): objects are ``object_frac`` (0.22-0.30) of the side.
On the test referents, :func:`albef.evaluation.scenes.oracle_pointing` gives what each grid leaves
to Grad-CAM: at 64 px with 16 px patches (a 4x4 grid) an object touches 3.8 patches and covers
half of almost none of them (11 % of its patches shared with another object), and a noisy
patch-level map points at the right box 74-81 % of the time; at 128/16 (8x8) an object touches
8.4 patches, covers 3.6 (at least 1) by half, shares 2 %, 82-92 %; at 96/8 (12x12): 15, 8.2,
0.7 %, 93-97 %. A training step (albef-small, batch 32, CPU) costs about 1.4x the 64/16 one at
128/16, 1.9x at 96/8, 2.4x at 128/8. Hence 128 px with 16 px patches, albef-small's own size.

Training transforms: the authors' horizontal flip makes every "left"/"right" caption false half
the time, and a random crop can cut an object out (then "two hearts" is false): train on these
scenes with ``data.hflip: false`` and ``data.random_crop: false``, as the main job does.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from albef.data.scene_grammar import COLOURS, RELATIONS, caption, semantic_key, usable_name
from albef.data.scene_layout import Emoji, Scene, SceneObject, free_slot, layout, mirror, render, sibling

SUBSETS = ("seen", "unseen_pair", "unseen_emoji")
TWIN_KINDS = ("swap", "object", "count", "attribute")
# What to train and evaluate the scenes at (albef-small, recipe model.overrides); see the module docstring
RECOMMENDED = {"vision": {"image_size": 128, "patch_size": 16}}

DEFAULT_CATEGORIES = (
    "Smileys & Emotion",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
)
_RENAME = {"heavy black heart": "red heart"}  # the Unicode name of the red heart


# -- hard cases -----------------------------------------------------------------------------------
def twins(
    scene: Scene,
    replacements: Callable[[str], Sequence[str]] | Sequence[str],
    all_names: Sequence[str],
    rng: random.Random,
) -> list[dict[str, str]]:
    """The altered captions of a scene (``[{"kind", "caption"}]``), each false of the image.

    ``replacements``: the names an ``object`` twin may bring in for a name (a function of the
    replaced name, or one list for all; names in the scene are left out); ``all_names``: every
    emoji name, for ``attribute`` twins (a colour swap must give another real emoji's name).
    """
    s = scene
    out = [{"kind": "swap", "caption": caption(s.b, s.count_b, s.relation, s.a, s.count_a)}]
    g = "a" if rng.random() < 0.5 else "b"
    old = s.a if g == "a" else s.b
    cands = replacements(old) if callable(replacements) else replacements
    in_scene = {o.name for o in s.objects} | {s.a, s.b}  # distractors too: "X left of B" may be true of one
    pool = sorted(n for n in set(cands) if n not in in_scene)
    if pool:
        new = rng.choice(pool)
        a, b = (new, s.b) if g == "a" else (s.a, new)
        out.append({"kind": "object", "caption": caption(a, s.count_a, s.relation, b, s.count_b)})
    ones = [g for g, c in (("a", s.count_a), ("b", s.count_b)) if c == 1]
    g = rng.choice(ones)  # a scene has at most one group of two
    ca, cb = (2, s.count_b) if g == "a" else (s.count_a, 2)
    out.append({"kind": "count", "caption": caption(s.a, ca, s.relation, s.b, cb)})
    names = set(all_names)
    options = []
    for g, name in (("a", s.a), ("b", s.b)):
        words = name.split()
        for i, w in enumerate(words):
            if w in COLOURS:
                for c in COLOURS:
                    alt = " ".join(words[:i] + [c] + words[i + 1 :])
                    if c != w and alt in names and alt not in in_scene:
                        options.append((g, alt))
    if options:
        g, alt = rng.choice(sorted(options))
        a, b = (alt, s.b) if g == "a" else (s.a, alt)
        out.append({"kind": "attribute", "caption": caption(a, s.count_a, s.relation, b, s.count_b)})
    return out


# -- the emoji to draw from ----------------------------------------------------------------------
def emoji_catalogue(
    emoji_dir: str | Path, style: str = "google", categories: Sequence[str] = DEFAULT_CATEGORIES, max_words: int = 3
) -> list[Emoji]:
    """The usable emoji of a folder built by :func:`albef.data.emoji.build_emoji`: base images of
    ``style`` (on disk under ``images/STYLE``), names by :func:`usable_name`, sorted by name."""
    from albef.data.emoji import PACKAGES, VERSION

    emoji_dir = Path(emoji_dir)
    tgz = emoji_dir / "cache" / f"{PACKAGES['meta']}-{VERSION}.tgz"
    if not tgz.exists():
        raise FileNotFoundError(f"{tgz} not found: build the emoji data first (albef.data.emoji.build_emoji)")
    with tarfile.open(tgz) as t:
        meta = json.load(t.extractfile("package/emoji.json"))
    by_name: dict[str, Emoji] = {}
    for e in sorted(meta, key=lambda e: e.get("sort_order", 0)):
        name = (e.get("name") or "").lower().strip()
        name = _RENAME.get(name, name)
        path = emoji_dir / "images" / style / str(e.get("image"))
        if e.get("category") not in categories or not usable_name(name, max_words) or not path.exists():
            continue
        by_name.setdefault(name, Emoji(name, str(path), e.get("unified", ""), style))
    return [by_name[n] for n in sorted(by_name)]


# -- the data set ---------------------------------------------------------------------------------
def make_splits(
    names: Sequence[str], seed: int, unseen_emoji: float | int = 0.1, unseen_pairs: int = 300
) -> dict[str, list]:
    """Held-out emoji and held-out pairs of seen emoji (``{"seen", "unseen_emoji", "unseen_pairs"}``)."""
    rng = random.Random(seed)
    order = sorted(set(names))
    rng.shuffle(order)
    n_u = unseen_emoji if isinstance(unseen_emoji, int) else max(2, round(unseen_emoji * len(order)))
    held, seen = sorted(order[:n_u]), sorted(order[n_u:])
    n_pairs = len(seen) * (len(seen) - 1) // 2
    if len(seen) < 3 or unseen_pairs > n_pairs // 2:
        raise ValueError(f"{len(seen)} seen emoji give {n_pairs} pairs: too few to hold out {unseen_pairs}")
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < unseen_pairs:
        a, b = rng.sample(seen, 2)
        pairs.add((min(a, b), max(a, b)))
    return {"seen": seen, "unseen_emoji": held, "unseen_pairs": sorted(pairs)}


def generate_scenes(
    catalogue: Sequence[Emoji],
    seed: int = 0,
    n_train: int = 8000,
    n_test: int = 300,
    image_size: int = 128,
    object_frac: tuple[float, float] = (0.22, 0.30),
    unseen_emoji: float | int = 0.1,
    p_two: float = 0.5,
    siblings: bool | str = False,
    unseen_pairs: int | None = None,
    distractors: int = 0,
) -> tuple[list[Scene], dict[str, list]]:
    """The scenes (train, then ``n_test`` per test subset) and the splits; nothing is drawn yet.

    ``siblings``: the training scenes come in pairs, each followed by its :func:`sibling` (the same
    layout with the two emoji exchanged), so that a sampler keeping consecutive pairs together
    (``data.group_size: 2``) puts a scene and the caption that only the relation tells apart in
    one batch: ITC, blind to order, ranks that caption high, and ALBEF's hard-negative mining
    hands it to ITM. ``siblings="mirror"``: each followed by its :func:`mirror` instead (the same
    objects and counts, their places reflected), whose caption is the scene's ``swap`` twin for
    every scene, not only for one object of each. ``distractors``: up to that many other emoji
    (group ``"x"``) where they fit
    beside the two the caption names, so that finding *the named* object is a choice among several
    (Grad-CAM pointing). Deterministic from ``seed`` and the catalogue's names.
    """
    if siblings not in (False, True, "exchange", "mirror"):
        raise ValueError(f"siblings must be False, True (or 'exchange') or 'mirror', not {siblings!r}")
    by_name = {e.name: e for e in catalogue}
    if len(by_name) != len(catalogue):
        raise ValueError("the catalogue has two emoji of the same name")
    splits = make_splits(list(by_name), seed, unseen_emoji, n_test if unseen_pairs is None else unseen_pairs)
    seen, held = splits["seen"], splits["unseen_emoji"]
    held_pairs = {tuple(p) for p in splits["unseen_pairs"]}
    rng = random.Random(seed + 1)
    lo, hi = (max(4, round(f * image_size)) for f in object_frac)

    def scene(split: str, k: int, a: str, b: str) -> Scene:
        if rng.random() < 0.5:
            a, b = b, a
        counts = (1, 1)
        if rng.random() < p_two:
            counts = (2, 1) if rng.random() < 0.5 else (1, 2)
        rel = rng.choice(sorted(RELATIONS))
        slot = rng.randint(lo, hi)
        slots_a, slots_b = layout(rng, rel, *counts, image_size, slot)
        objs = [
            SceneObject(n, list(sl), g, by_name[n].image, by_name[n].source)
            for g, n, sls in (("a", a, slots_a), ("b", b, slots_b))
            for sl in sls
        ]
        if distractors:  # other emoji in the free space: the caption says nothing of them
            pool = [n for n in (held if split == "unseen_emoji" else seen) if n not in (a, b)]
            for n in rng.sample(pool, min(distractors, len(pool))):
                sl = free_slot(rng, [o.box for o in objs], image_size, slot)
                if sl is not None:
                    objs.append(SceneObject(n, sl, "x", by_name[n].image, by_name[n].source))
        sid = f"{split}-{k:05d}"
        return Scene(sid, split, a, b, counts[0], counts[1], rel, f"images/{split}/{sid}.png", objs)

    scenes: list[Scene] = []
    cycle: list[str] = []
    train_pairs: list[tuple[str, str]] = []
    for k in range(0, n_train, 2 if siblings else 1):
        if not cycle:
            cycle = list(seen)
            rng.shuffle(cycle)
        a = cycle.pop()
        while True:
            b = rng.choice(seen)
            if b != a and (min(a, b), max(a, b)) not in held_pairs:
                break
        train_pairs.append((min(a, b), max(a, b)))
        scenes.append(scene("train", k, a, b))
        if siblings and k + 1 < n_train:
            sid = f"train-{k + 1:05d}"
            scenes.append(
                mirror(scenes[-1], sid, image_size) if siblings == "mirror" else sibling(scenes[-1], sid, by_name)
            )

    keys: set[tuple] = set()

    def unique(split: str, k: int, a: str, b: str) -> Scene | None:
        for _ in range(50):  # another layout/relation/count until its caption is new among the tests
            s = scene(split, k, a, b)
            key = semantic_key(s.a, s.count_a, s.relation, s.b, s.count_b)
            if key not in keys:
                keys.add(key)
                return s
        return None

    distinct_train = sorted(set(train_pairs))
    rng.shuffle(distinct_train)
    subsets = {"seen": distinct_train, "unseen_pair": sorted(held_pairs)}
    held_cycle = []
    unseen = []
    others = sorted(set(seen) | set(held))
    used: set[tuple[str, str]] = set()
    for _ in range(50 * n_test):
        if len(unseen) >= n_test:
            break
        if not held_cycle:
            held_cycle = list(held)
            rng.shuffle(held_cycle)
        a = held_cycle.pop()
        b = rng.choice(others)
        p = (min(a, b), max(a, b))
        if b != a and p not in used:
            used.add(p)
            unseen.append(p)
    subsets["unseen_emoji"] = unseen
    for split in SUBSETS:
        k = 0
        # around the pairs again (other layouts, relations, counts) while a subset has fewer pairs
        # than scenes to fill; each pair has a dozen distinct captions
        for _ in range(12):
            for a, b in subsets[split]:
                if k >= n_test:
                    break
                s = unique(split, k, a, b)
                if s is not None:
                    scenes.append(s)
                    k += 1
            if k >= n_test or not subsets[split]:
                break
    return scenes, splits


def build_scenes(
    out: str | Path,
    catalogue: Sequence[Emoji] | None = None,
    emoji_dir: str | Path | None = None,
    seed: int = 0,
    n_train: int = 8000,
    n_test: int = 300,
    image_size: int = 128,
    object_frac: tuple[float, float] = (0.22, 0.30),
    unseen_emoji: float | int = 0.1,
    p_two: float = 0.5,
    attribution: str | None = None,
    max_emoji: int | None = None,
    siblings: bool | str = False,
    unseen_pairs: int | None = None,
    distractors: int = 0,
) -> dict[str, int]:
    """Generate, draw and write the scene data set under ``out``; returns counts.

    The emoji come from ``catalogue`` or, when it is None, from :func:`emoji_catalogue` of
    ``emoji_dir`` (a folder of :func:`albef.data.emoji.build_emoji`). ``max_emoji``: draw the scenes
    from that many of them (a seeded sample), so that each is seen often in a short training run.
    ``siblings`` and ``distractors``: see :func:`generate_scenes`. ``unseen_pairs``: pairs of seen
    emoji never shown together in training (default ``n_test``). ``attribution``: the licence text to
    keep beside the scenes (default: ``emoji_dir/LICENSE.md``, or albef.data.emoji's).
    """
    out = Path(out)
    if catalogue is None:
        if emoji_dir is None:
            raise ValueError("give a catalogue or the emoji folder to read one from")
        catalogue = emoji_catalogue(emoji_dir)
    if max_emoji is not None and len(catalogue) > max_emoji:
        catalogue = sorted(random.Random(seed + 3).sample(list(catalogue), max_emoji), key=lambda e: e.name)
    scenes, splits = generate_scenes(
        catalogue,
        seed,
        n_train,
        n_test,
        image_size,
        object_frac,
        unseen_emoji,
        p_two,
        siblings,
        unseen_pairs,
        distractors,
    )
    all_names = [e.name for e in catalogue]
    rng = random.Random(seed + 2)
    cache: dict = {}
    for s in scenes:
        path = out / s.image
        path.parent.mkdir(parents=True, exist_ok=True)
        render(s, image_size=image_size, cache=cache).save(path)

    def dump(name: str, data) -> None:
        (out / name).write_text(json.dumps(data, indent=0))

    train = [s for s in scenes if s.split == "train"]
    test = [s for s in scenes if s.split != "train"]
    dump("pretrain.json", [{"image": s.image, "caption": [s.caption, s.converse]} for s in train])
    dump(
        "retrieval_train.json",
        [{"image": s.image, "caption": c, "image_id": s.scene_id} for s in train for c in (s.caption, s.converse)],
    )
    dump("retrieval_test.json", [{"image": s.image, "caption": [s.caption, s.converse]} for s in test])
    for sub in SUBSETS:
        dump(
            f"retrieval_test_{sub}.json",
            [{"image": s.image, "caption": [s.caption, s.converse]} for s in test if s.split == sub],
        )
    dump(
        "grounding_train.json",
        [{"image": s.image, "text": o.name, "ref_id": f"{s.scene_id}-{o.group}"} for s in train for o in _referents(s)],
    )
    dump(
        "grounding_test.json",
        [
            {
                "image": s.image,
                "text": o.name,
                "ref_id": f"{s.scene_id}-{o.group}",
                "box": o.box,
                "candidates": [p.box for p in s.objects],
                "split": s.split,
            }
            for s in test
            for o in _referents(s)
        ],
    )
    held = set(splits["unseen_emoji"])
    seen, held_list = sorted(splits["seen"]), sorted(held)
    twin_rows = []
    for s in test:
        # an object twin brings in a name of the pool of what it replaces (held-out for held-out):
        # a seen scene's twin never holds a never-seen name, a cue in the text alone
        pool = lambda name: held_list if name in held else seen  # noqa: E731
        twin_rows.append(
            {
                "image": s.image,
                "caption": s.caption,
                "twins": twins(s, pool, all_names, rng),
                "split": s.split,
                "scene_id": s.scene_id,
            }
        )
    dump("twins_test.json", twin_rows)
    dump(
        "scenes.json",
        [
            {
                **{k: v for k, v in asdict(s).items() if k != "objects"},
                "caption": s.caption,
                "objects": [
                    {
                        "name": o.name,
                        "box": o.box,
                        "group": o.group,
                        "source": o.source,
                        "emoji_image": Path(o.image).name,
                    }
                    for o in s.objects
                ],
            }
            for s in scenes
        ],
    )
    dump("splits.json", splits)
    config = {
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "image_size": image_size,
        "object_frac": list(object_frac),
        "unseen_emoji": unseen_emoji,
        "p_two": p_two,
        "max_emoji": max_emoji,
        "unseen_pairs": unseen_pairs,
        "distractors": distractors,
        "siblings": siblings,
        "emoji": len(catalogue),
        "recommended_model_overrides": RECOMMENDED,
    }
    dump("config.json", config)
    (out / "ATTRIBUTION.md").write_text(_attribution(catalogue, emoji_dir, attribution))
    counts = {
        "emoji": len(catalogue),
        "seen_emoji": len(splits["seen"]),
        "held_out_emoji": len(held),
        "train": len(train),
        "grounding_test": sum(len(_referents(s)) for s in test),
    }
    counts.update({sub: sum(s.split == sub for s in test) for sub in SUBSETS})
    return counts


def _referents(s: Scene) -> list[SceneObject]:
    """The objects a name picks out alone (the group of one)."""
    return [o for o in s.objects if sum(p.name == o.name for p in s.objects) == 1]


def _attribution(catalogue: Sequence[Emoji], emoji_dir, text: str | None) -> str:
    if text is None:
        lic = Path(emoji_dir) / "LICENSE.md" if emoji_dir is not None else None
        if lic is not None and lic.exists():
            text = lic.read_text()
        else:
            from albef.data.emoji import LICENSE

            text = LICENSE
    sources = sorted({e.source for e in catalogue if e.source})
    return (
        "# Emoji scenes\n\nComposed by `albef.data.scenes.build_scenes` from emoji images of the style(s): "
        f"{', '.join(sources) or 'unknown'} (each object's style is in scenes.json, `source`).\n"
        "The images keep their licences and attribution:\n\n" + text
    )
