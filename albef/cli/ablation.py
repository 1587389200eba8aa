"""``albef ablation``: the paper's pretraining ablation (Table 1) in miniature, on the emoji scenes.

Each row pretrains with the main job's data, preset and seed (scale ``ablation``: fewer steps),
with the objectives switched as in the paper, and is scored on the held-out scenes: the relation
test (ITM and ITC accuracy against the twins), scene retrieval R@1 with ITC alone and with ITC + ITM
re-ranking, Grad-CAM pointing, and ITM's training loss over the last 100 steps (whether ITM has
left its prior); mean ± standard deviation over seeds. Results go to ``docs/ablation.md`` (and
``OUT/ablation.json``), with the command of each row. ``--set key.sub=value`` changes the recipe of
every row alike (e.g. ``train.lr_scale.temp=0.2``); such an ablation gets a folder and a table of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from albef.checkpoints.files import atomic_write_text
from albef.cli.mdblock import write_block
from albef.data.annotations import read_json_file

if TYPE_CHECKING:
    from albef.recipes import Recipe

ROWS = {
    "MLM + ITM": {"itc": False, "itc_distill": False, "mlm_distill": False},
    "ITC + MLM + ITM": {"hard_negatives": False, "itc_distill": False, "mlm_distill": False},
    "ITC + MLM + ITM_hard": {"itc_distill": False, "mlm_distill": False},
    "ITC_MoD + MLM + ITM_hard": {"mlm_distill": False},
    "Full (ITC_MoD + MLM_MoD + ITM_hard)": {},
}
METRICS = {
    "twins_itm": "relation test, ITM %",
    "twins_itc": "relation test, ITC %",
    "swap_itm": "relation swapped, ITM %",
    "txt_r1_itc": "scene TR@1 (ITC)",
    "txt_r1": "scene TR@1 (ITC+ITM)",
    "img_r1_itc": "scene IR@1 (ITC)",
    "img_r1": "scene IR@1 (ITC+ITM)",
    "pointing": "pointing game %",
    "itm_loss_end": "ITM loss, last 100 steps",
}
# ITM's loss for a head that has learned nothing: each batch pairs B positives with 2B negatives
ITM_PRIOR = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))


def _steps(scale: str, pretrain_steps: int | None) -> int:
    from albef.cli.mainjob import SCALES

    return pretrain_steps or SCALES[scale]["pretrain"]


def with_settings(recipe: Recipe, sets: list[str]) -> Recipe:
    """``recipe`` with the ``key.sub=value`` assignments of ``--set`` applied, in order."""
    from albef.recipes import Recipe, apply_override

    if not sets:
        return recipe
    d = recipe.to_dict()
    for assignment in sets:
        apply_override(d, assignment)
    return Recipe.from_dict(d)


def check_settings(sets: list[str]) -> None:
    """Refuse ``--set`` assignments that are not recipe keys, or that would undo a row's switches."""
    from albef.recipes import load_recipe

    switched = {f"train.{k}" for flags in ROWS.values() for k in flags}
    per_run = {"train", "train.seed", "train.max_steps", "output_dir", "task"}  # each run sets these itself
    for assignment in sets:
        key = assignment.split("=", 1)[0].strip()
        if key in switched:
            raise SystemExit(f"--set {assignment}: {key} is what the rows switch; it cannot be set for all of them")
        if key in per_run:
            raise SystemExit(f"--set {assignment}: each run sets {key} itself (--seeds, --pretrain-steps, --out)")
    try:
        load_recipe(None, sets)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--set {' '.join(sets)}: {e}") from e


def job_lr_scale(scale: str, pretrain_steps: int | None) -> dict[str, float]:
    """``train.lr_scale`` of the main job's pretraining at ``scale``."""
    from albef.cli.mainjob import SCALES, pretrain_lr_scale

    return pretrain_lr_scale({**SCALES[scale], "pretrain": _steps(scale, pretrain_steps)})


def run_lr_scale(run: dict, sets: list[str], job: dict[str, float] | None = None) -> dict[str, float]:
    """The ``train.lr_scale`` a run trained with: recorded, or its ``--set`` assignments on ``job``
    (for runs that record none, ``job`` empty: they were made while the job's own lr_scale was)."""
    from albef.recipes import apply_override

    if "lr_scale" in run:
        return run["lr_scale"]
    d = {"train": {"lr_scale": dict(job or {})}}
    for assignment in sets:
        apply_override(d, assignment)
    return d["train"]["lr_scale"] or {}


def settings_suffix(sets: list[str]) -> str:
    """The settings in a folder or block name.

    >>> settings_suffix(["train.lr_scale.temp=0.2"])
    '-train.lr_scale.temp-0.2'
    """
    return "".join("-" + re.sub(r"[^A-Za-z0-9._]+", "-", s).strip("-") for s in sets)


