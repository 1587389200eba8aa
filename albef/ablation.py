"""``albef ablation``: the paper's pretraining ablation (Table 1) in miniature, on the emoji split.

Each row pretrains with the same data, steps and seed as the main job's pretraining stage, with
objectives switched as in the paper, then fine-tunes retrieval the same way and reports TR/IR
R@1/R@5 on the held-out emoji (ITC + ITM re-ranking), mean ± standard deviation over seeds.
Results go to ``docs/ablation.md`` (and ``OUT/ablation.json``), with the command of each row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from albef.mdblock import write_block

ROWS = {
    "MLM + ITM": {"itc": False, "itc_distill": False, "mlm_distill": False},
    "ITC + MLM + ITM": {"hard_negatives": False, "itc_distill": False, "mlm_distill": False},
    "ITC + MLM + ITM_hard": {"itc_distill": False, "mlm_distill": False},
    "ITC_MoD + MLM + ITM_hard": {"mlm_distill": False},
    "Full (ITC_MoD + MLM_MoD + ITM_hard)": {},
}
METRICS = ("txt_r1", "txt_r5", "img_r1", "img_r5")


def run_row(flags: dict, seed: int, out: Path, data: Path, scale: str) -> dict[str, float]:
    from albef.cli_evaluate import load_inference_model
    from albef.data.retrieval import read_retrieval_eval
    from albef.data.transforms import test_transform
    from albef.evaluation.retrieval import evaluate_retrieval
    from albef.mainjob import SCALES, _recipe, _train
    from albef.text import Tokenizer

    s = SCALES[scale]
    emoji = data / "emoji"
    pre = _recipe("pretrain", out / "pretrain", [str(emoji / "pretrain.json")], emoji, s["pretrain"], s["batch"],
                  None, seed, lr=s["pretrain_lr"], randaugment=s["randaugment"])
    for k, v in flags.items():
        setattr(pre.train, k, v)
    _train(pre, overwrite=True)  # an unfinished (row, seed) pair starts over; finished ones are not re-run
    _train(_recipe("retrieval", out / "retrieval", [str(emoji / "retrieval_train.json")], emoji, s["retrieval"],
                   s["batch"], str(out / "pretrain" / "checkpoint_last.pt"), seed, randaugment=s["randaugment"]),
           overwrite=True)
    test = read_retrieval_eval(emoji / "retrieval_test.json", str(emoji))
    model = load_inference_model(out / "retrieval" / "checkpoint_last.pt")
    return evaluate_retrieval(model, test, Tokenizer(), test_transform(64), k=s["k"])["itm"]


def write_table(results: dict[str, list[dict]], path: Path, seeds: list[int], scale: str) -> None:
    lines = ["# Pretraining ablation in miniature (emoji, held-out retrieval)", "",
             f"albef-small (MiniLM text side) at 64 px; each row: the main job's pretraining and retrieval "
             f"stages (scale `{scale}`), seeds {seeds}; ITC + ITM re-ranking on the held-out emoji; "
             "mean ± standard deviation over seeds.", "",
             "| row | seeds | TR@1 | TR@5 | IR@1 | IR@5 | command |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        cells = []
        for m in METRICS:
            vals = [r[m] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | `albef ablation --row \"{name}\"` |")
    # only the marked block is replaced: the analysis written around the table survives a re-run
    write_block(path, "ablation-table", "\n".join(lines), at="start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data", help="where `albef main` put the emoji data")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--row", action="append", choices=list(ROWS), help="only these rows (repeatable)")
    p.add_argument("--scale", default="ablation", help="steps per stage, from albef.mainjob.SCALES")
    p.add_argument("--table", default="docs/ablation.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    done_path = out / "ablation.json"
    results: dict[str, list[dict]] = json.loads(done_path.read_text()) if done_path.exists() else {}
    for name in args.row or list(ROWS):
        runs = results.setdefault(name, [])
        for seed in args.seeds[len(runs):]:  # resumable: finished (row, seed) pairs are kept
            runs.append(run_row(ROWS[name], seed, out / f"{list(ROWS).index(name)}_{seed}", Path(args.data),
                                args.scale))
            out.mkdir(parents=True, exist_ok=True)
            done_path.write_text(json.dumps(results, indent=2))
    write_table({k: v for k, v in results.items() if v}, Path(args.table), args.seeds, args.scale)
    print(Path(args.table).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
