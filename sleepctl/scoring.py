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


# What `recalled` means, for a cached gate measurement: 2 since teacher probes are matched on what they add.
SCORING_VERSION = 2

_ENDINGS = ("s", "es", "d", "ed", "ing", "e")
_NAMING = {"called", "named", "name", "names"}  # "the tool was called Paper Lantern": they only introduce the answer
# Words that change what a run of words says ("not Dana", "before Friday", "more than 40") stay inside it; the rest
# of the stop words, and the pieces an apostrophe leaves ("manager's" -> "manager s"), only separate runs.
_KEEP_IN_RUNS = {
    "not", "no", "nor", "never", "before", "after", "above", "below", "over", "under", "up", "down", "off",
    "more", "most", "less", "few", "than", "only", "same", "against", "again", "further",
}  # fmt: skip
_SEPARATORS = (_STOPWORDS - _KEEP_IN_RUNS) | _NAMING | {"s", "t", "d", "ll", "re", "ve", "m"}


def _same_word(a: str, b: str) -> bool:
    """One word up to a regular inflection: "start"/"starts", "approve"/"approved", "class"/"classes", "move"/"moving"."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if len(short) < 3:
        return False
    for stem in (short, short[:-1] if short.endswith("e") else None):
        if stem and long.startswith(stem) and long[len(stem) :] in _ENDINGS:
            return True
    return False


def answer_match(prediction: str, reference: str, question: str) -> bool:
    """Contains-match, or, for a reference that restates its question, a match on what it adds to the question.

    A teacher writes a probe's answer as a sentence ("The manager mentioned in the note is Fenna Albright." for
    "Who is the manager mentioned in the note?"): "Fenna Albright", or "The rule is proposed by ..." for "The
    rule was proposed by ...", missed the whole sentence; after a dream that answers tersely, teacher-probe recall
    read 50% -> 12% on one seed of the real pair. A reference restates its question when it holds more than half of
    the question's content words (up to inflection); then each run of words it adds must appear as written, the
    runs in its order: "Fenna Albright replaced Dana Okafor" does not match "Dana Okafor replaced Fenna Albright",
    nor "June 14 ... March" "March 14", nor "after Friday" "before Friday". A number keeps the question's word in
    front of it ("room 12", not any 12). A question offering a choice ("... Fenna or Dana ...") holds its answer,
    so it is matched as before, as is any reference that does not restate its question (a user's "Tallinn").
    """
    if contains_match(prediction, reference):
        return True
    q = normalize(question)
    asked = [w for w in q.split() if w not in _STOPWORDS and w not in _SEPARATORS]
    if not asked or " or " in f" {q} ":
        return False
    spans: list[list[str]] = [[]]
    shared: set[str] = set()
    before = ""  # the word before, where the question asked it
    for w in normalize(reference).split():
        hit = [a for a in asked if _same_word(w, a)]
        shared.update(hit)
        if w in _SEPARATORS or hit:
            if spans[-1]:
                spans.append([])
        else:
            if not spans[-1] and w.replace(".", "").isdigit() and before:
                spans[-1].append(before)  # "room 12": the number with the question's word in front of it
            spans[-1].append(w)
        before = w if hit else ""
    spans = [x for x in spans if x]
    if not spans or 2 * len(shared) <= len(set(asked)):
        return False
    said, at = f" {normalize(prediction)} ", 0
    for x in spans:  # each run, after the one before it
        at = said.find(f" {' '.join(x)} ", at)
        if at < 0:
            return False
        at += len(" ".join(x)) + 1
    return True


def recalled(prediction: str, reference: str, question: str, origin: str) -> bool:
    """Whether an answer recalls a probe: a user's answer, short and the user's own words, by contains-match; a
    teacher's, a sentence, by what it adds to its question."""
    if origin == "teacher":
        return answer_match(prediction, reference, question)
    return contains_match(prediction, reference)


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