def run_row(
    flags: dict,
    seed: int,
    out: Path,
    data: Path,
    scale: str,
    keep: bool = False,
    pretrain_steps: int | None = None,
    sets: list[str] | None = None,
) -> dict[str, float]:
    from albef.checkpoints.pretrained import load_inference_model
    from albef.cli.mainjob import SCALES, _train, build_data, evaluate_scenes, scene_pretraining

    s = {**SCALES[scale], "pretrain": _steps(scale, pretrain_steps)}
    build_data(data, s)
    out.mkdir(parents=True, exist_ok=True)
    pre = with_settings(scene_pretraining(out, data, s, seed), sets or [])
    for k, v in flags.items():
        setattr(pre.train, k, v)
    _train(pre, overwrite=True)  # an unfinished (row, seed) pair starts over; finished ones are not re-run
    r = evaluate_scenes(
        load_inference_model(out / "pretrain" / "checkpoint_last.pt"),
        data / "scenes",
        s["k"],
        out / "overlays",
        subsets=False,
    )
    if not keep:  # 0.8 GB a run (student, teacher, AdamW), 15 runs: the scores are what the table needs
        for f in (out / "pretrain").glob("checkpoint_*.pt"):
            f.unlink()
    itc, itm = r["retrieval"]["all"]["itc"], r["retrieval"]["all"]["itm"]
    return {
        "steps": s["pretrain"],
        "seed": seed,
        **({"set": list(sets)} if sets else {}),
        "lr_scale": dict(pre.train.lr_scale),
        "twins_itm": r["twins"]["itm"]["overall"],
        "swap_itm": r["twins"]["itm"]["swap"],
        "twins_itc": r["twins"]["itc"]["overall"],
        "txt_r1_itc": itc["txt_r1"],
        "txt_r1": itm["txt_r1"],
        "img_r1_itc": itc["img_r1"],
        "img_r1": itm["img_r1"],
        "pointing": r["pointing"]["pointing_game"]["accuracy"],
        "pointing_layer": r["pointing"]["layer"],
        "itm_loss_end": itm_loss_end(out / "pretrain" / "metrics.jsonl", s["pretrain"]),
    }


def run_dir(out: Path, row: str, seed: int) -> Path:
    """A run's folder: ``OUT/<row index>_<seed>``."""
    return out / f"{list(ROWS).index(row)}_{seed}"


def itm_loss_end(metrics: Path, steps: int, last: int = 100) -> float | None:
    """The mean logged ITM training loss over a run's last ``last`` steps (None without a log).

    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> rows = [{"step": s, "split": "train", "loss_itm": s / 100} for s in (10, 20, 30)]
    >>> _ = log.write_text("\\n".join(map(json.dumps, rows)))
    >>> itm_loss_end(log, steps=30, last=15)
    0.25
    """
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    vals = [r["loss_itm"] for r in rows if r.get("split") == "train" and r["step"] > steps - last and "loss_itm" in r]
    return statistics.mean(vals) if vals else None


def _cell(runs: list[dict], metric: str) -> str:
    """Mean ± standard deviation over the runs that recorded ``metric`` ("—" if none did)."""
    vals = [r[metric] for r in runs if r.get(metric) is not None]
    if not vals:
        return "—"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    some = f" ({len(vals)} of {len(runs)} runs)" if len(vals) < len(runs) else ""
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}{some}"


