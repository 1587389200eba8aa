"""The 4M / 14M recipes start where the authors start: the ViT from a DeiT-B/16 state dict and the
text side from a bert-base-uncased folder, both local files named in the recipe. Small fake files
in exactly those formats show the path works; a missing one stops the command before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albef.cli import main as cli_main
from albef.data.cli import write_shapes
from albef.recipes import load_recipe
from albef.training.loop import TrainRun

ROOT = Path(__file__).resolve().parents[1]
H, LAYERS, FFN, VOCAB, POS = 32, 4, 64, 30522, 64  # albef-tiny's text side


def fake_deit(path: Path, width: int = 32, depth: int = 2, grid: int = 2) -> dict[str, torch.Tensor]:
    """A DeiT checkpoint as facebookresearch/deit publishes it: ``{"model": state_dict}`` in timm's
    names, with the ImageNet classifier, made for another resolution (a 2 x 2 patch grid)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": r(width, 3, 8, 8),
        "patch_embed.proj.bias": r(width),
        "norm.weight": r(width),
        "norm.bias": r(width),
        "head.weight": r(1000, width),
        "head.bias": r(1000),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": r(width),
                p + "norm1.bias": r(width),
                p + "attn.qkv.weight": r(3 * width, width),
                p + "attn.qkv.bias": r(3 * width),
                p + "attn.proj.weight": r(width, width),
                p + "attn.proj.bias": r(width),
                p + "norm2.weight": r(width),
                p + "norm2.bias": r(width),
                p + "mlp.fc1.weight": r(4 * width, width),
                p + "mlp.fc1.bias": r(4 * width),
                p + "mlp.fc2.weight": r(width, 4 * width),
                p + "mlp.fc2.bias": r(width),
            }
        )
    torch.save({"model": sd}, path)
    return sd


def fake_bert_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A bert-base-uncased folder as Hugging Face hosts it: config.json and pytorch_model.bin of a
    ``BertForPreTraining`` with the original LayerNorm names (gamma / beta), pooler and NSP head."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        "bert.embeddings.word_embeddings.weight": r(VOCAB, H),
        "bert.embeddings.position_embeddings.weight": r(POS, H),
        "bert.embeddings.token_type_embeddings.weight": r(2, H),
        "bert.embeddings.LayerNorm.gamma": r(H),
        "bert.embeddings.LayerNorm.beta": r(H),
        "bert.pooler.dense.weight": r(H, H),
        "bert.pooler.dense.bias": r(H),
        "cls.predictions.bias": r(VOCAB),
        "cls.predictions.transform.dense.weight": r(H, H),
        "cls.predictions.transform.dense.bias": r(H),
        "cls.predictions.transform.LayerNorm.gamma": r(H),
        "cls.predictions.transform.LayerNorm.beta": r(H),
        "cls.seq_relationship.weight": r(2, H),
        "cls.seq_relationship.bias": r(2),
    }
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(H, H), r(H)
        sd[p + "attention.output.LayerNorm.gamma"], sd[p + "attention.output.LayerNorm.beta"] = r(H), r(H)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(FFN, H), r(FFN)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(H, FFN), r(H)
        sd[p + "output.LayerNorm.gamma"], sd[p + "output.LayerNorm.beta"] = r(H), r(H)
    folder.mkdir(parents=True)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["BertForMaskedLM"],
                "model_type": "bert",
                "hidden_size": H,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": 2,
                "intermediate_size": FFN,
                "vocab_size": VOCAB,
                "max_position_embeddings": POS,
                "layer_norm_eps": 1e-12,
                "type_vocab_size": 2,
            }
        )
    )
    return sd


