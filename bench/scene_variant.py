"""The main job's scene pretraining with one change, scored on the held-out scenes.

    .venv/bin/python bench/scene_variant.py runs/variants/share25 --steps 500 --scale '{"sibling_share": 0.25}'
    .venv/bin/python bench/scene_variant.py runs/variants/sincos --recipe \\
        '{"model": {"overrides": {"vision": {"image_size": 128, "pos_embed_init": "sincos"}}}}'

``--scale`` overrides entries of ``albef.cli.mainjob.FULL`` (the data and the budget); ``--recipe``
is merged into the pretraining recipe's dictionary. Needs the main job's ``data/`` (``albef main``
builds it). Writes ``OUT/variant.json``: the twins test, the pointing game and scene retrieval on
all held-out scenes, as the main job's report has them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from albef.checkpoints.pretrained import load_inference_model
    from albef.cli.mainjob import SCALES, _train, evaluate_scenes, scene_pretraining
    from albef.recipes import Recipe, _merge

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--steps", type=int, default=SCALES["full"]["pretrain"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=json.loads, default={}, help="JSON: entries of the main job's FULL scale")
    p.add_argument("--recipe", type=json.loads, default={}, help="JSON merged into the pretraining recipe")
    args = p.parse_args(argv)
    s = {**SCALES["full"], "pretrain": args.steps, **args.scale}
    args.out.mkdir(parents=True, exist_ok=True)
    d = _merge(scene_pretraining(args.out, args.data, s, args.seed).to_dict(), args.recipe)
    _, seconds = _train(Recipe.from_dict(d), overwrite=True)
    model = load_inference_model(args.out / "pretrain" / "checkpoint_last.pt")
    t0 = time.perf_counter()
    sc = evaluate_scenes(model, args.data / "scenes", s["k"], args.out / "overlays", subsets=False)
    res = {
        "scale": args.scale,
        "recipe": args.recipe,
        "steps": args.steps,
        "seed": args.seed,
        "pretraining_s": seconds,
        "evaluation_s": time.perf_counter() - t0,
        "twins": sc["twins"],
        "pointing": sc["pointing"],
        "retrieval_all": sc["retrieval"]["all"],
    }
    (args.out / "variant.json").write_text(json.dumps(res, indent=1))
    t, r = sc["twins"], sc["retrieval"]["all"]
    print(f"twins overall ITC {t['itc']['overall']:.1f} ITM {t['itm']['overall']:.1f}; swap ITM {t['itm']['swap']:.1f}")
    for k, name in (("txt_r1", "TR@1"), ("img_r1", "IR@1")):
        print(f"{name} ITC {r['itc'][k]:.1f}, ITC + ITM {r['itm'][k]:.1f}")
    print(f"pointing game {sc['pointing']['pointing_game']['accuracy']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
