"""Read the logs agents write: JSONL or one JSON document, in sleepctl's own schema or a foreign one.

Each conversation becomes one chat memory of what was said and done, whatever wrote it: user and assistant
turns, tool calls rendered as `[called get_weather(city="Oslo")]`, tool results as
`[result of get_weather] ...` (facts arrive there). System and developer prompts are kept out (counted), and
so are parts that are not text: images, audio, files, documents, reasoning (counted by kind). mem0 and Letta
exports become text memories. Foreign records may carry any metadata (ignored); sleepctl's own schema stays
strict. A cumulative log (each record the conversation so far) is stored once, as its longest record.

A JSON array or one object (pretty-printed or not) is read as one document whose elements are records, as
a JSONL file's lines are; anything else is read line by line, split on "\\n" only.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InputError
from .ingest import ChatRecord, ParsedMemory, ProbeIn, TextRecord, _lone_surrogate, _pydantic_msg, render_chat
from .records import Message

FOREIGN = {
    "openai": "OpenAI Chat Completions",
    "responses": "OpenAI Responses",
    "anthropic": "Anthropic Messages",
    "langchain": "LangChain messages",
    "claude-code": "Claude Code session",
    "mem0": "mem0 export",
    "letta": "Letta passages",
}
NAMES = {"chat": "sleepctl chat", "text": "sleepctl text", **FOREIGN}
FORMATS = ("auto", "chat", "text", "note", *FOREIGN)
NOTHING = "; nothing from this file was recorded"
UNKNOWN = (
    "a record needs a 'messages' list or a 'text' field (sleepctl's schema), or must be one of: "
    + ", ".join(FOREIGN.values())
    + " (--format forces one)"
)

OWN_KEYS = {"messages", "text", "tags", "source", "probes"}
ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "ai": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool",
    "system": "system", "developer": "system",
}  # fmt: skip
LC_TYPES = {"human": "user", "ai": "assistant", "tool": "tool", "function": "tool", "system": "system", "chat": ""}
LC_TYPES |= {f"{k.capitalize()}MessageChunk": v for k, v in LC_TYPES.items()} | {"AIMessageChunk": "assistant"}
RESPONSES_CALLS = {"function_call", "custom_tool_call"}
RESPONSES_OUTPUTS = {"function_call_output", "custom_tool_call_output"}
RESPONSES_ITEMS = RESPONSES_CALLS | RESPONSES_OUTPUTS | {
    "reasoning", "web_search_call", "file_search_call", "computer_call", "computer_call_output", "code_interpreter_call",
    "image_generation_call", "local_shell_call", "local_shell_call_output", "mcp_call", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "item_reference", "compaction",
}  # fmt: skip
TEXT_PARTS = {"text", "input_text", "output_text"}
SKIPPED_PARTS = {
    "image": "image", "image_url": "image", "input_image": "image",
    "input_audio": "audio", "audio": "audio", "output_audio": "audio",
    "file": "file", "input_file": "file", "document": "document",
    "thinking": "reasoning", "redacted_thinking": "reasoning", "reasoning": "reasoning",
}  # fmt: skip
# what a message or part says about who wrote it; a file's records must agree on at least one family
PART_FAMILY = {
    "tool_use": {"anthropic"}, "tool_result": {"anthropic"}, "server_tool_use": {"anthropic"},
    "thinking": {"anthropic"}, "redacted_thinking": {"anthropic"}, "document": {"anthropic"}, "image": {"anthropic"},
    "input_text": {"responses"}, "output_text": {"responses"}, "input_image": {"responses"},
    "input_file": {"responses"}, "image_url": {"openai"}, "input_audio": {"openai"}, "file": {"openai"},
    "refusal": {"openai", "responses"},
}  # fmt: skip
MESSAGE_FAMILIES = {"openai", "anthropic", "responses"}
CLAUDE_CODE_EVENTS = {"summary", "system", "file-history-snapshot", "queue-operation"}
LETTA_KEYS = {"embedding", "embedding_config", "agent_id", "archive_id", "organization_id", "created_by_id"}
LETTA_KEYS |= {"last_updated_by_id", "source_id", "file_id", "file_name", "is_deleted"}


@dataclass
class Record:
    line: int
    obj: Any


@dataclass
class _Conv:
    """One conversation under construction: its messages, what was left out, and which tool each call id named."""

    where: str
    line: int
    messages: list[Message] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    tools: dict[str, str] = field(default_factory=dict)
    system: list[str] = field(default_factory=list)  # system/developer prompts, kept beside the memory

    def say(self, role: str, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if role == "assistant" and self.messages and self.messages[-1].role == "assistant":
            # one turn: a Responses message then its function_call items, or Claude Code's block-per-line
            self.messages[-1] = Message(role="assistant", content=f"{self.messages[-1].content}\n{text}")
        else:
            self.messages.append(Message(role=role, content=text))


class _Extras(BaseModel):
    """sleepctl's own fields on a foreign record; everything else on it is ignored, and so are `tags` and
    `source` that are not sleepctl's (another tool's `source` may be an object)."""

    model_config = ConfigDict(extra="ignore")
    tags: list[str] = []
    source: str | None = None
    probes: list[ProbeIn] = []


class _Bad(Exception):
    """A problem at `loc` inside a record; raised as `file:line: loc: msg` by the caller."""

    def __init__(self, loc: str, msg: str):
        super().__init__(f"{loc}: {msg}" if loc else msg)


# --- reading records: one document or JSONL ------------------------------------------------------------


def load_records(text: str, where: str) -> tuple[list[Record], bool]:
    """The records in `text` and whether it was one JSON document (an array's elements, or one object)."""
    doc = _document(text, where)
    if doc is not None:
        return doc, True
    out = []
    # "\n" only: str.splitlines also splits at U+2028, U+0085, \x0b... which valid JSON carries raw in strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            out.append(Record(lineno, _load(line, where, lineno)))
    return out, False


def _load(line: str, where: str, lineno: int) -> Any:
    try:
        # a trailing \r (CRLF) is JSON whitespace; strict=False takes a raw tab or \x0b inside a string as it is
        obj = json.loads(line, strict=False)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}:{lineno}: malformed JSON ({e.msg} at column {e.colno}){NOTHING}") from e
    except RecursionError as e:
        raise InputError(f"{where}:{lineno}: JSON nested too deeply to read{NOTHING}") from e
    except ValueError as e:  # an integer of over 4,300 digits (Python's int-from-text limit)
        raise InputError(f"{where}:{lineno}: malformed JSON (a number too long to read){NOTHING}") from e
    _check_surrogates(obj, line, where, lineno)
    return obj


