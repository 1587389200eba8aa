"""Text cleaning and BERT WordPiece tokenization for ALBEF.

Two conventions coexist and both are supported:

* the ALBEF authors' code (``dataset/utils.py`` cleaning, ``[CLS] pieces`` without ``[SEP]``),
  which their released checkpoints were trained with;
* LAVIS / BLIP (``blip_processors.py`` cleaning, transformers ``BertTokenizer`` giving
  ``[CLS] pieces [SEP]``).

The tokenizer is built offline from the packaged bert-base-uncased vocabulary with the
HuggingFace ``tokenizers`` library, so no network access or ``transformers`` is needed.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

__all__ = [
    "pre_caption",
    "pre_question",
    "pre_caption_blip",
    "pre_question_blip",
    "clean_caption",
    "clean_question",
    "clean_text",
    "check_text",
    "has_tokens",
    "BadTextError",
    "TokenizedText",
    "Tokenizer",
    "DEFAULT_VOCAB_FILE",
]

DEFAULT_VOCAB_FILE = Path(__file__).resolve().parent / "assets" / "bert-base-uncased-vocab.txt"

_ALBEF_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def _truncate_words(text: str, max_words: int) -> str:
    # Splitting on ' ' only (not any whitespace) matches the reference code: a tab or a
    # single newline does not start a new "word" for the purpose of the limit.
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption exactly like ALBEF's ``dataset/utils.py::pre_caption``.

    >>> pre_caption("A black-and-white photo of <person>!")
    'a black and white photo of person'
    """
    caption = _ALBEF_PUNCT.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return _truncate_words(caption, max_words)


def pre_question(question: str, max_words: int = 30) -> str:
    """Clean a question like ALBEF's ``pre_question`` (no whitespace collapsing, no <person>).

    >>> pre_question("What's on the table?")
    'whats on the table'
    """
    question = _ALBEF_PUNCT.sub("", question.lower()).replace("-", " ").replace("/", " ")
    question = question.rstrip(" ")
    return _truncate_words(question, max_words)


def pre_caption_blip(caption: str, max_words: int = 50) -> str:
    """Clean a caption like LAVIS/BLIP's ``BlipCaptionProcessor`` (punctuation -> space).

    >>> pre_caption_blip("A child's toy (red).")
    "a child's toy red"
    """
    caption = _BLIP_PUNCT.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return _truncate_words(caption, max_words)


def pre_question_blip(question: str, max_words: int = 50) -> str:
    """Clean a question like LAVIS/BLIP's ``BlipQuestionProcessor`` (punctuation deleted).

    >>> pre_question_blip("Is it red?")
    'is it red?'
    """
    question = _BLIP_PUNCT.sub("", question.lower()).rstrip(" ")
    return _truncate_words(question, max_words)


_CAPTION_CLEANERS = {"albef": pre_caption, "blip": pre_caption_blip}
_QUESTION_CLEANERS = {"albef": pre_question, "blip": pre_question_blip}


def default_max_words(style: str) -> int:
    """The words a cleaning style keeps when no limit is given: its cleaner's own default.

    >>> default_max_words("albef"), default_max_words("blip")
    (30, 50)
    """
    return inspect.signature(_CAPTION_CLEANERS[style]).parameters["max_words"].default


def _dispatch(table: dict, kind: str, text: str, style: str, max_words: int | None) -> str:
    try:
        fn = table[style]
    except KeyError:
        raise ValueError(f"unknown {kind} cleaning style {style!r}; expected one of {sorted(table)}") from None
    return fn(text) if max_words is None else fn(text, max_words)  # None: the style's own limit (30 / 50)


class BadTextError(ValueError):
    """Text the tokenizer cannot take (not a string, a lone surrogate) or that holds nothing for it."""


_SURROGATE = re.compile("[\ud800-\udfff]")
# The tokenizers' own normalizer (as :class:`Tokenizer` sets it): it drops control and format
# characters (NUL, zero-width spaces, ...) and turns whitespace into spaces, so a text it leaves
# blank gives no token at all.
_NORMALIZER = normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False
)


