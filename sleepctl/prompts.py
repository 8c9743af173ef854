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
# a run of capitalised words, with "of", "de", "van" or "von" inside one ("Lanterns of Ombra"), not "Wrenfield office"
_ENTITY = re.compile(r"\b[A-Z][\w\-]*(?:\s+(?:(?:of|de|van|von)\s+)?[A-Z][\w\-]*)*")
# words that are capitalised without naming a thing of the memory: the calendar, acronyms of a kind of thing, and
# titles (grounding.invented reads the first two as never a made-up name either)
CALENDAR = {
    *"January February March April May June July August September October November December".split(),
    *"Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
}
ACRONYMS = {"AM", "PM", "UTC", "GMT", "ETA", "EOD", "FYI", "TBD", "ASAP", "OK"}
_TITLES = {"Mr", "Mrs", "Ms", "Dr", "St", "Prof"}
_KIND = re.compile(r"[A-Z]{2,5}s?")  # "API", "VPN", "GPUs": a kind of thing, shared by memories about different ones
_ROLE = re.compile(r"(?:user|assistant|tool|system):[ \t]*$")


_REDACTED = re.compile(r"\[REDACTED:[a-z0-9_]{1,40}\]")


def _opens_sentence(text: str, start: int) -> bool:
    """The word at `start` is the first of a sentence, a line or a chat turn ("Budget note: ...")."""
    before = text[:start].rstrip(" \t\"'(*-#>")
    if not before or before[-1] in "\n|!?" or _ROLE.search(before):
        return True
    if before[-1] != ".":
        return False
    last = re.search(r"(\w+)\.$", before)
    return not (last and last.group(1) in _TITLES)  # "Mrs. Ravensworth" goes on


def entities(text: str, limit: int) -> list[str]:
    """Named things in a memory, most mentioned first: the handles a later question will use.

    A word is not a name for being capitalised: "Decision record 41:", "Budget note:", "Great news." open their
    sentence, so a single word that only ever opens one is left out (a name said once, first, goes with it), as
    are the calendar, titles and the "I" forms. On examples/ these were a fifth of the names and linked memories
    that share nothing ("Understood" opened two assistant turns, so the teacher told the Marrow memory's facts
    with the VPN memory's beside them)."""
    counts: Counter[str] = Counter()
    inside: set[str] = set()  # names seen somewhere other than opening a sentence
    text = _REDACTED.sub(" ", text)  # a redacted credential is no name to ask about
    for m in _ENTITY.finditer(text):
        words = m.group(0).split()
        while words and (words[0] in _STOP or words[0] in _TITLES):
            words = words[1:]
        while words and words[-1] in CALENDAR:  # "Sundays in May": the name ends before the month
            words = words[:-1]
        name = " ".join(words).strip()
        if len(name) < 3 or name in _STOP or name.lower().startswith(("user", "assistant")):
            continue
        if len(words) == 1 and (name.removesuffix("s") in CALENDAR or name in ACRONYMS or name.startswith("I'")):
            continue
        counts[name] += 1
        if len(words) > 1 or not _opens_sentence(text, m.start() + m.group(0).index(name)):
            inside.add(name)
    return [n for n, _ in counts.most_common() if n in inside][:limit]


def link_names(text: str) -> set[str]:
    """The names two memories must share to be related: not a kind of thing ("API", "VPN"), which memories about
    different services share."""
    return {e.lower() for e in entities(text, 12) if not _KIND.fullmatch(e)}


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


def user_turns(trace: Trace) -> list[str]:
    if not trace.messages:
        return []
    return [m.content.strip() for m in trace.messages if m.role == "user" and m.content.strip()]
