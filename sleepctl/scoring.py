"""Answer scoring: SQuAD-style normalisation with number words and ordinals unified, contains-match and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter

from text_to_num import alpha2digit

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ORDINAL_SUFFIX = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b")


def normalize(text: str) -> str:
    """Lower case, number words as digits ("two hundred" -> 200, "March fourteenth" -> "march 14"),
    ordinal suffixes dropped, punctuation and articles out: the answers a person would accept compare equal.

    Number words go through text2num (a maintained parser), with no threshold so "one" and "first" become
    1 as well: both sides of a comparison are normalised the same way, so the only effect is that a digit
    and its word meet.
    """
    text = alpha2digit(text.lower(), "en", threshold=0)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,200 -> 1200
    text = _ORDINAL_SUFFIX.sub(r"\1", text)  # 14th -> 14
    text = re.sub(r"(?<=\w)-(?=\w)", " ", text)
    text = "".join(ch if ch not in string.punctuation or ch == "." else " " for ch in text)
    text = re.sub(r"\.(?!\d)", " ", text)  # keep decimal points, drop full stops
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_match(prediction: str, reference: str) -> bool:
    ref = normalize(reference)
    if not ref:
        return False
    return f" {ref} " in f" {normalize(prediction)} "


def token_f1(prediction: str, reference: str) -> float:
    return bag_f1(token_bag(prediction), token_bag(reference))


def token_bag(text: str) -> Counter[str]:
    """A text's normalised words, counted: computed once where one text meets many."""
    return Counter(normalize(text).split())


def bag_f1(p: Counter[str], r: Counter[str]) -> float:
    if not p or not r:
        return float(p == r)
    same = sum((p & r).values())
    if same == 0:
        return 0.0
    prec, rec = same / sum(p.values()), same / sum(r.values())
    return 2 * prec * rec / (prec + rec)
