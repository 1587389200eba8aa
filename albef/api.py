"""The high-level API: images and strings in, scores and maps out.

Example:
    >>> from albef import Pipeline
    >>> pipe = Pipeline.from_pretrained("runs/main/pretrain")                        # doctest: +SKIP
    >>> pipe = Pipeline.from_pretrained("runs/main/pretrain")  # a run folder: best, else last  # doctest: +SKIP
    >>> pipe.similarity(["cat.png", "dog.png"], ["a cat", "a dog"])              # doctest: +SKIP
    tensor([[0.41, 0.02], [0.05, 0.38]])
    >>> pipe.retrieve("a cat", gallery=["cat.png", "dog.png", "car.png"], top=2)  # doctest: +SKIP
    [RetrievalHit(index=0, itc=0.41, itm=0.97), RetrievalHit(index=2, itc=0.08, itm=0.03)]
    >>> # precision="auto": bf16 autocast where the device has it natively
    >>> pipe = Pipeline.from_pretrained("runs/main/pretrain", precision="auto")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from albef.data.pretrain import load_image
from albef.data.transforms import test_transform
from albef.gradcam import box_scores, gradcam_itm, upsample_heatmap
from albef.models.albef import ALBEF
from albef.precision import autocast, resolve_precision
from albef.text import TokenizedText, Tokenizer, clean_caption

if TYPE_CHECKING:  # for the annotation only; VQAPipeline.from_pretrained imports it where used
    from albef.models.tasks import ALBEFForVQA

ImageLike = str | Path | Image.Image | Tensor


class Processor:
    """Turns images and strings into model inputs: the test transform, cleaning, tokenising."""

    def __init__(
        self, image_size: int, tokenizer: Tokenizer | None = None, max_text_len: int = 30, cleaning: str = "albef"
    ):
        self.image_size = image_size
        self.transform = test_transform(image_size)
        self.tokenizer = tokenizer or Tokenizer()
        self.max_text_len = max_text_len
        self.cleaning = cleaning

    @classmethod
    def for_model(cls, model: ALBEF, directory: str | Path | None = None, max_text_len: int = 30) -> Processor:
        tok = Tokenizer.from_dir(directory) if directory else Tokenizer(add_sep=model.config.add_sep)
        return cls(model.config.vision.image_size, tok, max_text_len, model.config.text_cleaning)

    def load(self, image: ImageLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        try:
            return load_image(str(image))
        except (OSError, ValueError) as e:
            raise ValueError(f"{image}: not a readable image ({type(e).__name__}: {e})") from e

    def images(self, images: Sequence[ImageLike] | Tensor) -> Tensor:
        """[B, 3, S, S] normalised pixels; a tensor is taken as already normalised."""
        if isinstance(images, Tensor):
            return images if images.dim() == 4 else images.unsqueeze(0)
        return torch.stack([img if isinstance(img, Tensor) else self.transform(self.load(img)) for img in images])

    def texts(self, texts: Sequence[str] | str) -> TokenizedText:
        texts = [texts] if isinstance(texts, str) else list(texts)
        cleaned = [clean_caption(t, self.cleaning) for t in texts]
        empty = [t for t, c in zip(texts, cleaned, strict=True) if not c]
        if empty:
            raise ValueError(f"text is empty after cleaning: {empty[0]!r}")
        return self.tokenizer(cleaned, max_length=self.max_text_len, padding="longest")


@dataclass
class RetrievalHit:
    index: int  # position in the gallery
    itc: float  # cosine similarity
    itm: float | None  # ITM match probability (None in ITC-only mode)


@dataclass
class GroundingResult:
    heatmap: Tensor  # [grid, grid] Grad-CAM on the patch grid
    heatmap_image: Tensor  # [H, W] upsampled to the original image
    box_scores: Tensor | None  # one score per given box
    best_box: int | None  # index of the best box


def _up(x: Tensor, amp: bool) -> Tensor:
    """Autocast's bf16/fp16 outputs returned as float32 (a pipeline whose weights are bf16 keeps them)."""
    return x.float() if amp and x.dtype in (torch.bfloat16, torch.float16) else x


