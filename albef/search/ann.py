"""Galleries of millions: image ITC embeddings written to disk in chunks, a FAISS index over them,
and text → image search whose FAISS shortlist is re-ranked by ITM.

Memory while building is bounded by the chunk size: images are embedded ``chunk`` at a time into
a float32 memory-mapped file, the index is trained on a sample read back from it and filled chunk
by chunk. What the index itself holds depends on its type: ``flat`` and ``ivf`` keep every vector
(4·d bytes each), ``ivfpq`` keeps ``pq_m`` bytes per vector (the one for galleries that do not fit
in RAM), ``hnsw`` keeps the vectors plus its graph.

Example:
    >>> build_index(pipe, files, "gallery_index", kind="ivfpq")                 # doctest: +SKIP
    >>> search(pipe, "gallery_index", "a red heart", k=100, top=5)               # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from albef.checkpoints.files import pid_alive
from albef.data.annotations import read_json_file

log = logging.getLogger("albef.search.ann")
KINDS = ("flat", "ivf", "ivfpq", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise SystemExit("albef index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def make_index(kind: str, dim: int, n: int, nlist: int | None = None, pq_m: int | None = None):
    """An inner-product FAISS index for ``n`` L2-normalised vectors (cosine = inner product)."""
    faiss = _faiss()
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r}: choose one of {KINDS}")
    if kind == "ivfpq" and n < 1000:  # its 256-entry codebooks need more training points than this
        log.info("%d vectors: an IVF index instead of IVF-PQ", n)
        kind = "ivf"
    if kind == "ivf" and n < 39:
        kind = "flat"
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 128
        return index
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))  # FAISS wants >= 39 points per list
    if kind == "ivf":
        spec = f"IVF{nlist},Flat"
    else:
        m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim // 2)
        spec = f"IVF{nlist},PQ{m}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)  # owns its quantizer
    index.nprobe = max(1, nlist // 16)
    return index


def fill_index(
    index, vectors: np.ndarray, chunk: int = 65536, train_size: int = 100_000, seed: int = 0, progress: bool = False
):
    """Train (on a random sample of at most ``train_size`` rows) and add ``vectors`` chunk by chunk.

    ``vectors`` may be a ``np.memmap``: only the sample and one chunk are in memory at a time.
    """
    n = len(vectors)
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, train_size), replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for start in tqdm(range(0, n, chunk), desc="adding to the index", disable=not progress):
        index.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))
    return index


def embed_to_disk(
    pipe, files: Sequence[Path], out: Path, chunk: int = 1024, progress: bool = True
) -> tuple[np.memmap, list[int], list[dict]]:
    """ITC image features of ``files`` into ``out/features.f32`` ([N_ok, d] float32 memmap).

    Returns the memmap, the row → file-number map (unreadable files are skipped) and the failures.
    """
    d = pipe.model.config.embed_dim
    out.mkdir(parents=True, exist_ok=True)
    path = out / "features.f32"
    rows, bad, n_written = [], [], 0
    with open(path, "wb") as fh:
        bar = tqdm(total=len(files), desc="embedding images", unit="img", disable=not progress)
        for start in range(0, len(files), chunk):
            pixels, ok = [], []
            for i, p in enumerate(files[start : start + chunk], start):
                try:
                    pixels.append(pipe.processor.transform(pipe.processor.load(p)))
                    ok.append(i)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    bad.append({"file": str(p), "error": f"{type(e).__name__}: {e}"})
                    log.warning("skipping %s (%s)", p, e)
            if pixels:
                feats = pipe.encode_image(torch.stack(pixels)).float().cpu().numpy()
                fh.write(np.ascontiguousarray(feats).tobytes())
                rows += ok
                n_written += len(ok)
            bar.update(min(chunk, len(files) - start))
        bar.close()
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_written, d)), rows, bad


def build_index(
    pipe,
    files: Sequence[str | Path],
    out: str | Path,
    kind: str = "ivfpq",
    chunk: int = 1024,
    nlist: int | None = None,
    progress: bool = True,
    model_id: str = "",
    overwrite: bool = False,
) -> dict:
    """Embed ``files`` and write ``out/{index.faiss, meta.json, features.f32}``; returns the meta.

    The index is built in a hidden folder inside ``out`` and its files are moved into place when
    complete, so a kill or an error never leaves a half-built index; an existing index there is
    replaced only with ``overwrite`` (a ``FileExistsError`` otherwise, before any work). Other
    files in ``out`` are left alone."""
    faiss = _faiss()
    out = Path(out)
    if holds_index(out) and not overwrite:
        raise FileExistsError(f"{out} already holds an index: give another folder, or overwrite it (--overwrite)")
    files = [Path(f) for f in files]
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".building-*"):  # left by a build that was killed
        pid = stale.name.rpartition("-")[2]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    building = out / f".building-{os.getpid()}"
    try:
        meta = _build_in(faiss, pipe, files, building, kind, chunk, nlist, progress, model_id)
        # the old index stops being one (no meta.json) before its files are replaced, the new one
        # becomes one last: a kill in between leaves no index, never a mix of two; nothing else in
        # the folder is touched
        (out / "meta.json").unlink(missing_ok=True)
        for name in INDEX_FILES:
            os.replace(building / name, out / name)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return meta


#: what an index folder holds, meta.json last (it makes the folder an index)
INDEX_FILES = ("features.f32", "index.faiss", "meta.json")


def holds_index(folder: Path) -> bool:
    """Whether ``folder`` holds an index, whole or part of one."""
    return any((folder / name).exists() for name in INDEX_FILES)


def _build_in(faiss, pipe, files: list[Path], out: Path, kind: str, chunk: int, nlist, progress: bool, model_id: str):
    t0 = time.perf_counter()
    feats, rows, bad = embed_to_disk(pipe, files, out, chunk, progress)
    if not len(feats):
        raise ValueError(f"none of the {len(files)} images could be read; nothing to index")
    t1 = time.perf_counter()
    index = fill_index(make_index(kind, feats.shape[1], len(feats), nlist), feats, progress=progress)
    faiss.write_index(index, str(out / "index.faiss"))
    meta = {
        "kind": kind,
        "count": len(feats),
        "dim": int(feats.shape[1]),
        "model": model_id,
        "files": [str(files[r]) for r in rows],
        "bad": bad,
        "embed_s": round(t1 - t0, 2),
        "index_s": round(time.perf_counter() - t1, 2),
        "nprobe": getattr(index, "nprobe", None),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    del feats  # the memmap of features.f32, before the folder moves
    return meta


def refine_exact(vectors: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate rows ``cand`` [Q, K'] exactly against ``vectors`` (a memmap is fine: only
    the candidates' rows are read) and keep the best ``k``: the IVF-PQ shortlist made exact."""
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for qi, (q, ids) in enumerate(zip(queries, cand, strict=True)):
        ids = np.sort(ids[ids >= 0])  # ascending rows: a sequential read of the memmap
        s = np.asarray(vectors[ids], dtype=np.float32) @ q
        top = np.argsort(-s)[:k]
        out_s[qi, : len(top)], out_i[qi, : len(top)] = s[top], ids[top]
    return out_s, out_i


