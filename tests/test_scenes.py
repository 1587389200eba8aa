"""The compositional emoji scenes (albef.data.scenes) and their evaluations (albef.evaluation.scenes),
on small synthetic emoji (coloured shapes saved as PNGs under emoji-like names): no network, no npm."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from albef.data import scene_grammar as gr
from albef.data import scenes as sc
from albef.data.annotations import read_annotations
from albef.data.pretrain import parse_pretrain_entry
from albef.data.retrieval import read_retrieval_eval, read_retrieval_train
from albef.evaluation import scenes as ev
from albef.evaluation.grounding import read_grounding
from albef.text import Tokenizer

COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 170, 60),
    "yellow": (240, 200, 20),
    "orange": (250, 130, 20),
    "purple": (140, 40, 180),
    "black": (20, 20, 20),
    "pink": (250, 120, 180),
    "brown": (120, 70, 30),
    "grey": (128, 128, 128),
}
# (name, colour, shape): colour words in some names, so attribute twins exist ("red heart" -> "blue heart")
EMOJI = [
    ("red heart", "red", "ellipse"),
    ("blue heart", "blue", "ellipse"),
    ("green heart", "green", "ellipse"),
    ("cat face", "orange", "rect"),
    ("dog face", "brown", "triangle"),
    ("star", "yellow", "triangle"),
    ("apple", "red", "rect"),
    ("rocket", "grey", "ellipse"),
    ("black square", "black", "rect"),
    ("pink flower", "pink", "triangle"),
    ("purple circle", "purple", "ellipse"),
    ("fox face", "orange", "ellipse"),
]
SIZE = 64
BUILD = dict(seed=3, n_train=60, n_test=6, image_size=SIZE, unseen_emoji=3)


def _draw(path: Path, colour: tuple[int, int, int], shape: str, rng: random.Random) -> None:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = rng.randint(2, 10), rng.randint(2, 10), rng.randint(50, 62), rng.randint(50, 62)
    if shape == "ellipse":
        d.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "rect":
        d.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    img.save(path)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> list[sc.Emoji]:
    folder = tmp_path_factory.mktemp("emoji")
    rng = random.Random(0)
    out = []
    for name, colour, shape in EMOJI:
        path = folder / (name.replace(" ", "_") + ".png")
        _draw(path, COLOURS[colour], shape, rng)
        out.append(sc.Emoji(name, str(path), name.upper(), "synthetic"))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, catalogue) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    counts = sc.build_scenes(out, catalogue, attribution="Synthetic shapes, public domain.\n", **BUILD)
    assert counts["train"] == 60 and all(counts[s] == 6 for s in sc.SUBSETS)
    return out


def _load(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def _colour_of(name: str) -> tuple[int, int, int]:
    return COLOURS[next(c for n, c, _ in EMOJI if n == name)]


# -- grammar ---------------------------------------------------------------------------------------
def test_grammar():
    assert gr.caption("cat face", 1, "left", "red heart", 1) == "a cat face to the left of a red heart"
    assert gr.caption("star", 1, "above", "red heart", 2) == "a star above two red hearts"
    assert gr.caption("apple", 2, "below", "octopus", 1) == "two apples below an octopus"
    assert gr.noun_phrase("unicorn face", 1) == "a unicorn face"
    assert [gr.plural(n) for n in ("fox", "cherry", "mouse face", "sheep", "bus")] == [
        "foxes",
        "cherries",
        "mouse faces",
        "sheep",
        "buses",
    ]
    assert gr.usable_name("cat face") and gr.usable_name("octopus")
    assert not any(
        gr.usable_name(n) for n in ("grapes", "up arrow", "face with tears of joy", "flag: japan", "two hearts", "Cat")
    )
    key = gr.semantic_key("star", 1, "above", "apple", 2)
    assert key == gr.semantic_key("apple", 2, "below", "star", 1)


def test_layout_satisfies_its_relation_and_fits():
    rng = random.Random(0)
    for _ in range(300):
        rel, counts = rng.choice(sorted(gr.RELATIONS)), rng.choice([(1, 1), (2, 1), (1, 2)])
        size = rng.choice([64, 96, 128])
        slot = rng.randint(round(0.22 * size), round(0.30 * size))
        a, b = sc.layout(rng, rel, *counts, size, slot)
        assert (len(a), len(b)) == counts
        boxes = a + b
        assert all(0 <= x and 0 <= y and x + w <= size and y + h <= size for x, y, w, h in boxes)
        for i, p in enumerate(boxes):  # no two slots overlap
            for q in boxes[i + 1 :]:
                assert p[0] + p[2] <= q[0] or q[0] + q[2] <= p[0] or p[1] + p[3] <= q[1] or q[1] + q[3] <= p[1]
        for p in a:
            for q in b:
                _check_relation(p, q, rel)
    with pytest.raises(ValueError, match="do not fit"):
        sc.layout(rng, "left", 1, 1, 64, 40)


def _centre(b):
    return b[0] + b[2] / 2, b[1] + b[3] / 2


def _check_relation(pa, pb, rel):
    (ax, ay), (bx, by) = _centre(pa), _centre(pb)
    dx, dy = bx - ax, by - ay  # B's centre relative to A's
    if rel in ("left", "right"):
        assert abs(dx) > abs(dy)
        assert (dx > 0 and pa[0] + pa[2] <= pb[0]) if rel == "left" else (dx < 0 and pb[0] + pb[2] <= pa[0])
    else:
        assert abs(dy) > abs(dx)
        assert (dy > 0 and pa[1] + pa[3] <= pb[1]) if rel == "above" else (dy < 0 and pb[1] + pb[3] <= pa[1])


# -- the data set ------------------------------------------------------------------------------------
def test_deterministic(tmp_path, catalogue, built):
    again = tmp_path / "again"
    sc.build_scenes(again, catalogue, attribution="Synthetic shapes, public domain.\n", **BUILD)
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((built / f).read_bytes() == (again / f).read_bytes() for f in files)
    other, _ = sc.generate_scenes(catalogue, **{**BUILD, "seed": 4})
    assert [s.caption for s in other] != [s["caption"] for s in _load(built, "scenes.json")]


def test_boxes_inside_the_image_and_on_the_pasted_pixels(built):
    for s in _load(built, "scenes.json"):
        img = Image.open(built / s["image"]).convert("RGB")
        assert img.size == (SIZE, SIZE)
        t = torch.from_numpy(np.asarray(img).astype(np.int16))
        ink = (t != 255).any(-1)  # pixels that are not the white canvas
        covered = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        for o in s["objects"]:
            x, y, w, h = o["box"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
            inside = ink[y : y + h, x : x + w]
            # the box is tight: the pasted shape reaches each of its four edges
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y : y + h, x : x + w] = True
            # and it is this emoji's shape: its dominant colour is the emoji's
            px = t[y : y + h, x : x + w][inside[..., None].expand(-1, -1, 3)].view(-1, 3).float()
            mean = px.median(0).values
            assert torch.allclose(mean, torch.tensor(_colour_of(o["name"]), dtype=torch.float), atol=40), o
        assert not ink[~covered].any()  # nothing drawn outside the boxes


def test_captions_agree_with_the_geometry(built):
    pre = {e["image"]: e["caption"] for e in _load(built, "pretrain.json")}
    for s in _load(built, "scenes.json"):
        a = [o["box"] for o in s["objects"] if o["group"] == "a"]
        b = [o["box"] for o in s["objects"] if o["group"] == "b"]
        assert (len(a), len(b)) == (s["count_a"], s["count_b"]) and 2 <= len(a) + len(b) <= 3 and s["a"] != s["b"]
        assert {o["name"] for o in s["objects"] if o["group"] == "a"} == {s["a"]}
        for pa in a:
            for pb in b:
                _check_relation(pa, pb, s["relation"])
        words = (
            f"{gr.noun_phrase(s['a'], s['count_a'])} {gr.RELATIONS[s['relation']]} "
            f"{gr.noun_phrase(s['b'], s['count_b'])}"
        )
        assert s["caption"] == words
        if s["split"] == "train":  # the converse is the second, equally true caption
            conv = gr.caption(s["b"], s["count_b"], gr.CONVERSE[s["relation"]], s["a"], s["count_a"])
            assert pre[s["image"]] == [words, conv]


def test_twins_differ_from_the_caption_in_one_way(built):
    scenes = {s["scene_id"]: s for s in _load(built, "scenes.json")}
    splits = _load(built, "splits.json")
    names = {n for n, _, _ in EMOJI}
    kinds = set()
    for case in _load(built, "twins_test.json"):
        s = scenes[case["scene_id"]]
        a, ca, rel, b, cb = s["a"], s["count_a"], s["relation"], s["b"], s["count_b"]
        assert case["caption"] == gr.caption(a, ca, rel, b, cb)
        assert [t["kind"] for t in case["twins"]][:3] == ["swap", "object", "count"]
        for t in case["twins"]:
            kinds.add(t["kind"])
            tw = t["caption"]
            assert tw not in (case["caption"], gr.caption(b, cb, gr.CONVERSE[rel], a, ca))
            if t["kind"] == "swap":
                assert tw == gr.caption(b, cb, rel, a, ca)
            elif t["kind"] == "count":
                assert tw in {
                    gr.caption(a, 2, rel, b, cb) if ca == 1 else None,
                    gr.caption(a, ca, rel, b, 2) if cb == 1 else None,
                }
            else:
                new = [
                    n for n in names - {a, b} if tw in (gr.caption(n, ca, rel, b, cb), gr.caption(a, ca, rel, n, cb))
                ]
                assert len(new) == 1, tw
                if t["kind"] == "attribute":  # a colour word changed, the rest of the name kept
                    old = a if tw == gr.caption(new[0], ca, rel, b, cb) else b
                    assert len(old.split()) == len(new[0].split())
                    diff = [(u, v) for u, v in zip(old.split(), new[0].split(), strict=True) if u != v]
                    assert len(diff) == 1
                    assert set(diff[0]) <= set(gr.COLOURS)
                else:  # an object twin keeps to the pool of what it replaces
                    old = a if tw == gr.caption(new[0], ca, rel, b, cb) else b
                    held = set(splits["unseen_emoji"])
                    assert (new[0] in held) == (old in held)
    assert kinds == set(sc.TWIN_KINDS)


def test_held_out_emoji_and_pairs_are_absent_from_training(built):
    splits = _load(built, "splits.json")
    scenes = _load(built, "scenes.json")
    held = set(splits["unseen_emoji"])
    held_pairs = {tuple(p) for p in splits["unseen_pairs"]}
    assert len(held) == 3 and not held & set(splits["seen"])
    train = [s for s in scenes if s["split"] == "train"]
    train_pairs = {tuple(sorted((s["a"], s["b"]))) for s in train}
    train_emoji = {o["name"] for s in train for o in s["objects"]}
    assert not train_emoji & held and not train_pairs & held_pairs
    assert train_emoji == set(splits["seen"])  # every seen emoji is seen in training
    by = {sub: [s for s in scenes if s["split"] == sub] for sub in sc.SUBSETS}
    for s in by["unseen_pair"]:
        p = tuple(sorted((s["a"], s["b"])))
        assert p in held_pairs and p not in train_pairs and {s["a"], s["b"]} <= train_emoji
    for s in by["unseen_emoji"]:
        assert {s["a"], s["b"]} & held
    for s in by["seen"]:
        assert tuple(sorted((s["a"], s["b"]))) in train_pairs
    test = [s for s in scenes if s["split"] != "train"]
    keys = [gr.semantic_key(s["a"], s["count_a"], s["relation"], s["b"], s["count_b"]) for s in test]
    assert len(set(keys)) == len(keys) == 18  # one right image per test caption
    retr = read_retrieval_eval(built / "retrieval_test.json", str(built))
    assert len(set(retr.texts)) == len(retr.texts) == 36


def test_files_are_the_formats_the_library_reads(built):
    records, bad = read_annotations(built / "pretrain.json", parse_pretrain_entry(str(built)))
    assert not bad and len(records) == 60 and all(len(r.captions) == 2 for r in records)
    train, bad = read_retrieval_train(built / "retrieval_train.json", str(built))
    assert not bad and len(train) == 120 and len({r.image_id for r in train}) == 60
    for sub in sc.SUBSETS:
        data = read_retrieval_eval(built / f"retrieval_test_{sub}.json", str(built))
        assert len(data.images) == 6 and all(len(t) == 2 for t in data.img2txt)
    g = read_grounding(built / "grounding_test.json", str(built))
    assert {r.split for r in g} == set(sc.SUBSETS)
    for r in g:
        assert r.box in r.candidates and 2 <= len(r.candidates) <= 3
    cases = ev.read_twins(built / "twins_test.json", built)
    assert len(cases) == 18 and all(Path(c.image).exists() for c in cases)
    text = (built / "ATTRIBUTION.md").read_text()
    assert "Synthetic shapes" in text and "synthetic" in text
    assert _load(built, "config.json")["recommended_model_overrides"] == sc.RECOMMENDED


# -- the evaluations on constructed cases -----------------------------------------------------------
class _FakeModel:
    """ITM (and ITC) decided by whether the text is one of the true captions: known answers."""

    def __init__(self, tok: Tokenizer, true_captions, itm: str, itc: str):
        enc = tok(list(true_captions), max_length=30, padding="longest")
        self.true = {tuple(i for i in row.tolist() if i) for row in enc.input_ids}
        self.itm, self.itc = itm, itc  # "true", "twin" or "tie": which side wins

    def eval(self):
        return self

    def _is_true(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([tuple(int(i) for i in row if i) in self.true for row in ids[..., 0].long()])

    def _prefer(self, ids: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "tie":
            return torch.zeros(len(ids))
        t = self._is_true(ids)
        return (t if mode == "true" else ~t).float()

    def encode_image(self, x):
        return x.flatten(1)[:, None, :4]

    def image_feat(self, e):
        return F.normalize(torch.ones(len(e), 2) * torch.tensor([1.0, 0.0]), dim=-1)

    def encode_text(self, ids, mask):
        return ids.float()[..., None]

    def text_feat(self, te, mask=None):
        p = self._prefer(te, self.itc)
        return F.normalize(torch.stack([p, 1 - p], -1) + 1e-6, dim=-1)

    def fuse(self, te, mask, image):
        return te

    def itm_logits(self, fused):
        p = self._prefer(fused, self.itm)
        return torch.stack([torch.zeros_like(p), 10 * p - 5], -1)


def test_evaluate_twins_known_answers(built):
    from albef.data.transforms import test_transform

    tok = Tokenizer()
    cases = ev.read_twins(built / "twins_test.json", built)
    true = [c.caption for c in cases]
    r = ev.evaluate_twins(_FakeModel(tok, true, itm="true", itc="twin"), cases, tok, test_transform(32))
    assert r["chance"] == 50.0
    assert set(r["itm"]) == set(sc.TWIN_KINDS) | {"overall"}
    assert all(v == 100.0 for v in r["itm"].values()) and all(v == 0.0 for v in r["itc"].values())
    assert r["n"]["overall"] == sum(len(c.twins) for c in cases) and r["n"]["swap"] == len(cases)
    assert set(r["per_split"]) == set(sc.SUBSETS)
    assert all(v == 100.0 for d in r["per_split"].values() for v in d["itm"].values())
    # this model decides by the text alone: it scores the same with another scene's image
    assert r["itm_blind"] == r["itm"] and r["itc_blind"] == r["itc"]
    tie = ev.evaluate_twins(_FakeModel(tok, true, itm="tie", itc="tie"), cases, tok, test_transform(32))
    assert tie["itc"]["overall"] == 50.0 and tie["itm"]["overall"] == 50.0  # ties count one half
    looks = _LookingModel(tok, cases, test_transform(32))
    r = ev.evaluate_twins(looks, cases, tok, test_transform(32))
    assert r["itm"]["overall"] == 100.0 and r["itm_blind"]["overall"] == 50.0  # another image: no match
    assert "itm_blind" not in ev.evaluate_twins(looks, cases, tok, test_transform(32), blind=False)


class _LookingModel(_FakeModel):
    """ITM says match only for an image's own caption: it reads the image (which it keys by its pixels)."""

    def __init__(self, tok: Tokenizer, cases, transform):
        from albef.data.pretrain import load_image

        self.keys = {self._key(transform(load_image(c.image))): i for i, c in enumerate(cases)}
        enc = tok([c.caption for c in cases], max_length=30, padding="longest")
        self.own = [tuple(i for i in row.tolist() if i) for row in enc.input_ids]
        self.itc = "tie"

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return tuple(x.flatten()[::97][:64].mul(1000).round().long().tolist())

    def encode_image(self, x):
        return torch.tensor([float(self.keys[self._key(im)]) for im in x])[:, None, None]

    def fuse(self, te, mask, image):
        return torch.cat([te, image], 1)  # the text ids, then the image's case index

    def itm_logits(self, fused):
        match = [tuple(int(i) for i in row[:-1, 0] if i) == self.own[int(row[-1, 0])] for row in fused]
        return torch.stack([torch.zeros(len(match)), 10 * torch.tensor(match).float() - 5], -1)


