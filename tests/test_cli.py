"""The command line: dispatch, the demo and the benchmark run end to end (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import albef
from albef.cli import bench, demo, main
from albef.heap import _mallopt


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert main(["--help"]) == 0
    assert "parity" in capsys.readouterr().out
    assert main(["nope"]) == 2


@pytest.mark.slow
def test_demo_runs_and_reports_recall(capsys):
    assert demo.main(["--steps", "3", "--batch-size", "4", "--queue-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "ITC R@1 image->text" in out and "chance" in out


def test_bench_prints_a_json_record(capsys):
    assert (
        bench.main(
            [
                "--preset",
                "albef-tiny",
                "--image-size",
                "32",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--threads",
                "1",
                "--json",
            ]
        )
        == 0
    )
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["batch_size"] == 2 and rec["median_step_s"] > 0 and rec["peak_memory_mb"] > 0
    assert rec["optimizer_in_backward"] is True  # the training loop's set-up for one process
    assert rec["keep_freed_memory"] is (_mallopt() is not None)  # the loop's heap on the CPU (glibc)
    assert (
        bench.main(
            [
                "--preset",
                "albef-tiny",
                "--image-size",
                "32",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--threads",
                "1",
                "--json",
                "--optimizer-in-backward",
                "false",
                "--keep-freed-memory",
                "false",
            ]
        )
        == 0
    )
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["optimizer_in_backward"] is False and rec["keep_freed_memory"] is False


@pytest.mark.slow
def test_import_albef_loads_the_inference_api_on_first_use():
    """`import albef` (and so every CLI command's start) skips torchvision until the API is used."""
    code = (
        "import sys, albef; assert 'torchvision' not in sys.modules and 'Pipeline' in dir(albef); "
        "from albef import Pipeline; assert 'torchvision' in sys.modules and Pipeline is albef.Pipeline; "
        "import albef.api; assert Pipeline is albef.api.Pipeline"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Pipline'"):
        albef.Pipline  # noqa: B018


def test_from_the_shell_an_input_error_is_its_message_without_a_traceback(tmp_path, monkeypatch, capsys):
    from albef.cli import main

    argv = ["albef", "evaluate", "ve", "--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "x.json")]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("ALBEF_TRACEBACK", raising=False)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith("albef evaluate: error: ") and "no_model" in err and "Traceback" not in err
    monkeypatch.setenv("ALBEF_TRACEBACK", "1")
    with pytest.raises((FileNotFoundError, ValueError), match="no_model"):
        main()
    with pytest.raises((FileNotFoundError, ValueError), match="no_model"):  # called with argv: raises
        main(argv[1:])


def test_from_the_shell_a_commands_own_refusal_has_the_same_status(tmp_path, monkeypatch, capsys):
    # `raise SystemExit("message")` inside a command: status 2 like the input errors, not Python's 1
    from albef.cli import main

    monkeypatch.setattr(sys, "argv", ["albef", "search", " ", "--index", str(tmp_path), "--model", "m"])
    assert main() == 2
    assert "the query is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="the query is empty"):  # called with argv: raises
        main(["search", " ", "--index", str(tmp_path), "--model", "m"])
