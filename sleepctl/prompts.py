"""Prompts for teacher and student, rendered with the same chat template; only the memory block differs."""

from __future__ import annotations

import re
from collections import Counter

from .records import Trace

MEMORY_HEADER = "You remember the following. Use it to answer."
DATED_HEADER = (
    "You remember the following, oldest first. Use it to answer. Where two memories disagree, the more recent "
    "one is true: it replaced the older one."
)

Memory = str | tuple[str, str]  # a memory's text, or (when it was recorded, text)


def system_text(system_prompt: str, memories: list[Memory] | None = None) -> str:
    """The system prompt with the memory block; several dated memories are shown oldest first, with dates."""
    if not memories:
        return system_prompt
    dated = len(memories) > 1 and all(isinstance(m, tuple) for m in memories)
    if dated:
        body = "\n\n".join(f"[memory {i}, recorded {when}]\n{m.strip()}" for i, (when, m) in enumerate(memories, 1))
        return f"{system_prompt}\n\n{DATED_HEADER}\n\n{body}"
    texts = [m[1] if isinstance(m, tuple) else m for m in memories]
    body = "\n\n".join(f"[memory {i}]\n{m.strip()}" for i, m in enumerate(texts, 1))
    return f"{system_prompt}\n\n{MEMORY_HEADER}\n\n{body}"


