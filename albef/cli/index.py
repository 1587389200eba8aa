"""``albef index build|bench`` and ``albef search``: FAISS galleries with an ITM-re-ranked shortlist.

Examples:
    albef index build --model runs/main/pretrain/checkpoint_last.pt --images data/emoji/images --out runs/gallery
    albef search --index runs/gallery --model runs/main/pretrain/checkpoint_last.pt "a red heart" --top 5
    albef index bench --n 200000 --dim 256          # recall of the shortlist vs exact search, memory, time
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from albef.checkpoints.files import atomic_write_text
from albef.outputs import new_output_file


def _pipeline(model: str, device: str | None, precision: str = "fp32"):
    from albef.api import Pipeline, Processor
    from albef.checkpoints.pretrained import load_inference_model

    path = Path(model)
    if not path.exists():
        raise SystemExit(f"no model at {path}")
    m = load_inference_model(path)
    return Pipeline(m, Processor.for_model(m, path if path.is_dir() else None), device, precision=precision)


def _files(images: str, image_root: str | None = None) -> list[Path]:
    from albef.data.annotations import read_json_file
    from albef.search.gallery import list_images

    p = Path(images)
    if p.is_dir():
        return list_images(p)
    if not p.is_file():
        raise FileNotFoundError(f"--images {p}: no such folder or file")
    if p.suffix == ".json":  # the authors' formats: a list of {"image": ...}
        root = Path(image_root) if image_root else p.parent
        entries = read_json_file(p)
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("image"), str) and e["image"] for e in entries
        ):
            raise ValueError(f'{p}: expected a JSON list of objects with an "image" path (the authors\' format)')
        return sorted({root / e["image"] for e in entries})
    return [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]


def bench(args: argparse.Namespace) -> dict:
    """A generated gallery (clustered, L2-normalised, on disk): build each index kind chunk by chunk,
    report build time, index size, search time and recall@k of the shortlist against exact search."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the generated gallery")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # a gallery of its own, gone when the bench ends: hundreds of MB that no other command reads, and
    # two benches into one --out never read each other's vectors
    try:
        with tempfile.TemporaryDirectory(prefix=".index-bench-", dir=out) as scratch:
            return _bench(args, Path(scratch))
    finally:
        if made and not any(out.iterdir()):
            out.rmdir()


