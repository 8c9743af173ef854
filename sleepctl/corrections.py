"""What a recorded chat itself takes back: "That's out of date: Lucan handed the backup over to Saoirse Mbeki",
"Change of plan: send it on Wednesday instead".

The teacher sees the whole chat and still answers with the earlier value (the CPU demo's 0.5B: "Lucan Tremayne owns
the Ferrowind wiki backup", "scheduled to be sent on Monday"), and the chat's own reply before the correction states
it too. `data.replaced_by` does this across memories; inside one chat a turn must also say that it corrects, since
a chat states many values of one form that replace nothing (an outward and a return train's times).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .grounding import mentions, values, whole_value
from .prompts import full_names
from .records import Trace
from .scoring import content_tokens

# what a sentence says when it corrects; "instead of" and "rather than" only count before an earlier value
# ("a hotel instead of driving back" corrects nothing)
_TAKES_BACK = re.compile(
    r"\b(?:out of date|outdated|no longer|not\b[^.;!?]{0,40}\bany ?more|instead(?! of)|change of plan|correction|"
    r"scratch that|not correct|(?:is|was|are|were|'s|got (?:it|that)) wrong|mistaken|"
    r"handed\b[^.;!?]{0,40}\bover|took over|taken over|replaced (?:by|with))\b",
    re.I,
)
_INSTEAD_OF = re.compile(r"\b(?:instead of|rather than)\s+(.{1,40})", re.I)
# where an earlier value is said only to be denied: "instead of Monday", "not Lucan Tremayne", "from 9:30 to"
_DENIED = r"(?:instead of|rather than|not|no longer|from)\s+(?:on |at |in |the |by |to )?$"
_WEEKDAY = re.compile(r"\b(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)days?\b")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE = re.compile(r"[.;!?\n]|,\s|\band\b")


@dataclass(frozen=True)
class TakenBack:
    """A value the chat took back: what replaced it, the slot it filled ("time", "weekday", "full name", a number's
    shape and unit) and the words of what the correction is about (its sentence and the earlier clauses it
    matched), which say where a text states it in the corrected role."""

    by: frozenset[str]
    forms: frozenset[str]
    words: frozenset[str]


def _slots(text: str) -> dict[str, set[str]]:
    """`grounding.values` and two slots a correction fills more: a weekday and a full name."""
    out = values(text)
    for m in _WEEKDAY.finditer(text):
        out.setdefault(f"{m.group(1)}day", set()).add("weekday")
    for name in full_names(text):
        out.setdefault(name, set()).add("full name")
    return out


def _said(v: str) -> set[str]:
    """How a text may state the value: "Mondays", "the 2nd"."""
    if v.endswith("day") and _WEEKDAY.fullmatch(v):
        return {v, f"{v}s"}
    if v.isdigit():
        return {v} | {v + s for s in ("st", "nd", "rd", "th")}
    return {v}


def _affirms(text: str, v: str) -> bool:
    """`text` states `v` somewhere other than to deny it ("instead of Monday", "Saoirse, not Lucan Tremayne")."""
    for form in _said(v):
        for m in re.finditer(whole_value(form), text):
            if not re.search(_DENIED, text[max(0, m.start() - 24) : m.start()], re.I):
                return True
    return False


def _corrects(sentence: str, earlier: dict[str, set[str]]) -> bool:
    if sentence.rstrip().endswith("?"):  # "Should we use Google Cloud instead?" asks
        return False
    if _TAKES_BACK.search(sentence):
        return True
    return any(mentions(m.group(1), _said(v)) for m in _INSTEAD_OF.finditer(sentence) for v in earlier)


def corrected(t: Trace) -> dict[str, TakenBack]:
    """The values a recorded chat stated and a later user sentence took back, each with what replaced it.

    A sentence of a user turn that says it corrects and brings a value of a form the chat stated before (a number
    with its unit, a time, a code, a weekday, a full name), new to the chat, takes back each earlier value of that
    form whose clause shares a word with it ("standup is at 9:30 and the retro at 14:00" / "Correction: standup is
    at 10:05" takes back 9:30 only), unless the chat states it again from that turn on other than to deny it."""
    turns = [m for m in t.messages or [] if m.content.strip()]
    msgs = [m.content for m in turns]
    slots = [_slots(m) for m in msgs]
    # each turn's values as it affirms them, and from each turn to the end (one pass each: chats run long)
    affirmed = [{v for v in sl if _affirms(m, v)} for m, sl in zip(msgs, slots)]
    still: list[set[str]] = [set() for _ in range(len(msgs) + 1)]
    for i in range(len(msgs) - 1, -1, -1):
        still[i] = still[i + 1] | affirmed[i]
    out: dict[str, TakenBack] = {}
    earlier: dict[str, set[str]] = {}  # value -> forms, of the turns so far
    clauses: dict[str, list[set[str]]] = {}  # value -> the words of each earlier clause that states it
    seen = ""  # the turns so far, lower case: a value is new only if the chat never said it, in any case
    for i, m in enumerate(msgs):
        if i and turns[i].role == "user":
            for s in _SENTENCE.split(m):
                if not _corrects(s, earlier):
                    continue
                new = {
                    v: f for v, f in _slots(s).items() if not re.search(rf"(?<!\w){re.escape(v.lower())}(?!\w)", seen)
                }
                words = content_tokens(s) - {w for v in new for w in content_tokens(v)}
                for v, forms in earlier.items():
                    by = {n for n, f in new.items() if f & forms}
                    near = [c for c in clauses.get(v, ()) if c & words]
                    if by and v not in still[i] and near:
                        was = out.get(v, TakenBack(frozenset(), frozenset(), frozenset()))
                        about = words.union(*near) - content_tokens(v)
                        # taken back again later: the latest correction is what holds (Monday -> Wednesday -> Friday)
                        out[v] = TakenBack(frozenset(by), was.forms | forms, was.words | about)
        for v, f in slots[i].items():
            earlier.setdefault(v, set()).update(f)
        for clause in _CLAUSE.split(m):
            for v in _slots(clause).keys() & slots[i].keys():
                clauses.setdefault(v, []).append(content_tokens(clause))
        seen += "\n" + m.lower()
    return out


def states_corrected(text: str, taken_back: dict[str, TakenBack]) -> list[str]:
    """The taken-back values `text` states without a value that replaced them ("Lucan handed it over to Saoirse
    Mbeki" states the change, not the old owner)."""
    return [
        v
        for v, tb in taken_back.items()
        if mentions(text, _said(v)) and not any(mentions(text, _said(b)) for b in tb.by)
    ]


def restated(text: str, taken_back: dict[str, TakenBack]) -> str | None:
    """`text` with each taken-back value it states put as the one value that replaced it ("The backup runs on
    brisa-07 at 02:30 UTC; Lucan Tremayne owns it." -> "...; Saoirse Mbeki owns it."; Monday -> Wednesday ->
    Friday as a chain), or None where that would not be the correction: a value replaced by several, stated in a
    clause about something else ("ticket 340" of "340 per minute"; "Lucan reviews the wiki" of the backup's owner),
    or in a form not rewritten here ("the 2nd").

    Left out whole, such an answer took its other facts with it: on the demo the chat's reply that alone taught
    the backup's host and time."""
    for _ in range(len(taken_back) + 1):
        stale = states_corrected(text, taken_back)
        if not stale:
            return text
        for v in stale:
            if (put := _put(text, v, taken_back[v])) is None:
                return None
            text = put
    return None


def _put(text: str, v: str, tb: TakenBack) -> str | None:
    if len(tb.by) != 1:
        return None
    (new,) = tb.by
    subs = {v: new} | ({f"{v}s": f"{new}s"} if _WEEKDAY.fullmatch(v) and _WEEKDAY.fullmatch(new) else {})
    spans = [0] + [x for m in _CLAUSE.finditer(text) for x in (m.start(), m.end())] + [len(text)]
    pattern = "|".join(whole_value(o) for o in sorted(subs, key=len, reverse=True))
    for m in re.finditer(pattern, text):
        k = max(j for j in range(0, len(spans), 2) if spans[j] <= m.start())
        clause = text[spans[k] : spans[k + 1]]
        if not content_tokens(clause) & tb.words:
            return None
        number_forms = values(clause).get(v)
        if number_forms is not None and not number_forms & tb.forms:  # the same number in another unit
            return None
    text = re.sub(pattern, lambda m: subs[m.group(0)], text)
    return None if mentions(text, _said(v)) else text