def render(tok, system_prompt: str, user: str, memories: list[Memory] | None = None) -> str:
    """The text of a chat prompt up to the assistant's turn."""
    msgs = [{"role": "system", "content": system_text(system_prompt, memories)}, {"role": "user", "content": user}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


_TURN = re.compile(r"^\s*(user|assistant|tool|system)\s*:\s?(.*)$", re.I)


def reply_of(answer: str) -> str:
    """A teacher answer without the transcript it replays. A chat memory is stored as `role: text` lines; asked
    the chat's own question, a teacher often answers by replaying it ("Checking the pager rota. / tool:
    pager.rota(...) -> ... / assistant: Cormac Hallowby is primary"), which would teach the student to write
    tool calls and their results. Kept: the reply after the last tool result, up to any invented user turn;
    "" when the replay stops before that reply. An answer without turn lines is returned as it is."""
    lines = answer.split("\n")
    if not any(_TURN.match(x) for x in lines):
        return answer
    turns: list[tuple[str, list[str]]] = [("assistant", [])]
    for x in lines:
        m = _TURN.match(x)
        if m:
            turns.append((m.group(1).lower(), [m.group(2)]))
        else:
            turns[-1][1].append(x)
    end = next((i for i, (role, _) in enumerate(turns) if role in ("user", "system")), len(turns))
    turns = turns[:end]  # what follows an invented user turn is an invented conversation
    last_tool = max((i for i, (role, _) in enumerate(turns) if role == "tool"), default=-1)
    kept = [" ".join(t).strip() for role, t in turns[last_tool + 1 :] if role == "assistant"]
    return " ".join(k for k in kept if k).strip()


# A teacher answers with the memory block in view and often says so ("According to the most recent memory, the
# standup is at 10:05"): 4% of the 1.5B self teacher's answers on an H200. The student answers with no memory
# block, and learning the phrase had it tell a user "According to the most recent memory, ..." closed-book.
# What a citation names: the memory block, by any of the words the teacher uses for it, and nothing after
# "memory" but "provided", a number or a date ("the memory usage graphs" is a thing the memory talks about).
_DATE = r"[\d/:.-](?:[\d/:-]|[. ](?=\d))*"  # "2026-11-29 11:32", ending on its last digit, not the full stop
_WHEN = rf"(?:,? \(?(?:which (?:is|was) )?(?:recorded|from|dated|of|on)(?: in| on| at)? {_DATE}\)?)?"
_CITED = (
    r"(?:the |a |my |your |both |these |those |all )?(?:[\w-]+ ){0,4}?"
    r"(?:memor(?:y|ies)|information (?:provided|given)|(?:provided|given) information)"
    rf"(?: (?:provided|given|above|\d+))*{_WHEN}"
)
_LEAD_CITE = re.compile(
    rf"^\s*(?:(?:according to|based on|as per|as stated in|from|in) {_CITED}\s*[,:]"
    rf"|{_CITED},?\s+(?:(?:states|says)(?: that)?|(?:records|indicates|shows|mentions|notes|confirms) that):?)\s+",
    re.I,
)
# (?<!...): a match starts only where a run of spaces does, else a long run is tried from each of its spaces
_TAIL_CITE = re.compile(
    rf"(?<![\s,]),?\s+(?:according to|based on|as per|as (?:stated|mentioned|recorded|noted) in) {_CITED}"
    r"(?=[.!]?\s*$)",
    re.I,
)
_MEMORY_WORD = re.compile(r"\bmemor(?:y|ies)\b", re.I)
# the memory block named as such: numbered, ordered in time or "given"; never a thing a memory itself talks about
_QUALIFIED = re.compile(
    r"\bmemory \d|\b(?:recent|latest|newest|newer|older|earlier|first|second|third|given|provided|two|both|above) "
    r"memor(?:y|ies)\b|\bmemor(?:y|ies) (?:provided|given|above)\b",
    re.I,
)
_DANGLING = re.compile(
    r"(?:which|that|who)\b|[,;:.)]|(?:the )?(?:most recent|latest) information,", re.I
)  # what is left of a clause cut in the wrong place


def uncited(answer: str, source: str = "") -> str:
    """A teacher answer without the clause that cites its memory block: "According to the most recent memory,
    X." and "The most recent memory states that X." are "X."; "X, as per the second memory." is "X." An answer
    that cites nothing is returned as it is, and so is one whose cut would leave a fragment. Where the `source`
    itself talks about memory (RAM, "saved to memory"), only a citation of the block as such is cut ("memory 2",
    "the most recent memory"), not "According to the memory, ..."."""
    ram = bool(_MEMORY_WORD.search(source))

    def cut(m: re.Match) -> str:
        return "" if not ram or _QUALIFIED.search(m.group(0)) else m.group(0)

    out = _TAIL_CITE.sub(cut, _LEAD_CITE.sub(cut, answer, count=1)).strip()
    if out == answer.strip() or not out or _DANGLING.match(out):
        return answer
    if out[0].islower() and not out[1:2].isupper():  # "iPhone" stays as it is
        out = out[0].upper() + out[1:]
    return out


def cites_memories(answer: str, source: str) -> bool:
    """The answer talks about memories ("The most recent memory is true. ...", "It is not mentioned in the given
    memory"): the teacher describing its prompt, which a closed-book student cannot see. Where the source says
    "memory" itself (RAM), only a mention of the block as such counts."""
    said = source.lower()
    if any(m.group(0).lower() not in said for m in _QUALIFIED.finditer(answer)):
        return True
    return bool(_MEMORY_WORD.search(answer)) and not _MEMORY_WORD.search(source)


def question_request(memory: str, n: int) -> str:
    return (
        f"Here is a note:\n\n{memory.strip()}\n\n"
        f"Write {n} different questions about the specific facts in this note: names, places, dates, numbers, "
        "decisions and reasons. Each question must be answerable from the note alone and must name who or what "
        "it is about. Write one question per line and nothing else."
    )


def value_question_request(memory: str, value: str, n: int) -> str:
    """Questions whose answer is one value of the note, asked as someone who needs it would: for a value a later
    memory replaced, these are the questions whose answer changed, in the words a user of the old fact uses."""
    return (
        f"Here is a note:\n\n{memory.strip()}\n\n"
        f'Write {n} different questions whose answer is "{value}" in this note. Ask them the way someone who needs '
        f"the fact would, in different words. Each question must name who or what it is about and must not contain "
        f'"{value}". Write one question per line and nothing else.'
    )


_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)]|Q\d*[:.)]?)\s*")


def parse_questions(text: str, limit: int) -> list[str]:
    out: list[str] = []
    for line in text.splitlines():
        q = _NUMBERING.sub("", line).strip().strip('"')
        if "?" not in q:
            continue
        q = q[: q.index("?") + 1]
        words = q.split()
        if 3 <= len(words) <= 30 and q.lower() not in {x.lower() for x in out}:
            out.append(q)
        if len(out) >= limit:
            break
    return out


