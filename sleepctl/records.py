"""Pydantic records for what the store holds; the CLI's --json output is these, dumped."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
