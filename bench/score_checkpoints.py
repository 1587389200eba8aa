"""Score scene pretraining checkpoints on the held-out scenes, one row per checkpoint's step.

    .venv/bin/python bench/score_checkpoints.py snaps/*.pt --data data --out curve.json

For a learning curve within one run: copy each checkpoint aside as the run writes it (the trainer
keeps only its last two), then score them here. Each checkpoint is scored as the main job's report
scores its model (``albef.cli.mainjob.evaluate_scenes`` on all held-out scenes: the twins test,
scene retrieval with ITC alone and ITC + ITM, the pointing game). ``--layers 3 4 5`` adds the
pointing game on each of those text layers' cross-attention (``"pointing_by_layer"``).
``--train-swaps N`` adds ITC and ITM on N training scenes' captions against their swapped twins
(``"train_swaps"``): whether a model tells apart the relations of the very images it trained on,
beside the held-out test's new layouts. Writes ``--out`` as ``{step: {"twins", "pointing",
"retrieval_all"[, "pointing_by_layer", "train_swaps"]}}``; steps already there are kept, not scored
again (an option added on a rerun scores only the steps not yet in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path


def training_swaps(scene_dir: Path, n: int, seed: int = 0) -> list:
    """``n`` training scenes drawn at random (``seed``), each with its swapped twin ("B rel A" for
    "A rel B", counts kept), as :func:`albef.evaluation.scenes.read_twins` reads the test's."""
    from albef.data.scene_grammar import caption
    from albef.evaluation.scenes import read_twins

    train = [s for s in json.loads((scene_dir / "scenes.json").read_text()) if s["split"] == "train"]
    random.Random(seed).shuffle(train)
    rows = [
        {
            "image": s["image"],
            "caption": s["caption"],
            "twins": [{"kind": "swap", "caption": caption(s["b"], s["count_b"], s["relation"], s["a"], s["count_a"])}],
            "split": "train",
            "scene_id": s["scene_id"],
        }
        for s in train[:n]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "train_swaps.json"
        f.write_text(json.dumps(rows))
        return read_twins(f, scene_dir)


def main(argv: list[str] | None = None) -> int:
    from albef.checkpoints.pretrained import load_inference_model, peek_checkpoint
    from albef.cli.mainjob import SCALES, evaluate_scenes
    from albef.data.transforms import test_transform
    from albef.evaluation.grounding import read_grounding
    from albef.evaluation.scenes import evaluate_pointing, evaluate_twins
    from albef.text import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="training checkpoints (checkpoint_last.pt copies)")
    p.add_argument("--data", type=Path, default=Path("data"), help="the main job's data folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=SCALES["full"]["k"], help="ITM re-ranks ITC's top k")
    p.add_argument("--layers", type=int, nargs="*", default=[], help="text layers for Grad-CAM pointing")
    p.add_argument("--train-swaps", type=int, default=0, metavar="N", help="swapped twins of N training scenes")
    args = p.parse_args(argv)
    if args.train_swaps < 0:
        p.error(f"--train-swaps {args.train_swaps}: a number of training scenes, 0 or more")
    records = read_grounding(str(args.data / "scenes" / "grounding_test.json"), str(args.data / "scenes"))
    tokenizer = Tokenizer()
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    swaps = training_swaps(args.data / "scenes", args.train_swaps) if args.train_swaps else []
    for f in args.checkpoints:
        step = str(peek_checkpoint(f)["state"]["global_step"])  # memory-mapped: the tensors stay on disk
        if step in res:
            continue
        model = load_inference_model(f)
        sc = evaluate_scenes(model, args.data / "scenes", args.k, args.out.parent / "overlays", False)
        res[step] = {"twins": sc["twins"], "pointing": sc["pointing"], "retrieval_all": sc["retrieval"]["all"]}
        if args.layers:
            tf = test_transform(model.config.vision.image_size)
            res[step]["pointing_by_layer"] = {
                str(n): evaluate_pointing(model, records, tokenizer, tf, layer=n)[0]["pointing_game"]["accuracy"]
                for n in args.layers
            }
        if swaps:
            tw = evaluate_twins(model, swaps, tokenizer, test_transform(model.config.vision.image_size), blind=False)
            res[step]["train_swaps"] = {"n": tw["n"]["swap"], "itc": tw["itc"]["swap"], "itm": tw["itm"]["swap"]}
        args.out.write_text(json.dumps(res, indent=1))
        t, r = sc["twins"], sc["retrieval"]["all"]
        print(
            f"step {step}: twins ITC {t['itc']['overall']:.1f} ITM {t['itm']['overall']:.1f}, swapped ITC "
            f"{t['itc']['swap']:.1f} ITM {t['itm']['swap']:.1f}; TR@1 {r['itc']['txt_r1']:.1f} -> "
            f"{r['itm']['txt_r1']:.1f}, IR@1 {r['itc']['img_r1']:.1f} -> {r['itm']['img_r1']:.1f}; pointing game "
            f"{sc['pointing']['pointing_game']['accuracy']:.1f} (layer {sc['pointing']['layer']})"
            + "".join(f", layer {n}: {a:.1f}" for n, a in res[step].get("pointing_by_layer", {}).items())
            + (f"; training swaps ITC {tw['itc']['swap']:.1f} ITM {tw['itm']['swap']:.1f}" if swaps else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
