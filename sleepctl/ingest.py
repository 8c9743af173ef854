"""Parse memory files into traces, all of a file or none of it.

Accepted: chat JSONL (`{"messages": [...]}`), JSONL with a `text` field, and plain text/markdown notes
(one per file, or split on a separator line). A JSONL record may carry `tags`, `source` and `probes`
(`[{"question": ..., "answer": ...}]`), so a memory and its user probes travel together. The logs other
tools write (OpenAI, Anthropic, LangChain, Claude Code, mem0, Letta), and JSON documents: `importers.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import InputError
from .records import Message, TraceKind
from .redact import redact

DEFAULT_MAX_BYTES = 1_000_000  # one memory; a 10 MB "memory" is a log dump, not something to put in weights
Format = Literal[
    "auto", "chat", "text", "note", "openai", "responses", "anthropic", "langchain", "claude-code", "mem0", "letta"
]


class ProbeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    answer: str

    @field_validator("question", "answer")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class ChatRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message]
    tags: list[str] = []
    source: str | None = None
    probes: list[ProbeIn] = []

    @field_validator("messages")
    @classmethod
    def _has_content(cls, v: list[Message]) -> list[Message]:
        if not any(m.content.strip() for m in v):
            raise ValueError("no message has content")
        return v


class TextRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    tags: list[str] = []
    source: str | None = None
    probes: list[ProbeIn] = []

    @field_validator("text")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


@dataclass
class ParsedMemory:
    kind: TraceKind
    text: str
    messages: list[Message] | None
    source: str
    tags: list[str]
    probes: list[ProbeIn]
    redactions: int = 0
    format: str = ""  # what it was read as: chat, text, note, openai, anthropic, ...
    skipped: dict[str, int] = field(default_factory=dict)  # left out of the text: {"system prompt": 1, "image": 2}
    system: str | None = None  # the system/developer prompt: stored beside the memory, out of its text and hash
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.hash = content_hash(self.kind, self.text)


def content_hash(kind: str, text: str) -> str:
    """Whitespace-insensitive, so re-recording the same memory with a trailing newline is a duplicate."""
    norm = " ".join(text.split())
    return hashlib.sha256(f"{kind}\n{norm}".encode()).hexdigest()


def render_chat(messages: list[Message]) -> str:
    return "\n".join(f"{m.role}: {m.content.strip()}" for m in messages if m.content.strip())


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{where}: not UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})", hint="convert the file to UTF-8"
        ) from e


def _pydantic_msg(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:  # keys come from the input: a few, each cut short, keep the error one readable line
        loc = ".".join(str(x)[:40] for x in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts) + (f"; and {e.error_count() - 3} more" if e.error_count() > 3 else "")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: object, line: str) -> str | None:
    """The first lone surrogate a JSON escape put in `obj` (`\\ud800` alone): SQLite cannot store it."""
    if not _SURROGATE_ESCAPE.search(line):  # escapes of any surrogate, paired or not, are rare: check only then
        return None
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        return f"\\u{ord(e.object[e.start]):04x}"
    return None


def parse_note(text: str, where: str, separator: str | None) -> list[ParsedMemory]:
    chunks = [text] if separator is None else _split(text, separator)
    return [
        ParsedMemory("note", c.strip(), None, where if len(chunks) == 1 else f"{where}#{i}", [], [], format="note")
        for i, c in enumerate(chunks, 1)
        if c.strip()
    ]


def _split(text: str, separator: str) -> list[str]:
    chunks, cur = [], []
    for line in text.split("\n"):  # "\n" only, so a note keeps its U+2028 and form feeds
        line = line.removesuffix("\r")
        if line.strip() == separator:
            chunks.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    chunks.append("\n".join(cur))
    return chunks


def detect_format(name: str, text: str) -> Format:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "auto"
    if suffix in (".md", ".txt", ".markdown", ".rst"):
        return "note"
    start = text.lstrip()[:1]
    return "auto" if start == "{" or start == "[" and _is_json(text) else "note"


def _is_json(text: str) -> bool:
    """A JSON array on stdin is a document; a note that starts with `[x] done` is not."""
    try:
        json.loads(text, strict=False)
    except (ValueError, RecursionError):
        return False
    return True


def parse_source(
    data: bytes,
    where: str,
    fmt: Format = "auto",
    separator: str | None = None,
    do_redact: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[ParsedMemory]:
    """Parse one file (or stdin) completely, or raise: a file is never half-recorded."""
    # a file name that is not UTF-8 arrives as lone surrogates (PEP 383) and becomes the stored source: spell them out
    where = where.encode("utf-8", "backslashreplace").decode()
    text = _decode(data, where)
    if not text.strip():
        raise InputError(f"{where}: empty input, nothing to record")
    if fmt == "auto":
        fmt = detect_format(where, text)
    from .importers import parse_records  # it builds on this module

    memories = parse_note(text, where, separator) if fmt == "note" else parse_records(text, where, fmt)
    if not memories:
        raise InputError(f"{where}: no memories found")
    for m in memories:
        size = len(m.text.encode())
        if size > max_bytes:
            raise InputError(
                f"{m.source}: memory of {size:,} bytes is over the limit of {max_bytes:,}; nothing from this file was recorded",
                hint="split it into smaller memories, or raise --max-bytes",
            )
        if do_redact:
            redact_memory(m)
    return memories


def redact_memory(m: ParsedMemory) -> None:
    """Every field that is stored, not only the text: a probe, a tag or a source reaches the teacher's prompts
    and the run files as surely as the memory does. The messages are what the text renders, counted once."""
    m.text, n = redact(m.text)
    if m.messages:
        m.messages = [Message(role=x.role, content=redact(x.content)[0]) for x in m.messages]
    m.source, k = redact(m.source)
    s = 0
    if m.system:
        m.system, s = redact(m.system)
    tags = [redact(t) for t in m.tags]
    probes = [(redact(p.question), redact(p.answer)) for p in m.probes]
    m.tags = [t for t, _ in tags]
    m.probes = [ProbeIn(question=q, answer=a) for (q, _), (a, _) in probes]
    m.redactions = n + k + s + sum(c for _, c in tags) + sum(cq + ca for (_, cq), (_, ca) in probes)
    m.hash = content_hash(m.kind, m.text)