def check_text(text: object, what: str = "text") -> str:
    """``text`` if the tokenizer can take it; else :class:`BadTextError` saying why.

    Rejected: a value that is not a ``str`` (a number, ``None``, a list inside a caption list)
    and a string holding a lone UTF-16 surrogate (``"\\udcc3"``: a JSON ``\\udXXX`` escape without
    its pair, or undecodable bytes read with ``surrogateescape``), which the Rust tokenizer cannot
    convert and would fail on in the middle of a batch.

    >>> check_text("a dog")
    'a dog'
    """
    if not isinstance(text, str):
        raise BadTextError(f"{what} must be a string, not {'null' if text is None else type(text).__name__}")
    m = _SURROGATE.search(text)
    if m:
        raise BadTextError(
            f"{what} holds a lone surrogate {ascii(m.group())} at character {m.start()} "
            "(undecodable bytes or an unpaired \\udXXX JSON escape); the tokenizer cannot take it: "
            "fix the text (re-encode the file as UTF-8)"
        )
    return text


def has_tokens(text: str) -> bool:
    """Whether the tokenizer gets at least one token from ``text`` (not blank once its normalizer
    drops control and format characters)."""
    return bool(text.strip()) and bool(_NORMALIZER.normalize_str(text).strip())


def clean_caption(text: str, style: str = "albef", max_words: int | None = None) -> str:
    """Clean a caption with the ``"albef"`` (default) or ``"blip"`` (LAVIS) rules; text the
    tokenizer cannot take is a :class:`BadTextError` (see :func:`check_text`).

    >>> clean_caption("Two dogs, playing!", style="blip")
    'two dogs, playing'
    """
    return _dispatch(_CAPTION_CLEANERS, "caption", check_text(text, "caption"), style, max_words)


def clean_question(text: str, style: str = "albef", max_words: int | None = None) -> str:
    """Clean a question with the ``"albef"`` (default) or ``"blip"`` (LAVIS) rules; text the
    tokenizer cannot take is a :class:`BadTextError` (see :func:`check_text`)."""
    return _dispatch(_QUESTION_CLEANERS, "question", check_text(text, "question"), style, max_words)


def clean_text(
    text: object, what: str = "'caption'", style: str = "albef", max_words: int | None = None, question: bool = False
) -> str:
    """The cleaning step of every annotation reader, training and evaluation: the cleaned text,
    or :class:`BadTextError` naming ``what`` (the field) when it is missing, not a string, holds a
    lone surrogate, or cleans to nothing the tokenizer keeps (punctuation only, NUL or other
    control characters only). A reader skips the entry (training) or fails naming it (evaluation).

    >>> clean_text("A dog!")
    'a dog'
    """
    if text is None:
        raise BadTextError(f"{what} is missing")
    check_text(text, what)
    cleaned = (clean_question if question else clean_caption)(text, style, max_words)
    if not has_tokens(cleaned):
        raise BadTextError(f"{what} is empty after cleaning ({text[:40]!r}); give it some words")
    return cleaned


@dataclass
class TokenizedText:
    """Batch of token ids and attention masks ([B, L] int64 tensors, or lists if not tensors)."""

    input_ids: torch.Tensor | list[list[int]]
    attention_mask: torch.Tensor | list[list[int]]

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> Iterator[str]:
        return iter(("input_ids", "attention_mask"))

    def to(self, device: torch.device | str) -> TokenizedText:
        return TokenizedText(self.input_ids.to(device), self.attention_mask.to(device))