def write_table(
    results: dict[str, list[dict]],
    path: Path,
    seeds: list[int],
    scale: str,
    pretrain_steps: int | None = None,
    sets: list[str] | None = None,
) -> None:
    """The table of ``results`` in its block of ``path``: the scale's own number of steps in the block
    ``ablation-table`` (first in the file), another number N in ``ablation-table-N-steps`` (appended),
    ``--set`` settings in a block named after them too (appended)."""
    from albef.cli.mainjob import SCALES

    sets = sets or []
    s, steps = SCALES[scale], _steps(scale, pretrain_steps)
    own = steps == s["pretrain"] and not sets
    option = ("" if steps == s["pretrain"] else f" --pretrain-steps {steps}") + "".join(
        f" --set {shlex.quote(a)}" for a in sets
    )
    title = ", ".join(([] if steps == s["pretrain"] else [f"{steps} steps"]) + [f"`{a}`" for a in sets])
    lines = [
        "# Pretraining ablation in miniature (emoji scenes)" + (f", {title}" if title else ""),
        "",
        f"albef-small (MiniLM text side, ViT from random weights) at 128 px; each row: the main job's "
        f"pretraining (scale `{scale}`{option}: {steps} steps of batch {s['batch']}), seeds {seeds}, scored "
        "on the held-out scenes; mean ± standard deviation over seeds. Chance: relation test 50 %, "
        "scene R@1 100 / test images, pointing game the boxes' share of the image (see runs/main/report.md; "
        "Grad-CAM on the layer each run's code chose, text layer 5, the last fusion layer, for runs that do not "
        "record it: docs/results.md compares the layers); "
        f"ITM's loss for a head that has learned nothing {ITM_PRIOR:.3f} (one positive to two negatives). "
        "—: not recorded by the code that ran those runs.",
        "",
        "| row | seeds | " + " | ".join(METRICS.values()) + " | command |",
        "|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    order = {name: i for i, name in enumerate(ROWS)}  # the paper's order; unknown names last
    for name, runs in sorted(results.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        cells = [_cell(runs, m) for m in METRICS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f' | `albef ablation --row "{name}"{option}` |')
    # only the marked block is replaced: the analysis written around the table survives a re-run
    block = "ablation-table" if own else f"ablation-table-{steps}-steps{settings_suffix(sets)}"
    write_block(path, block, "\n".join(lines), at="start" if own else "end")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data", help="where `albef main` put its data (built if missing)")
    p.add_argument(
        "--out",
        help="default: runs/ablation, runs/ablation-N-steps with --pretrain-steps N, and the --set settings after it",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--row", action="append", choices=list(ROWS), help="only these rows (repeatable)")
    p.add_argument("--scale", default="ablation", help="steps per stage, from albef.cli.mainjob.SCALES")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps per run instead of the scale's")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe change for every row, e.g. train.lr_scale.temp=0.2 (repeatable; own folder and table)",
    )
    p.add_argument("--table", default="docs/ablation.md")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (0.8 GB a run)")
    args = p.parse_args(argv)
    check_settings(args.set)
    steps = _steps(args.scale, args.pretrain_steps)
    default_out = "runs/ablation" + ("" if args.pretrain_steps is None else f"-{steps}-steps")
    out = Path(args.out or default_out + settings_suffix(args.set))
    done_path = out / "ablation.json"
    results: dict[str, list[dict]] = read_json_file(done_path) if done_path.exists() else {}
    default_steps = _steps(args.scale, None)  # runs scored before the count was recorded ran the default
    other = {r.get("steps", default_steps) for runs in results.values() for r in runs} - {steps}
    if other:
        raise SystemExit(
            f"{done_path} holds runs of {sorted(other)} pretraining steps, not {steps}: "
            "give another --out for this number of steps"
        )
    other_sets = {tuple(r.get("set", [])) for runs in results.values() for r in runs} - {tuple(args.set)}
    if other_sets:
        shown = "; ".join(" ".join(f"--set {a}" for a in o) or "no --set" for o in sorted(other_sets))
        raise SystemExit(f"{done_path} holds runs made with {shown}, not this run's settings: give another --out")
    want = run_lr_scale({}, args.set, job_lr_scale(args.scale, args.pretrain_steps))
    other_scales = {
        json.dumps(run_lr_scale(r, r.get("set", [])), sort_keys=True) for rs in results.values() for r in rs
    }
    other_scales -= {json.dumps(want, sort_keys=True)}
    if other_scales:
        raise SystemExit(
            f"{done_path} holds runs trained with train.lr_scale {' / '.join(sorted(other_scales))}, this run's "
            f"recipe has {json.dumps(want)}: give another --out"
        )
    backfilled = False  # runs scored before ITM's loss was recorded: from their own logs, where kept
    for name, runs in results.items():
        for seed, r in zip(args.seeds, runs, strict=False):  # a row may have fewer runs than seeds
            if r.get("itm_loss_end") is None:
                log = run_dir(out, name, r.get("seed", seed)) / "pretrain" / "metrics.jsonl"
                r["itm_loss_end"] = itm_loss_end(log, steps)
                backfilled |= r["itm_loss_end"] is not None
    if backfilled:
        atomic_write_text(done_path, json.dumps(results, indent=2))
    for name in args.row or list(ROWS):
        runs = results.setdefault(name, [])
        for seed in args.seeds[len(runs) :]:  # resumable: finished (row, seed) pairs are kept
            runs.append(
                run_row(
                    ROWS[name],
                    seed,
                    run_dir(out, name, seed),
                    Path(args.data),
                    args.scale,
                    args.keep_checkpoints,
                    args.pretrain_steps,
                    args.set,
                )
            )
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(done_path, json.dumps(results, indent=2))
    write_table(
        {k: v for k, v in results.items() if v}, Path(args.table), args.seeds, args.scale, args.pretrain_steps, args.set
    )
    print(Path(args.table).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