def ann_search(
    index, queries: np.ndarray, k: int, vectors: np.ndarray | None = None, refine: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of an index; HNSW searches at least 2k deep, and a compressed (PQ) index fetches
    ``refine``·k candidates re-scored exactly from ``vectors`` when they are given."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(index.hnsw.efSearch, 2 * k)
    compressed = "PQ" in type(index).__name__
    if compressed and vectors is not None and refine > 1:
        _, cand = index.search(queries, refine * k)
        return refine_exact(vectors, queries, cand, k)
    return index.search(queries, k)


def load_index(directory: str | Path):
    faiss = _faiss()
    directory = Path(directory)
    if not (directory / "index.faiss").exists() or not (directory / "meta.json").exists():
        raise FileNotFoundError(f"{directory} holds no complete index; build one with `albef index build`")
    meta = read_json_file(directory / "meta.json")
    return faiss.read_index(str(directory / "index.faiss")), meta


@torch.inference_mode()
def search(
    pipe,
    directory: str | Path,
    query: str,
    k: int = 100,
    top: int = 10,
    rerank: bool = True,
    nprobe: int | None = None,
    loaded=None,
) -> list[dict]:
    """Text → image: FAISS shortlist of ``k`` by ITC, re-ranked by ITM (images re-encoded from
    their files, so memory is bounded by ``k``, not by the gallery)."""
    index, meta = loaded or load_index(directory)
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    q = pipe.encode_text(query).float().cpu().numpy()
    if q.shape[1] != meta["dim"]:
        raise ValueError(
            f"{directory} holds {meta['dim']}-d embeddings of {meta.get('model') or 'another model'}; this model "
            f"embeds in {q.shape[1]} dimensions: search with the model the index was built with"
        )
    feats = Path(directory) / "features.f32"
    vectors = (
        np.memmap(feats, dtype=np.float32, mode="r", shape=(meta["count"], meta["dim"])) if feats.exists() else None
    )
    sims, ids = ann_search(index, q, min(k, meta["count"]), vectors)
    cand = [(int(i), float(s)) for i, s in zip(ids[0], sims[0], strict=True) if i >= 0]
    hits = [{"row": i, "file": meta["files"][i], "itc": s, "itm": None} for i, s in cand]
    if not rerank or not hits:
        return hits[:top]
    probs = pipe.match([h["file"] for h in hits], [query] * len(hits))
    for h, p in zip(hits, probs.tolist(), strict=True):
        h["itm"] = p
    return sorted(hits, key=lambda h: -h["itm"])[:top]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a[:k]) & set(e)) / k for a, e in zip(approx_ids, exact_ids, strict=True)]))


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Exact inner-product top-k by a chunked scan (memory bounded by the chunk)."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        s = queries @ np.asarray(vectors[start : start + chunk], dtype=np.float32).T
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, np.arange(start, start + s.shape[1])[None].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)