def _check_surrogates(obj: Any, raw: str, where: str, lineno: int) -> None:
    bad = _lone_surrogate(obj, raw)
    if bad:
        raise InputError(
            f"{where}:{lineno}: a string holds the lone surrogate {bad}, which is not text{NOTHING}",
            hint="escape a character outside the BMP as a surrogate pair, or write it as UTF-8",
        )


_WS = re.compile(r"[ \t\n\r]*")


def _document(text: str, where: str) -> list[Record] | None:
    """`text` as one JSON value (None: read it as JSONL). An array's elements are records, each at its line."""
    start = _WS.match(text).end()
    if text[start : start + 1] not in ("[", "{"):
        return None
    line_at = text.count("\n", 0, start) + 1
    try:
        whole = json.loads(text, strict=False)
    except (ValueError, RecursionError) as e:
        bad_json = isinstance(e, json.JSONDecodeError)
        if (bad_json and e.msg == "Extra data") or "\n" not in text.strip():
            return None  # JSONL: several values, or one line whose error the line reader names
        first = text[start:].split("\n", 1)[0].strip()
        try:
            json.loads(first, strict=False)
            return None  # a JSONL file whose first line is whole: the error is on a later line
        except (ValueError, RecursionError):
            pass
        if not first.endswith(("[", "{", ",")):
            return None
        if bad_json:
            raise InputError(f"{where}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}){NOTHING}") from e
        if isinstance(e, RecursionError):
            raise InputError(f"{where}:{line_at}: JSON nested too deeply to read{NOTHING}") from e
        raise InputError(f"{where}:{line_at}: malformed JSON (a number too long to read){NOTHING}") from e
    if not isinstance(whole, list):
        _check_surrogates(whole, text, where, line_at)
        return [Record(line_at, whole)]
    out, dec, i, line = [], json.JSONDecoder(strict=False), start + 1, line_at
    while True:  # the array again, element by element, for the line each starts on
        j = _WS.match(text, i).end()
        line += text.count("\n", i, j)
        if text[j] == "]":
            return out
        obj, end = dec.raw_decode(text, j)
        _check_surrogates(obj, text[j:end], where, line)
        out.append(Record(line, obj))
        k = _WS.match(text, end).end()
        line += text.count("\n", j, k)
        i = k + 1 if text[k] == "," else k


