"""Retrieval: the authors' metrics by hand, batched re-ranking vs the per-query loop, k, ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.checkpoints import save_pretrained
from albef.cli import main as cli_main
from albef.data.cli import write_shapes
from albef.evaluation.retrieval import embed_gallery, rerank, rerank_per_query, retrieval_metrics
from albef.models.albef import ALBEF
from albef.text import Tokenizer

from helpers import bare_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_by_hand_with_ties_and_several_captions():
    img2txt, txt2img = [[0, 1], [2], [3, 4]], [0, 0, 1, 2, 2]
    i2t = torch.tensor([[0.9, 0.1, 0.5, 0.5, -100], [0.2, 0.3, 0.1, 0.3, 0.0], [-100.0] * 5])
    t2i = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.1], [0.3, 0.2, 0.1], [-100, -100, 0.5], [0.0, 0.0, 0.0]])
    # ranks (ties: the later index first, as argsort()[::-1] orders them):
    # TR: image 0 -> caption 0 first (0); image 1 -> order 3,1,0,2,4 so caption 2 at 3; image 2 -> 4 first (0)
    # IR: text 0 -> 0; text 1 -> order 2,1,0 so 2; text 2 -> 1; text 3 -> 0; text 4 -> order 2,1,0 so 0
    m = retrieval_metrics(i2t, t2i, img2txt, txt2img)
    assert m["txt_r1"] == pytest.approx(200 / 3) and m["txt_r5"] == 100 and m["txt_r10"] == 100
    assert m["img_r1"] == pytest.approx(60.0) and m["img_r5"] == 100
    assert m["r_mean"] == pytest.approx(((200 / 3 + 200) / 3 + (60 + 200) / 3) / 2)


def test_itc_metrics_on_a_gallery_with_known_answers():
    # image i's feature is axis i; its two captions sit near it, except text 5 which points at image 0
    img = torch.eye(4, 8)
    txt = torch.stack([img[0], img[0] + 0.1 * img[1], img[1], img[1], img[2], img[0] + 0.2, img[3], img[3]])
    txt = F.normalize(txt, dim=1)
    img2txt, txt2img = [[0, 1], [2, 3], [4, 5], [6, 7]], [0, 0, 1, 1, 2, 2, 3, 3]
    sims = img @ txt.T
    m = retrieval_metrics(sims, sims.T, img2txt, txt2img)
    assert m["txt_r1"] == 100.0  # every image still has one caption on top
    assert m["img_r1"] == pytest.approx(700 / 8)  # text 5 retrieves image 0 first


@pytest.fixture
def gallery64():
    torch.manual_seed(0)
    from albef.config import get_preset

    cfg = get_preset("albef-tiny")
    model = ALBEF(cfg).double().eval()
    texts = [
        f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left", "top")
    ]
    g = embed_gallery(model, torch.randn(9, 3, 32, 32, dtype=torch.float64), texts, Tokenizer())
    return model, g


def test_batched_rerank_equals_the_per_query_loop(gallery64):
    model, g = gallery64
    for k, add_cosine in ((3, False), (5, True), (50, False)):
        _, i2t, t2i = rerank(model, g, k, batch_size=7, add_cosine=add_cosine)
        ref_i2t, ref_t2i = rerank_per_query(model, g, k, add_cosine)
        torch.testing.assert_close(i2t, ref_i2t, rtol=0, atol=1e-12)
        torch.testing.assert_close(t2i, ref_t2i, rtol=0, atol=1e-12)


def test_only_the_k_nearest_are_rescored(gallery64):
    model, g = gallery64
    sims, i2t, t2i = rerank(model, g, 3)
    assert ((i2t != -100).sum(1) == 3).all() and ((t2i != -100).sum(1) == 3).all()
    for i in range(sims.shape[0]):
        assert set((i2t[i] != -100).nonzero().flatten().tolist()) == set(sims[i].topk(3).indices.tolist())


@pytest.fixture(scope="module")
def shapes_eval(tmp_path_factory):
    d = tmp_path_factory.mktemp("reval")
    write_shapes(d, n=24, image_size=32, seed=2, test=8)
    from albef.config import get_preset

    torch.manual_seed(0)
    save_pretrained(ALBEF(get_preset("albef-tiny")), d / "model")
    return d


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_give_the_same_metrics(shapes_eval, tmp_path):
    args = [
        "evaluate",
        "retrieval",
        "--model",
        str(shapes_eval / "model"),
        "--data",
        str(shapes_eval / "retrieval_test.json"),
        "--image-root",
        str(shapes_eval),
        "--k",
        "4",
        "--device",
        "cpu",
    ]
    assert cli_main([*args, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "albef.cli",
            *args,
            "--out",
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one == two and one["n_images"] == 8 and one["n_texts"] == 16


def test_retrieval_finetuning_runs_and_evaluates(shapes_eval, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = cli_main(
        [
            "finetune",
            "retrieval",
            "--config",
            bare_recipe(tmp_path, "retrieval"),
            f"model.init={shapes_eval / 'model'}",
            "model.preset=albef-tiny",
            "model.overrides={queue_size: 16}",
            f"data.train_files=[{shapes_eval / 'retrieval_train.json'}]",
            f"data.image_root={shapes_eval}",
            "data.num_workers=0",
            "train.batch_size=4",
            "train.epochs=1",
            "train.lr=1e-4",
            "train.warmup_lr=1e-4",
            "train.warmup_epochs=1",
            "train.log_every=1",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and "loss_mlm" not in rows[0] and rows[-1]["loss_itc"] > 0
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["recipe"]["task"] == "retrieval"
    assert (ckpt["model"]["queue.idx_queue"] >= 0).sum() == 16  # image ids went into the queue
    assert (
        cli_main(
            [
                "evaluate",
                "retrieval",
                "--model",
                str(out / "checkpoint_last.pt"),
                "--data",
                str(shapes_eval / "retrieval_test.json"),
                "--image-root",
                str(shapes_eval),
                "--k",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "ITC+ITM" in capsys.readouterr().out
    # --max-length (LAVIS cuts at 35): cut to [CLS] + one word, the captions read otherwise
    args = ["evaluate", "retrieval", "--model", str(out / "checkpoint_last.pt"), "--image-root", str(shapes_eval)]
    args += ["--data", str(shapes_eval / "retrieval_test.json"), "--k", "4", "--device", "cpu", "--itc-only"]
    scores = {}
    for n in (30, 2):
        assert cli_main([*args, "--max-length", str(n), "--out", str(tmp_path / f"m{n}.json")]) == 0
        scores[n] = json.loads((tmp_path / f"m{n}.json").read_text())["itc"]
    assert scores[30] != scores[2]
    with pytest.raises(SystemExit):
        cli_main([*args, "--max-length", "1"])


def test_every_recipe_parses_and_builds_its_model_config():
    from albef.recipes import load_recipe

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        cfg = recipe.model.build_config()
        assert path.stem.startswith(recipe.task.split("_")[0]), path.name
        if recipe.task in ("pretrain", "retrieval", "grounding"):  # the tasks with feature queues
            assert cfg.queue_size % recipe.train.batch_size == 0, path.name


def test_grounding_training_format_uses_the_image_file_as_id(tmp_path):
    from albef.data.retrieval import read_retrieval_train

    (tmp_path / "g.json").write_text(
        json.dumps(
            [
                {"image": "coco/a.jpg", "text": "the left dog", "ref_id": 7},
                {"image": "coco/b.jpg", "text": "man in red", "ref_id": 8},
                {"image": "other/a.jpg", "text": "the right dog", "ref_id": 9},
            ]
        )
    )
    records, bad = read_retrieval_train(tmp_path / "g.json", None, grounding=True)
    assert not bad and [r.image_id for r in records] == [0, 1, 0]  # same file name, same id (as the authors)


def test_an_image_id_that_is_no_string_or_integer_is_a_bad_entry(tmp_path):
    from albef.data.retrieval import read_retrieval_train

    entries = [
        {"image": "a.jpg", "caption": "a dog", "image_id": "a"},
        {"image": "b.jpg", "caption": "a cat", "image_id": [2]},  # unhashable: was a bare TypeError
        {"image": "c.jpg", "caption": "a cow", "image_id": 3},
        {"image": "d.jpg", "caption": "a hen", "image_id": True},
    ]
    (tmp_path / "r.json").write_text(json.dumps(entries))
    records, bad = read_retrieval_train(tmp_path / "r.json", None)
    assert [r.image_id for r in records] == [0, 1]
    assert [b.where for b in bad] == [f"{tmp_path / 'r.json'}[1]", f"{tmp_path / 'r.json'}[3]"]
    assert "'image_id' must be a string or an integer" in bad[0].reason
