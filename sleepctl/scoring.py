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


_STOPWORDS = set(
    "i me my we our you your he him his she her it its they them their what which who whom this that these those am is are was were be been being have has had do does did a an the and but if or because as until while of at by for with about against between into through during before after above below to from up down in out on off over under again further then once here there when where why how all any both each few more most other some such no nor not only own same so than too very can will just should now".split()
)


def content_tokens(text: str) -> set[str]:
    return {t for t in normalize(text).split() if t not in _STOPWORDS}


def contains_match(prediction: str, reference: str) -> bool:
    ref = normalize(reference)
    if not ref:
        return False
    return f" {ref} " in f" {normalize(prediction)} "


def answer_match(prediction: str, reference: str, question: str) -> bool:
    """Contains-match, or, for a reference that restates its question, a match on what it adds to the question.

    A teacher writes a probe's answer as a sentence ("The manager mentioned in the note is Fenna Albright." for
    "Who is the manager mentioned in the note?"): "Fenna Albright", or "The rule is proposed by ..." for "The
    rule was proposed by ...", missed the whole sentence. After a dream that answers tersely, teacher-probe recall
    read 50% -> 12% on one seed of the real pair, where what the references add read 62% -> 54%. Every content
    word the reference adds must appear; a reference that shares no content word with its question (a user's
    "Tallinn") is matched as before.
    """
    if contains_match(prediction, reference):
        return True
    ref, asked = content_tokens(reference), content_tokens(question)
    added = ref - asked
    return bool(ref & asked) and bool(added) and added <= content_tokens(prediction)


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
