"""Retrieval data in the authors' formats.

Train: ``[{"image", "caption", "image_id"}]`` — one caption per entry; entries sharing an
``image_id`` are captions of the same image (positives of each other in the id-aware ITC).
Eval: ``[{"image", "caption": [str, ...]}]`` — every caption of every image; the ground truth of
image ``i`` is its captions, of text ``t`` its image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor
from torch.utils.data import Dataset

from albef.data.annotations import BadSample, read_annotations, require_entries, resolve_image
from albef.data.pretrain import PretrainDataset, PretrainRecord, read_image
from albef.text import check_text, clean_text


@dataclass(frozen=True)
class RetrievalRecord(PretrainRecord):
    image_id: int = 0  # dense index of the entry's image id


def read_retrieval_train(
    files: str | Sequence[str],
    image_root: str | None,
    max_words: int | None = None,
    cleaning: str = "albef",
    grounding: bool = False,
) -> tuple[list[RetrievalRecord], list[BadSample]]:
    """Training entries, with image ids mapped to 0..n-1 in order of first appearance (as the
    authors' ``re_train_dataset`` does). ``grounding=True`` reads the authors' grounding training
    format instead: ``{"image", "text", "ref_id"}``, the image's file name as its id."""
    ids: dict[object, int] = {}
    text_key = "text" if grounding else "caption"

    def parse(entry: dict, where: str) -> RetrievalRecord:
        image = resolve_image(entry.get("image"), image_root)
        cleaned = clean_text(entry.get(text_key), f"'{text_key}'", cleaning, max_words)
        if grounding:
            key = entry["image"].split("/")[-1]
        elif "image_id" in entry:
            key = entry["image_id"]
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise ValueError(f"'image_id' must be a string or an integer, not {type(key).__name__} {key!r}")
        else:
            raise ValueError("missing 'image_id'")
        return RetrievalRecord(image, (cleaned,), where, ids.setdefault(key, len(ids)))

    return read_annotations(files, parse)


class RetrievalTrainDataset(PretrainDataset):
    """:class:`PretrainDataset` whose items also carry the image id (``idx``)."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["idx"] = self.records[item["index"]].image_id
        return item


@dataclass
class RetrievalEvalSet:
    images: list[str]
    texts: list[str]  # cleaned captions, image by image
    txt2img: list[int]  # image of each text
    img2txt: list[list[int]]  # texts of each image
    bad: list[BadSample]


def read_retrieval_eval(
    files: str | Sequence[str], image_root: str | None, max_words: int | None = None, cleaning: str = "albef"
) -> RetrievalEvalSet:
    """The evaluation gallery. Unlike training, a bad entry here is an error: skipping it would
    silently change the benchmark."""

    def parse(entry: dict, where: str) -> tuple[str, list[str]]:
        image = resolve_image(entry.get("image"), image_root)
        caps = entry.get("caption")
        if not isinstance(caps, list):
            return image, [clean_text(caps, "'caption'", cleaning, max_words)]
        if not caps:
            raise ValueError("'caption' is an empty list; every image needs a caption")
        # every caption is a text query of the benchmark: none is dropped
        return image, [
            clean_text(check_text(c, f"'caption'[{i}]"), f"'caption'[{i}]", cleaning, max_words)
            for i, c in enumerate(caps)
        ]

    records, bad = read_annotations(files, parse)
    require_entries(len(records), files, "retrieval evaluation")
    if bad:
        raise ValueError(
            "the evaluation set has bad entries (fix them: skipping would change the benchmark):\n  "
            + "\n  ".join(map(str, bad[:20]))
        )
    out = RetrievalEvalSet([], [], [], [], bad)
    for i, (image, caps) in enumerate(records):
        out.images.append(image)
        out.img2txt.append(list(range(len(out.texts), len(out.texts) + len(caps))))
        out.texts += caps
        out.txt2img += [i] * len(caps)
    return out


class ImageListDataset(Dataset):
    """Images by path through a transform; an unreadable image is an error naming it."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(read_image(self.paths[i]))
