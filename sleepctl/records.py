"""Pydantic records for what the store holds; the CLI's --json output is these, dumped."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError

TraceKind = Literal["chat", "text", "note"]
TraceStatus = Literal["pending", "consolidated"]
ProbeOrigin = Literal["user", "teacher"]
ProbeSplit = Literal["train", "heldout"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Trace(BaseModel):
    id: str
    hash: str
    kind: TraceKind
    text: str = Field(description="the memory as the teacher sees it")
    messages: list[Message] | None = None
    system: str | None = Field(
        None, description="the conversation's system or developer prompt: kept, but never in the memory's text"
    )
    source: str
    tags: list[str] = []
    status: TraceStatus = "pending"
    adapter_id: str | None = None
    redactions: int = 0
    created_at: str
    updated_at: str


class Probe(BaseModel):
    id: str
    trace_id: str
    question: str
    answer: str
    origin: ProbeOrigin
    split: ProbeSplit
    created_at: str
    superseded_by: str | None = None  # a newer memory that answers this question differently


class Run(BaseModel):
    id: str
    kind: str
    status: Literal["running", "done", "failed", "interrupted"]
    dir: str
    started_at: str
    ended_at: str | None = None
    summary: dict[str, Any] = {}


class Adapter(BaseModel):
    id: str
    version: int
    run_id: str
    kind: str
    base_model: str
    parent_id: str | None
    path: str
    trace_ids: list[str]
    metrics: dict[str, Any] = {}
    created_at: str
    current: bool = False
    replaces: str | None = None  # a consolidation: the adapter that was current when it was made
    forgotten: list[str] = []  # memories it was trained on that `forget` removed since: still in its weights


_AGO = re.compile(r"(\d{1,5})\s*([mhdw])")
_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since_timestamp(text: str, now: datetime | None = None) -> str:
    """`--since` as the store's UTC timestamp: an ISO date or date-time, `today`, `yesterday`, or an age
    (`90m`, `12h`, `3d`, `2w`). Anything else is refused: compared as text it would match nothing, silently."""
    now = now or datetime.now(timezone.utc)
    t = text.strip().lower()
    if t in ("today", "yesterday"):
        day = now.astimezone().date() - timedelta(days=t == "yesterday")  # the user's calendar day
        at = datetime.combine(day, datetime.min.time()).astimezone()
    elif m := _AGO.fullmatch(t):
        at = now - timedelta(**{_UNIT[m.group(2)]: int(m.group(1))})
    else:
        try:
            at = datetime.fromisoformat(text.strip())
        except ValueError:
            raise InputError(
                f"--since {text!r} is not a date",
                hint="an ISO date or time (2026-11-27, 2026-11-27T09:00), today, yesterday, or an age: 12h, 3d, 2w",
            ) from None
        if at.tzinfo is None:  # a date or a naive time is the user's local time
            at = at.astimezone()
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds")