# --- detection -------------------------------------------------------------------------------------------


def _shape(obj: dict) -> str:
    """What one record is: own, conversation, message, event, item, container or unknown."""
    if isinstance(obj.get("message"), dict) and ("sessionId" in obj or "parentUuid" in obj):
        return "event"
    if _s(obj.get("type")) in CLAUDE_CODE_EVENTS and ({"sessionId", "leafUuid", "messageId", "uuid"} & obj.keys()):
        return "event"
    if "memory" in obj and not {"messages", "text"} & obj.keys():
        return "mem0"
    if isinstance(obj.get("results"), list) and "messages" not in obj:
        return "mem0-container"
    if "text" in obj and (LETTA_KEYS & obj.keys() or str(obj.get("id", "")).startswith("passage-")):
        return "letta"
    if "messages" in obj:
        return "own" if obj.keys() <= OWN_KEYS and not _foreign_messages(obj["messages"]) else "conversation"
    if "text" in obj:
        return "own"
    if isinstance(obj.get("input"), list | str) or isinstance(obj.get("output"), list) or "choices" in obj:
        return "conversation"
    if _is_message(obj):
        return "message"
    return "unknown"


def _is_message(obj: dict) -> bool:
    t = obj.get("type")
    return (
        ("role" in obj and ({"content", "tool_calls", "function_call"} & obj.keys()))
        or (isinstance(t, str) and (t in RESPONSES_ITEMS or t in LC_TYPES))
        or ("lc" in obj and isinstance(obj.get("kwargs"), dict))
    )


def _foreign_messages(messages: Any) -> bool:
    """Messages sleepctl's own schema would refuse but another format writes (so not a typo in ours)."""
    if not isinstance(messages, list):
        return False
    for m in messages:
        if not isinstance(m, dict):
            continue
        if not m.keys() <= {"role", "content"} and (m.keys() - {"role", "content"}) & _FOREIGN_MESSAGE_KEYS:
            return True
        if m.get("content") is None or isinstance(m.get("content"), list | dict) or _s(m.get("role")) in _FOREIGN_ROLES:
            return True
    return False


_FOREIGN_MESSAGE_KEYS = {"tool_calls", "tool_call_id", "name", "function_call", "type", "data", "id", "lc", "kwargs"}
_FOREIGN_ROLES = {"developer", "function", "human", "ai", "model"}


def _families(obj: dict, seen: tuple[bool, set[str]] | None = None) -> tuple[bool, set[str]]:
    """The formats a conversation or message could be in, from what it carries, narrowing `seen`: whether a
    LangChain message was seen (LangGraph takes role dicts beside its own), and the formats role dicts fit."""
    lc, fam = seen or (False, set(MESSAGE_FAMILIES))
    if "system" in obj and "messages" in obj:
        fam = fam & {"anthropic"}
    if {"instructions", "input", "output"} & obj.keys() and "messages" not in obj:
        fam = fam & {"responses"}
    if "choices" in obj:
        fam = fam & {"openai"}
    msgs = obj.get("messages") if "messages" in obj else [obj] if "role" in obj or "type" in obj or "lc" in obj else []
    for m in msgs if isinstance(msgs, list) else []:
        if not isinstance(m, dict):
            continue
        t = _s(m.get("type"))
        if ("lc" in m and "kwargs" in m) or (t in LC_TYPES and "role" not in m):
            lc = True
        else:
            fam = fam & _message_families(m)
    return lc, fam


