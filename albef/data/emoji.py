"""``albef data emoji DIR``: a real image–text set from the emoji-datasource npm packages.

Names, short names and categories come from ``emoji-datasource`` (MIT); the 64 px images and
sprite sheets from the Google (Noto Emoji, Apache-2.0) and Twitter (Twemoji, CC-BY-4.0) styles.
The packages are fetched with ``npm pack`` into ``DIR/cache`` once. Written, in the authors'
formats (paths relative to DIR):

* ``pretrain.json`` — train-split images of both styles with their captions;
* ``retrieval_{train,val,test}.json`` — split **by emoji** (80/10/10, fixed seed), skin-tone
  variants always on their base emoji's side; evaluation sets hold one image per emoji (the
  Google base image) so every caption has exactly one right image;
* ``grounding_{train,test}.json`` — windows of 3×3 cells cut from the Google sprite sheet, the
  expression is one cell's emoji name, the nine cells are the candidate boxes; test windows
  name test-split emoji only;
* ``LICENSE.md`` with the attribution.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

from PIL import Image

from albef.checkpoints.files import atomic_write_bytes, atomic_write_text
from albef.outputs import check_build, finish_build, start_build

PACKAGES = {"meta": "emoji-datasource", "google": "emoji-datasource-google", "twitter": "emoji-datasource-twitter"}
VERSION = "16.0.0"
STYLES = ("google", "twitter")
CELL, PAD = 64, 1  # sprite sheets: 64 px images in 66 px squares
LICENSE = """# Emoji data