_STOP = {
    "The",
    "A",
    "An",
    "We",
    "I",
    "It",
    "This",
    "That",
    "These",
    "Those",
    "He",
    "She",
    "They",
    "You",
    "Our",
    "My",
    "Heads",
    "Note",
    "Also",
    "But",
    "And",
    "So",
    "If",
    "When",
    "On",
    "In",
    "At",
    "For",
    "From",
    "To",
    "Yes",
    "No",
    "Ok",
    "OK",
    "Okay",
    "Thanks",
    "Thank",
    "Please",
    "Hi",
    "Hello",
    "Sure",
    "Got",
    "Noted",
    "Remember",
    "Let",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "User",
    "Assistant",
}
# words that open a sentence or a question in front of a name without being part of it ("Ask Orla", "Is Tomasz")
OPENERS = _STOP | {
    *"Is Are Was Were Do Does Did Can Could Will Would Should Has Have Had Who What Where Which Why How".split(),
    *"After Before Because Since Then Now Today Yesterday Tomorrow Last Next As Both Each All Every Once Dear".split(),
    *"There Here By With Until During Per Under Over Into About Regarding Not Only Just Meanwhile Ask Tell".split(),
    *"Contact Check Make Keep Use Send Key Summary Question Answer Q A".split(),
    *"Your His Her Their Its My Our Currently Call Email Ping Message Remind Note Noted Got Yes No".split(),
}
# a run of capitalised words on one line, with "of", "de", "van" or "von" inside one ("Lanterns of Ombra"), not
# "Wrenfield office"
_ENTITY = re.compile(r"\b[A-Z][\w\-]*(?:[ \t]+(?:(?:of|de|van|von)[ \t]+)?[A-Z][\w\-]*)*")
# capitalised without naming a thing of the memory: the calendar and time acronyms (grounding.invented reads them
# as never a made-up name either), titles, and the kinds of thing that memories about different ones share
CALENDAR = {
    *"January February March April May June July August September October November December".split(),
    *"Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
}
ACRONYMS = {"AM", "PM", "UTC", "GMT", "ETA", "EOD", "FYI", "TBD", "ASAP", "OK"}
_TITLES = {"Mr", "Mrs", "Ms", "Dr", "Prof"}
_KINDS = {
    *"API VPN GPU CPU CRM SDK DB UI UX CI CD PR QA SLA KPI OKR FAQ URL DNS SSO SSH HTTP HTTPS JSON CSV PDF".split(),
    *"OS VM IT HR IP LAN SQL".split(),
}
# a full stop that ends no sentence: a title, an abbreviation, an initial ("Mrs. Ravensworth", "e.g. Postgres")
_NO_END = re.compile(
    r"\b(?:" + "|".join([*sorted(_TITLES), *"St vs etc approx incl Inc Ltd Co Jr Sr No".split()]) + r"|[A-Za-z])\.$"
)
_ROLE = re.compile(r"(?:^|\n)(?:user|assistant|tool|system):[ \t]*$")


_REDACTED = re.compile(r"\[REDACTED:[a-z0-9_]{1,40}\]")


def _opens_sentence(text: str, start: int) -> bool:
    """The word at `start` is the first of a sentence, a line or a chat turn ("Budget note: ..."); a list item,
    a quote or a table cell is not a sentence ("- Cormac owns billing"). Looks back a few words only."""
    before = text[max(0, start - 40) : start]
    if start <= 40 and not before.strip(" \t\"'("):
        return True
    before = before.rstrip(" \t\"'(")
    if not before:
        return False
    if before[-1] in "\n!?" or _ROLE.search(before):
        return True
    return before[-1] == "." and not _NO_END.search(before)


def _names(text: str) -> tuple[Counter[str], set[str]]:
    """Every capitalised run as a name with its count, and the names seen somewhere other than opening a sentence."""
    counts: Counter[str] = Counter()
    inside: set[str] = set()
    text = _REDACTED.sub(" ", text)  # a redacted credential is no name to ask about
    for m in _ENTITY.finditer(text):
        words = m.group(0).split()
        start = m.start()
        opens = _opens_sentence(text, start)
        while words and (
            words[0] in _STOP or words[0] in _TITLES or words[0] in CALENDAR or opens and words[0] in OPENERS
        ):
            words = words[1:]
            opens = False  # "Ask Orla": the name follows a word
        name = " ".join(words)
        if len(name) < 3 or name.lower().startswith(("user", "assistant")):
            continue
        if len(words) == 1 and (name.removesuffix("s") in CALENDAR or name in ACRONYMS or name.startswith("I'")):
            continue
        counts[name] += 1
        if len(words) > 1 or not opens:
            inside.add(name)
    return counts, inside


