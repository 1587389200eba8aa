"""Tests for albef.text against the independent LAVIS / official-ALBEF reference vectors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from albef.text import (
    DEFAULT_VOCAB_FILE,
    Tokenizer,
    clean_caption,
    clean_question,
    pre_caption,
    pre_caption_blip,
    pre_question,
    pre_question_blip,
)

N_CAPTIONS = 10  # size of the reference list; parametrize by index so ids read well


def _io(parity_dir, name: str) -> dict:
    return torch.load(parity_dir / f"{name}_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def ref(parity_dir) -> dict:  # the parity_dir fixture skips, or fails in CI, without the reference vectors
    return json.loads((parity_dir / "tokenization.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(add_sep=False)


@pytest.fixture(scope="module")
def tok_sep() -> Tokenizer:
    return Tokenizer(add_sep=True)


def test_reference_size(ref):
    assert len(ref["captions"]) == N_CAPTIONS
    assert ref["max_words"] == 30


@pytest.fixture(params=range(N_CAPTIONS), ids=lambda i: f"caption{i}")
def case(request, ref) -> dict:
    return ref["captions"][request.param]


# --- text cleaning -------------------------------------------------------------------------


def test_official_pre_caption(case, ref):
    assert pre_caption(case["raw"], ref["max_words"]) == case["official_pre_caption"]
    assert clean_caption(case["raw"], "albef", ref["max_words"]) == case["official_pre_caption"]


def test_official_pre_question(case, ref):
    assert pre_question(case["raw"], ref["max_words"]) == case["official_pre_question"]
    assert clean_question(case["raw"], "albef", ref["max_words"]) == case["official_pre_question"]


def test_lavis_blip_caption(case, ref):
    assert pre_caption_blip(case["raw"], max_words=ref["max_words"]) == case["lavis_blip_caption"]
    assert clean_caption(case["raw"], "blip", ref["max_words"]) == case["lavis_blip_caption"]


def test_lavis_blip_question(case, ref):
    assert pre_question_blip(case["raw"], ref["max_words"]) == case["lavis_blip_question"]
    assert clean_question(case["raw"], "blip", ref["max_words"]) == case["lavis_blip_question"]


def test_cleaning_defaults_and_bad_style():
    long = " ".join(f"w{i}" for i in range(60))
    assert len(pre_caption(long).split(" ")) == 30
    assert len(pre_question(long).split(" ")) == 30
    assert len(pre_caption_blip(long).split(" ")) == 50
    assert len(pre_question_blip(long).split(" ")) == 50
    with pytest.raises(ValueError, match="style"):
        clean_caption("a cat", style="lavis")
    with pytest.raises(ValueError, match="style"):
        clean_question("a cat", style="")


# --- tokenization vs reference ids -------------------------------------------------------


def test_wordpiece_tokens(case, tok, tok_sep):
    assert tok.tokenize(case["official_pre_caption"]) == case["wordpiece_tokens"]
    assert tok_sep.tokenize(case["official_pre_caption"]) == case["wordpiece_tokens"]


def test_ids_without_sep(case, tok):
    text = case["official_pre_caption"]
    assert tok.encode(text) == case["ids_without_sep"]
    assert tok(text, padding="none").input_ids[0].tolist() == case["ids_without_sep"]
    assert tok.convert_tokens_to_ids(["[CLS]"] + case["wordpiece_tokens"]) == case["ids_without_sep"]


def test_ids_with_sep(case, tok_sep):
    text = case["official_pre_caption"]
    assert tok_sep.encode(text) == case["ids_with_sep"]
    assert tok_sep(text, padding="none").input_ids[0].tolist() == case["ids_with_sep"]


def test_ids_without_sep_maxlen30(case, tok):
    text = case["official_pre_caption"]
    assert tok.encode(text, max_length=30) == case["ids_without_sep_maxlen30"]
    out = tok(text, max_length=30, padding="max_length")
    n = len(case["ids_without_sep_maxlen30"])
    assert out.input_ids.shape == (1, 30)
    assert out.input_ids[0, :n].tolist() == case["ids_without_sep_maxlen30"]
    assert out.input_ids[0, n:].eq(0).all()
    assert out.attention_mask[0].tolist() == [1] * n + [0] * (30 - n)


def test_ids_with_sep_maxlen30(case, tok_sep):
    text = case["official_pre_caption"]
    assert tok_sep.encode(text, max_length=30) == case["ids_with_sep_maxlen30"]
    out = tok_sep(text, max_length=30, padding="max_length")
    n = len(case["ids_with_sep_maxlen30"])
    assert out.input_ids[0, :n].tolist() == case["ids_with_sep_maxlen30"]
    assert out.attention_mask[0].sum().item() == n


def test_lavis_blip_caption_ids_with_sep(case, tok_sep):
    assert tok_sep.encode(case["lavis_blip_caption"]) == case["lavis_blip_caption_ids_with_sep"]


def test_truncation_keeps_29_vs_28_pieces(ref, tok, tok_sep):
    longest = max(ref["captions"], key=lambda c: len(c["wordpiece_tokens"]))
    assert len(longest["wordpiece_tokens"]) > 29  # the reference must actually exercise truncation
    ids = tok.encode(longest["official_pre_caption"], max_length=30)
    ids_sep = tok_sep.encode(longest["official_pre_caption"], max_length=30)
    assert ids[0] == 101 and 102 not in ids and len(ids) == 30
    assert ids_sep[0] == 101 and ids_sep[-1] == 102 and len(ids_sep) == 30
    assert ids[1:] == tok.convert_tokens_to_ids(longest["wordpiece_tokens"][:29])
    assert ids_sep[1:-1] == tok.convert_tokens_to_ids(longest["wordpiece_tokens"][:28])


# --- LAVIS batches recorded in the model fixtures (same tokenizer kwargs) ------------------


@pytest.mark.parametrize(
    "name, text_key, ids_key, mask_key, kwargs_key",
    [
        ("pretrain", "captions", "input_ids", "attention_mask", "lavis_tokenizer_kwargs"),
        ("retrieval", "captions", "input_ids", "attention_mask", "lavis_tokenizer_kwargs"),
        ("nlvr", "sentences", "input_ids", "attention_mask", "lavis_tokenizer_kwargs"),
        ("ve", "sentences", "input_ids", "attention_mask", "lavis_tokenizer_kwargs"),
        ("vqa", "questions", "question_input_ids", "question_attention_mask", "question_tokenizer_kwargs"),
        ("vqa", "answers", "answer_input_ids", "answer_attention_mask", "answer_tokenizer_kwargs"),
        ("vqa", "answer_list", "answer_list_input_ids", "answer_list_attention_mask", None),
    ],
)
def test_lavis_fixture_batches(parity_dir, tok_sep, name, text_key, ids_key, mask_key, kwargs_key):
    inputs = _io(parity_dir, name)["inputs"]
    kwargs = inputs[kwargs_key] if kwargs_key else {"padding": "longest"}
    out = tok_sep(inputs[text_key], max_length=kwargs.get("max_length"), padding=kwargs["padding"])
    assert torch.equal(out.input_ids, inputs[ids_key])
    assert torch.equal(out.attention_mask, inputs[mask_key])


def test_official_answer_eos_equals_lavis_sep(parity_dir, tok, tok_sep):
    # Official ALBEF appends the string '[SEP]' to answers; it must be read as the special token.
    inputs = _io(parity_dir, "vqa")["inputs"]
    official = tok([a + "[SEP]" for a in inputs["answer_list"]])
    assert torch.equal(official.input_ids, inputs["answer_list_input_ids"])
    doubled = tok_sep([a + "[SEP]" for a in inputs["answer_list"]])
    assert torch.equal(doubled.input_ids, inputs["answer_list_ids_if_sep_appended_lavis"])


# --- vocab, padding, edge cases, persistence ---------------------------------------------

VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"
SIMPLE_TEXTS = ["a man riding a wave on top of a surfboard", "two dogs playing in the snow", "", " ".join(["dog"] * 40)]


def test_vocab_md5_matches_reference(ref):
    assert ref["vocab_md5"] == VOCAB_MD5


def test_packaged_vocab(tok):
    data = DEFAULT_VOCAB_FILE.read_bytes()
    assert len(data.decode("utf-8").splitlines()) == 30522
    assert hashlib.md5(data).hexdigest() == VOCAB_MD5
    assert tok.vocab_size == 30522
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 100, 101, 102, 103]
    assert tok.convert_tokens_to_ids("notarealtoken!!") == 100


@pytest.mark.parametrize("add_sep", [False, True])
def test_padding_longest_vs_max_length(add_sep):
    t = Tokenizer(add_sep=add_sep)
    texts = ["a cat", "two dogs playing in the snow", ""]
    lengths = [len(t.encode(x)) for x in texts]
    longest = t(texts, max_length=30, padding="longest")
    assert longest.input_ids.shape == (3, max(lengths))
    fixed = t(texts, max_length=30, padding="max_length")
    assert fixed.input_ids.shape == (3, 30)
    for out in (longest, fixed):
        assert out.input_ids.dtype == out.attention_mask.dtype == torch.int64
        assert out.attention_mask.sum(1).tolist() == lengths
        assert out.input_ids[out.attention_mask == 0].eq(0).all()
        assert out["input_ids"] is out.input_ids
    assert torch.equal(fixed.input_ids[:, : max(lengths)], longest.input_ids)
    ragged = t(texts, padding=False, return_tensors=False)
    assert [len(x) for x in ragged.input_ids] == lengths
    with pytest.raises(ValueError):
        t(texts, padding="none")  # ragged lengths cannot form a tensor
    with pytest.raises(ValueError):
        t(texts, padding="max_length")  # needs max_length


def test_empty_string(tok, tok_sep):
    assert tok.encode("") == [101]
    assert tok_sep.encode("") == [101, 102]
    assert tok("").input_ids.tolist() == [[101]]
    assert tok_sep("", max_length=4, padding="max_length").input_ids.tolist() == [[101, 102, 0, 0]]
    assert tok.tokenize("") == []


def test_truncation_does_not_leak_between_calls(tok):
    text = " ".join(["dog"] * 50)
    assert len(tok.encode(text, max_length=10)) == 10
    assert len(tok.encode(text)) == 51
    assert tok(text).input_ids.shape == (1, 51)
    with pytest.raises(ValueError):
        Tokenizer(add_sep=True).encode(text, max_length=1)


@pytest.mark.parametrize("add_sep", [False, True])
def test_save_from_dir_roundtrip(tmp_path, add_sep):
    t = Tokenizer(add_sep=add_sep)
    t.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"add_sep": add_sep, "do_lower_case": True}
    assert hashlib.md5((tmp_path / "vocab.txt").read_bytes()).hexdigest() == VOCAB_MD5
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.add_sep == add_sep
    texts = SIMPLE_TEXTS
    a, b = t(texts, max_length=30, padding="max_length"), loaded(texts, max_length=30, padding="max_length")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)

    (tmp_path / "vocab.txt").unlink()  # config only: falls back to the packaged vocab
    fallback = Tokenizer.from_dir(tmp_path)
    assert fallback.add_sep == add_sep
    assert torch.equal(fallback(texts, max_length=30, padding="max_length").input_ids, a.input_ids)


def test_decode_recovers_cleaned_text(tok, tok_sep):
    text = pre_caption("A man riding a wave on top of a surfboard.")
    for t in (tok, tok_sep):
        ids = t.encode(text)
        assert t.decode(ids) == text
        assert t.decode(torch.tensor(ids)) == text
        assert t.decode(ids, skip_special_tokens=False).startswith("[CLS] a man")


def test_each_cleaning_keeps_its_own_number_of_words_unless_told():
    # the authors' pre_caption keeps 30 words, LAVIS's BLIP processor 50 (data.max_words: None)
    from albef.recipes import DataSection
    from albef.text import clean_text

    long = " ".join(f"w{i}" for i in range(60))
    assert len(clean_text(long).split()) == 30
    assert len(clean_text(long, style="blip").split()) == 50
    assert len(clean_text(long, style="blip", max_words=30).split()) == 30
    assert len(clean_text(long + "?", question=True).split()) == 30
    assert len(clean_text(long + "?", style="blip", question=True).split()) == 50
    assert DataSection().max_words is None