@pytest.fixture(scope="module")
def tiny_model():
    from albef.config import get_preset
    from albef.models.albef import ALBEF

    torch.manual_seed(0)
    return ALBEF(get_preset("albef-tiny"), mlm_head=False).eval()


def test_pointing_known_answers(built, tiny_model, monkeypatch):
    import albef.evaluation.grounding as eg
    from albef.data.transforms import test_transform

    records = read_grounding(built / "grounding_test.json", str(built))
    grid = tiny_model.config.vision.grid_size
    queue = []

    def fake_gradcam(model, images, ids, mask, layer=None):  # the map of the box queued for each record
        return torch.stack([ev.oracle_heatmap(queue.pop(0), SIZE, SIZE, grid) for _ in range(len(images))])

    monkeypatch.setattr(eg, "gradcam_itm", fake_gradcam)
    queue[:] = [r.box for r in records]
    right, preds = ev.evaluate_pointing(tiny_model, records, Tokenizer(), test_transform(32), batch_size=4)
    expected_chance = 100.0 * sum(1 / len(r.candidates) for r in records) / len(records)
    assert right["accuracy"] == 100.0 and right["chance"] == pytest.approx(expected_chance)
    assert 100 / 3 < right["chance"] < 50.0 + 1e-9 and set(right["chance_per_split"]) == set(sc.SUBSETS)
    queue[:] = [next(c for c in r.candidates if c != r.box) for r in records]  # a map on another object
    wrong, _ = ev.evaluate_pointing(tiny_model, records, Tokenizer(), test_transform(32), batch_size=4)
    assert wrong["accuracy"] == 0.0 and len(preds) == len(records)