def _message_families(m: dict) -> set[str]:
    """The formats a role dict or Responses item fits."""
    t = m.get("type")
    if isinstance(t, str) and t in RESPONSES_ITEMS:
        return {"responses"}
    fam = set(MESSAGE_FAMILIES)
    if t == "message":
        fam &= {"anthropic", "responses"}
    if {"tool_calls", "tool_call_id", "function_call", "name"} & m.keys() or m.get("role") in ("tool", "function"):
        fam &= {"openai"}
    if "content" in m and m["content"] is None:
        fam &= {"openai"}
    if m.get("role") in ("system", "developer"):
        fam &= {"openai", "responses"}
    for p in m.get("content") if isinstance(m.get("content"), list) else []:
        if isinstance(p, dict) and isinstance(p.get("type"), str):
            fam &= PART_FAMILY.get(p["type"], MESSAGE_FAMILIES)
    return fam


def _s(value: Any) -> str | None:
    """`value` if it is a string: what a record holds may be anything, and a dict cannot be looked up."""
    return value if isinstance(value, str) else None


def _pick(fam: set[str]) -> str:
    return next(f for f in ("openai", "anthropic", "responses") if f in fam)


def detect(records: list[Record], where: str) -> str:
    """The one format of a file's records (auto-detection); a mix or an unknown record is a one-line error."""
    shapes = [(r, _shape(r.obj)) for r in records]
    if any(s == "event" for _, s in shapes):
        return "claude-code"  # its other lines (snapshots, summaries, new event kinds) are skipped, counted
    kinds = set()
    lc, fam, fam_line = False, set(MESSAGE_FAMILIES), None
    for r, s in shapes:
        if s == "unknown":
            raise InputError(f"{where}:{r.line}: not a format sleepctl reads: {UNKNOWN}{NOTHING}")
        kinds.add("mem0" if s.startswith("mem0") else s)
        if s in ("conversation", "message"):
            lc, new = _families(r.obj, (lc, fam))
            if not new:
                what = "its messages are not all of one format"
                if fam_line:
                    what = f"the records from line {fam_line} are {_names(fam)}, this one is not"
                raise InputError(
                    f"{where}:{r.line}: mixes formats: {what}{NOTHING}",
                    hint="record each format from its own file, or force one with --format",
                )
            fam, fam_line = new, fam_line or r.line
    if "message" in kinds and len(kinds) > 1:
        line = next(r.line for r, s in shapes if s != "message")
        raise InputError(
            f"{where}:{line}: mixes whole records with single messages (a file of messages is one conversation)"
            f"{NOTHING}",
            hint="record them from separate files",
        )
    if kinds & {"conversation", "message"}:
        return "langchain" if lc else _pick(fam)
    if len(kinds) == 1 and kinds != {"own"}:
        return kinds.pop()
    return "auto-own"  # sleepctl's own records, perhaps beside mem0 items or Letta passages: each by its shape


def _names(fam: set[str]) -> str:
    return " or ".join(FOREIGN[f] for f in sorted(fam))


# --- conversion --------------------------------------------------------------------------------------------


def parse_records(text: str, where: str, fmt: str = "auto") -> list[ParsedMemory]:
    """Every memory in `text` (JSONL or one JSON document) of format `fmt`, or raise: all of a file or none."""
    records, _ = load_records(text, where)
    for r in records:
        if not isinstance(r.obj, dict):
            raise InputError(f"{where}:{r.line}: expected a JSON object, got {type(r.obj).__name__}{NOTHING}")
    found = detect(records, where) if fmt == "auto" else fmt
    if found == "claude-code":
        out = _claude_code(records, where)
    elif found in MESSAGE_FAMILIES | {"langchain"}:
        out = _conversations(records, where, found)
    else:
        out = [m for r in records for m in _record(r, where, found)]
    skipped = Counter()
    for m in out:
        skipped.update(m.skipped)
    out = fold_cumulative([m for m in out if m.text])
    if not out:
        left = f": nothing left but {describe(skipped)}" if skipped else ""
        raise InputError(f"{where}: no memories found{left}")
    return out


