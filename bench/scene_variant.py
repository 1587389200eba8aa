"""The main job's scene pretraining with one change, scored on the held-out scenes.

    .venv/bin/python bench/scene_variant.py runs/variants/share25 --steps 500 --scale '{"sibling_share": 0.25}'
    .venv/bin/python bench/scene_variant.py runs/variants/sincos --recipe \\
        '{"model": {"overrides": {"vision": {"image_size": 128, "pos_embed_init": "sincos"}}}}'

``--scale`` overrides entries of ``albef.cli.mainjob.FULL`` (the data and the budget); ``--recipe``
is merged into the pretraining recipe's dictionary. Needs the main job's ``data/`` (``albef main``
builds it). Writes ``OUT/variant.json``: the twins test, the pointing game and scene retrieval on
all held-out scenes, as the main job's report has them.

``--sibling-negatives P`` is a probe, not the authors' ITM: each ITM negative (the image of a
text, the text of an image) is with probability P the row's batch neighbour instead of the one
drawn from ITC's similarities. With mirrored siblings all in one batch (``--scale '{"siblings":
"mirror", "sibling_share": 1.0}'`` on data built with them) that neighbour is the scene's mirror
image, whose caption is the scene's swapped twin: ITM is handed the relation to learn at every step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def with_sibling_negatives(neg, share: float, generator: torch.Generator | None = None):
    """``neg`` (``albef.training.pretrain.Negatives``) with each negative index replaced, with
    probability ``share``, by its row's sibling: rows 2i and 2i+1 are a sampler unit of group
    size 2 (a lone last row keeps its own draw)."""
    n, dev = neg.image.shape[0], neg.image.device
    sib = torch.arange(n, device=dev) ^ 1
    ok = sib < n
    draw_on = generator.device if generator is not None else dev  # the training loop's generator is on its device
    take_img = (torch.rand(n, generator=generator, device=draw_on) < share).to(dev) & ok
    take_txt = (torch.rand(n, generator=generator, device=draw_on) < share).to(dev) & ok
    return neg._replace(image=torch.where(take_img, sib, neg.image), text=torch.where(take_txt, sib, neg.text))


@contextlib.contextmanager
def sibling_negatives(share: float) -> Iterator[None]:
    """Pretraining inside this block hands ITM its sibling as the negative ``share`` of the time
    (replayed draws are kept as recorded)."""
    from albef.training.pretrain import ALBEFPretrainer

    if share <= 0:  # nothing patched, no draw taken: the run is the plain one, draw for draw
        yield
        return
    drawn = ALBEFPretrainer._hard_negatives

    def patched(self, itc, idx, draws, generator):
        neg = drawn(self, itc, idx, draws, generator)
        return neg if draws.neg_image_idx is not None else with_sibling_negatives(neg, share, generator)

    ALBEFPretrainer._hard_negatives = torch.no_grad()(patched)
    try:
        yield
    finally:
        ALBEFPretrainer._hard_negatives = drawn


def train_and_evaluate(d: dict, out: Path, data: Path, k: int):
    """Pretrain by the recipe dictionary ``d`` (its run in ``out/pretrain``, replaced), then score its
    last checkpoint as the main job's report does: (model, scores, pretraining s, evaluation s)."""
    from albef.checkpoints.pretrained import load_inference_model
    from albef.cli.mainjob import _train, evaluate_scenes
    from albef.recipes import Recipe

    _, seconds = _train(Recipe.from_dict(d), overwrite=True)
    model = load_inference_model(out / "pretrain" / "checkpoint_last.pt")
    t0 = time.perf_counter()
    sc = evaluate_scenes(model, data / "scenes", k, out / "overlays", subsets=False)
    return model, sc, seconds, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from albef.cli.mainjob import SCALES, scene_pretraining
    from albef.recipes import _merge

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--steps", type=int, default=SCALES["full"]["pretrain"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=json.loads, default={}, help="JSON: entries of the main job's FULL scale")
    p.add_argument("--recipe", type=json.loads, default={}, help="JSON merged into the pretraining recipe")
    p.add_argument(
        "--sibling-negatives",
        type=float,
        default=0.0,
        metavar="P",
        help="probe: each ITM negative is the row's batch neighbour with probability P (module doc)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.sibling_negatives <= 1:
        p.error(f"--sibling-negatives {args.sibling_negatives}: a probability, in [0, 1]")
    s = {**SCALES["full"], "pretrain": args.steps, **args.scale}
    args.out.mkdir(parents=True, exist_ok=True)
    d = _merge(scene_pretraining(args.out, args.data, s, args.seed).to_dict(), args.recipe)
    with sibling_negatives(args.sibling_negatives):
        _, sc, seconds, evaluation_s = train_and_evaluate(d, args.out, args.data, s["k"])
    res = {
        "scale": args.scale,
        "recipe": args.recipe,
        "sibling_negatives": args.sibling_negatives,
        "steps": args.steps,
        "seed": args.seed,
        "pretraining_s": seconds,
        "evaluation_s": evaluation_s,
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
