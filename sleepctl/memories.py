"""Recording and reading memories: the Python API behind `sleepctl record`, `list`, `show`, `probe`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import BaseModel

from .errors import InputError
from .home import open_home
from .importers import NAMES
from .ingest import DEFAULT_MAX_BYTES, Format, ParsedMemory, parse_source
from .records import Probe, Trace, since_timestamp
from .redact import redact as redact_text
from .store import Store, new_id, now


class RecordResult(BaseModel):
    added: list[str] = []
    duplicates: list[str] = []
    probes_added: int = 0
    redactions: int = 0
    formats: dict[str, int] = {}  # memories read, by format
    skipped: dict[str, int] = {}  # left out of the memory text: system prompts, images, earlier snapshots, ...
    home: str


def open_store(home: str | os.PathLike | None = None, create: bool = False, readonly: bool = False) -> Store:
    """`readonly` for reading (no migration, no write lock, a read-only home works); `create` makes a home."""
    return Store(open_home(home, create=create).db_path, create=create, readonly=readonly)


def record(
    sources: list[str | os.PathLike] | None = None,
    *,
    text: str | None = None,
    home: str | os.PathLike | None = None,
    fmt: Format = "auto",
    separator: str | None = None,
    tags: list[str] | None = None,
    redact: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> RecordResult:
    """Record memories from files ('-' is stdin) or from `text`.

    Every source is parsed before anything is written, and all of it goes in one transaction:
    bad input anywhere means nothing of this call is stored, and nothing already stored is touched.
    """
    parsed: list[ParsedMemory] = []
    for src in sources or []:
        if str(src) == "-":
            data, where = sys.stdin.buffer.read(), "<stdin>"
        else:
            p = Path(src)
            if not p.is_file():
                raise InputError(f"{p}: no such file")
            data, where = p.read_bytes(), str(p)
        parsed += parse_source(data, where, fmt, separator, redact, max_bytes)
    if text is not None:
        parsed += parse_source(text.encode(), "<text>", fmt if fmt != "auto" else "note", separator, redact, max_bytes)
    if not parsed:
        raise InputError("nothing to record", hint="give files, '-' for stdin, or --text")
    extra_tags, tag_redactions = list(tags or []), 0
    if redact:
        redacted = [redact_text(x) for x in extra_tags]
        extra_tags, tag_redactions = [x for x, _ in redacted], sum(n for _, n in redacted)
    st = open_store(home, create=True)
    res = RecordResult(home=str(st.path.parent))
    for m in parsed:
        name = NAMES.get(m.format, m.format)
        res.formats[name] = res.formats.get(name, 0) + 1
        for k, n in m.skipped.items():
            res.skipped[k] = res.skipped.get(k, 0) + n
    try:
        with st.transaction() as db:
            seen: set[str] = set()
            for m in parsed:
                if m.hash in seen or st.has_hash(m.hash):
                    res.duplicates.append(m.source)
                    continue
                seen.add(m.hash)
                t = Trace(
                    id=new_id("m"),
                    hash=m.hash,
                    kind=m.kind,
                    text=m.text,
                    messages=m.messages,
                    system=m.system,
                    source=m.source,
                    tags=sorted(set(m.tags + extra_tags)),
                    redactions=m.redactions + tag_redactions,
                    created_at=now(),
                    updated_at=now(),
                )
                st.insert_trace(db, t)
                res.added.append(t.id)
                res.redactions += m.redactions + tag_redactions
                for p in m.probes:
                    res.probes_added += st.insert_probe(db, _user_probe(t.id, p.question, p.answer))
    finally:
        st.close()
    return res


def _user_probe(trace_id: str, question: str, answer: str) -> Probe:
    # User probes are always held out: they are the user's own test of what was learned.
    return Probe(
        id=new_id("p"),
        trace_id=trace_id,
        question=question,
        answer=answer,
        origin="user",
        split="heldout",
        created_at=now(),
    )


def add_probe(
    memory: str, question: str, answer: str, home: str | os.PathLike | None = None, redact: bool = True
) -> Probe:
    """A user probe; credentials in it are redacted like a memory's (a probe is put to the adapter and stored)."""
    if not question.strip() or not answer.strip():
        raise InputError("a probe needs a non-empty question and answer")
    if redact:
        question, answer = redact_text(question)[0], redact_text(answer)[0]
    with open_store(home) as st:
        t = st.trace(memory)
        p = _user_probe(t.id, question.strip(), answer.strip())
        with st.transaction() as db:
            if not st.insert_probe(db, p):
                raise InputError(f"memory {t.id} already has the probe {question!r}")
    return p


def list_memories(
    home: str | os.PathLike | None = None, status: str | None = None, since: str | None = None
) -> list[Trace]:
    if status not in (None, "pending", "consolidated"):
        raise InputError(f"unknown status {status!r}: use pending or consolidated")
    since = since_timestamp(since) if since else None
    with open_store(home, readonly=True) as st:
        return st.traces(status=status, since=since)


def show_memory(ref: str, home: str | os.PathLike | None = None) -> tuple[Trace, list[Probe]]:
    with open_store(home, readonly=True) as st:
        t = st.trace(ref)
        return t, st.probes([t.id])
