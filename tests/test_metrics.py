from __future__ import annotations

import csv
import json
import sys
import time

import pytest
import torch

from albef.training import metrics
from albef.training.metrics import MetricsLogger, plot_losses


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_jsonl_and_csv_contents(tmp_path):
    t0 = time.time()
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss_itc": 2.5, "loss_mlm": torch.tensor(4.0), "lr": 1e-4})
        log.log(2, {"loss_itc": 2.0, "loss_mlm": 3.5, "lr": 2e-4})
        log.log(2, {"loss_itc": 2.2, "loss_mlm": 3.9, "lr": 2e-4}, split="val")
    rows = _jsonl(tmp_path / "metrics.jsonl")
    got = [(r["step"], r["split"], r["loss_itc"]) for r in rows]
    assert got == [(1, "train", 2.5), (2, "train", 2.0), (2, "val", 2.2)]
    assert rows[0]["loss_mlm"] == 4.0 and rows[0]["lr"] == 1e-4
    assert all(t0 <= r["time"] <= time.time() for r in rows)
    table = _csv(tmp_path / "metrics.csv")
    assert list(table[0]) == ["step", "split", "time", "loss_itc", "loss_mlm", "lr"]
    got = [(r["step"], r["split"], float(r["loss_mlm"])) for r in table]
    assert got == [("1", "train", 4.0), ("2", "train", 3.5), ("2", "val", 3.9)]


def test_lines_are_flushed_before_close(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss": 1.0})
    # A killed run never reaches close(); what was logged must already be on disk.
    assert _jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0
    assert _csv(tmp_path / "metrics.csv")[0]["loss"] == "1.0"
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.log(2, {"loss": 1.0})


def test_csv_column_union(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss_itc": 1.0})
        log.log(2, {"loss_itc": 0.9, "loss_itm": 0.7})
        log.log(3, {"acc": 0.5}, split="val")
        log.log(4, {"loss_itc": 0.8})
    table = _csv(tmp_path / "metrics.csv")
    assert list(table[0]) == ["step", "split", "time", "loss_itc", "loss_itm", "acc"]
    assert [(r["step"], r["loss_itc"], r["loss_itm"], r["acc"]) for r in table] == [
        ("1", "1.0", "", ""),
        ("2", "0.9", "0.7", ""),
        ("3", "", "", "0.5"),
        ("4", "0.8", "", ""),
    ]
    assert len(_jsonl(tmp_path / "metrics.jsonl")) == 4


def test_resume_drops_steps_after_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 7):
            log.log(step, {"loss": 1.0 / step})
        log.log(5, {"loss_val": 0.3}, split="val")
    # The run was checkpointed at step 4 and then killed at step 6: steps 4.. will be redone.
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=4) as log:
        assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        log.log(4, {"loss": 0.2})
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    table = _csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in table] == ["1", "2", "3", "4"] and table[-1]["loss"] == "0.2"
    # Without resume_step the existing history is kept and appended to.
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(5, {"loss": 0.1})
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in _csv(tmp_path / "metrics.csv")] == ["1", "2", "3", "4", "5"]


def test_resume_repairs_torn_last_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tr')  # killed mid-write
    with pytest.warns(match="metrics.jsonl"):
        log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(2, {"loss": 0.5})
    log.close()
    assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_reserved_names_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log, pytest.raises(ValueError, match="reserved"):
        log.log(1, {"step": 3.0})


def test_disabled_logger_creates_nothing(tmp_path):
    out = tmp_path / "rank1"
    log = MetricsLogger(out, enabled=False, resume_step=3)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not out.exists()


def test_tensorboard_event_file(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"loss_itc": 1.0})
        log.log(2, {"loss_itc": 0.5}, split="val")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_import_failure_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise
    monkeypatch.setattr(metrics, "_TB_WARNED", False)
    with pytest.warns(UserWarning, match="TensorBoard unavailable") as record:
        a = MetricsLogger(tmp_path / "a")
        b = MetricsLogger(tmp_path / "b")
    assert len([w for w in record if "TensorBoard" in str(w.message)]) == 1
    a.log(1, {"loss": 1.0})
    b.log(1, {"loss": 1.0})
    a.close()
    b.close()
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert _jsonl(tmp_path / "a" / "metrics.jsonl")[0]["loss"] == 1.0


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


def test_plot_losses_png(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 200):
            log.log(step, {"loss_itc": 10.0 / step, "loss_mlm": 5.0 - step / 100, "lr": 1e-4})
            if step % 50 == 0:
                log.log(step, {"loss_itc": 12.0 / step}, split="val")
        log.log(200, {"loss_itm": float("nan")})  # non-finite values are skipped, not plotted
    out = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "plots" / "losses.png")
    assert out == tmp_path / "plots" / "losses.png"
    _check_png(out)
    _check_png(plot_losses(tmp_path / "metrics.jsonl", tmp_path / "lr.png", keys=["lr"]))


def test_plot_losses_errors(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_losses(empty, tmp_path / "x.png")
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"acc": 0.5})
    with pytest.raises(ValueError, match="no loss values"):
        plot_losses(empty, tmp_path / "x.png")
    with pytest.raises(ValueError, match="loss_typo"):
        plot_losses(empty, tmp_path / "x.png", keys=["loss_typo"])
    assert not (tmp_path / "x.png").exists()
