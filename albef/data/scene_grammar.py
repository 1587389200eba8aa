"""The scenes' caption grammar: names that read as English nouns, plurals, captions.

    caption := NP(A) REL NP(B)
    NP(x)   := "a"/"an" NAME(x)  |  "two" PLURAL(NAME(x))
    REL     := "to the left of" | "to the right of" | "above" | "below"

>>> caption("cat face", 1, "left", "red heart", 2)
'a cat face to the left of two red hearts'
>>> semantic_key("star", 1, "above", "apple", 2) == semantic_key("apple", 2, "below", "star", 1)
True
"""

from __future__ import annotations

import re

RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
CONVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink", "grey")

# words that would clash with the grammar (relations, counts) or make a name a phrase of its own
_BANNED_WORDS = frozenset(
    "left right above below up down upwards downwards leftwards rightwards north south east west arrow arrows "
    "over under and with of on in no not one two three four five six seven eight nine ten "
    "flag sign squared symbol button keycap latin input cjk ideograph mark".split()
)
_BANNED_NAMES = frozenset(
    {
        "cooking",
        "camping",
        "customs",
        "wireless",
        "infinity",
        "radioactive",
        "biohazard",
        "spaghetti",
        "popcorn",
        "bacon",
        "custard",
        "fondue",
        "curry rice",
        "cooked rice",
        "softball",
    }
)
_IRREGULAR = {
    "man": "men",
    "woman": "women",
    "person": "people",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "child": "children",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "loaf": "loaves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "mango": "mangoes",
    "volcano": "volcanoes",
    "cactus": "cacti",
    "ox": "oxen",
}
_UNCHANGED = frozenset(
    {"sheep", "deer", "fish", "bison", "moose", "shrimp", "squid", "sushi", "dango", "oden", "bento", "sake", "tempura"}
)


def usable_name(name: str, max_words: int = 3) -> bool:
    """A name the grammar can take: lower-case letters, 1-``max_words`` words, none of the grammar's
    own words, countable (``a NAME``/``two NAMEs`` read as English)."""
    if not re.fullmatch(r"[a-z]+( [a-z]+)*", name) or len(name.split()) > max_words:
        return False
    words = name.split()
    if set(words) & _BANNED_WORDS or name in _BANNED_NAMES:
        return False
    last = words[-1]
    # already plural ("grapes", "sparkles"): "a grapes" is not English; keep -ss / -us singulars
    return not (last.endswith("s") and not last.endswith(("ss", "us")) and last not in _IRREGULAR)


def plural(name: str) -> str:
    """English plural of a name's last word: ``plural("red heart") == "red hearts"``."""
    *head, last = name.split()
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last in _UNCHANGED:
        pass
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(head + [last])


def noun_phrase(name: str, count: int) -> str:
    """``"a cat face"``, ``"an apple"``, ``"two red hearts"``."""
    if count == 2:
        return f"two {plural(name)}"
    if count != 1:
        raise ValueError(f"count must be 1 or 2, not {count}")
    vowel = name[0] in "aeiou" and not name.startswith(("uni", "use", "eu", "one", "ufo"))
    return f"{'an' if vowel or name.startswith('hour') else 'a'} {name}"


def caption(a: str, count_a: int, relation: str, b: str, count_b: int) -> str:
    """``caption("cat face", 1, "left", "red heart", 2) == "a cat face to the left of two red hearts"``."""
    return f"{noun_phrase(a, count_a)} {RELATIONS[relation]} {noun_phrase(b, count_b)}"


def semantic_key(a: str, count_a: int, relation: str, b: str, count_b: int) -> tuple:
    """The same key for a caption and its converse."""
    if relation in ("right", "below"):
        return (b, count_b, CONVERSE[relation], a, count_a)
    return (a, count_a, relation, b, count_b)