def _record(r: Record, where: str, fmt: str) -> list[ParsedMemory]:
    """One record of sleepctl's own schema, a mem0 export or Letta passages (each record its own memories)."""
    obj, at = r.obj, f"{where}:{r.line}"
    shape = _shape(obj) if fmt == "auto-own" else fmt
    if shape in ("mem0", "mem0-container"):
        return _mem0(obj, at, r.line)
    if shape == "letta":
        return [m for m in [_text_item(obj, "text", at, "letta")] if m]
    if shape in ("chat", "text", "own"):
        kind = shape if shape != "own" else "chat" if "messages" in obj else "text"
        try:
            rec = ChatRecord.model_validate(obj) if kind == "chat" else TextRecord.model_validate(obj)
        except ValidationError as e:
            raise InputError(f"{at}: {_pydantic_msg(e)}{NOTHING}") from e
        if isinstance(rec, TextRecord):
            return [_memory("text", rec.text.strip(), None, rec.source or at, rec.tags, rec.probes, "text")]
        kept = [m for m in rec.messages if m.role != "system"]
        skipped = Counter({"system prompt": len(rec.messages) - len(kept)})
        if not any(m.content.strip() for m in kept):
            raise InputError(f"{at}: messages: no message has content but a system prompt{NOTHING}")
        system = _join([m.content for m in rec.messages if m.role == "system"])
        return [
            _memory("chat", render_chat(kept), kept, rec.source or at, rec.tags, rec.probes, "chat", skipped, system)
        ]
    raise InputError(f"{at}: not a format sleepctl reads: {UNKNOWN}{NOTHING}")


def _memory(
    kind: str,
    text: str,
    messages: list[Message] | None,
    source: str,
    tags: list[str],
    probes: list[ProbeIn],
    fmt: str,
    skipped: Counter | None = None,
    system: str | None = None,
) -> ParsedMemory:
    left_out = {k: v for k, v in (skipped or {}).items() if v}
    return ParsedMemory(
        kind, text, messages, source, list(tags), list(probes), format=fmt, skipped=left_out, system=system
    )


def _join(texts: list[str]) -> str | None:
    """Several system prompts of one conversation (a system and a developer message) as one, in order."""
    kept = [t.strip() for t in texts if t and t.strip()]
    return "\n\n".join(kept) or None


def _extras(obj: dict, at: str) -> _Extras:
    tags, source = obj.get("tags"), obj.get("source")
    fields = {"probes": obj["probes"]} if "probes" in obj else {}
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        fields["tags"] = tags
    if isinstance(source, str):
        fields["source"] = source
    try:
        return _Extras.model_validate(fields)
    except ValidationError as e:
        raise InputError(f"{at}: {_pydantic_msg(e)}{NOTHING}") from e


def _text_item(obj: dict, key: str, at: str, fmt: str) -> ParsedMemory | None:
    text = obj.get(key)
    if not isinstance(text, str):
        raise InputError(f"{at}: {key}: Input should be a valid string{NOTHING}")
    if not text.strip():
        return None  # an emptied entry in an export: nothing to keep, nothing to refuse the rest for
    ex = _extras(obj, at)
    cats = obj.get("categories") if fmt == "mem0" and isinstance(obj.get("categories"), list) else []
    tags = ex.tags or [c for c in cats if isinstance(c, str)]  # mem0's categories: as tags
    return _memory("text", text.strip(), None, ex.source or at, tags, ex.probes, fmt)


def _mem0(obj: dict, at: str, line: int) -> list[ParsedMemory]:
    if "memory" in obj:
        m = _text_item(obj, "memory", at, "mem0")
        return [m] if m else []
    items = obj.get("results")
    if not isinstance(items, list):
        raise InputError(f"{at}: results: Input should be a valid list (a mem0 export){NOTHING}")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise InputError(f"{at}: results.{i}: Input should be an object{NOTHING}")
        m = _text_item(it, "memory", f"{at}:results.{i}", "mem0")
        out += [m] if m else []
    if out and obj.get("relations"):
        out[0].skipped["graph relation"] = len(obj["relations"]) if isinstance(obj["relations"], list) else 1
    return out


def _conversations(records: list[Record], where: str, fmt: str) -> list[ParsedMemory]:
    """Whole conversations (one a record), or a file of single messages (all one conversation)."""
    if not any(_shape(r.obj) == "message" for r in records):
        out = []
        for r in records:
            if _shape(r.obj) in ("own", "mem0", "mem0-container", "letta") and "messages" not in r.obj:
                out += _record(r, where, "auto-own")  # a note beside the conversations: a memory of its own
            elif m := _conversation(r, where, fmt):
                out.append(m)
        return out
    conv = _Conv(where, records[0].line)
    for r in records:
        try:
            _message(conv, r.obj, "")
        except _Bad as e:
            raise InputError(f"{where}:{r.line}: {e}{NOTHING}") from None
    return [m for m in [_finish(conv, fmt, _Extras())] if m]