def test_oracle_pointing(built):
    records = read_grounding(built / "grounding_test.json", str(built))
    r = ev.oracle_pointing(records, 64, 8)  # 8x8 patches of an 8 px grid at the images' 64 px
    assert r["grid"] == 8 and r["accuracy"] == 100.0 and r["min_patches_per_object"] >= 1
    m = ev.oracle_heatmap([8, 0, 16, 4], 32, 32, 4)  # two patches of 8 px, half their height
    assert m[0, 1].item() == m[0, 2].item() == 0.5 and m.sum().item() == 1.0
    coarse = ev.oracle_pointing(records, 64, 32, noise=1.0)
    assert coarse["patches_half_covered"] < r["patches_half_covered"]


def test_retrieval_runs_on_the_scenes(built, tiny_model):
    from albef.data.transforms import test_transform
    from albef.evaluation.retrieval import evaluate_retrieval

    data = read_retrieval_eval(built / "retrieval_test_unseen_pair.json", str(built))
    out = evaluate_retrieval(tiny_model, data, Tokenizer(), test_transform(32), k=4)
    assert set(out) == {"itc", "itm"} and all(0 <= out[h]["r_mean"] <= 100 for h in out)


# -- siblings and the grouped sampler (the main job's hard negatives) ------------------------------
def test_siblings_exchange_the_two_emoji_in_the_same_layout(tmp_path, catalogue):
    out = tmp_path / "sib"
    sc.build_scenes(out, catalogue, attribution="x\n", **{**BUILD, "n_train": 20}, siblings=True)
    train = [s for s in _load(out, "scenes.json") if s["split"] == "train"]
    assert len(train) == 20
    pre = _load(out, "pretrain.json")
    assert [e["image"] for e in pre] == [s["image"] for s in train]  # siblings stay next to each other
    for s, t in zip(train[0::2], train[1::2], strict=True):
        assert (t["a"], t["b"], t["relation"]) == (s["b"], s["a"], s["relation"])
        assert (t["count_a"], t["count_b"]) == (s["count_a"], s["count_b"])  # counts stay with the slots
        assert [o["name"] for o in t["objects"]] == [s["b"] if o["group"] == "a" else s["a"] for o in s["objects"]]
        # the same slots: each box of the sibling sits in the slot of the same object of the scene
        for o, p in zip(s["objects"], t["objects"], strict=True):
            cx = lambda b: (b[0] + b[2] / 2, b[1] + b[3] / 2)  # noqa: E731
            assert max(abs(u - v) for u, v in zip(cx(o["box"]), cx(p["box"]), strict=True)) <= 1 + SIZE * 0.3 / 2
        if s["count_a"] == s["count_b"] == 1:  # then the sibling's caption is the scene's swap twin
            assert t["caption"] == gr.caption(s["b"], 1, s["relation"], s["a"], 1)
        _check_relation(
            next(o["box"] for o in t["objects"] if o["group"] == "a"),
            next(o["box"] for o in t["objects"] if o["group"] == "b"),
            t["relation"],
        )