- Names and metadata: emoji-datasource (https://github.com/iamcal/emoji-data), MIT License,
  Copyright (c) 2013 Cal Henderson.
- Google-style images: Noto Emoji by Google, Apache License 2.0
  (https://github.com/googlefonts/noto-emoji), via the emoji-datasource-google package.
- Twitter-style images: Twemoji by Twitter, Inc and other contributors, graphics licensed under
  CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), via emoji-datasource-twitter.
  Attribution: "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0".

Converted to the ALBEF authors' formats by `albef data emoji` (images composited on white).
"""


def fetch(cache: Path) -> dict[str, Path]:
    """``npm pack`` the three packages into ``cache`` (once); a clear error when npm fails."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, name in PACKAGES.items():
        tgz = cache / f"{name}-{VERSION}.tgz"
        if not tgz.exists():  # packed in a folder of its own and moved in whole: a killed fetch leaves no half file
            work = cache / f".npm-pack-{os.getpid()}"
            work.mkdir(exist_ok=True)
            try:
                try:
                    proc = subprocess.run(
                        ["npm", "pack", f"{name}@{VERSION}"], cwd=work, capture_output=True, text=True, timeout=600
                    )
                except (OSError, subprocess.TimeoutExpired) as e:
                    raise RuntimeError(
                        f"could not run npm to fetch {name}: {e}; install Node.js/npm or "
                        "check that the npm registry is reachable"
                    ) from e
                if proc.returncode != 0 or not (work / tgz.name).exists():
                    raise RuntimeError(
                        f"npm pack {name}@{VERSION} failed (is the npm registry reachable?):\n" + proc.stderr[-2000:]
                    )
                os.replace(work / tgz.name, tgz)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        out[key] = tgz
    return out


def _save_png(img: Image.Image, path: Path) -> None:
    """Written whole or not at all: the builders take a file that exists as done."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def captions_of(e: dict) -> list[str]:
    """The official name first, then the short names (underscores as spaces), deduplicated."""
    caps = []
    for c in [e.get("name") or ""] + [s.replace("_", " ").replace("-", " ") for s in e.get("short_names") or []]:
        c = c.lower().strip()
        if c and c not in caps:
            caps.append(c)
    return caps


def _rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


#: what :func:`build_emoji` writes that depends on its settings (the emoji images do not)
EMOJI_FILES = ("pretrain.json", "retrieval_*.json", "grounding_*.json", "splits.json", "grounding/*.png")


def emoji_settings(seed: int = 0, windows: int = 400) -> dict:
    """What an emoji set is built from (recorded beside it: albef.outputs.start_build)."""
    return {"kind": "emoji", "seed": seed, "windows": windows}


def build_emoji(
    out: str | Path, seed: int = 0, windows: int = 400, fetcher=fetch, overwrite: bool = False
) -> dict[str, int]:
    """Build the data set under ``out`` (idempotent); returns counts. A set ``out`` holds that was
    built with other settings is refused before anything is fetched, unless ``overwrite``
    (:func:`albef.outputs.start_build`; the emoji images, the same for every setting, are kept)."""
    out = Path(out)
    settings = emoji_settings(seed, windows)
    check_build(out, settings, overwrite)  # before the download; the old set is cleared only once it is here
    tgz = fetcher(out / "cache")
    start_build(out, settings, EMOJI_FILES, overwrite)
    with tarfile.open(tgz["meta"]) as t:
        emoji = json.load(t.extractfile("package/emoji.json"))
    emoji = [e for e in emoji if e.get("category") != "Component" and captions_of(e)]
    # images: base and skin-tone variants, per style
    images: dict[str, dict[str, str]] = {}  # concept (base unified) -> {style: path of base}
    all_images: dict[str, list[str]] = {}  # concept -> every image path (styles x variants)
    for style in STYLES:
        with tarfile.open(tgz[style]) as t:
            members = {Path(m.name).name: m for m in t.getmembers() if f"/img/{style}/64/" in m.name}
            for e in emoji:
                variants = [e] + list((e.get("skin_variations") or {}).values())
                for k, v in enumerate(variants):
                    if not v.get(f"has_img_{style}") or v["image"] not in members:
                        continue
                    rel = f"images/{style}/{v['image']}"
                    if not (out / rel).exists():
                        (out / rel).parent.mkdir(parents=True, exist_ok=True)
                        _save_png(_rgb(t.extractfile(members[v["image"]]).read()), out / rel)
                    all_images.setdefault(e["unified"], []).append(rel)
                    if k == 0:
                        images.setdefault(e["unified"], {})[style] = rel
    concepts = [e for e in emoji if e["unified"] in all_images]
    order = list(range(len(concepts)))
    random.Random(seed).shuffle(order)
    n = len(order)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[concepts[i]["unified"]] = "train" if rank < 0.8 * n else ("val" if rank < 0.9 * n else "test")
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for e in concepts:
        by_split[split_of[e["unified"]]].append(e)

    def dump(name: str, data: list) -> None:
        (out / name).write_text(json.dumps(data, indent=0))

    train = by_split["train"]
    dump(
        "pretrain.json", [{"image": img, "caption": captions_of(e)} for e in train for img in all_images[e["unified"]]]
    )
    dump(
        "retrieval_train.json",
        [
            {"image": img, "caption": c, "image_id": e["unified"]}
            for e in train
            for img in all_images[e["unified"]]
            for c in captions_of(e)
        ],
    )
    for split in ("val", "test"):
        dump(
            f"retrieval_{split}.json",
            [
                {"image": images[e["unified"]]["google"], "caption": captions_of(e)}
                for e in by_split[split]
                if "google" in images.get(e["unified"], {})
            ],
        )
    n_windows = _grounding(out, tgz["google"], emoji, split_of, seed, windows)
    (out / "LICENSE.md").write_text(LICENSE)
    (out / "splits.json").write_text(json.dumps({k: sorted(e["unified"] for e in v) for k, v in by_split.items()}))
    finish_build(out, settings)
    return {
        "concepts": len(concepts),
        "train": len(by_split["train"]),
        "val": len(by_split["val"]),
        "test": len(by_split["test"]),
        "images": sum(len(v) for v in all_images.values()),
        **n_windows,
    }


def _grounding(
    out: Path, google_tgz: Path, emoji: list[dict], split_of: dict[str, str], seed: int, windows: int
) -> dict[str, int]:
    """Windows of 3x3 sheet cells; the referred cell is a base emoji of the window's split."""
    with tarfile.open(google_tgz) as t:
        sheet = _rgb(t.extractfile("package/img/google/sheets/64.png").read())
    cells = {(e["sheet_x"], e["sheet_y"]): e for e in emoji if e.get("has_img_google")}
    rng = random.Random(seed + 1)
    (out / "grounding").mkdir(exist_ok=True)
    counts = {}
    for split, n_win in (("train", windows), ("test", windows // 2)):
        entries = []
        targets = [xy for xy, e in cells.items() if split_of.get(e["unified"]) == split]
        rng.shuffle(targets)
        for k, (tx, ty) in enumerate(targets):
            if len(entries) >= n_win:
                break
            offsets = [(i, j) for i in range(3) for j in range(3)]
            rng.shuffle(offsets)  # the target's place in the window varies
            full = [
                (tx - i, ty - j)
                for i, j in offsets
                if all((tx - i + a, ty - j + b) in cells for a in range(3) for b in range(3))
            ]
            if not full:
                continue  # no window around it without an empty cell (a trivial candidate)
            x0, y0 = full[0]
            step = CELL + 2 * PAD
            window = sheet.crop((x0 * step, y0 * step, (x0 + 3) * step, (y0 + 3) * step))
            rel = f"grounding/{split}_{k:04d}.png"
            _save_png(window, out / rel)  # always: which window a name holds depends on the settings
            cand = [[i * step + PAD, j * step + PAD, CELL, CELL] for j in range(3) for i in range(3)]
            box = [(tx - x0) * step + PAD, (ty - y0) * step + PAD, CELL, CELL]
            name = captions_of(cells[(tx, ty)])[0]
            entries.append(
                {"image": rel, "text": name, "ref_id": f"{split}-{k}", "box": box, "candidates": cand, "split": split}
            )
        atomic_write_text(out / f"grounding_{split}.json", json.dumps(entries, indent=0))
        counts[f"grounding_{split}"] = len(entries)
    return counts
