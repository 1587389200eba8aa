"""bf16 autocast on the CPU against float32, on the main job's model and data: one bf16 run beside
two float32 seeds (the seed spread is the yardstick), each the main job's pretraining at the
ablation's budget, scored on the held-out scenes.

    .venv/bin/python bench/bf16_vs_fp32.py --data data --out runs/precision   # ~25 min on 2 cores

Prints a Markdown table (step time, the losses of the last 100 steps, the scene metrics) and
writes it with the raw numbers to OUT/precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RUNS = (("fp32", 0), ("fp32", 1), ("bf16", 0))


def losses(run: Path, last: int = 100) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    end = rows[-1]["step"]
    tail = [r for r in rows if r["step"] > end - last]
    out = {k: statistics.mean(r[k] for r in tail) for k in ("loss_itc", "loss_itm", "loss_mlm")}
    out["samples_per_s"] = statistics.median(r["samples_per_s"] for r in tail)
    return out


def main(argv: list[str] | None = None) -> int:
    from albef.cli.ablation import run_row

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data")
    p.add_argument("--out", default="runs/precision")
    p.add_argument("--scale", default="ablation")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = {}
    for precision, seed in RUNS:
        run = out / f"{precision}_{seed}"
        metrics = run_row({"precision": precision}, seed, run, Path(args.data), args.scale)
        results[f"{precision} seed {seed}"] = {**metrics, **losses(run)}
    cols = (
        "samples_per_s",
        "loss_itc",
        "loss_itm",
        "loss_mlm",
        "twins_itc",
        "twins_itm",
        "txt_r1",
        "img_r1",
        "pointing",
    )
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {k} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for k, v in results.items()]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"results": results, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