def test_mirrored_siblings_reflect_the_places_and_caption_the_swap_twin(tmp_path, catalogue):
    out = tmp_path / "mirror"
    sc.build_scenes(out, catalogue, attribution="x\n", **{**BUILD, "n_train": 20}, siblings="mirror")
    train = [s for s in _load(out, "scenes.json") if s["split"] == "train"]
    assert len(train) == 20 and [e["image"] for e in _load(out, "pretrain.json")] == [s["image"] for s in train]
    for s, t in zip(train[0::2], train[1::2], strict=True):
        assert (t["a"], t["b"], t["count_a"], t["count_b"]) == (s["a"], s["b"], s["count_a"], s["count_b"])
        # the meaning of the scene's swap twin, whatever the counts
        swap = (s["b"], s["count_b"], s["relation"], s["a"], s["count_a"])
        assert gr.semantic_key(t["a"], t["count_a"], t["relation"], t["b"], t["count_b"]) == gr.semantic_key(*swap)
        axis = 1 if s["relation"] in ("above", "below") else 0
        for o, m in zip(s["objects"], t["objects"], strict=True):  # each object's centre reflected
            assert o["name"] == m["name"]
            centres = [b[axis] + b[axis + 2] / 2 for b in (o["box"], m["box"])]
            assert abs(sum(centres) - SIZE) <= 1
            assert o["box"][1 - axis] == m["box"][1 - axis]
        _check_relation(
            next(o["box"] for o in t["objects"] if o["group"] == "a"),
            next(o["box"] for o in t["objects"] if o["group"] == "b"),
            t["relation"],
        )
    with pytest.raises(ValueError, match="mirror"):
        sc.generate_scenes(catalogue, **{**BUILD, "n_train": 4}, siblings="rotate")


