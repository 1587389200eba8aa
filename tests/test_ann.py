"""FAISS galleries: chunked embedding, exact top-k, recall, and search with ITM re-ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

faiss = pytest.importorskip("faiss")

from albef.api import Pipeline  # noqa: E402
from albef.models.albef import ALBEF  # noqa: E402
from albef.search.ann import build_index, embed_to_disk, exact_topk, fill_index, make_index, recall_at_k, search  # noqa: E402


@pytest.fixture
def pipe(tiny_config):
    return Pipeline(ALBEF(tiny_config, mlm_head=False), device="cpu")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(11):
        p = tmp_path / "img" / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(p)
        out.append(p)
    bad = tmp_path / "img" / "bad.png"
    bad.write_bytes(b"nope")
    return out[:5] + [bad] + out[5:]


def test_exact_topk_matches_a_full_sort():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((1000, 8)).astype(np.float32)
    q = rng.standard_normal((7, 8)).astype(np.float32)
    got = exact_topk(v, q, k=5, chunk=128)  # chunks smaller than the gallery
    want = np.argsort(-(q @ v.T), axis=1)[:, :5]
    assert (got == want).all()


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 1) / 2)


def test_embedding_in_chunks_equals_one_pass_and_skips_bad_files(pipe, files, tmp_path):
    feats, rows, bad = embed_to_disk(pipe, files, tmp_path / "a", chunk=3, progress=False)
    good = [f for f in files if f.name != "bad.png"]
    assert len(feats) == len(good) and [files[r] for r in rows] == good
    assert len(bad) == 1 and bad[0]["file"].endswith("bad.png")
    whole = pipe.encode_image(good).numpy()
    np.testing.assert_allclose(np.asarray(feats), whole, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", pytest.param("ivfpq", marks=pytest.mark.slow), "hnsw"])
def test_approximate_indexes_find_most_of_the_exact_neighbours(kind, tmp_path):
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((50, 32)).astype(np.float32)
    x = centres[rng.integers(50, size=5000)] + 0.5 * rng.standard_normal((5000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mm = np.memmap(tmp_path / "v.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    q = x[:40] + 0.1 * rng.standard_normal((40, 32)).astype(np.float32)
    index = fill_index(make_index(kind, 32, len(x)), mm, chunk=700)
    assert index.ntotal == len(x)
    _, ids = index.search(q, 10)
    floor = {"ivf": 0.8, "ivfpq": 0.4, "hnsw": 0.9}[kind]
    assert recall_at_k(ids, exact_topk(x, q, 10)) >= floor


def test_search_shortlists_by_itc_and_reranks_by_itm(pipe, files, tmp_path):
    meta = build_index(pipe, files, tmp_path / "idx", kind="flat", chunk=4, progress=False)
    assert meta["count"] == 11 and len(meta["bad"]) == 1
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["files"][0].endswith("00.png")
    good = meta["files"]
    query = "a colourful noise pattern"
    sims = (pipe.encode_image(good) @ pipe.encode_text(query).T)[:, 0]
    hits = search(pipe, tmp_path / "idx", query, k=6, top=6, rerank=False)
    assert [h["row"] for h in hits] == sims.argsort(descending=True)[:6].tolist()  # flat = exact ITC order
    reranked = search(pipe, tmp_path / "idx", query, k=6, top=3)
    itm = pipe.match([good[h["row"]] for h in hits], [query] * 6)
    assert [h["row"] for h in reranked] == [hits[int(i)]["row"] for i in itm.argsort(descending=True)[:3]]
    assert [h["itm"] for h in reranked] == pytest.approx(sorted(itm.tolist(), reverse=True)[:3], abs=1e-5)


def test_index_cli_builds_and_searches(pipe, files, tmp_path, capsys):
    from albef.checkpoints.pretrained import save_pretrained
    from albef.cli import main as cli

    save_pretrained(pipe.model, tmp_path / "model")
    folder = files[0].parent
    assert (
        cli(
            [
                "index",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--images",
                str(folder),
                "--out",
                str(tmp_path / "g"),
                "--kind",
                "flat",
                "--chunk",
                "4",
            ]
        )
        == 0
    )
    assert "indexed 11 images (1 unreadable)" in capsys.readouterr().out
    assert (
        cli(
            [
                "search",
                "a red heart",
                "--index",
                str(tmp_path / "g"),
                "--model",
                str(tmp_path / "model"),
                "--k",
                "5",
                "--top",
                "2",
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["itm"] >= hits[1]["itm"]
    with pytest.raises(FileNotFoundError, match="albef index build"):
        search(pipe, tmp_path / "missing", "x")


@pytest.mark.slow
def test_pq_shortlist_refined_exactly_from_disk_beats_pq_alone(tmp_path):
    from albef.search.ann import ann_search

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mm = np.memmap(tmp_path / "v.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    q = x[:30] + 0.2 * rng.standard_normal((30, 32)).astype(np.float32)
    index = fill_index(make_index("ivfpq", 32, len(x)), mm)
    index.nprobe = 64  # all lists: what remains is the PQ error
    exact = exact_topk(x, q, 10)
    plain = recall_at_k(ann_search(index, q, 10)[1], exact)
    refined_s, refined = ann_search(index, q, 10, mm, refine=8)
    assert recall_at_k(refined, exact) > plain and recall_at_k(refined, exact) >= 0.9
    np.testing.assert_allclose(refined_s, np.take_along_axis(q @ x.T, refined, 1), rtol=1e-5)


def test_small_galleries_get_an_index_they_can_train():
    index = make_index("ivfpq", 16, 200)  # too few points for 256-entry PQ codebooks
    assert "PQ" not in type(index).__name__
    x = np.random.default_rng(4).standard_normal((200, 16)).astype(np.float32)
    fill_index(index, x)
    assert index.ntotal == 200


def test_an_index_is_replaced_only_when_told_and_only_once_complete(pipe, files, tmp_path, capsys, monkeypatch):
    from albef.checkpoints.pretrained import save_pretrained
    from albef.cli import main as cli
    from albef.search import ann

    out = tmp_path / "idx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not the index's: never touched
    (out / ".building-999999999").mkdir()  # a killed build's leftovers (no such process): removed
    first = build_index(pipe, files[:6], out, kind="flat", chunk=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["features.f32", "index.faiss", "meta.json", "notes.txt"]
    with pytest.raises(FileExistsError, match="already holds an index"):
        build_index(pipe, files, out, kind="flat", progress=False)
    save_pretrained(pipe.model, tmp_path / "model")
    args = ["index", "build", "--model", str(tmp_path / "model"), "--images", str(files[0].parent), "--out", str(out)]
    with pytest.raises(SystemExit):
        cli([*args, "--kind", "flat"])
    assert "--overwrite" in capsys.readouterr().err
    # a build that fails half-way (here: indexing) leaves the old index whole, and no temp folder
    monkeypatch.setattr(ann, "fill_index", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        build_index(pipe, files, out, kind="flat", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    meta = build_index(pipe, files, out, kind="flat", chunk=4, progress=False, overwrite=True)
    assert first["count"] < meta["count"] == 11
    assert json.loads((out / "meta.json").read_text())["count"] == 11
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob(".building-*"))


def test_index_build_reads_an_authors_json_list_against_its_image_root(pipe, files, tmp_path):
    from albef.cli.index import _files

    listing = tmp_path / "lists" / "test.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps([{"image": f.name, "caption": "x"} for f in files[:3]]))
    assert _files(str(listing), str(files[0].parent)) == sorted(files[:3])
    assert _files(str(listing)) == sorted(listing.parent / f.name for f in files[:3])  # default: beside the JSON
    for entry in ({"caption": "no image"}, {"image": 5}, {"image": ""}):  # a number was a bare TypeError
        listing.write_text(json.dumps([entry]))
        with pytest.raises(ValueError, match='test.json: expected a JSON list of objects with an "image" path'):
            _files(str(listing))


def test_searching_with_a_model_of_another_embedding_size_says_so(pipe, files, tmp_path, tiny_config):
    import dataclasses

    build_index(pipe, files, tmp_path / "idx", kind="flat", progress=False, model_id="runs/a")
    other = Pipeline(ALBEF(dataclasses.replace(tiny_config, embed_dim=tiny_config.embed_dim * 2), mlm_head=False))
    with pytest.raises(ValueError, match=r"embeddings of runs/a; this model embeds in \d+ dimensions"):
        search(other, tmp_path / "idx", "a dog")
    with pytest.raises(FileNotFoundError, match="holds no complete index"):
        search(pipe, tmp_path, "a dog")


def test_index_bench_leaves_no_scratch_and_keeps_an_earlier_result(tmp_path, capsys):
    from albef.cli.index import main as index_main

    argv = ["bench", "--n", "3000", "--dim", "16", "--clusters", "20", "--queries", "30", "--k", "10"]
    argv += ["--chunk", "1000", "--kinds", "flat", "ivf", "--out", str(tmp_path / "scratch")]
    assert index_main([*argv, "--json", str(tmp_path / "r" / "bench.json")]) == 0
    res = json.loads((tmp_path / "r" / "bench.json").read_text())
    flat = [r for r in res["rows"] if r["kind"] == "flat"]
    assert flat and all(r["recall"] == 1.0 for r in flat)  # exhaustive search is exact search
    assert {r["kind"] for r in res["rows"]} == {"flat", "ivf"} and res["n"] == 3000
    assert not (tmp_path / "scratch").exists()  # the generated gallery and indexes are gone, and the folder made
    (tmp_path / "r" / "bench.json").write_text("earlier")
    with pytest.raises(FileExistsError, match="--overwrite to replace it"):
        index_main([*argv, "--json", str(tmp_path / "r" / "bench.json")])
    assert (tmp_path / "r" / "bench.json").read_text() == "earlier"
    assert index_main([*argv, "--json", str(tmp_path / "r" / "bench.json"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "r" / "bench.json").read_text())["n"] == 3000  # replaced when told
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "mine.txt").write_text("mine")
    assert index_main(argv) == 0
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["mine.txt"]  # a folder it did not make stays
    with pytest.raises(NotADirectoryError, match="is a file; give a folder"):
        index_main([*argv, "--out", str(tmp_path / "scratch" / "mine.txt")])
