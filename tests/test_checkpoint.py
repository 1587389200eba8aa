from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from albef.checkpoints.files import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from albef.training.checkpoint import find_last_checkpoint, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]


class NotAllowed:
    """A user class: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.x = 1


def _ckpt(value: float = 1.0) -> dict:
    model = {"w": torch.full((64, 64), value), "b": torch.arange(5)}
    return {"model": model, "step": 7, "name": "run", "hist": [0.5, 0.25]}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    assert (a["step"], a["name"], a["hist"]) == (b["step"], b["name"], b["hist"])


def test_round_trip(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "sub" / "dir" / CHECKPOINT_NAME)
    assert path == tmp_path / "sub" / "dir" / CHECKPOINT_NAME
    _assert_equal(load_checkpoint(path), _ckpt())
    # Overwrite in place, and no temp file is left behind.
    save_checkpoint(_ckpt(3.0), path)
    _assert_equal(load_checkpoint(str(path)), _ckpt(3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_NAME]


def test_find_last_checkpoint(tmp_path):
    assert find_last_checkpoint(tmp_path) is None
    assert find_last_checkpoint(tmp_path / "missing") is None
    save_checkpoint(_ckpt(), tmp_path / CHECKPOINT_NAME)
    assert find_last_checkpoint(tmp_path) == tmp_path / CHECKPOINT_NAME


def test_previous_checkpoint_survives_kill_mid_write(tmp_path):
    target = tmp_path / CHECKPOINT_NAME
    save_checkpoint(_ckpt(1.0), target)
    script = textwrap.dedent(
        """
        import io, os, sys
        import torch
        from albef.checkpoints.files import save_checkpoint

        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os._exit(1)  # like a SIGKILL / node loss: no cleanup, no finally blocks

        torch.save = half_save
        save_checkpoint({"model": {"w": torch.full((64, 64), 2.0)}, "step": 8}, sys.argv[1])
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    # The killed writer left its partial temp file (proof the kill really happened mid-write) ...
    leftovers = [p for p in tmp_path.iterdir() if p.name != CHECKPOINT_NAME]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{CHECKPOINT_NAME}.tmp-"), leftovers
    assert leftovers[0].stat().st_size > 0
    with pytest.raises(CheckpointError):
        load_checkpoint(leftovers[0])
    # ... but the real checkpoint is the previous, complete one, and it is what resume finds.
    assert find_last_checkpoint(tmp_path) == target
    _assert_equal(load_checkpoint(target), _ckpt(1.0))


def test_failed_save_keeps_previous_and_cleans_temp(tmp_path):
    target = save_checkpoint(_ckpt(1.0), tmp_path / CHECKPOINT_NAME)
    # a local lambda cannot be pickled (AttributeError up to Python 3.13, PicklingError from 3.14)
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint({"fn": lambda: None}, target)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    _assert_equal(load_checkpoint(target), _ckpt(1.0))


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.5, 0.99, 0.0])
def test_truncated_file_is_checkpoint_error(tmp_path, fraction):
    good = save_checkpoint(_ckpt(), tmp_path / "good.pt")
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    msg = str(info.value)
    assert str(bad) in msg and "not a complete checkpoint" in msg and "earlier checkpoint" in msg
    assert isinstance(info.value, ValueError)


def test_garbage_file_is_checkpoint_error(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"definitely not a checkpoint " * 100)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(bad)


def test_custom_class_is_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"obj": NotAllowed(), "w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "refused for safety" in msg and "NotAllowed" in msg
    assert "weights_only=False" not in msg and "trust" not in msg  # never advise turning the protection off


def test_numpy_array_is_refused(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"state": np.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_not_loaded(tmp_path):
    path = tmp_path / "plain.pkl"
    with open(path, "wb") as f:
        pickle.dump({"obj": NotAllowed()}, f)
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bad_map_location_is_not_called_corrupt(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "ok.pt")
    with pytest.raises(RuntimeError, match="CUDA") as info:
        load_checkpoint(path, map_location="cuda")
    assert not isinstance(info.value, CheckpointError)


def test_non_dict_is_checkpoint_error(tmp_path):
    path = save_checkpoint([1, 2], tmp_path / "list.pt")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def _draws() -> tuple:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1)


def test_rng_state_round_trip_through_file(tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # ... and in python's (gauss_next)
    state = rng_state()
    expected = _draws()
    path = save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    loaded = load_checkpoint(path)["rng"]  # must survive weights_only=True
    # Scramble every generator before restoring.
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(loaded)
    got = _draws()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_rng_state_contents_are_weights_only_safe():
    state = rng_state()
    assert isinstance(state["torch"], torch.Tensor)
    assert state["numpy"]["keys"].dtype == torch.int64 and state["numpy"]["keys"].numel() == 624
    assert state["python"]["internal"].numel() == 625
    assert ("cuda" in state) == torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_round_trip(tmp_path):
    torch.cuda.manual_seed_all(5)
    state = load_checkpoint(save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt"), map_location="cuda")["rng"]
    expected = torch.rand(8, device="cuda")
    torch.cuda.manual_seed_all(0)
    set_rng_state(state)
    assert torch.equal(torch.rand(8, device="cuda"), expected)