def _conversation(r: Record, where: str, fmt: str) -> ParsedMemory | None:
    obj, at = r.obj, f"{where}:{r.line}"
    conv = _Conv(where, r.line)
    try:
        if "messages" in obj:
            if not isinstance(obj["messages"], list):
                raise _Bad("messages", "Input should be a valid list")
            if "system" in obj:  # Anthropic's top-level system prompt: a string or text blocks
                _system(conv, obj["system"])
            for i, m in enumerate(obj["messages"]):
                _message(conv, m, f"messages.{i}")
        else:
            if "instructions" in obj:  # the Responses API's system prompt
                _system(conv, obj["instructions"])
            items = obj.get("input")
            items = [{"role": "user", "content": items}] if isinstance(items, str) else items or []
            items = items + (obj.get("output") if isinstance(obj.get("output"), list) else [])
            if not isinstance(items, list):
                raise _Bad("input", "Input should be a string or a list of items")
            for i, m in enumerate(items):
                _message(conv, m, f"items.{i}")
        reply = obj.get("response", obj)
        if isinstance(reply, dict) and isinstance(reply.get("choices"), list) and reply["choices"]:
            choice = reply["choices"][0]  # a logged Chat Completions reply: the assistant's message
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                _message(conv, choice["message"], "choices.0.message")
        elif isinstance(reply, dict) and reply is not obj and "content" in reply and "role" in reply:
            _message(conv, reply, "response")  # a logged Anthropic reply
    except _Bad as e:
        raise InputError(f"{at}: {e}{NOTHING}") from None
    return _finish(conv, fmt, _extras(obj, at))


def _finish(conv: _Conv, fmt: str, ex: _Extras) -> ParsedMemory:
    text = render_chat(conv.messages)
    source = ex.source or f"{conv.where}:{conv.line}"
    return _memory(
        "chat", text, conv.messages or None, source, ex.tags, ex.probes, fmt, conv.skipped, _join(conv.system)
    )


def _system(conv: _Conv, value: Any) -> None:
    """Out of the memory's text (it is the agent's instructions, not what happened) but kept: a string, or
    text parts (Anthropic's top-level `system`, OpenAI content parts); other parts of it are not memory."""
    if value is None or value == "" or value == []:
        return
    parts = value if isinstance(value, list) else [value]
    texts = [p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None for p in parts]
    conv.system += [t for t in texts if isinstance(t, str)]
    conv.skipped["system prompt"] += 1


def _message(conv: _Conv, m: Any, loc: str) -> None:
    """One message or item, in any of the foreign shapes, into `conv`."""
    at = lambda k: f"{loc}.{k}" if loc else k  # noqa: E731
    if not isinstance(m, dict):
        raise _Bad(loc, "Input should be an object (a message)")
    if "lc" in m and isinstance(m.get("kwargs"), dict):  # LangChain's dumpd: {"lc": 1, "id": [..., "HumanMessage"]}
        ident = m.get("id")
        kind = ident[-1] if isinstance(ident, list) and ident and isinstance(ident[-1], str) else ""
        kw = m["kwargs"]
        return _message(conv, {"type": kw.get("type") or kind.removesuffix("Message").lower(), "data": kw}, loc)
    t = m.get("type")
    if isinstance(t, str) and t in LC_TYPES and "role" not in m:
        body = m["data"] if isinstance(m.get("data"), dict) else m  # messages_to_dict nests; the flat form does not
        role = LC_TYPES[t] or body.get("role")
        calls = body.get("tool_calls") if role == "assistant" else None
        return _turn(conv, role, body, at, calls)
    if isinstance(t, str) and t in RESPONSES_ITEMS:
        return _item(conv, m, t, at)
    role = m.get("role")
    if role is None and "content" not in m:
        raise _Bad(at("role"), "Field required")
    return _turn(conv, role or "user", m, at, m.get("tool_calls"))


