"""One scene: what it holds and where (``Scene``), its slots (``layout``), its siblings
(``sibling``, ``mirror``) and its drawing (``render``). :mod:`albef.data.scenes` builds the data
set from these.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from albef.data.scene_grammar import CONVERSE, caption


@dataclass(frozen=True)
class Emoji:
    """One emoji the scenes can use: its name (the caption word), image and provenance."""

    name: str
    image: str  # path of an RGB image on white (albef.data.emoji writes these)
    key: str = ""  # e.g. the unified code point
    source: str = ""  # the image set ("google", "twitter"), for attribution


@dataclass
class SceneObject:
    name: str
    box: list[int]  # [x, y, w, h] of the pasted pixels (the emoji's content, cropped)
    group: str  # "a" or "b"
    image: str
    source: str


@dataclass
class Scene:
    scene_id: str
    split: str  # "train" or a test subset
    a: str
    b: str
    count_a: int
    count_b: int
    relation: str
    image: str  # relative to the output folder
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return caption(self.a, self.count_a, self.relation, self.b, self.count_b)

    @property
    def converse(self) -> str:
        return caption(self.b, self.count_b, CONVERSE[self.relation], self.a, self.count_a)


def layout(
    rng: random.Random,
    relation: str,
    count_a: int,
    count_b: int,
    image_size: int,
    slot: int,
    margin: int = 4,
    gap_min: int = 4,
) -> tuple[list[list[int]], list[list[int]]]:
    """Square slots ``[x, y, s, s]`` of group A's and group B's objects such that A ``relation`` B.

    Along the relation's axis (u): the first group's slots, a gap >= ``gap_min``, the second's. Across
    it (v): a group of two is two slots ``gap_min..2*gap_min`` apart; the groups' centres differ by
    at most ``slot/4``. So every A/B pair of centres is further apart along u (>= slot + gap) than
    across v (<= 3/4 slot + gap_in/2).
    """
    S, s = image_size, slot
    axis = 0 if relation in ("left", "right") else 1
    first_is_a = relation in ("left", "above")
    counts = (count_a, count_b) if first_is_a else (count_b, count_a)
    max_gap = S - 2 * margin - 2 * s
    gap_in = rng.randint(gap_min, 2 * gap_min)
    ext_v = [c * s + (c - 1) * gap_in for c in counts]
    jitter = s // 4
    if max_gap < gap_min or max(ext_v) + 2 * jitter > S - 2 * margin:
        raise ValueError(f"slots of {s} px do not fit a {S} px image")
    gap = rng.randint(gap_min, max_gap)
    u0 = rng.randint(margin, S - margin - (2 * s + gap))
    us = (u0, u0 + s + gap)
    dv = rng.randint(-jitter, jitter)
    centre_v = [0.0, dv + 0.0]  # relative centres of the two groups across the axis
    lo = min(c - e / 2 for c, e in zip(centre_v, ext_v, strict=True))
    hi = max(c + e / 2 for c, e in zip(centre_v, ext_v, strict=True))
    shift = rng.randint(math.ceil(margin - lo), math.floor(S - margin - hi))  # whole composite inside
    groups = []
    for u, c, e, cv in zip(us, counts, ext_v, centre_v, strict=True):
        v0 = round(cv + shift - e / 2)
        slots = []
        for k in range(c):
            v = v0 + k * (s + gap_in)
            slots.append([u, v, s, s] if axis == 0 else [v, u, s, s])
        groups.append(slots)
    return (groups[0], groups[1]) if first_is_a else (groups[1], groups[0])


def _content(img: Image.Image, threshold: int = 245) -> Image.Image:
    """The image cropped to its non-white pixels (the whole image when it is all white)."""
    grey = img.convert("L").point(lambda p: 255 if p < threshold else 0)
    box = grey.getbbox()
    return img.crop(box) if box else img


def paste_in_slot(canvas: Image.Image, emoji_img: Image.Image, slot: Sequence[int]) -> list[int]:
    """Paste the emoji's content, fitted to the slot (aspect kept) and centred; its exact box."""
    x, y, s, _ = slot
    content = _content(emoji_img)
    scale = s / max(content.size)
    w, h = max(1, round(content.width * scale)), max(1, round(content.height * scale))
    bx, by = x + (s - w) // 2, y + (s - h) // 2
    canvas.paste(content.resize((w, h), Image.LANCZOS), (bx, by))
    return [bx, by, w, h]


