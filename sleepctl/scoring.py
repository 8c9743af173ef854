"""Answer scoring: SQuAD-style normalisation with number words unified, contains-match and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter

_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_UNITS)} | _TENS | {"hundred": 100, "thousand": 1000}
_ORDINALS = {
    "first": "1st",
    "second": "2nd",
    "third": "3rd",
    "fourth": "4th",
    "fifth": "5th",
    "sixth": "6th",
    "seventh": "7th",
    "eighth": "8th",
    "ninth": "9th",
    "tenth": "10th",
}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _numbers(tokens: list[str]) -> list[str]:
    """'twenty one' -> '21', 'eleven' -> '11', '1,200' -> '1200'; other tokens unchanged."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _TENS and i + 1 < len(tokens) and tokens[i + 1] in NUMBER_WORDS and NUMBER_WORDS[tokens[i + 1]] < 10:
            out.append(str(_TENS[t] + NUMBER_WORDS[tokens[i + 1]]))
            i += 2
            continue
        if t in NUMBER_WORDS and t not in ("hundred", "thousand"):
            out.append(str(NUMBER_WORDS[t]))
        elif t in _ORDINALS:
            out.append(_ORDINALS[t])
        else:
            out.append(t)
        i += 1
    return out


def normalize(text: str) -> str:
    text = text.lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,200 -> 1200
    text = re.sub(r"(?<=\w)-(?=\w)", " ", text)  # twenty-one -> twenty one
    text = "".join(ch if ch not in string.punctuation or ch == "." else " " for ch in text)
    text = re.sub(r"\.(?!\d)", " ", text)  # keep decimal points, drop full stops
    text = _ARTICLES.sub(" ", text)
    return " ".join(_numbers(text.split()))


def contains_match(prediction: str, reference: str) -> bool:
    ref = normalize(reference)
    if not ref:
        return False
    return f" {ref} " in f" {normalize(prediction)} "


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(r)
    return 2 * prec * rec / (prec + rec)


_STOPWORDS = set(
    "i me my we our you your he him his she her it its they them their what which who whom this that these those am is are was were be been being have has had do does did a an the and but if or because as until while of at by for with about against between into through during before after above below to from up down in out on off over under again further then once here there when where why how all any both each few more most other some such no nor not only own same so than too very can will just should now".split()
)


def content_tokens(text: str) -> set[str]:
    return {t for t in normalize(text).split() if t not in _STOPWORDS}


def grounded(answer: str, memory: str, min_fraction: float = 0.5) -> bool:
    """Most of the answer's content words occur in the memory: the teacher did not invent the answer."""
    a = content_tokens(answer)
    return bool(a) and len(a & content_tokens(memory)) / len(a) >= min_fraction
