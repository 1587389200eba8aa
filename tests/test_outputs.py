"""Commands never replace results they did not make in this run unless told to (albef.outputs)."""

from __future__ import annotations

import json

import pytest

from albef.data.cli import main as data_main
from albef.outputs import earlier_outputs, new_output_file


def test_a_new_output_file_is_refused_where_it_would_replace_something(tmp_path):
    target = tmp_path / "a" / "b" / "m.json"
    assert new_output_file(target, "--out") == target and target.parent.is_dir()  # its folder made now
    target.write_text("kept")
    with pytest.raises(FileExistsError, match=r"--out .*m\.json already exists: .*--overwrite"):
        new_output_file(target, "--out")
    assert new_output_file(target, "--out", overwrite=True) == target and target.read_text() == "kept"
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path"):
        new_output_file(tmp_path / "a", "--results", overwrite=True)


def test_earlier_outputs_are_only_the_named_ones(tmp_path):
    assert earlier_outputs(tmp_path / "none", ("*.png",), "--overlays") == []  # nothing there yet
    (tmp_path / "g_1_ok.png").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "g_2_miss.png").mkdir()  # a folder is not a file of a run
    with pytest.raises(FileExistsError, match=r"--overlays .* 1 file\(s\) of an earlier run \(g_1_ok\.png"):
        earlier_outputs(tmp_path, ("g_*_ok.png", "g_*_miss.png"), "--overlays")
    found = earlier_outputs(tmp_path, ("g_*_ok.png", "g_*_miss.png", "g_1_*"), "--overlays", overwrite=True)
    assert found == [tmp_path / "g_1_ok.png"]  # once, though two patterns match it
    with pytest.raises(NotADirectoryError, match="is a file; give a folder"):
        earlier_outputs(tmp_path / "notes.txt", ("*.png",), "--overlays")


def test_data_shapes_keeps_a_set_unless_told_and_then_leaves_none_of_it(tmp_path, capsys):
    assert data_main(["shapes", str(tmp_path), "--n", "6", "--image-size", "16", "--test", "2"]) == 0
    first = (tmp_path / "pretrain.json").read_text()
    with pytest.raises(FileExistsError, match="DIR .* earlier run .*--overwrite"):
        data_main(["shapes", str(tmp_path), "--n", "4", "--image-size", "16"])
    assert (tmp_path / "pretrain.json").read_text() == first
    assert data_main(["shapes", str(tmp_path), "--n", "4", "--image-size", "16", "--overwrite"]) == 0
    assert len(json.loads((tmp_path / "pretrain.json").read_text())) == 4
    assert not (tmp_path / "ve_test.json").exists()  # the earlier set's held-out files do not outlive it
    assert json.loads((tmp_path / "retrieval_test.json").read_text()) == []
