"""`albef parity` against the reference vectors in ../shared/parity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from albef.cli import main as cli_main
from albef.cli import parity


@pytest.mark.slow
def test_parity_vectors_pass_in_float64_and_float32(parity_dir, capsys):
    assert cli_main(["parity", str(parity_dir)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert lines and not any(line.startswith("FAIL") for line in lines)
    assert any("float64 pretrain: outputs/mlm_logits_m_masked" in line for line in lines)
    assert any("float32 retrieval: outputs/itm_logits" in line for line in lines)
    # float64 must agree far below the 1e-8 bar, not just under it
    checks = parity.run_parity(parity_dir, dtypes=("float64",), tasks=("pretrain",))
    assert max(c.rel for c in checks) < 1e-12


def test_parity_of_the_plain_model(parity_dir, capsys):
    """``--plain``: every check on the plain model alone (the fast model's own checks left out)."""
    assert cli_main(["parity", str(parity_dir), "--plain", "--dtype", "float64"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ok", "FAIL"))]
    assert lines and not any(line.startswith("FAIL") for line in lines)
    assert any("pretrain: outputs/fused_pos_last_hidden" in line for line in lines)
    assert not any("real tokens only" in line for line in lines)
    checks = parity.run_parity(parity_dir, dtypes=("float64",), tasks=("pretrain",), plain=True)
    assert max(c.rel for c in checks) < 1e-12


def test_parity_detects_a_wrong_weight(parity_dir, tmp_path):
    for f in ("config.json", "pretrain_io.pt"):
        shutil.copy(parity_dir / f, tmp_path / f)
    sd = torch.load(parity_dir / "pretrain_state_dict.pt", weights_only=True)
    key = "text_encoder.bert.encoder.layer.3.crossattention.output.dense.bias"
    # not a constant shift: the LayerNorm that follows would cancel it exactly
    sd[key] = sd[key] + 1e-3 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0))
    torch.save(sd, tmp_path / "pretrain_state_dict.pt")
    checks = parity.run_parity(tmp_path, dtypes=("float64",))
    failed = {c.name for c in checks if not c.ok}
    assert "pretrain: outputs/fused_pos_last_hidden" in failed
    assert "pretrain: outputs/image_embeds" not in failed  # the ViT is untouched
    assert parity.main([str(tmp_path), "--dtype", "float64"]) == 1


def test_parity_resizes_pos_embed_for_another_run_resolution(parity_dir, tmp_path):
    """A folder whose weights were made for another resolution loads with the bicubic resize."""
    meta = json.loads((parity_dir / "config.json").read_text())
    meta["vit"]["img_size_run"] = 48
    cfg = parity.config_from_parity(meta)
    assert cfg.vision.num_patches == 36
    task = parity._Task(parity_dir, meta, "pretrain", "float64")
    sd = task.state_dict()
    assert sd["model.visual_encoder.pos_embed"].shape == (1, 37, 64)
    assert sd["model_m.visual_encoder.pos_embed"].shape == (1, 37, 64)


def test_parity_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="parity folder"):
        parity.run_parity(tmp_path)