def _turn(conv: _Conv, role: Any, m: dict, at, calls: Any) -> None:
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise _Bad(at("role"), "Input should be user, assistant, system, developer or tool")
    role = ROLES[role.lower()]
    if role == "system":
        _system(conv, m.get("content"))
        return
    content = m.get("content")
    if role == "tool":
        call_id = m.get("tool_call_id")
        name = m.get("name") if isinstance(m.get("name"), str) else conv.tools.get(_s(call_id))
        texts, _ = _parts(conv, content, at("content"))
        return _result(conv, name, "\n".join(texts), m.get("status") == "error")
    texts, done = _parts(conv, content, at("content"))
    name = m.get("name")
    if texts and isinstance(name, str) and name.strip() and role == "user":
        texts[0] = f"{name.strip()}: {texts[0]}"  # who said it, in a chat of several people
    for k, c in enumerate(calls if isinstance(calls, list) else []):
        if not isinstance(c, dict):
            raise _Bad(at(f"tool_calls.{k}"), "Input should be an object (a tool call)")
        fn = c.get("function") if isinstance(c.get("function"), dict) else c  # OpenAI nests; LangChain does not
        if _s(c.get("id")) in done:
            continue  # a LangChain message over Anthropic holds each call twice: a tool_use block and tool_calls
        texts.append(_call(conv, fn.get("name"), fn.get("arguments", fn.get("args")), c.get("id")))
    if isinstance(m.get("function_call"), dict):  # OpenAI's older single call
        fc = m["function_call"]
        texts.append(_call(conv, fc.get("name"), fc.get("arguments"), None))
    text = "\n".join(texts)
    if role == "user":
        conv.say("user", text)
    else:
        conv.say("assistant", text)


def _parts(conv: _Conv, content: Any, loc: str) -> tuple[list[str], set]:
    """The text of a content (a string, null, or parts); tool calls and results in it are written to `conv`
    in order. Returns the texts not yet said and the ids of tool calls rendered."""
    if content is None:
        return [], set()
    if isinstance(content, str):
        return [content], set()
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise _Bad(loc, "Input should be a string, a list of parts or null")
    texts, done = [], set()
    for i, p in enumerate(content):
        if isinstance(p, str):
            texts.append(p)
            continue
        if not isinstance(p, dict):
            raise _Bad(f"{loc}.{i}", "Input should be a string or an object (a content part)")
        t = p.get("type")
        if _s(t) in TEXT_PARTS or (t is None and isinstance(p.get("text"), str)):
            if not isinstance(p.get("text"), str):
                raise _Bad(f"{loc}.{i}.text", "Input should be a valid string")
            texts.append(p["text"])
        elif t == "refusal":
            texts.append(f"[refused] {p.get('refusal') if isinstance(p.get('refusal'), str) else ''}")
        elif t in ("tool_use", "server_tool_use"):
            texts.append(_call(conv, p.get("name"), p.get("input"), p.get("id")))
            done |= {p["id"]} if _s(p.get("id")) else set()
        elif t == "tool_result":
            if texts:  # what the user wrote before it comes first
                conv.say("user", "\n".join(texts))
                texts = []
            inner, _ = _parts(conv, p.get("content"), f"{loc}.{i}.content")
            name = conv.tools.get(p.get("tool_use_id")) if isinstance(p.get("tool_use_id"), str) else None
            _result(conv, name, "\n".join(inner), p.get("is_error") is True)
        elif isinstance(t, str) and t in SKIPPED_PARTS:
            conv.skipped[SKIPPED_PARTS[t]] += 1
        else:
            conv.skipped["other part"] += 1
    return texts, done


def _item(conv: _Conv, m: dict, t: str, at) -> None:
    """An OpenAI Responses item other than a message."""
    if t in RESPONSES_CALLS:
        args = m.get("arguments") if t == "function_call" else m.get("input")
        conv.say("assistant", _call(conv, m.get("name"), args, m.get("call_id")))
    elif t in RESPONSES_OUTPUTS:
        name = conv.tools.get(m.get("call_id")) if isinstance(m.get("call_id"), str) else None
        texts, _ = _parts(conv, m.get("output"), at("output"))
        _result(conv, name, "\n".join(texts), False)
    elif t == "reasoning":
        conv.skipped["reasoning"] += 1
    else:
        conv.skipped["other item"] += 1


def _call(conv: _Conv, name: Any, args: Any, call_id: Any) -> str:
    name = name.strip() if isinstance(name, str) and name.strip() else "a tool"
    if isinstance(call_id, str):
        conv.tools[call_id] = name
    return f"[called {name}({render_args(args)})]"


