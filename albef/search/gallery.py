"""An image folder embedded once for search: ITC features for the shortlist, the image sequences
for ITM re-ranking and Grad-CAM, cached on disk and re-used while the folder and model are unchanged.

Example:
    >>> idx = GalleryIndex.build(pipe, "data/emoji/images/google", cache_dir="runs/serve-cache")  # doctest: +SKIP
    >>> len(idx), idx.bad[:1]                                                                     # doctest: +SKIP
    (1906, [])
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from albef.api import Pipeline

log = logging.getLogger("albef.serve")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by suffix), sorted, hidden folders skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def fingerprint(files: list[Path], folder: Path, model_id: str) -> str:
    """Changes when a file is added, removed, rewritten, or the model changes."""
    h = hashlib.sha256(model_id.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@dataclass
class GalleryIndex:
    folder: Path
    names: list[str]  # relative paths of the indexed images, row order
    image_feat: Tensor  # [N, embed_dim], L2-normalised
    image_embeds: Tensor  # [N, 1 + patches, width], stored in float16
    bad: list[dict] = field(default_factory=list)  # {"file", "error"} for files that could not be read
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> Path:
        return self.folder / self.names[i]

    @classmethod
    def build(
        cls,
        pipe: Pipeline,
        folder: str | Path,
        cache_dir: str | Path | None = None,
        model_id: str = "",
        batch_size: int = 32,
        progress: bool = True,
    ) -> GalleryIndex:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"image folder {folder} does not exist; pass --images FOLDER (the main job prepares data/emoji/images)"
            )
        files = list_images(folder)
        fp = fingerprint(files, folder, model_id or type(pipe.model).__name__)
        cache = Path(cache_dir) / f"index-{fp}" if cache_dir else None
        if cache is not None and (cache / "index.json").exists():
            try:
                meta = json.loads((cache / "index.json").read_text())
                t = load_file(str(cache / "embeddings.safetensors"))
                log.info("index of %s: %d images from the cache %s", folder, len(meta["names"]), cache)
                return cls(folder, meta["names"], t["image_feat"], t["image_embeds"], meta["bad"], from_cache=True)
            except (OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt, not trusted
                log.warning("ignoring the unreadable index cache %s (%s)", cache, e)
        names, feats, embeds, bad = [], [], [], []
        bar = tqdm(total=len(files), desc=f"indexing {folder}", unit="img", disable=not progress)
        for start in range(0, len(files), batch_size):
            batch, pixels = [], []
            for p in files[start : start + batch_size]:
                try:
                    pixels.append(pipe.processor.transform(pipe.processor.load(p)))
                    batch.append(str(p.relative_to(folder)))
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    rel = str(p.relative_to(folder))  # messages name the file as the page shows it, not where it is
                    bad.append({"file": rel, "error": f"{type(e).__name__}: {e}".replace(str(p), rel)})
                    log.warning("skipping %s: not a readable image (%s)", p, e)
            if pixels:
                with torch.inference_mode(), pipe.autocast():  # the pipeline's --precision
                    px = torch.stack(pixels).to(pipe.device, pipe.dtype)
                    e = pipe.model.encode_image(px)
                    feats.append(pipe.model.image_feat(e).float().cpu())
                embeds.append(e.half().cpu())
                names += batch
            bar.update(len(files[start : start + batch_size]))
        bar.close()
        width = pipe.model.config.vision.width
        n_tok = pipe.model.config.vision.num_patches + 1
        index = cls(
            folder,
            names,
            torch.cat(feats) if feats else torch.zeros(0, pipe.model.config.embed_dim),
            torch.cat(embeds) if embeds else torch.zeros(0, n_tok, width, dtype=torch.float16),
            bad,
        )
        if cache is not None:
            index._save(cache)
        log.info("indexed %d images of %s (%d unreadable)", len(names), folder, len(bad))
        return index

    def _save(self, cache: Path) -> None:
        """Write the cache atomically; a failure (read-only or full disk, a concurrent writer) is
        logged and the index is served from memory."""
        tmp = None
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
            save_file(
                {"image_feat": self.image_feat.contiguous(), "image_embeds": self.image_embeds.contiguous()},
                str(tmp / "embeddings.safetensors"),
            )
            (tmp / "index.json").write_text(json.dumps({"names": self.names, "bad": self.bad}))
            tmp.rename(cache)  # fails if another process got there first: keep theirs
            tmp = None
        except OSError as e:
            if not (cache / "index.json").exists():
                log.warning("could not write the index cache %s (%s); serving without it", cache, e)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
