"""Commands never replace results they did not make in this run unless told to (albef.outputs)."""

from __future__ import annotations

import json

import pytest

from albef.data.cli import main as data_main
from albef.outputs import BUILD_RECORD, earlier_outputs, finish_build, new_output_file, start_build


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


def test_data_shapes_rebuilds_its_own_set_and_replaces_another_only_when_told(tmp_path):
    assert data_main(["shapes", str(tmp_path), "--n", "6", "--image-size", "16", "--test", "2"]) == 0
    first = (tmp_path / "pretrain.json").read_text()
    assert data_main(["shapes", str(tmp_path), "--n", "6", "--image-size", "16", "--test", "2"]) == 0  # the same set
    assert (tmp_path / "pretrain.json").read_text() == first
    with pytest.raises(FileExistsError, match=r"shapes data built with other settings \(n: 6 there, 4 here, test: 2"):
        data_main(["shapes", str(tmp_path), "--n", "4", "--image-size", "16"])
    assert (tmp_path / "pretrain.json").read_text() == first
    (tmp_path / "notes.txt").write_text("mine")
    assert data_main(["shapes", str(tmp_path), "--n", "4", "--image-size", "16", "--overwrite"]) == 0
    assert len(json.loads((tmp_path / "pretrain.json").read_text())) == 4
    assert not (tmp_path / "ve_test.json").exists()  # nothing of the earlier set outlives it
    assert json.loads((tmp_path / "retrieval_test.json").read_text()) == []
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files of other names are left alone
    assert json.loads((tmp_path / BUILD_RECORD).read_text())["complete"] is True


def test_a_replacement_cut_short_leaves_its_own_settings_behind(tmp_path):
    a, b = {"kind": "shapes", "n": 2}, {"kind": "shapes", "n": 3}
    start_build(tmp_path, a, ("*.json",))
    (tmp_path / "a.json").write_text("[]")
    finish_build(tmp_path, a)
    start_build(tmp_path, b, ("*.json",), overwrite=True)  # ... and killed before finish_build
    assert not (tmp_path / "a.json").exists()
    assert json.loads((tmp_path / BUILD_RECORD).read_text()) == {"settings": b, "complete": False}
    with pytest.raises(FileExistsError, match="n: 3 there, 2 here"):  # the old set is not taken to be there
        start_build(tmp_path, a, ("*.json",))
    start_build(tmp_path, b, ("*.json",))  # the cut build goes on


def test_another_kind_is_refused_even_with_overwrite_and_a_folder_without_a_record_is_built_in_place(tmp_path):
    from albef.data.cli import write_shapes

    write_shapes(tmp_path, 4, image_size=16)
    for extra in ([], ["--overwrite"]):  # refused before any fetch
        with pytest.raises(FileExistsError, match="holds shapes data; emoji data needs a folder of its own"):
            data_main(["emoji", str(tmp_path), *extra])
    (tmp_path / BUILD_RECORD).unlink()  # a folder without a record is built in place ...
    assert data_main(["shapes", str(tmp_path), "--n", "3", "--image-size", "16"]) == 0
    assert len(json.loads((tmp_path / "pretrain.json").read_text())) == 3
    assert (tmp_path / "images" / "000003.png").exists()  # ... where its other files stay
    (tmp_path / BUILD_RECORD).write_text('{"settings": [1]}')  # a malformed record is no record
    assert data_main(["shapes", str(tmp_path), "--n", "2", "--image-size", "16", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png", "000001.png"]  # ... or go


def test_evaluate_refuses_one_file_for_metrics_and_answers_before_loading_a_model(tmp_path, capsys):
    from albef.cli import main as cli_main

    argv = ["evaluate", "vqa", "--model", str(tmp_path / "none"), "--data", "q.json", "--answers", "a.json"]
    with pytest.raises(SystemExit):
        cli_main([*argv, "--out", str(tmp_path / "r.json"), "--results", str(tmp_path / "." / "r.json")])
    assert "--out and --results name one file" in capsys.readouterr().err