def _overrides(data: Path, out: Path, **model) -> list[str]:
    items = {
        "model.preset": "albef-tiny",
        "model.overrides": "{queue_size: 32}",
        "data.train_files": f"[{data / 'pretrain.json'}]",
        "data.image_root": str(data),
        "data.num_workers": 0,
        "train.batch_size": 4,
        "train.max_steps": 1,
        "train.device": "cpu",
        "output_dir": str(out),
        **{f"model.{k}": v for k, v in model.items()},
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes(d, n=8, image_size=32, seed=1)
    return d


def test_the_authors_pretraining_recipes_name_deit_and_bert():
    for name in ("pretrain_4m.yaml", "pretrain_14m.yaml"):
        m = load_recipe(ROOT / "recipes" / name).model
        assert m.init is None
        assert m.vision_init and "deit_base_patch16_224" in m.vision_init
        assert m.text_init and m.text_init.rstrip("/").endswith("bert-base-uncased")


def test_student_and_teacher_start_from_the_deit_and_bert_files(shapes, tmp_path):
    deit = fake_deit(tmp_path / "deit_base_patch16_224-b5f2ef4d.pth")
    bert = fake_bert_folder(tmp_path / "bert-base-uncased")
    recipe = load_recipe(
        None,
        _overrides(
            shapes,
            tmp_path / "run",
            vision_init=tmp_path / "deit_base_patch16_224-b5f2ef4d.pth",
            text_init=tmp_path / "bert-base-uncased",
        ),
    )
    run = TrainRun(recipe)
    for model in (run.trainer.model, run.trainer.model_m):
        vit = model.visual_encoder.state_dict()
        for k in (
            "cls_token",
            "patch_embed.proj.weight",
            "blocks.1.attn.qkv.weight",
            "blocks.0.mlp.fc2.bias",
            "norm.weight",
        ):
            assert torch.equal(vit[k], deit[k]), k
        # 2 x 2 -> 4 x 4 patch grid: the [CLS] position is kept, the grid is interpolated
        assert vit["pos_embed"].shape == (1, 17, 32)
        assert torch.equal(vit["pos_embed"][:, 0], deit["pos_embed"][:, 0])
        text = model.text_encoder.state_dict()
        assert torch.equal(text["embeddings.word_embeddings.weight"], bert["bert.embeddings.word_embeddings.weight"])
        assert torch.equal(text["embeddings.LayerNorm.weight"], bert["bert.embeddings.LayerNorm.gamma"])
        for i in range(LAYERS):  # fusion layers (2, 3) too: self-attention and feed-forward from BERT
            b = f"bert.encoder.layer.{i}."
            assert torch.equal(
                text[f"encoder.layer.{i}.attention.self.query.weight"], bert[b + "attention.self.query.weight"]
            )
            assert torch.equal(text[f"encoder.layer.{i}.output.LayerNorm.bias"], bert[b + "output.LayerNorm.beta"])
        mlm = model.mlm_head.state_dict()
        assert torch.equal(mlm["transform.LayerNorm.weight"], bert["cls.predictions.transform.LayerNorm.gamma"])
    # and a step trains from there
    assert (
        cli_main(
            [
                "pretrain",
                *_overrides(
                    shapes,
                    tmp_path / "cli",
                    vision_init=tmp_path / "deit_base_patch16_224-b5f2ef4d.pth",
                    text_init=tmp_path / "bert-base-uncased",
                ),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize(
    "key, must",
    [
        ("vision_init", "timm/DeiT ViT state dict"),
        ("text_init", "Hugging Face BERT folder"),
        ("init", "authors' checkpoint"),
    ],
)
def test_a_missing_init_file_stops_before_any_work(shapes, tmp_path, capsys, key, must):
    missing = tmp_path / "weights" / "nowhere"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", *_overrides(shapes, out, **{key: missing})])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"model.{key}: {missing}" in err and must in err
    assert not out.exists()  # no folder, no work
    with pytest.raises(FileNotFoundError, match=f"model.{key}"):  # the library entry point checks first too
        TrainRun(load_recipe(None, _overrides(shapes, out, **{key: missing})))
    assert not out.exists()


def test_an_incomplete_bert_folder_is_named(shapes, tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli_main(["pretrain", *_overrides(shapes, tmp_path / "run", text_init=tmp_path / "bert")])
    assert "is not a complete Hugging Face BERT folder" in capsys.readouterr().err


def test_the_4m_recipe_without_the_files_names_them(capsys):
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--config", str(ROOT / "recipes" / "pretrain_4m.yaml"), "output_dir=/nonexistent/x"])
    err = capsys.readouterr().err
    assert "deit_base_patch16_224-b5f2ef4d.pth not found" in err
