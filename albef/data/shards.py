"""WebDataset tar shards: writing them from the authors' JSON formats, and streaming them to training.

A shard sample is ``{"__key__", "img": the image file's bytes, "json": {"captions", "index", ...}}``
where ``index`` is the record's position in the JSON data set. The stream gives every sample the
same seed rule as :class:`~albef.data.pretrain.PretrainDataset` (``(seed, epoch, index)``), so a
sample gets the same caption and the same augmentation whichever way it is read.

Two modes (``data.resampled``):

* exact epochs (default): each epoch the shard list is shuffled with the epoch's seed and dealt
  to ranks and loader workers; every sample is seen once per epoch (the JSON run's set), mixed by
  a shuffle buffer; a rank that runs out wraps around so all ranks take the same number of steps.
  Resuming skips the micro-batches already taken in the epoch: the stream is deterministic.
* resampled (web scale): shards drawn with replacement per rank and worker, an endless stream
  cut into epochs of ``data.epoch_samples``; resuming starts a fresh draw for the rest of the epoch.

Example:
    >>> write_shards(records, "shards/", max_count=10_000)       # doctest: +SKIP
    >>> expand_urls("shards/shard-{000000..000009}.tar")[:1]     # doctest: +SKIP
    ['shards/shard-000000.tar']
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from albef.checkpoints.files import atomic_write_text
from albef.data.annotations import BadSample, read_json_file
from albef.data.pretrain import load_image, sample_seed
from albef.seeding import mix_seed

log = logging.getLogger("albef.data")
INDEX_NAME = "shards.json"
MAX_BAD_IN_A_ROW = 1000
ERROR_KEY = "__error__"  # a sample standing for the unreadable rest of a shard


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expanded shard list (``a-{000..009}.tar``); a folder means its ``shards.json`` list."""
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += [str(p / s["file"]) for s in read_shard_index(p)["shards"]]
        else:
            out += list(braceexpand.braceexpand(item))
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    absent = [u for u in out if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if absent:
        raise FileNotFoundError(
            f"data.shards: {len(absent)} of {len(out)} shard files not found, e.g. {', '.join(absent[:3])}; "
            "check the path or brace pattern (albef data shards writes them with shards.json beside them)"
        )
    return out


def read_shard_index(folder: str | Path) -> dict:
    """A shard folder's ``shards.json`` (written by :func:`write_shards`), with errors naming it."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a shard folder needs the index `albef data shards` writes; "
            "or give the shard files themselves (data.shards='DIR/shard-{000000..000009}.tar')"
        )
    meta = read_json_file(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise ValueError(f'{path}: expected {{"shards": [{{"file", "count"}}, ...]}}; write it again')
    return meta


def count_samples(urls: Sequence[str]) -> int | None:
    """Samples in the shards, from the ``shards.json`` written beside them (None when unknown)."""
    by_file: dict[str, int] = {}
    for folder in {Path(u).parent for u in urls}:
        if (folder / INDEX_NAME).exists():
            for s in read_shard_index(folder)["shards"]:
                by_file[str(folder / s["file"])] = s["count"]
    if not all(u in by_file for u in urls):
        return None
    return sum(by_file[u] for u in urls)


def write_shards(records: Sequence[Any], out: str | Path, max_count: int = 10_000, prefix: str = "shard") -> dict:
    """Write ``records`` (parsed JSON entries: ``.image``, ``.captions``, optional ``.image_id``)
    to ``out/{prefix}-NNNNNN.tar`` plus ``out/shards.json``. Image files are copied byte for byte
    (decoding happens when training reads them, where a bad one is skipped and counted); entries
    whose file is missing are left out and listed."""
    import webdataset as wds

    if any(isinstance(rec.image, tuple) for rec in records):  # before anything is written
        raise ValueError("two-image entries (NLVR2) are not supported in shards yet")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    missing, counts = [], {}
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
        for i, rec in enumerate(records):
            try:
                data = Path(rec.image).read_bytes()
            except OSError as e:
                missing.append({"image": rec.image, "error": str(e)})
                continue
            meta = {"captions": list(rec.captions), "index": i, "image": Path(rec.image).name}
            if getattr(rec, "image_id", None) is not None:
                meta["image_id"] = rec.image_id
            sink.write({"__key__": f"{i:09d}", "img": data, "json": meta})
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    summary = {
        "shards": [{"file": f, "count": c} for f, c in sorted(counts.items())],
        "count": sum(counts.values()),
        "missing": missing,
        "records": len(records),
    }
    atomic_write_text(out / INDEX_NAME, json.dumps(summary, indent=1))
    return summary


def remove_shards(folder: str | Path) -> None:
    """Delete the shard files a folder's ``shards.json`` lists, then the index itself (no other file)."""
    folder = Path(folder)
    if not (folder / INDEX_NAME).is_file():
        return
    try:
        names = [Path(str(s.get("file", ""))).name for s in read_shard_index(folder)["shards"] if isinstance(s, dict)]
    except (OSError, ValueError) as e:  # a damaged index: the files `albef data shards` names
        log.warning("%s; removing the shard-NNNNNN.tar files of %s instead", e, folder)
        names = [f.name for f in folder.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar")]
    for name in names:  # base names only: never outside the folder, never the folder itself
        if name.endswith(".tar"):
            (folder / name).unlink(missing_ok=True)
    (folder / INDEX_NAME).unlink()


def _read_tars(urls: Iterator[str]) -> Iterator[dict]:
    """Samples (dicts of raw bytes by extension, plus ``__key__`` and ``__url__``) of each tar in turn."""
    import webdataset as wds

    for url in urls:
        try:
            with open(url, "rb") as stream:
                files = wds.tariterators.tar_file_expander(
                    [{"url": url, "stream": stream}], handler=wds.reraise_exception
                )
                yield from wds.tariterators.group_by_keys(files)
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:  # missing, cut short or not a tar
            # the samples read before the damage stand; the rest of this shard is one bad sample
            yield {"__url__": url, "__key__": "(rest of the shard)", ERROR_KEY: f"{type(e).__name__}: {e}"}


class ShardStream(IterableDataset):
    """Decoded, augmented samples of one rank, as dicts like :class:`PretrainDataset` items."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable,
        seed: int,
        rank: int,
        world_size: int,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        truncated_ok: bool = True,
    ):
        self.urls, self.transform, self.seed = list(urls), transform, seed
        self.truncated_ok = truncated_ok  # as PretrainDataset's
        self.rank, self.world_size = rank, world_size
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _passes(self, worker: int, n_workers: int) -> Iterator[Iterator[str]]:
        """Shard lists to read one after the other, each with its own shuffle buffer."""
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        if self.resampled:  # with replacement, a different draw per (epoch, resume point, rank, worker)
            rng = random.Random(mix_seed("shard-draws", self.seed, self.epoch, self.start_step, slot))
            yield (rng.choice(self.urls) for _ in itertools.count())
            return
        order = list(self.urls)
        random.Random(mix_seed("shard-order", self.seed, self.epoch)).shuffle(order)
        mine = order[slot::n_slots] or [order[slot % len(order)]]
        if slot == 0 and self.epoch == 0 and len(self.urls) % n_slots:
            log.warning(
                "%d shards over %d rank x worker slots: the slots hold different numbers of samples, "
                "so an epoch repeats some and skips others; use a multiple of %d shards of equal size "
                "for exact epochs",
                len(self.urls),
                n_slots,
                n_slots,
            )
        while True:  # wrap around: every rank must take the same number of steps
            yield iter(mine)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(
            mix_seed("shard-buffer", self.seed, self.epoch, self.rank, worker, self.start_step if self.resampled else 0)
        )
        bad: list[BadSample] = []
        for urls in self._passes(worker, n_workers):
            buffer: list[dict] = []
            for sample in _read_tars(urls):
                item = self._decode(sample, bad)
                if item is None:
                    if len(bad) >= MAX_BAD_IN_A_ROW:  # a loop over unreadable data would never end
                        raise RuntimeError(
                            f"{len(bad)} unreadable samples in a row in {self.urls[0]}...; "
                            f"shards need 'img' and 'json' entries (write them with `albef data "
                            f"shards`); last: {bad[-1]}"
                        )
                    continue
                bad = []
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], item = item, buffer[j]
                yield item
            rng.shuffle(buffer)  # the end of a pass: a pass yields exactly its shards' samples
            yield from buffer

    def _decode(self, sample: dict, bad: list[BadSample]) -> dict | None:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        if ERROR_KEY in sample:
            bad.append(BadSample(where, f"unreadable shard: {sample[ERROR_KEY]}"))
            return None
        try:
            meta = json.loads(sample["json"])
            i, caps = int(meta["index"]), meta["captions"]
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise ValueError(f"captions {caps!r}: expected a non-empty list of non-empty strings")
            image = load_image(io.BytesIO(sample["img"]), self.truncated_ok)
        except (KeyError, TypeError, OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            bad.append(BadSample(where, f"{type(e).__name__}: {e}"))
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            caption = caps[int(torch.randint(len(caps), ()))]
            pixels = self.transform(image)
        item = {"image": pixels, "caption": caption, "index": i, "bad": list(bad), "replaced": len(bad)}
        if "image_id" in meta:
            item["idx"] = int(meta["image_id"])
        return item


class ShardLoader:
    """What the training loop needs of a data source — ``steps_per_epoch``, ``global_batch``,
    ``set_epoch`` and an iterable of micro-batches — over shards instead of a JSON list."""

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Callable,
        collate: Callable,
        micro_batch: int,
        world_size: int,
        rank: int,
        grad_accum: int,
        seed: int,
        epoch_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        truncated_ok: bool = True,
    ):
        self.urls = expand_urls(urls)
        n = epoch_samples or count_samples(self.urls)
        if not n:
            raise ValueError(
                "the number of samples per epoch is unknown: write the shards with "
                "`albef data shards` (it records counts) or set data.epoch_samples"
            )
        self.epoch_samples = n
        self.global_batch = micro_batch * world_size * grad_accum
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch of {n} samples is less than one global batch of {self.global_batch}")
        self.grad_accum = grad_accum
        self.stream = ShardStream(
            self.urls,
            transform,
            seed,
            rank,
            world_size,
            resampled,
            min(shuffle_buffer, max(1, n // (world_size * max(1, num_workers)))),
            truncated_ok,
        )
        self.loader = DataLoader(self.stream, batch_size=micro_batch, collate_fn=collate, num_workers=num_workers)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.stream.set_epoch(epoch, start_step)
        self._skip = 0 if self.stream.resampled else start_step * self.grad_accum

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self._skip):  # exact resume: the stream is deterministic within an epoch
            next(it)
        return it
