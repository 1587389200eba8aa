"""SNLI-VE and NLVR2 data in the authors' formats.

SNLI-VE: ``{"image", "sentence", "label": "entailment" | "neutral" | "contradiction"}`` ->
2 / 1 / 0 (the authors' mapping). NLVR2: ``{"images": [a, b], "sentence", "label": "True" |
"False"}`` -> 1 / 0. Sentences are cleaned like captions (30 words).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from albef.data.annotations import BadSample, read_annotations, resolve_image
from albef.data.pretrain import PretrainRecord
from albef.text import clean_caption

LABELS = {"ve": {"entailment": 2, "neutral": 1, "contradiction": 0}, "nlvr": {"True": 1, "False": 0}}


@dataclass(frozen=True)
class ClassificationRecord(PretrainRecord):
    label: int = 0


def read_classification(files: str | Sequence[str], image_root: str | None, task: str, cleaning: str = "albef",
                        max_words: int = 30) -> tuple[list[ClassificationRecord], list[BadSample]]:
    if task not in LABELS:
        raise ValueError(f"task must be one of {sorted(LABELS)}")
    labels = LABELS[task]

    def parse(entry: dict, where: str) -> ClassificationRecord:
        if task == "nlvr":
            imgs = entry.get("images")
            if not (isinstance(imgs, list) and len(imgs) == 2):
                raise ValueError("'images' must be a list of two paths")
            image: str | tuple[str, ...] = tuple(resolve_image(i, image_root) for i in imgs)
        else:
            image = resolve_image(entry.get("image"), image_root)
        sentence = clean_caption(entry.get("sentence") or "", cleaning, max_words)
        if not sentence:
            raise ValueError("'sentence' is missing or empty after cleaning")
        label = str(entry.get("label"))
        if label not in labels:
            raise ValueError(f"label {entry.get('label')!r} is not one of {sorted(labels)}")
        return ClassificationRecord(image, (sentence,), where, labels[label])

    return read_annotations(files, parse)