def test_grouped_sampler_keeps_groups_whole_and_covers_each_once():
    from albef.data.sampler import GlobalBatchSampler

    s = GlobalBatchSampler(40, micro_batch=4, world_size=1, rank=0, grad_accum=1, seed=5, group_size=2)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(40)) and len(batches) == s.steps_per_epoch == 10
    for b in batches:
        assert all(b[j + 1] == b[j] + 1 and b[j] % 2 == 0 for j in range(0, len(b), 2))
    assert flat != list(range(40))  # shuffled, as units
    again = GlobalBatchSampler(40, micro_batch=4, world_size=1, rank=0, grad_accum=1, seed=5, group_size=2)
    assert list(again) == batches
    # two ranks with a global batch of 8 see what one process does with accumulation 2
    one = GlobalBatchSampler(40, 4, 1, 0, grad_accum=2, seed=5, group_size=2)
    two = [GlobalBatchSampler(40, 4, 2, r, grad_accum=1, seed=5, group_size=2) for r in (0, 1)]
    per_step = [b0 + b1 for b0, b1 in zip(*[list(t) for t in two], strict=True)]
    ones = list(one)
    assert per_step == [ones[2 * k] + ones[2 * k + 1] for k in range(len(per_step))]
    with pytest.raises(ValueError, match="group_size"):
        GlobalBatchSampler(40, micro_batch=3, group_size=2)


