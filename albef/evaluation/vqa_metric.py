"""The VQA accuracy of the official evaluation (Antol et al., 2015; the VQA API's ``vqaEval``).

A prediction is scored against each annotator's answer left out in turn: ``min(1, matches among
the other annotators / 3)``, averaged. With ten annotators, 1, 2 or 3 matching answers give 0.3,
0.6 and 0.9, four or more give 1. Before matching, the prediction is normalised (punctuation,
number words to digits, articles dropped, contractions restored) and, where the annotators
disagree, their answers lose their punctuation, as the official evaluation does. A question with a
single reference answer (easy-VQA, answers written by a generator) is an exact match.

Example:
    >>> vqa_accuracy("two", ["2"] * 3 + ["3"] * 7)
    0.9
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (decimals keep theirs)
# answers typed without the apostrophe, as the official evaluation restores them (its table: single
# contractions with the apostrophe dropped, double ones in the forms listed below)
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
        "how'd how'll how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't "
        "not've o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd "
        "someone'll someone's something'd something'll that's there'd there're there's they'd they'll "
        "they're they've wasn't we've weren't what'll what're what's what've when's where'd where's "
        "where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd "
        "you'll you're you've"
    ).split()
}
# forms with the apostrophe in another place, and the official list's own irregular entries
_CONTRACTIONS.update(
    {
        "couldn'tve": "couldn't've",
        "couldnt've": "couldn't've",
        "hadnt've": "hadn't've",
        "hadn'tve": "hadn't've",
        "hed've": "he'd've",
        "he'dve": "he'd've",
        "I'dve": "I'd've",
        "itd've": "it'd've",
        "it'dve": "it'd've",
        "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've",
        "shed've": "she'd've",
        "she'dve": "she'd've",
        "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd",
        "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've",
        "someoned've": "someone'd've",
        "someone'dve": "someone'd've",
        "somethingd've": "something'd've",
        "something'dve": "something'd've",
        "thered've": "there'd've",
        "there'dve": "there'd've",
        "theyd've": "they'd've",
        "they'dve": "they'd've",
        "twas": "'twas",
        "wed've": "we'd've",
        "we'dve": "we'd've",
        "whod've": "who'd've",
        "who'dve": "who'd've",
        "wouldnt've": "wouldn't've",
        "wouldn'tve": "wouldn't've",
        "yall'll": "y'all'll",
        "y'allll": "y'all'll",
        "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've",
        "youd've": "you'd've",
        "you'dve": "you'd've",
        "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at",
        "'ow'sat": "'ow's'at",
        "Id've": "I'd've",
        "let's": "let's",
        "she's": "she's",
    }
)


def strip_punctuation(text: str) -> str:
    """The official evaluation's punctuation rule: a mark next to a space (or any mark in a text
    holding a digit-comma-digit) is deleted, one elsewhere becomes a space; periods not followed by
    a digit are deleted."""
    out = text
    delete = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)  # the official call passes re.UNICODE (32) as the count


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of ``pred`` against the annotators' ``answers`` (see the module
    docstring); exact match where there is one reference answer (a string is one answer)."""
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 1:
        return float(pred == answers[0])
    if not answers:
        raise ValueError("no reference answers to score against")
    pred = normalize_answer(pred)
    refs = [strip_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = sum(r == pred for r in refs)
    # leaving out annotator i removes one match exactly when i's answer is the prediction
    return sum(min(1.0, (matches - (r == pred)) / 3) for r in refs) / len(refs)
