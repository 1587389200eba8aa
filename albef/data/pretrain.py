"""The pretraining dataset (``{"image": path, "caption": str | [str]}``) and its collate.

Every random choice of a sample (which caption of a list, the crop, the flip, RandomAugment) is
drawn from a seed derived from ``(seed, epoch, index)``, so a sample looks the same whichever
rank, worker or resumed run loads it. A sample whose image cannot be read is replaced by the
next readable one (deterministically), so batches keep their size — the feature queue and DDP
both need equal batches — and the replacement is reported with the batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from albef.data.annotations import BadSample, resolve_image
from albef.seeding import mix_seed
from albef.text import BadTextError, Tokenizer, check_text, clean_text

# An image this large is almost certainly a mistake or an attack (a decompression bomb);
# PIL's own default limit warns at ~89M pixels and fails at twice that.
Image.MAX_IMAGE_PIXELS = 200_000_000


@dataclass(frozen=True)
class PretrainRecord:
    image: str | tuple[str, ...]  # a pair for NLVR2
    captions: tuple[str, ...]
    where: str

    @property
    def image_paths(self) -> tuple[str, ...]:
        """The record's image files: one, or NLVR2's two."""
        return self.image if isinstance(self.image, tuple) else (self.image,)


def parse_pretrain_entry(
    image_root: str | None, max_words: int | None = None, cleaning: str = "albef"
) -> Callable[[dict, str], PretrainRecord]:
    """A parser for :func:`~albef.data.annotations.read_annotations`: cleans the captions now,
    so an entry whose every caption is empty after cleaning is rejected at load time."""

    def parse(entry: dict, where: str) -> PretrainRecord:
        image = resolve_image(entry.get("image"), image_root)
        caption = entry.get("caption")
        if isinstance(caption, list):
            if not caption:
                raise ValueError("'caption' must be a string or a list of strings, not an empty list")
            # text the tokenizer cannot take rejects the entry; an empty caption of a list is dropped
            for i, c in enumerate(caption):
                check_text(c, f"'caption'[{i}]")
            cleaned = tuple(c for c in _cleaned_or_empty(caption, cleaning, max_words) if c)
            if not cleaned:
                raise ValueError("every 'caption' is empty after cleaning")
            return PretrainRecord(image, cleaned, where)
        return PretrainRecord(image, (clean_text(caption, "'caption'", cleaning, max_words),), where)

    return parse


def _cleaned_or_empty(captions: Sequence[str], cleaning: str, max_words: int) -> list[str]:
    out = []
    for c in captions:
        try:
            out.append(clean_text(c, "caption", cleaning, max_words))
        except BadTextError:
            out.append("")
    return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's caption choice and augmentation in an epoch (the same whichever
    worker or rank loads it)."""
    return mix_seed("sample", seed, epoch, index)


class DamagedImageError(OSError):
    """An image file whose data is damaged inside (``filename`` names it)."""

    def __init__(self, message: str, filename: str):
        super().__init__(message)
        self.filename = filename

    def __str__(self) -> str:  # OSError's own would print "[Errno None] None: 'file'"
        return str(self.args[0])

    def __reduce__(self):  # through DataLoader workers and multiprocessing
        return type(self), (str(self.args[0]), self.filename)


def load_image(source: str | IO[bytes], truncated_ok: bool = False) -> Image.Image:
    """Open and fully decode an image (a path or a binary file) as RGB; raises ``OSError`` /
    ``ValueError`` when it can't. ``truncated_ok``: a file cut short decodes what it holds, the rest
    left black, as in the authors' datasets (which set PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` for
    the whole process); otherwise it raises here, not later in a transform."""
    try:
        with Image.open(source) as img:
            # PIL's switch is process-wide: set it for this decode either way, whatever else set it
            before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, truncated_ok
            try:
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = before
            return img.convert("RGB")
    except SyntaxError as e:  # PIL's PNG reader reports a damaged chunk met while decoding this way
        name = _source_name(source)
        raise DamagedImageError(f"{name}: damaged image data ({e})", name) from e
    except Image.DecompressionBombError as e:  # neither an OSError nor a ValueError: callers would not catch it
        raise ValueError(
            f"{_source_name(source)}: {e}; resize the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from e


def _source_name(source: str | IO[bytes]) -> str:
    return str(source) if isinstance(source, str | os.PathLike) else getattr(source, "name", "image data")


def read_image(path: str) -> Image.Image:
    """:func:`load_image` for evaluation, where an image that cannot be read is an error naming it
    (a training run skips and counts it instead: :class:`PretrainDataset`)."""
    try:
        return load_image(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e}); replace the file or drop its entry") from e


