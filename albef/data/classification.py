"""SNLI-VE and NLVR2 data in the authors' formats.

SNLI-VE: ``{"image", "sentence", "label": "entailment" | "neutral" | "contradiction"}`` ->
2 / 1 / 0 (the authors' mapping). NLVR2: ``{"images": [a, b], "sentence", "label": "True" |
"False"}`` -> 1 / 0. Sentences are cleaned like captions (30 words).

Image names, as the authors' loaders build them: SNLI-VE names a Flickr30K image by its bare id
(``"image": "2248275918"``) and the authors open ``image_root/<id>.jpg``; so for ``ve`` an entry
whose image's last path component has no ``.`` (no file extension) gets ``.jpg`` appended, and a
name that already has an extension (``"2248275918.jpg"``, ``"images/000001.png"``) is used as it
is. NLVR2 names both images with their extensions, joined to ``image_root`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from albef.data.annotations import BadSample, read_annotations, resolve_image
from albef.data.pretrain import PretrainRecord
from albef.text import clean_text

LABELS = {"ve": {"entailment": 2, "neutral": 1, "contradiction": 0}, "nlvr": {"True": 1, "False": 0}}


@dataclass(frozen=True)
class ClassificationRecord(PretrainRecord):
    label: int = 0


def _ve_file_name(image: object) -> object:
    """SNLI-VE's bare image id -> its file name: ``.jpg`` appended when the last path component
    has no ``.`` (the authors' ``'%s.jpg' % ann['image']``); a name with an extension is kept.
    An integer id is taken as its decimal string, as ``%s`` would."""
    if isinstance(image, int) and not isinstance(image, bool):
        image = str(image)
    if isinstance(image, str) and image and "." not in image.replace("\\", "/").rsplit("/", 1)[-1]:
        return image + ".jpg"
    return image


def read_classification(
    files: str | Sequence[str], image_root: str | None, task: str, cleaning: str = "albef", max_words: int | None = None
) -> tuple[list[ClassificationRecord], list[BadSample]]:
    """Read SNLI-VE (``task="ve"``) or NLVR2 (``task="nlvr"``) entries; bad entries are skipped and
    returned as :class:`BadSample`. For ``ve``, an image named without a file extension (no ``.``
    in its last path component, e.g. the authors' ``"2248275918"``) is read from
    ``image_root/<name>.jpg``; a name with an extension is joined to ``image_root`` unchanged."""
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
            image = resolve_image(_ve_file_name(entry.get("image")), image_root)
        sentence = clean_text(entry.get("sentence"), "'sentence'", cleaning, max_words)
        label = str(entry.get("label"))
        if label not in labels:
            raise ValueError(f"label {entry.get('label')!r} is not one of {sorted(labels)}")
        return ClassificationRecord(image, (sentence,), where, labels[label])

    return read_annotations(files, parse)