def free_slot(
    rng: random.Random, boxes: Sequence[Sequence[int]], image_size: int, slot: int, margin: int = 4, gap: int = 4
) -> list[int] | None:
    """A square slot ``[x, y, slot, slot]`` inside the margins, ``gap`` px clear of every box (None
    after 50 tries)."""
    for _ in range(50):
        x = rng.randint(margin, image_size - margin - slot)
        y = rng.randint(margin, image_size - margin - slot)
        if all(
            x + slot + gap <= bx or bx + bw + gap <= x or y + slot + gap <= by or by + bh + gap <= y
            for bx, by, bw, bh in boxes
        ):
            return [x, y, slot, slot]
    return None


def sibling(s: Scene, scene_id: str, by_name: dict[str, Emoji]) -> Scene:
    """The same layout with the two emoji exchanged: B's image in A's slots and A's in B's. The
    counts stay with the slots, so "a cat left of two hearts" gives "a heart left of two cats";
    with one object each, the sibling's caption is the scene's ``swap`` twin.

    Example:
        >>> e = {n: Emoji(n, f"{n}.png") for n in ("cat", "dog")}
        >>> s = Scene("t-0", "train", "cat", "dog", 1, 2, "left", "t-0.png",
        ...           [SceneObject("cat", [0, 0, 9, 9], "a", "cat.png", "")])
        >>> sibling(s, "t-1", e).caption
        'a dog to the left of two cats'
    """
    swap = {"a": s.b, "b": s.a}  # distractors (group "x") stay as they are

    def moved(o: SceneObject) -> SceneObject:
        name = swap.get(o.group, o.name)
        return SceneObject(name, list(o.box), o.group, by_name[name].image, by_name[name].source)

    objs = [moved(o) for o in s.objects]
    return Scene(
        scene_id,
        s.split,
        s.b,
        s.a,
        s.count_a,
        s.count_b,
        s.relation,
        str(Path(s.image).with_name(f"{scene_id}.png")),
        objs,
    )


def mirror(s: Scene, scene_id: str, image_size: int) -> Scene:
    """The same objects and counts with their places reflected across the canvas's middle along the
    relation's axis: "a cat left of two hearts" gives "a cat right of two hearts", the meaning of
    the scene's ``swap`` twin ("two hearts left of a cat"). Boxes must still be slots (before
    :func:`render`); the emoji themselves are not flipped.

    Example:
        >>> s = Scene("t-0", "train", "cat", "dog", 1, 1, "left", "t-0.png",
        ...           [SceneObject("cat", [10, 50, 30, 30], "a", "cat.png", ""),
        ...            SceneObject("dog", [70, 50, 30, 30], "b", "dog.png", "")])
        >>> m = mirror(s, "t-1", 128)
        >>> m.caption, [o.box[0] for o in m.objects]
        ('a cat to the right of a dog', [88, 28])
    """
    vertical = s.relation in ("above", "below")

    def moved(o: SceneObject) -> SceneObject:
        x, y, w, h = o.box
        box = [x, image_size - y - h, w, h] if vertical else [image_size - x - w, y, w, h]
        return SceneObject(o.name, box, o.group, o.image, o.source)

    return Scene(
        scene_id,
        s.split,
        s.a,
        s.b,
        s.count_a,
        s.count_b,
        CONVERSE[s.relation],
        str(Path(s.image).with_name(f"{scene_id}.png")),
        [moved(o) for o in s.objects],
    )


def render(
    scene: Scene, background: tuple[int, int, int] = (255, 255, 255), image_size: int = 128, cache: dict | None = None
) -> Image.Image:
    """Draw a scene; the objects' boxes are set to the pasted pixels (slots become boxes)."""
    canvas = Image.new("RGB", (image_size, image_size), background)
    cache = {} if cache is None else cache
    for o in scene.objects:
        if o.image not in cache:
            with Image.open(o.image) as im:
                cache[o.image] = im.convert("RGB")
        o.box = paste_in_slot(canvas, cache[o.image], o.box)
    return canvas
