"""What a generated text may state: the words, names and values of the text it was written from.

A teacher answer or a dream that states a name or a value its memory does not hold is the model inventing it
("The Beryl Falls hackathon was held in 2019", "Odra Brennick" for Orla); trained in, it is a false memory.
"""

from __future__ import annotations

import re

from text_to_num import alpha2digit

from .prompts import ACRONYMS, CALENDAR, OPENERS
from .scoring import content_tokens


def grounded(answer: str, memory: str, min_fraction: float = 0.5) -> bool:
    """Most of the answer's content words occur in the memory: the teacher did not invent the answer."""
    a = content_tokens(answer)
    return bool(a) and len(a & content_tokens(memory)) / len(a) >= min_fraction


# a value: a time, an ordinal, a code like G-41, or a number (with the word after it: its unit, as in "per")
_VALUE = re.compile(r"(?<![\w:.\-])(\d{1,2}:\d{2}|\d+(?:st|nd|rd|th)\b|[A-Z]+-\d+|\d[\d,.]*\d|\d)(?:\s+([a-z]+))?")
_NOT_UNITS = {"a", "an", "and", "at", "by", "for", "from", "in", "is", "of", "on", "or", "the", "to", "was", "with"}


def _form(value: str, after: str | None) -> str:
    """What slot a value fills, by its form: any time is a time, any ordinal a day; a number keeps its length
    and unit, a code its letters and length (so "9:30" and "10:05" are alike, "340 per" and "520 per" too)."""
    if re.fullmatch(r"\d{1,2}:\d{2}", value):
        return "time"
    if re.fullmatch(r"\d+(?:st|nd|rd|th)", value):
        return "ordinal"
    shape = re.sub(r"[A-Z]", "A", re.sub(r"\d", "9", value))
    if value[0].isdigit() and after and after not in _NOT_UNITS:
        shape += f" {after}"
    return shape


def values(text: str) -> dict[str, set[str]]:
    """Each value of the text (a time, an ordinal, a code, a number) with the forms of slot it fills."""
    out: dict[str, set[str]] = {}
    for m in _VALUE.finditer(text):
        out.setdefault(m.group(1), set()).add(_form(m.group(1), m.group(2)))
    return out


_WORD = re.compile(r"[^\W_][\w'\-]*")
# not names: "I" forms anywhere in a sentence, and the calendar a date is rewritten in ("2026-03-14" as "March 14");
# an invented date still shows in its numbers
_NOT_NAMES = ACRONYMS | CALENDAR | {"I'm", "I'd", "I'll", "I've"}
_LIST_MARK = re.compile(r"^[ \t]*(?:\d+[.)]|[-*•])[ \t]+", re.M)
_MARKUP = re.compile(r"^[ \t]*#.*$|\*\*[^*\n]{1,40}:\*\*|\*\*|__", re.M)  # headings and labels go whole


def _plain_value(v: str) -> str:
    """A value as a reader compares it: "14th" is "14", "09:30" is "9:30", "1,200" is "1200", "03" is "3"."""
    return re.sub(r"(?<=\d)(?:st|nd|rd|th)$|,|^0+(?=\d)", "", v.lower())


_ANY_NUMBER = re.compile(r"\d[\d,.:]*\d|\d")
_CODE = re.compile(r"[A-Za-z]+-\d+")  # as the source may write it: "ref:QX-5530", "EU-QX-5530", "qx-5530"


def _held_values(source: str) -> set[str]:
    """Every value the source holds, as a reader would also write it: codes whole ("INC-778") and the numbers
    inside codes and dates ("v4.18.0", "2026-03-14"), number words ("three" is 3), and a time in both clocks
    ("14:30" is also 2:30, "9:00" is 9)."""
    source = _LIST_MARK.sub("", source)
    said = (source, alpha2digit(source, "en"), alpha2digit(source.replace("-", " "), "en"))  # "a three-day offsite"
    held = {_plain_value(v) for text in said for v in _ANY_NUMBER.findall(text)}
    held |= {_plain_value(c) for c in _CODE.findall(source)}  # whole codes: "QX-5530" is held, not only its 5530
    for v in list(held):
        if m := re.fullmatch(r"(\d{1,2}):(\d{2})", v):
            h = int(m.group(1))
            held |= {f"{(h - 1) % 12 + 1}:{m.group(2)}", f"{h % 12 + 12}:{m.group(2)}"}
            # its hour and minutes as words may say ("five past ten", "half past nine")
            held |= {str(h), str((h - 1) % 12 + 1), str(int(m.group(2)))}
    return held


_WORD_NUMBER = re.compile(r"(?<![\w:.,\-])(\d+(?:st|nd|rd|th)?)(?![\w:.,\-])")