class PretrainDataset(Dataset):
    """Image–caption pairs for pretraining; items are dicts (see :class:`PretrainCollator`)."""

    def __init__(
        self,
        records: Sequence[PretrainRecord],
        transform: Callable[[Image.Image], Tensor],
        seed: int = 0,
        max_retries: int = 20,
        truncated_ok: bool = True,
    ):
        """``truncated_ok``: images cut short are used as far as they go, as the authors' datasets
        do (``data.load_truncated_images``); false: skipped and counted as bad samples."""
        if not records:
            raise ValueError("the pretraining dataset is empty (no valid entry in the annotation files)")
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries
        self.truncated_ok = truncated_ok

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, paths: Sequence[str], bad: list[BadSample]) -> list[Image.Image] | None:
        """Each image of a record (two for NLVR2); None, with the failing file added to ``bad``."""
        images = []
        for p in paths:
            try:
                images.append(load_image(p, self.truncated_ok))
            except (OSError, ValueError, UnidentifiedImageError) as e:
                bad.append(BadSample(getattr(e, "filename", None) or p, f"{type(e).__name__}: {e}"))
                return None
        return images

    def __getitem__(self, index: int) -> dict[str, Any]:
        bad: list[BadSample] = []
        for attempt in range(self.max_retries + 1):
            i = (index + attempt * 7_919) % len(self.records)  # stride: skip past runs of bad files
            rec = self.records[i]
            paths = rec.image_paths
            images = self._load(paths, bad)
            if images is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, i))
                caption = rec.captions[int(torch.randint(len(rec.captions), ()))]
                pixels = (
                    torch.stack([self.transform(im) for im in images]) if len(images) > 1 else self.transform(images[0])
                )
            item = {"image": pixels, "caption": caption, "index": i, "bad": bad}
            if getattr(rec, "label", None) is not None:
                item["label"] = rec.label
            return item
        raise RuntimeError(
            f"{self.max_retries + 1} images in a row could not be read, starting at "
            f"{self.records[index].image}; is the image root right?\n  " + "\n  ".join(map(str, bad))
        )


@dataclass
class PretrainBatch:
    images: Tensor  # [B, 3, H, W]
    input_ids: Tensor  # [B, L], padded to the longest caption of the batch
    attention_mask: Tensor
    index: Tensor  # dataset index of each sample
    bad: list[BadSample] = field(default_factory=list)  # every failed read, replacements' included
    n_replaced: int = 0  # samples of this batch whose own image failed (what the bad share counts)
    idx: Tensor | None = None  # image ids (retrieval fine-tuning)
    labels: Tensor | None = None  # class labels (SNLI-VE, NLVR2)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PretrainBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            images=move(self.images),
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            idx=move(self.idx),
            labels=move(self.labels),
        )


class PretrainCollator:
    """Stack images, tokenise captions padded to the longest in the batch (not a fixed 30)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> PretrainBatch:
        text = self.tokenizer([it["caption"] for it in items], max_length=self.max_length, padding="longest")
        return PretrainBatch(
            torch.stack([it["image"] for it in items]),
            text.input_ids,
            text.attention_mask,
            torch.tensor([it["index"] for it in items]),
            [b for it in items for b in it["bad"]],
            # items replacing a bad sample (JSON), or skipped bad samples before them (shards)
            sum(it.get("replaced", 1 if it["bad"] else 0) for it in items),
            torch.tensor([it["idx"] for it in items]) if "idx" in items[0] else None,
            torch.tensor([it["label"] for it in items]) if "label" in items[0] else None,
        )