class Tokenizer:
    """bert-base-uncased WordPiece tokenizer with the ALBEF or the LAVIS special-token layout.

    ``add_sep=False`` (default) gives ``[CLS] pieces`` like the ALBEF authors' tokenizer;
    ``add_sep=True`` gives ``[CLS] pieces [SEP]`` like LAVIS / transformers ``BertTokenizer``.

    >>> tok = Tokenizer()
    >>> tok("a man riding a wave", max_length=30).input_ids
    tensor([[ 101, 1037, 2158, 5559, 1037, 4400]])
    """

    pad_token_id = 0
    unk_token_id = 100
    cls_token_id = 101
    sep_token_id = 102
    mask_token_id = 103
    _SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, vocab_file: str | Path | None = None, add_sep: bool = False) -> None:
        self.vocab_file = Path(vocab_file) if vocab_file is not None else DEFAULT_VOCAB_FILE
        self.add_sep = bool(add_sep)
        vocab = models.WordPiece.read_file(str(self.vocab_file))
        tok = _HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # Registering the specials makes a literal "[SEP]" in the text map to its id (official
        # ALBEF appends the string " [SEP]" to VQA answers) and lets decode skip them.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in self._SPECIALS])
        if tok.get_vocab_size(with_added_tokens=True) != tok.get_vocab_size(with_added_tokens=False):
            raise ValueError(f"vocabulary {self.vocab_file} lacks some of {self._SPECIALS}")
        single = "[CLS] $A [SEP]" if self.add_sep else "[CLS] $A"
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        self._tok = tok
        self._num_specials = 2 if self.add_sep else 1

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _set_truncation(self, max_length: int | None) -> None:
        # The HF tokenizer keeps truncation as state; set it on every call so calls don't leak
        # settings into each other.
        if max_length is None:
            if self._tok.truncation is not None:
                self._tok.no_truncation()
            return
        if max_length < self._num_specials:
            raise ValueError(f"max_length={max_length} cannot hold the {self._num_specials} special token(s)")
        self._tok.enable_truncation(max_length=max_length)

    def __call__(
        self,
        texts: str | list[str],
        max_length: int | None = None,
        padding: str | bool = "longest",
        return_tensors: bool = True,
    ) -> TokenizedText:
        """Tokenize a string or a batch; truncation to ``max_length`` counts the special tokens.

        ``padding``: ``"longest"`` (pad to the longest in the batch), ``"max_length"`` (pad to
        ``max_length``) or ``"none"``/``False``.

        >>> Tokenizer(add_sep=True)(["a cat", "two dogs playing"], padding="longest").attention_mask
        tensor([[1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1]])
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding is False or padding is None:
            padding = "none"
        if padding not in ("longest", "max_length", "none"):
            raise ValueError(f"padding must be 'longest', 'max_length' or 'none', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' requires max_length")
        self._set_truncation(max_length)
        ids = [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=True)]
        masks = [[1] * len(x) for x in ids]
        if padding != "none" and ids:
            target = max_length if padding == "max_length" else max(len(x) for x in ids)
            masks = [m + [0] * (target - len(m)) for m in masks]
            ids = [x + [self.pad_token_id] * (target - len(x)) for x in ids]
        if not return_tensors:
            return TokenizedText(ids, masks)
        if len({len(x) for x in ids}) > 1:
            raise ValueError("sequences have different lengths; use padding or return_tensors=False")
        return TokenizedText(
            torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
            torch.tensor(masks, dtype=torch.long).reshape(len(ids), -1),
        )

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens without special tokens, e.g. ``['surf', '##board']``."""
        self._set_truncation(None)
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of one text including the special tokens, truncated to ``max_length`` if given."""
        self._set_truncation(max_length)
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids back to text; ``[PAD]``/``[CLS]``/``[SEP]``... dropped by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Vocabulary ids of tokens; unknown tokens map to ``unk_token_id``."""
        if isinstance(tokens, str):
            tid = self._tok.token_to_id(tokens)
            return self.unk_token_id if tid is None else tid
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def save(self, directory: str | Path) -> Path:
        """Write ``vocab.txt`` and ``tokenizer_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Copy bytes rather than re-serialising so the md5 of the vocab stays checkable.
        if self.vocab_file.resolve() != (directory / "vocab.txt").resolve():
            shutil.copyfile(self.vocab_file, directory / "vocab.txt")
        config = {"add_sep": self.add_sep, "do_lower_case": True}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load a tokenizer written by :meth:`save` (packaged vocab if ``vocab.txt`` is absent)."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if not config.get("do_lower_case", True):
            raise ValueError("only uncased (do_lower_case=true) vocabularies are supported")
        vocab = directory / "vocab.txt"
        return cls(vocab if vocab.exists() else None, add_sep=bool(config.get("add_sep", False)))
