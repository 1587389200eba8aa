"""Model folders and training checkpoints written by an earlier albef still load, and give the
outputs that version computed (tests/data/written_by_048924b/README.md says how they were made)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albef import ALBEF, Pipeline, load_model

OLD = Path(__file__).parent / "data" / "written_by_048924b"
EXPECTED = json.loads((OLD / "expected.json").read_text())


def _inputs():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    ids = torch.tensor(EXPECTED["inputs"]["input_ids"])
    return images, ids, (ids > 0).long()


@pytest.mark.parametrize(("name", "path"), [("model_folder", "model"), ("training_checkpoint", "checkpoint_last.pt")])
def test_an_old_file_loads_and_gives_its_outputs(name, path):
    model = load_model(OLD / path)
    assert isinstance(model, ALBEF)
    images, ids, mask = _inputs()
    with torch.no_grad():
        sim, match = model.similarity(images, ids, mask), model.match(images, ids, mask)
    # the same computation in the same order: equal up to the BLAS's own rounding on another CPU
    torch.testing.assert_close(sim, torch.tensor(EXPECTED[name]["similarity"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(match, torch.tensor(EXPECTED[name]["match"]), atol=1e-6, rtol=0)


def test_an_old_model_folder_serves_through_the_pipeline():
    pipe = Pipeline.from_pretrained(OLD / "model", device="cpu")
    assert pipe.model.config.text.hidden_size == 4


def test_a_run_resumes_from_an_old_checkpoint_as_if_never_stopped(tmp_path, monkeypatch):
    """Step 1 by the old version, step 2 by this one == both steps by this one."""
    import shutil

    from albef.data.cli import write_shapes
    from albef.recipes import load_recipe
    from albef.training.loop import TrainRun

    monkeypatch.chdir(tmp_path)
    write_shapes("data", n=8, image_size=16)  # what the old run trained on (README.md)
    # the defaults of that version where they have changed since: no uint8 wrap in RandomAugment, heads
    # from N(0, 0.02) (its checkpoint's config predates head_init, which resuming does not compare)
    two_steps = ["train.max_steps=2", "data.randaugment_wrap=false", "model.overrides.head_init=normal"]
    (tmp_path / "resumed").mkdir()
    shutil.copy(OLD / "checkpoint_last.pt", tmp_path / "resumed" / "checkpoint_last.pt")
    resumed = TrainRun(load_recipe(OLD / "r.yaml", [*two_steps, "output_dir=resumed"]), resume=True)
    assert resumed.state.global_step == 1
    resumed.fit()
    straight = TrainRun(load_recipe(OLD / "r.yaml", [*two_steps, "output_dir=straight"]))
    straight.fit()
    a, b = resumed.trainer.state_dict(), straight.trainer.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