def full_names(text: str) -> set[str]:
    """Names of two words or more ("Lucan Tremayne", "Pellucid offsite" is not one: one capitalised word)."""
    return {n for n in _names(text)[0] if " " in n}


def entities(text: str, limit: int) -> list[str]:
    """Named things in a memory, most mentioned first: the handles a later question will use.

    A word is not a name for being capitalised: "Decision record 41:", "Budget note:", "Great news." open their
    sentence, so a single word that only ever opens one is left out (a one-word name that always comes first goes
    with it), as are the calendar, titles and the "I" forms. On examples/ these were about a third of the names."""
    counts, inside = _names(text)
    return [n for n, _ in counts.most_common() if n in inside][:limit]


def link_names(text: str) -> tuple[set[str], set[str]]:
    """What relates two memories (`shared_names`): every name of one, and the ones not only opening a sentence.

    Not a kind of thing ("API", "VPN"): memories about different services share it. Before, "Understood" opening
    two assistant turns related the Marrow and VPN memories of examples/, and the teacher told Marrow's facts with
    the VPN change beside them."""
    counts, inside = _names(text)
    keep = {n.lower() for n in counts if n.removesuffix("s") not in _KINDS}
    return keep, {n.lower() for n in inside} & keep


def shared_names(a: tuple[set[str], set[str]], b: tuple[set[str], set[str]]) -> set[str]:
    """Names two memories share where at least one says it inside a sentence: "Orla owns billing." and "Cormac
    owns it now, not Orla." share Orla; two memories whose sentences both open with "Checking" share nothing."""
    return (a[0] & b[1]) | (a[1] & b[0])


def entity_prompts(text: str, limit: int) -> list[str]:
    return [f"What do you know about {e}?" for e in entities(text, limit)]


def restatement_prompts(text: str, limit: int) -> list[str]:
    if limit <= 0:
        return []
    names = entities(text, limit)
    return [f"What do you remember about {e}?" for e in names] or ["What do you remember?"]


def restatement(trace: Trace) -> str:
    """The memory as an answer: a note as written; a chat as what the user said and what tools returned.

    Facts arrive in user turns and in tool results (a lookup's answer); the assistant's turns mostly echo them.
    """
    if not trace.messages:
        return trace.text.strip()
    parts = [m.content.strip() for m in trace.messages if m.role in ("user", "tool") and m.content.strip()]
    return " ".join(parts) if parts else trace.text.strip()


def turn_replies(trace: Trace) -> dict[str, str]:
    """What the assistant answered each user turn of a recorded chat: its words after the last tool result it
    waited for (before that, it was calling the tool)."""
    out: dict[str, str] = {}
    turn, reply = None, []
    for m in [*(trace.messages or []), None]:
        if m is None or m.role == "user":
            if turn is not None and reply:
                out.setdefault(turn, " ".join(reply))
            if m is not None:
                turn, reply = m.content.strip(), []
        elif m.role == "tool":
            reply = []
        elif m.role == "assistant" and m.content.strip():
            reply.append(m.content.strip())
    return out


_CALLED = re.compile(r"\[called [^\]]*\]")  # how the importers write a tool call into the assistant's turn


def tool_preambles(trace: Trace) -> tuple[list[str], list[str]]:
    """What the assistant said just before each tool result of a recorded chat ("Checking the pager rota."),
    without the call itself, and the chat's other turns. A preamble may also hold what an earlier lookup found
    ("Cormac is primary; looking up his phone.")."""
    msgs = [m for m in trace.messages or [] if m.content.strip()]
    before = {i for i, (a, b) in enumerate(zip(msgs, msgs[1:])) if a.role == "assistant" and b.role == "tool"}
    said = [_CALLED.sub(" ", msgs[i].content).strip() for i in sorted(before)]
    return [x for x in said if x], [m.content for i, m in enumerate(msgs) if i not in before]


def user_turns(trace: Trace) -> list[str]:
    if not trace.messages:
        return []
    return [m.content.strip() for m in trace.messages if m.role == "user" and m.content.strip()]