class Pipeline:
    """A model and its processor on a device, with batched, gradient-free entry points.

    ``precision``: ``"fp32"`` (default), ``"bf16"`` (autocast to bfloat16 around the forward
    passes, float32 weights; features and scores come back float32) or ``"auto"`` (bf16 where the
    GPU or CPU has native bfloat16, see :mod:`albef.precision`; ``"fp16"`` on CUDA only).
    """

    def __init__(
        self,
        model: ALBEF,
        processor: Processor | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        precision: str = "fp32",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device, "precision")
        self.model = model.to(self.device).eval()
        self.processor = processor or Processor.for_model(model)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        precision: str = "fp32",
    ) -> Pipeline:
        """An albef model folder, a training run's checkpoint (its student, built from the config the
        checkpoint stores) or a run folder (its ``checkpoint_best.pt``, else ``checkpoint_last.pt``).
        A bare state dict or an authors' checkpoint is an error saying to ``albef convert`` it.
        ``dtype`` casts the weights; ``precision`` autocasts the forward passes (see the class)."""
        from albef.checkpoints.pretrained import load_model, resolve_model_path

        path = resolve_model_path(directory)
        model = load_model(path, device="cpu", dtype=dtype, expect=ALBEF)
        return cls(model, Processor.for_model(model, path if path.is_dir() else None), device, precision=precision)

    @property
    def amp(self) -> bool:
        """Whether the forward passes run under autocast (``precision`` bf16 / fp16)."""
        return self.precision != "fp32"

    def autocast(self):
        """The autocast context of ``precision`` (a no-op for fp32), for code that calls
        ``pipe.model`` directly (e.g. the gallery index)."""
        return autocast(self.device, self.precision)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _pixels(self, images: Sequence[ImageLike] | Tensor) -> Tensor:
        return self.processor.images(images).to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_image(self, images: Sequence[ImageLike] | Tensor) -> Tensor:
        """L2-normalised ITC embeddings [N, embed_dim]."""
        px = self._pixels(images)
        with self.autocast():
            return _up(
                torch.cat(
                    [
                        self.model.image_feat(self.model.encode_image(px[i : i + self.batch_size]))
                        for i in range(0, len(px), self.batch_size)
                    ]
                ),
                self.amp,
            )

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str] | str) -> Tensor:
        """L2-normalised ITC embeddings [N, embed_dim]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            t = self.processor.texts(texts[i : i + self.batch_size]).to(self.device)
            with self.autocast():
                out.append(
                    self.model.text_feat(self.model.encode_text(t.input_ids, t.attention_mask), t.attention_mask)
                )
        return _up(torch.cat(out), self.amp)

    def similarity(self, images: Sequence[ImageLike] | Tensor, texts: Sequence[str] | str) -> Tensor:
        """ITC cosine similarity of every image with every text: [N_images, N_texts], float32 (a
        bfloat16 pipeline's features are compared in float32, so near-equal scores do not tie)."""
        return self.encode_image(images).float() @ self.encode_text(texts).float().T

    @torch.inference_mode()
    def match(self, images: Sequence[ImageLike] | Tensor, texts: Sequence[str] | str) -> Tensor:
        """ITM match probability of each pair (image i, text i): [N]."""
        px = self._pixels(images)
        t = self.processor.texts(texts).to(self.device)
        if len(px) != len(t.input_ids):
            raise ValueError(
                f"match pairs images with texts one to one: got {len(px)} images, {len(t.input_ids)} texts"
            )
        probs = []
        for i in range(0, len(px), self.batch_size):
            sl = slice(i, i + self.batch_size)
            with self.autocast():
                text = self.model.encode_text(t.input_ids[sl], t.attention_mask[sl])
                fused = self.model.itm_cls(text, t.attention_mask[sl], self.model.encode_image(px[sl]))
                logits = self.model.itm_logits(fused)
            probs.append(logits.float().softmax(-1)[:, 1])
        return torch.cat(probs)

    @torch.inference_mode()
    def retrieve(
        self, query: str, gallery: Sequence[ImageLike] | Tensor, k: int = 16, top: int = 5, rerank: bool = True
    ) -> list[RetrievalHit]:
        """Text → image: ITC shortlist of ``k`` gallery images, re-ranked by ITM in one batch."""
        px = self._pixels(gallery)
        with self.autocast():
            embeds = torch.cat(
                [self.model.encode_image(px[i : i + self.batch_size]) for i in range(0, len(px), self.batch_size)]
            )
            feats = self.model.image_feat(embeds)
        return self.retrieve_embedded(query, feats, embeds, k, top, rerank)

    @torch.inference_mode()
    def retrieve_embedded(
        self, query: str, image_feat: Tensor, image_embeds: Tensor, k: int = 16, top: int = 5, rerank: bool = True
    ) -> list[RetrievalHit]:
        """:meth:`retrieve` over a gallery embedded beforehand: ITC features [N, E] and image
        sequences [N, 1 + patches, D] (any device or dtype; only the shortlist's rows are moved)."""
        t = self.processor.texts(query).to(self.device)
        with self.autocast():
            text_embeds = self.model.encode_text(t.input_ids, t.attention_mask)
            text_feat = self.model.text_feat(text_embeds, t.attention_mask)[0]
        sims = image_feat.to(self.device, torch.float32) @ text_feat.float()  # float32 scores: no bf16 ties
        k = min(k, len(sims))
        cand = sims.topk(k).indices
        if not rerank:
            return [RetrievalHit(int(i), float(sims[i]), None) for i in cand[:top]]
        embeds = image_embeds[cand.to(image_embeds.device)].to(self.device, self.dtype)
        with self.autocast():
            fused = self.model.itm_cls(text_embeds.expand(k, -1, -1), t.attention_mask.expand(k, -1), embeds)
            logits = self.model.itm_logits(fused)
        p = logits.float().softmax(-1)[:, 1]
        order = p.argsort(descending=True)[:top]
        return [RetrievalHit(int(cand[j]), float(sims[cand[j]]), float(p[j])) for j in order]

    def ground(
        self,
        image: ImageLike,
        text: str,
        boxes: Tensor | Sequence[Sequence[float]] | None = None,
        layer: int | None = None,
    ) -> GroundingResult:
        """Grad-CAM of ``text`` on ``image`` (ITM mode) and, given boxes (x, y, w, h), the best one."""
        pil = image if isinstance(image, Tensor) else self.processor.load(image)
        px = self._pixels([pil])
        t = self.processor.texts(text).to(self.device)
        with self.autocast():
            heat = gradcam_itm(self.model, px, t.input_ids, t.attention_mask, layer)[0].float()
        H, W = pil.shape[-2:] if isinstance(pil, Tensor) else (pil.height, pil.width)
        heat_img = upsample_heatmap(heat, H, W)
        if boxes is None:
            return GroundingResult(heat.cpu(), heat_img.cpu(), None, None)
        scores = box_scores(heat_img, torch.as_tensor(boxes, dtype=torch.float32))
        return GroundingResult(heat.cpu(), heat_img.cpu(), scores.cpu(), int(scores.argmax()) if len(scores) else None)


def tokenize_answers(tokenizer: Tokenizer, answers: Sequence[str]) -> TokenizedText:
    """Answers as decoder targets ``[CLS] answer [SEP]``: the authors append the string "[SEP]"
    (their tokenizer adds none); a LAVIS-convention tokenizer adds it itself."""
    texts = list(answers) if tokenizer.add_sep else [f"{a}[SEP]" for a in answers]
    return tokenizer(texts, padding="longest")


@dataclass
class Answer:
    answer: str
    score: float
    candidates: list[tuple[str, float]]  # the re-ranked shortlist, best first


class VQAPipeline:
    """Answer questions about images by ranking a fixed answer list.

    Example:
        >>> vqa = VQAPipeline.from_pretrained("runs/vqa/model", answer_list=["yes", "no", "red"])  # doctest: +SKIP
        >>> vqa.answer(["cat.png"], ["what color is the cat?"])[0].answer                          # doctest: +SKIP
        'red'
    """

    def __init__(
        self,
        model: ALBEFForVQA,
        processor: Processor | None = None,
        device: str | torch.device | None = None,
        answer_list: Sequence[str] | None = None,
        k: int = 128,
        scoring: str = "albef",
        precision: str = "fp32",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device, "precision")  # as Pipeline's
        self.model = model.to(self.device).eval()
        self.processor = processor or Processor.for_model(model)  # questions: see answer()
        self.k, self.scoring = k, scoring
        self.answers: list[str] = []
        if answer_list is not None:
            self.set_answers(answer_list)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None, **kwargs) -> VQAPipeline:
        """A VQA model folder, a VQA run's checkpoint or its run folder (as :meth:`Pipeline.from_pretrained`);
        ``precision=`` among ``kwargs`` as for :class:`Pipeline`."""
        from albef.checkpoints.pretrained import load_model, resolve_model_path
        from albef.models.tasks import ALBEFForVQA

        path = resolve_model_path(directory)
        model = load_model(path, expect=ALBEFForVQA)
        return cls(model, Processor.for_model(model, path if path.is_dir() else None), device, **kwargs)

    def set_answers(self, answer_list: Sequence[str]) -> None:
        if not answer_list:
            raise ValueError("the answer list is empty")
        self.answers = list(answer_list)
        tok = tokenize_answers(self.processor.tokenizer, self.answers)
        self._answer_ids, self._answer_mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    @torch.inference_mode()
    def answer(
        self,
        images: Sequence[ImageLike] | Tensor,
        questions: Sequence[str] | str,
        answer_list: Sequence[str] | None = None,
        k: int | None = None,
    ) -> list[Answer]:
        """The best answer of the list for each (image, question) pair."""
        from albef.data.vqa import TEST_QUESTION_WORDS
        from albef.models.tasks import rank_answers
        from albef.text import clean_question

        if answer_list is not None:
            self.set_answers(answer_list)
        if not self.answers:
            raise ValueError("no answer list: pass answer_list or call set_answers first")
        questions = [questions] if isinstance(questions, str) else list(questions)
        px = self.processor.images(images).to(self.device, next(self.model.parameters()).dtype)
        # as the authors' test split: cut by tokens only at BERT's position limit
        q = self.processor.tokenizer(
            [clean_question(x, self.processor.cleaning, TEST_QUESTION_WORDS) for x in questions],
            max_length=self.model.config.text.max_position_embeddings,
            padding="longest",
        ).to(self.device)
        with autocast(self.device, self.precision):
            states = self.model.encode_question(px, q.input_ids, q.attention_mask)
            r = rank_answers(
                self.model,
                states,
                q.attention_mask,
                self._answer_ids,
                self._answer_mask,
                k or self.k,
                scoring=self.scoring,
            )
        out = []
        for ids, scores in zip(r["ranked_ids"].tolist(), r["scores"].float().tolist(), strict=True):
            cands = [(self.answers[i], s) for i, s in zip(ids, scores, strict=True)]
            out.append(Answer(cands[0][0], cands[0][1], cands))
        return out