def render_args(args: Any) -> str:
    """Call arguments as `city="Oslo", days=3`: a JSON string is read first (OpenAI sends arguments as one)."""
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False) if args.strip()[:1] in ("{", "[") else args
        except (ValueError, RecursionError):
            pass
    if args is None or args == "" or args == {}:
        return ""
    if isinstance(args, dict):
        return ", ".join(f"{k}={_json(v)}" for k, v in args.items())
    return _json(args)


def _json(v: Any) -> str:
    try:
        return json.dumps(v, ensure_ascii=False)
    except (ValueError, RecursionError):
        return "…"


def _result(conv: _Conv, name: str | None, text: str, error: bool) -> None:
    head = (
        f"[{'error from' if error else 'result of'} {name}]" if name else "[tool error]" if error else "[tool result]"
    )
    conv.say("tool", f"{head} {text.strip()}" if text.strip() else f"{head} (empty)")


# --- Claude Code --------------------------------------------------------------------------------------------


def _claude_code(records: list[Record], where: str) -> list[ParsedMemory]:
    """One memory per session: its user and assistant messages, tool calls and results, in file order."""
    sessions: dict[str, _Conv] = {}
    loose = Counter()  # what came before any session's first message (summaries): counted on the first session
    for r in records:
        obj, msg = r.obj, r.obj.get("message")
        sid = obj.get("sessionId") if isinstance(obj.get("sessionId"), str) else ""
        said = obj.get("type") in ("user", "assistant") and isinstance(msg, dict)
        conv = sessions.setdefault(sid, _Conv(where, r.line)) if said else sessions.get(sid)
        counter = conv.skipped if conv else loose
        if not said:
            counter["summary" if obj.get("type") == "summary" else "other event"] += 1
        elif obj.get("isSidechain") is True:
            counter["sidechain message"] += 1  # a sub-agent's own conversation
        elif obj.get("isMeta") is True or obj.get("isCompactSummary") is True:
            counter["meta message"] += 1
        elif isinstance(msg.get("content"), str) and msg["content"].lstrip().startswith(_COMMAND_TAGS):
            counter["slash command"] += 1
        else:
            try:
                _message(conv, {**msg, "role": obj["type"]}, "message")
            except _Bad as e:
                raise InputError(f"{where}:{r.line}: {e}{NOTHING}") from None
    convs = list(sessions.values())
    if convs:
        convs[0].skipped.update(loose)
    return [_finish(c, "claude-code", _Extras()) for c in convs]


_COMMAND_TAGS = ("<command-name>", "<command-message>", "<local-command-stdout>", "<local-command-stderr>")


# --- cumulative logs ------------------------------------------------------------------------------------------


def fold_cumulative(memories: list[ParsedMemory]) -> list[ParsedMemory]:
    """Drop each chat memory whose text is the start of another's, up to a line end: a log that writes the
    conversation so far at every turn. Nothing is lost (the longer one holds it all); the longest keeps their
    tags and probes, and counts them."""
    chats = sorted((m.text, i) for i, m in enumerate(memories) if m.messages)
    texts = [t for t, _ in chats]
    drop = set()
    for t, i in chats:
        # the texts that start with t + "\n" sort together, from t + "\n" up to t + "\x0b" (the next character)
        lo, hi = bisect_left(texts, t + "\n"), bisect_left(texts, t + "\x0b")
        if lo == hi:
            continue
        drop.add(i)
        keeper, m = memories[max(chats[lo:hi], key=lambda x: len(x[0]))[1]], memories[i]
        keeper.skipped["earlier snapshot"] = keeper.skipped.get("earlier snapshot", 0) + 1
        keeper.tags = list(dict.fromkeys(keeper.tags + m.tags))
        keeper.probes = list({(p.question, p.answer): p for p in keeper.probes + m.probes}.values())
    return [m for i, m in enumerate(memories) if i not in drop]


def describe(skipped: dict[str, int]) -> str:
    """`1 system prompt, 2 images`: what was left out of the memories, for a person."""
    plural = {"reasoning": "reasoning parts", "audio": "audio parts", "summary": "summaries"}
    return ", ".join(
        f"{n} {plural.get(k, k + 's') if n != 1 else k}" for k, n in sorted(skipped.items(), key=lambda kv: -kv[1])
    )