def _bench(args: argparse.Namespace, out: Path) -> dict:
    import numpy as np

    from albef.cli.bench import proc_memory_mb
    from albef.search.ann import _faiss, ann_search, exact_topk, fill_index, make_index, recall_at_k

    faiss = _faiss()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    path = out / "generated.f32"
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    vecs = np.memmap(path, dtype=np.float32, mode="w+", shape=(args.n, args.dim))
    for s in range(0, args.n, args.chunk):  # written chunk by chunk: never the whole gallery in memory
        n = min(args.chunk, args.n - s)
        x = centres[rng.integers(args.clusters, size=n)] + 0.8 * rng.standard_normal((n, args.dim)).astype(np.float32)
        vecs[s : s + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    vecs.flush()
    vecs = np.memmap(path, dtype=np.float32, mode="r", shape=(args.n, args.dim))
    picked = vecs[rng.choice(args.n, args.queries, replace=False)]  # drawn before the noise, as ever
    q = picked + 0.3 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    t0 = time.perf_counter()
    exact = exact_topk(vecs, q, args.k, chunk=args.chunk)
    exact_s = time.perf_counter() - t0
    rows = []
    for kind in args.kinds:
        rss0 = proc_memory_mb("VmRSS")
        t0 = time.perf_counter()
        index = fill_index(make_index(kind, args.dim, args.n), vecs, chunk=args.chunk)
        build_s = time.perf_counter() - t0
        faiss.write_index(index, str(out / f"{kind}.faiss"))
        size_mb = (out / f"{kind}.faiss").stat().st_size / 2**20
        settings = [(None, 1)] if not hasattr(index, "nprobe") else [(index.nprobe, 1), (4 * index.nprobe, 1)]
        if kind == "ivfpq":  # and the PQ shortlist re-scored exactly from the on-disk vectors
            settings += [(index.nprobe, 4), (4 * index.nprobe, 4)]
        for nprobe, refine in settings:
            if nprobe:
                index.nprobe = nprobe
            t0 = time.perf_counter()
            _, ids = ann_search(index, q, args.k, vecs, refine)
            search_ms = 1000 * (time.perf_counter() - t0) / args.queries
            rows.append(
                {
                    "kind": kind,
                    "nprobe": nprobe,
                    "refine": refine,
                    "recall": round(recall_at_k(ids, exact), 4),
                    "build_s": round(build_s, 2),
                    "index_mb": round(size_mb, 1),
                    "rss_growth_mb": round(proc_memory_mb("VmRSS") - rss0, 1),
                    "search_ms_per_query": round(search_ms, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del index
    return {
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "chunk": args.chunk,
        "exact_scan_ms_per_query": round(1000 * exact_s / args.queries, 3),
        "peak_rss_mb": round(proc_memory_mb("VmHWM"), 1),
        "gallery_mb": round(args.n * args.dim * 4 / 2**20, 1),
        "threads": args.threads,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef index", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="embed an image folder (or list/JSON) in chunks and build a FAISS index")
    b.add_argument("--model", required=True)
    b.add_argument("--images", required=True, help="folder, text file of paths, or an authors' JSON list")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    b.add_argument(
        "--image-root",
        help="with an authors' JSON list: the folder its image paths are relative to (default: the JSON's)",
    )
    b.add_argument("--kind", choices=["flat", "ivf", "ivfpq", "hnsw"], default="ivfpq")
    b.add_argument("--chunk", type=int, default=1024, help="images embedded (and held) at a time")
    b.add_argument("--nlist", type=int)
    b.add_argument("--device")
    from albef.precision import add_precision_option

    add_precision_option(b)
    g = sub.add_parser("bench", help="recall / memory / time of the index kinds on a generated gallery")
    g.add_argument("--n", type=int, default=200_000)
    g.add_argument("--dim", type=int, default=256)
    g.add_argument("--clusters", type=int, default=2000)
    g.add_argument("--queries", type=int, default=500)
    g.add_argument("--k", type=int, default=100)
    g.add_argument("--chunk", type=int, default=65536)
    g.add_argument("--kinds", nargs="+", default=["ivf", "ivfpq", "hnsw"])
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--out", default="runs", help="where the generated gallery and indexes lie while it runs")
    g.add_argument("--json", help="write the results here")
    g.add_argument("--overwrite", action="store_true", help="replace the file --json names if it exists")
    args = p.parse_args(argv)
    if args.cmd == "bench":
        if args.json:
            new_output_file(args.json, "--json", args.overwrite)
        res = bench(args)
        print(json.dumps(res, indent=1))
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(res, indent=1))
        return 0
    out = Path(args.out)
    from albef.search.ann import build_index, holds_index

    if holds_index(out) and not args.overwrite:  # before the model is loaded
        p.error(f"{out} already holds an index: give another --out, or --overwrite to replace it")
    try:
        files = _files(args.images, args.image_root)
    except (OSError, ValueError) as e:
        p.error(str(e))
    pipe = _pipeline(args.model, args.device, args.precision)
    try:
        meta = build_index(
            pipe, files, out, args.kind, args.chunk, args.nlist, model_id=args.model, overwrite=args.overwrite
        )
    except (FileExistsError, ValueError) as e:
        p.error(str(e))
    print(
        f"indexed {meta['count']} images ({len(meta['bad'])} unreadable) into {args.out} "
        f"[{meta['kind']}; embedding {meta['embed_s']} s, index {meta['index_s']} s]"
    )
    return 0


def search_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef search", description="text -> image over a FAISS index, ITM re-ranked")
    p.add_argument("query")
    p.add_argument("--index", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, default=100, help="FAISS shortlist size")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--device")
    from albef.precision import add_precision_option

    add_precision_option(p)
    args = p.parse_args(argv)
    if not args.query.strip():
        raise SystemExit("albef search: the query is empty")
    from albef.search.ann import load_index, search

    try:
        loaded = load_index(args.index)
    except (OSError, ValueError) as e:
        p.error(str(e))
    built_with = loaded[1].get("model")
    if built_with and Path(built_with).resolve() != Path(args.model).resolve():
        print(f"albef search: the index was built with {built_with}, not {args.model}", file=sys.stderr)
    try:
        hits = search(
            _pipeline(args.model, args.device, args.precision),
            args.index,
            args.query,
            args.k,
            args.top,
            rerank=not args.no_rerank,
            nprobe=args.nprobe,
            loaded=loaded,
        )
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(hits, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