def test_recipe_refuses_a_group_that_does_not_divide_the_batch():
    from albef.recipes import Recipe

    with pytest.raises(ValueError, match="group_size"):
        Recipe.from_dict({"data": {"group_size": 3}, "train": {"batch_size": 8}})


def test_pointing_game_hits_and_chance(built, tiny_model, monkeypatch):
    import albef.evaluation.grounding as eg
    from albef.data.transforms import test_transform

    records = read_grounding(built / "grounding_test.json", str(built))
    grid = SIZE  # a map at pixel resolution: its maximum is exactly where the queued box is
    queue = []
    monkeypatch.setattr(
        eg,
        "gradcam_itm",
        lambda model, images, ids, mask, layer=None: torch.stack(
            [ev.oracle_heatmap(queue.pop(0), SIZE, SIZE, grid) for _ in range(len(images))]
        ),
    )
    queue[:] = [r.box for r in records]
    right, _ = ev.evaluate_pointing(tiny_model, records, Tokenizer(), test_transform(32), batch_size=4)
    pg = right["pointing_game"]
    area = 100.0 * sum(r.box[2] * r.box[3] / SIZE**2 for r in records) / len(records)
    assert pg["chance"] == pytest.approx(area) and 0 < pg["chance"] < 15
    assert pg["accuracy"] == 100.0
    queue[:] = [next(c for c in r.candidates if c != r.box) for r in records]
    wrong, _ = ev.evaluate_pointing(tiny_model, records, Tokenizer(), test_transform(32), batch_size=4)
    assert wrong["pointing_game"]["accuracy"] == 0.0  # the boxes never overlap