def _word_numbers(text: str) -> list[str]:
    """Numbers the text says in words ("Thirteen different locations"), as digits. One that runs into another
    ("nineteen ninety-eight", "nine thirty", "twenty-four seven") is a year, a time or a phrase, not a count: left
    out, as are the numbers the text already writes in digits."""
    digits = set(_WORD_NUMBER.findall(text))
    said = alpha2digit(text, "en")
    out = []
    for m in _WORD_NUMBER.finditer(said):
        before, after = said[: m.start()].rstrip(" "), said[m.end() :].lstrip(" ")
        next_to_number = before[-1:].isdigit() or after[:1].isdigit()
        if not next_to_number and m.group(1) not in digits and m.group(1) not in out:
            out.append(m.group(1))
    return out


def _bare(w: str) -> str:
    """A word without an owner's 's or edge quotes and hyphens: "Dana's" is "Dana"."""
    return re.sub(r"'s$", "", w).strip("'-")


def _known_words(source: str) -> set[str]:
    """Every word of the source, also without an owner's 's and split at hyphens ("Dana's", "Kestrel-based")."""
    out = set()
    for w in _WORD.findall(source):
        w = w.lower().strip("'-")
        out |= {w, _bare(w), *w.split("-")}
    return out


def invented(text: str, source: str) -> list[str]:
    """Names and values a dream or a teacher answer states that the memories it was written from do not hold.

    Both are the model's own writing; on the CPU demo 5 of 16 dreams of one night misspelt or made up a name
    ("Odra Brennick" for Orla, "Kit Verhoeven" for Tomasz) and the probe-NLL reward passed two, so ReST-EM
    trained the wrong names in. A capitalised word unknown to the source is a name unless it only opens a
    sentence ("Consequences:", "Which ...?"); one that opens a sentence in front of another capitalised word
    ("Elliot Okafor") is a name unless it is a common opener ("Is Tomasz ..."); an owner ("Merryfield's") is one.
    A made-up single word that opens a sentence ("Odra moved ...") passes: it cannot be told from an opener.
    """
    text = _MARKUP.sub("", _LIST_MARK.sub("", text))  # "1. Q: ...", "### Key Points", "**Next Steps:**"
    known = _known_words(source)
    held = _held_values(source)
    out = [v for v in values(text) if _plain_value(v) not in held]
    # a number said in words is a value too ("Thirteen different locations" of a memory with none); the source's
    # number words are held the same way. Below three they stay words ("one of them"): not a stated value
    out += [v for v in _word_numbers(text) if _plain_value(v) not in held and v not in out]
    words = list(_WORD.finditer(text))
    i = 0
    while i < len(words):  # runs of capitalised words, separated by spaces only: one name each
        if not words[i].group(0)[0].isupper():
            i += 1
            continue
        j = i + 1
        while (
            j < len(words)
            and words[j].group(0)[0].isupper()
            and not text[words[j - 1].end() : words[j].start()].strip(" \t")
        ):
            j += 1
        run = [w.group(0) for w in words[i:j]]
        before = text[: words[i].start()].rstrip(" \t\"'(*-#>")
        opens = not before or not (before[-1].isalnum() or before[-1] in ",;")
        for k, w in enumerate(run):
            bare = _bare(w)
            low = bare.lower()
            if len(w) == 1 or bare.removesuffix("s") in _NOT_NAMES or {low, low.removesuffix("s"), low + "s"} & known:
                continue  # an initial, an acronym, or a known word, also in its plural or singular ("Saturdays")
            if "-" in w and all(p.lower() in known for p in w.split("-") if p[:1].isupper()):  # "Tallinn-based"
                continue
            if k == 0 and opens and (bare in OPENERS or (len(run) == 1 and not w.endswith("'s"))):
                continue
            lead = opens and _bare(run[0]) in OPENERS  # "There's", "Is": not part of the name
            out.append(" ".join(run[1:] if lead else run))
            break
        i = j
    return list(dict.fromkeys(out))  # a code is a value and a capitalised word: said once


def whole_value(v: str) -> str:
    """A pattern for `v` said whole: not inside another value or name ("9:30" of "19:30", "340" of "1,340", "Lucan
    Tremayne" of "Lucan Tremayne-Smith")."""
    return rf"(?<![\w:.\-])(?<!\d,){re.escape(v)}(?![\w:]|[.,\-]\d|-[^\W\d_])"


def mentions(text: str, values: set[str]) -> bool:
    """Whether `text` states one of `values` as a whole value ("9:30" is not in "19:30")."""
    return any(re.search(whole_value(v), text) for v in values)
