"""The official VQA accuracy (leave-one-annotator-out, answers normalised), in closed form."""

from __future__ import annotations

import pytest

from albef.evaluation.vqa_metric import normalize_answer, strip_punctuation, vqa_accuracy


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_annotators_left_out_in_turn(matches, expected):
    # an annotator who gave the prediction sees matches - 1 others, the rest see all of them:
    # (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_the_prediction_is_normalised_and_disagreeing_references_lose_their_punctuation():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the red one") == "red 1"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("1,000") == "1000"
    assert strip_punctuation("blue-ish") == "blue ish" and strip_punctuation("yes !") == "yes "
    # references that disagree are compared without punctuation; the prediction "2" matches "two"
    # only through its own normalisation, so a reference must already say "2"
    assert vqa_accuracy("two", ["2", "2", "2", "x"]) == pytest.approx((3 * 2 / 3 + 1) / 4)
    # "dog!" becomes "dog " (a mark away from spaces turns into one) and no longer matches "dog"
    assert vqa_accuracy("a dog", ["dog!", "dog", "dog", "cat"]) == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 2 / 3) / 4)


def test_one_reference_is_an_exact_match_and_none_is_an_error():
    assert vqa_accuracy("red", ["red"]) == 1.0 and vqa_accuracy("a red", ["red"]) == 0.0
    assert vqa_accuracy("red", "red") == 1.0  # the authors' files may give one answer as a string
    with pytest.raises(ValueError, match="no reference"):
        vqa_accuracy("red", [])
