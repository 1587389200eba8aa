"""Training metrics: JSONL (source of truth) + CSV + TensorBoard, and a loss-curve plot.

Example:
    >>> rank = 0  # torch.distributed.get_rank() in a distributed run
    >>> with MetricsLogger("run", enabled=rank == 0, tensorboard=False) as log:
    ...     for step in (10, 20):
    ...         log.log(step, {"loss_itc": 1.2, "loss_mlm": 3.4, "lr": 1e-4})
    >>> plot_losses("run/metrics.jsonl", "run/losses.png")
    PosixPath('run/losses.png')
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from albef.checkpoints.files import atomic_write_text

__all__ = ["MetricsLogger", "plot_losses"]

_RESERVED = ("step", "split", "time")
_TB_WARNED = False


class MetricsLogger:
    """Append-only metrics log in ``out_dir``: ``metrics.jsonl``, ``metrics.csv``, ``tensorboard/``.

    Every line is flushed as written, so a killed run keeps all metrics up to its last ``log``.
    ``enabled=False`` (non-zero ranks) makes every method a no-op and touches no files.
    ``resume_step``: on restart from a checkpoint at that step, rows with ``step >= resume_step``
    (logged after the checkpoint by the killed run) are dropped so steps are not duplicated.

    Example:
        >>> ckpt = None  # or the checkpoint a resumed run starts from
        >>> log = MetricsLogger("run", resume_step=ckpt["step"] if ckpt else None, tensorboard=False)
        >>> log.log(100, {"loss_itc": 0.9}); log.log(100, {"loss_itc": 1.1}, split="val"); log.close()
        >>> len(Path("run/metrics.jsonl").read_text().splitlines())
        2
    """

    def __init__(
        self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.csv_path = self.out_dir / "metrics.csv"
        self._jsonl: Any = None
        self._csv: Any = None
        self._tb: Any = None
        self._columns: list[str] = []
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.jsonl_path.exists():
            rows, clean = _read_jsonl(self.jsonl_path)
            kept = [r for r in rows if resume_step is None or r.get("step", -1) < resume_step]
            if not clean:
                warnings.warn(f"{self.jsonl_path}: dropping a partially written line (killed run)", stacklevel=2)
            if not clean or len(kept) != len(rows):
                # Rewritten (atomically) rather than appended to, so a torn last line of a killed
                # run cannot glue onto the next record.
                atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
            self._columns = _union_keys(kept)
            self._rewrite_csv(kept)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _summary_writer(self.out_dir / "tensorboard", resume_step)

    def log(self, step: int, values: dict[str, Any], split: str = "train") -> None:
        """Record ``values`` (floats, ints, 0-d tensors) at ``step``; ``split`` is e.g. "train" or "val"."""
        if not self.enabled:
            return
        if self._jsonl is None:
            raise RuntimeError(f"MetricsLogger for {self.out_dir} is closed")
        clash = [k for k in values if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved ({', '.join(_RESERVED)})")
        row = {"step": int(step), "split": split, "time": time.time()}
        row.update((k, _scalar(v)) for k, v in values.items())
        self._jsonl.write(json.dumps(row) + "\n")  # NaN/Infinity are written as-is; json.loads reads them
        self._jsonl.flush()
        new = [k for k in row if k not in self._columns]
        if new:
            # A CSV header cannot grow in place; rebuild from the JSONL, which already has this row.
            self._columns += new
            self._rewrite_csv(_read_jsonl(self.jsonl_path)[0])
        else:
            csv.DictWriter(self._csv, self._columns, restval="").writerow(row)
            self._csv.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in _RESERVED:
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))
            self._tb.flush()

    def _rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if not self._columns:
            return
        # Built in memory and renamed into place so a kill mid-rewrite cannot lose the old CSV.
        w = csv.DictWriter(buf := io.StringIO(), self._columns, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")

    def close(self) -> None:
        """Flush and close every file; safe to call twice."""
        for name in ("_jsonl", "_csv", "_tb"):
            f = getattr(self, name)
            if f is not None:
                f.close()
                setattr(self, name, None)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scalar(v: Any) -> int | float:
    v = v.item() if callable(getattr(v, "item", None)) else v  # tensors, numpy scalars
    if isinstance(v, bool):
        return int(v)
    return v if isinstance(v, int) else float(v)


def _union_keys(rows: list[dict[str, Any]]) -> list[str]:
    cols = dict.fromkeys(_RESERVED)  # dict keeps first-seen order, unlike set
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a metrics JSONL, skipping a torn line; ``clean`` is False if anything was skipped."""
    text = path.read_text(encoding="utf-8")
    rows, clean = [], not text or text.endswith("\n")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip():
            clean = False
    return rows, clean


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    global _TB_WARNED
    try:  # lazy: tensorboard is heavy to import and optional for the JSONL/CSV logs
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:
        if not _TB_WARNED:
            warnings.warn(f"TensorBoard unavailable ({e}); logging metrics to JSONL/CSV only", stacklevel=3)
            _TB_WARNED = True
        return None
    # purge_step hides events a killed run wrote after the checkpoint it is resuming from.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def plot_losses(jsonl_path: str | Path, png_path: str | Path, keys: list[str] | None = None) -> Path:
    """Plot ``loss*`` keys (or ``keys``) of a metrics JSONL against step: train as lines, val as points.

    Example:
        >>> with MetricsLogger("run", tensorboard=False) as log:
        ...     log.log(1, {"loss_itc": 2.0, "loss_itm": 0.7}); log.log(2, {"loss_itc": 1.5, "loss_itm": 0.6})
        >>> plot_losses("run/metrics.jsonl", "run/losses.png", keys=["loss_itc", "loss_itm"])
        PosixPath('run/losses.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: never touch the global backend
    from matplotlib.figure import Figure

    jsonl_path, png_path = Path(jsonl_path), Path(png_path)
    rows = [r for r in _read_jsonl(jsonl_path)[0] if r.get("split", "train") in ("train", "val")]
    numeric = [k for k in _union_keys(rows) if k not in _RESERVED and any(_finite(r.get(k)) for r in rows)]
    if keys is None:
        keys = [k for k in numeric if k.startswith("loss")]
    elif missing := [k for k in keys if k not in numeric]:
        raise ValueError(f"{jsonl_path}: no numeric data for {missing}; available: {numeric}")
    if not keys:
        raise ValueError(f"{jsonl_path}: no loss values to plot (no train/val rows with numeric 'loss*' keys)")

    ncols = 1 if len(keys) == 1 else 2
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 3.6 * nrows))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        all_vals: list[float] = []
        for split, style in (("train", {"lw": 1.0}), ("val", {"marker": "o", "ms": 4, "lw": 1.0})):
            pts = sorted((r["step"], r[key]) for r in rows if r.get("split", "train") == split and _finite(r.get(key)))
            if pts:
                steps, vals = zip(*pts, strict=True)
                ax.plot(steps, vals, label=split, **style)
                all_vals += vals
        # Losses often fall by orders of magnitude early; linear axes then flatten everything after.
        if min(all_vals) > 0 and max(all_vals) / min(all_vals) > 100:
            ax.set_yscale("log")
        ax.set(title=key, xlabel="step", ylabel=key)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(str(jsonl_path))
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return png_path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