def test_distractors_fit_apart_and_no_twin_names_one(tmp_path, catalogue):
    out = tmp_path / "dis"
    sc.build_scenes(out, catalogue, attribution="x\n", **{**BUILD, "n_train": 20}, siblings=True, distractors=2)
    scenes = _load(out, "scenes.json")
    assert any(o["group"] == "x" for s in scenes for o in s["objects"])
    for s in scenes:
        boxes = [o["box"] for o in s["objects"]]
        for i, p in enumerate(boxes):  # no two objects overlap
            for q in boxes[i + 1 :]:
                assert p[0] + p[2] <= q[0] or q[0] + q[2] <= p[0] or p[1] + p[3] <= q[1] or q[1] + q[3] <= p[1]
        names_x = {o["name"] for o in s["objects"] if o["group"] == "x"}
        assert not names_x & {s["a"], s["b"]}
    train = [s for s in scenes if s["split"] == "train"]
    for s, t in zip(train[0::2], train[1::2], strict=True):  # a sibling keeps the distractors
        assert [o for o in s["objects"] if o["group"] == "x"] == [o for o in t["objects"] if o["group"] == "x"]
    by_image = {s["image"]: s for s in scenes}
    for case in _load(out, "twins_test.json"):
        s = by_image[case["image"]]
        distractors = {o["name"] for o in s["objects"] if o["group"] == "x"}
        for tw in case["twins"]:  # an object twin never brings in a name the scene holds
            assert tw["kind"] != "object" or not any(n in tw["caption"] for n in distractors)
    # the referents to point at include the distractors, and every object box is a candidate
    ground = _load(out, "grounding_test.json")
    assert any(len(g["candidates"]) > 3 for g in ground)
