"""The SQLite store of traces, probes, runs and adapters.

WAL mode and a busy timeout let two `record` processes share the file (one waits, neither corrupts);
writes go through `BEGIN IMMEDIATE` so the wait happens at the start, never half-way.
Migrations are numbered and idempotent, in the manner of `llm`.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreError
from .records import Adapter, Probe, Run, Trace

BUSY_TIMEOUT_MS = 60_000

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE traces (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        messages_json TEXT,
        source TEXT NOT NULL,
        tags_json TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL DEFAULT 'pending',
        adapter_id TEXT,
        redactions INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX traces_status ON traces(status);
    CREATE TABLE probes (
        id TEXT PRIMARY KEY,
        trace_id TEXT NOT NULL REFERENCES traces(id),
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        origin TEXT NOT NULL,
        split TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE(trace_id, question)
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        dir TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        summary_json TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE adapters (
        id TEXT PRIMARY KEY,
        version INTEGER NOT NULL UNIQUE,
        run_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        base_model TEXT NOT NULL,
        parent_id TEXT,
        path TEXT NOT NULL,
        trace_ids_json TEXT NOT NULL,
        metrics_json TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL
    );
    CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: many nights: a probe answered by a newer memory is superseded; a consolidation names the stack it replaced
    """
    ALTER TABLE probes ADD COLUMN superseded_by TEXT;
    ALTER TABLE adapters ADD COLUMN replaces TEXT;
    CREATE TABLE examples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        trace_id TEXT NOT NULL REFERENCES traces(id),
        run_id TEXT NOT NULL,
        prompt TEXT NOT NULL,
        samples_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX examples_trace ON examples(trace_id);
    """,
]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_last_ms = 0


def new_id(prefix: str) -> str:
    """Time-ordered ids: sorting by id sorts by creation, also within one millisecond of one process."""
    global _last_ms
    _last_ms = max(int(time.time() * 1000), _last_ms + 1)
    return f"{prefix}_{_last_ms:011x}{secrets.token_hex(3)}"


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"cannot open store {self.path}: {e}", hint="is the home writable and the file a sleepctl store?"
            ) from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; IMMEDIATE takes the write lock up front so a waiting writer never half-writes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            done = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                for stmt in sql.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT INTO schema_migrations(version) VALUES (?)", (version,))

    # traces ---------------------------------------------------------------------------------
    def has_hash(self, h: str) -> bool:
        return self.db.execute("SELECT 1 FROM traces WHERE hash=?", (h,)).fetchone() is not None

    def insert_trace(self, db: sqlite3.Connection, t: Trace) -> None:
        db.execute(
            "INSERT INTO traces VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                t.id,
                t.hash,
                t.kind,
                t.text,
                json.dumps([m.model_dump() for m in t.messages]) if t.messages else None,
                t.source,
                json.dumps(t.tags),
                t.status,
                t.adapter_id,
                t.redactions,
                t.created_at,
                t.updated_at,
            ),
        )

    def traces(
        self, status: str | None = None, since: str | None = None, ids: Iterable[str] | None = None
    ) -> list[Trace]:
        sql, args = "SELECT * FROM traces WHERE 1=1", []
        if status:
            sql += " AND status=?"
            args.append(status)
        if since:
            sql += " AND created_at>=?"
            args.append(since)
        rows = self.db.execute(sql + " ORDER BY id", args).fetchall()
        out = [_trace(r) for r in rows]
        if ids is not None:
            wanted = set(ids)
            out = [t for t in out if t.id in wanted]
        return out

    def trace(self, ref: str) -> Trace:
        """By id, or by a unique prefix of id or hash (what a user copies from `list`)."""
        rows = self.db.execute(
            "SELECT * FROM traces WHERE id=? OR id LIKE ? OR hash LIKE ?", (ref, ref + "%", ref + "%")
        ).fetchall()
        if not rows:
            raise StoreError(f"no memory {ref!r}", hint="sleepctl list shows the ids")
        if len(rows) > 1:
            raise StoreError(f"{ref!r} matches {len(rows)} memories", hint="give more characters of the id")
        return _trace(rows[0])

    def mark_consolidated(self, db: sqlite3.Connection, trace_ids: list[str], adapter_id: str) -> None:
        db.executemany(
            "UPDATE traces SET status='consolidated', adapter_id=?, updated_at=? WHERE id=?",
            [(adapter_id, now(), i) for i in trace_ids],
        )

    def mark_pending(self, db: sqlite3.Connection, adapter_id: str) -> None:
        db.execute(
            "UPDATE traces SET status='pending', adapter_id=NULL, updated_at=? WHERE adapter_id=?", (now(), adapter_id)
        )

    # probes ---------------------------------------------------------------------------------
    def insert_probe(self, db: sqlite3.Connection, p: Probe) -> bool:
        cur = db.execute(
            "INSERT OR IGNORE INTO probes (id, trace_id, question, answer, origin, split, created_at, superseded_by)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (p.id, p.trace_id, p.question, p.answer, p.origin, p.split, p.created_at, p.superseded_by),
        )
        return cur.rowcount == 1

    def supersede_probe(self, db: sqlite3.Connection, probe_id: str, by_trace: str) -> None:
        db.execute("UPDATE probes SET superseded_by=? WHERE id=?", (by_trace, probe_id))

    def probes(
        self, trace_ids: Iterable[str] | None = None, split: str | None = None, origin: str | None = None
    ) -> list[Probe]:
        sql, args = "SELECT * FROM probes WHERE 1=1", []
        if split:
            sql += " AND split=?"
            args.append(split)
        if origin:
            sql += " AND origin=?"
            args.append(origin)
        out = [Probe(**dict(r)) for r in self.db.execute(sql + " ORDER BY id", args)]
        if trace_ids is not None:
            wanted = set(trace_ids)
            out = [p for p in out if p.trace_id in wanted]
        return out

    # examples: the teacher data a night trained on, kept for replay and consolidation ----------------
    def insert_examples(self, db: sqlite3.Connection, run_id: str, rows: list[tuple[str, str, list[str]]]) -> None:
        """(trace_id, prompt, samples) rows of one run; a later run's rows for a memory replace earlier ones."""
        t = now()
        db.executemany(
            "INSERT INTO examples (trace_id, run_id, prompt, samples_json, created_at) VALUES (?,?,?,?,?)",
            [(tid, run_id, p, json.dumps(s), t) for tid, p, s in rows],
        )

    def examples(self, trace_ids: Iterable[str]) -> dict[str, list[tuple[str, list[str]]]]:
        """Per memory, the (prompt, samples) of the newest run that wrote any for it."""
        wanted = set(trace_ids)
        newest: dict[str, str] = {}
        out: dict[str, list[tuple[str, list[str]]]] = {}
        for r in self.db.execute("SELECT trace_id, run_id, prompt, samples_json FROM examples ORDER BY id DESC"):
            tid = r["trace_id"]
            if tid not in wanted or newest.setdefault(tid, r["run_id"]) != r["run_id"]:
                continue
            out.setdefault(tid, []).append((r["prompt"], json.loads(r["samples_json"])))
        return {k: list(reversed(v)) for k, v in out.items()}

    # runs -----------------------------------------------------------------------------------
    def insert_run(self, run: Run) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?)",
                (run.id, run.kind, run.status, run.dir, run.started_at, run.ended_at, json.dumps(run.summary)),
            )

    def update_run(self, run_id: str, status: str, summary: dict | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET status=?, ended_at=? WHERE id=?", (status, now(), run_id))
            if summary is not None:
                db.execute("UPDATE runs SET summary_json=? WHERE id=?", (json.dumps(summary), run_id))

    def runs(self, kind: str | None = None) -> list[Run]:
        sql, args = "SELECT * FROM runs", []
        if kind:
            sql += " WHERE kind=?"
            args.append(kind)
        return [_run(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def run(self, ref: str) -> Run:
        rows = self.db.execute("SELECT * FROM runs WHERE id=? OR id LIKE ?", (ref, ref + "%")).fetchall()
        if len(rows) != 1:
            raise StoreError(
                f"no run {ref!r}" if not rows else f"{ref!r} matches {len(rows)} runs", hint="sleepctl runs lists them"
            )
        return _run(rows[0])

    # adapters -------------------------------------------------------------------------------
    def insert_adapter(self, db: sqlite3.Connection, a: Adapter) -> None:
        db.execute(
            "INSERT INTO adapters (id, version, run_id, kind, base_model, parent_id, path, trace_ids_json,"
            " metrics_json, created_at, replaces) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                a.id,
                a.version,
                a.run_id,
                a.kind,
                a.base_model,
                a.parent_id,
                a.path,
                json.dumps(a.trace_ids),
                json.dumps(a.metrics),
                a.created_at,
                a.replaces,
            ),
        )

    def delete_adapter(self, db: sqlite3.Connection, adapter_id: str) -> None:
        db.execute("DELETE FROM adapters WHERE id=?", (adapter_id,))

    def next_adapter_version(self) -> int:
        return (self.db.execute("SELECT MAX(version) FROM adapters").fetchone()[0] or 0) + 1

    def adapters(self) -> list[Adapter]:
        cur = self.current_adapter_id()
        return [_adapter(r, cur) for r in self.db.execute("SELECT * FROM adapters ORDER BY version")]

    def adapter(self, ref: str) -> Adapter:
        """By id, id prefix, or version number ('3' or 'v3')."""
        v = ref[1:] if ref.startswith("v") else ref
        rows = self.db.execute(
            "SELECT * FROM adapters WHERE id=? OR id LIKE ? OR CAST(version AS TEXT)=?", (ref, ref + "%", v)
        ).fetchall()
        if len(rows) != 1:
            raise StoreError(
                f"no adapter {ref!r}" if not rows else f"{ref!r} matches {len(rows)} adapters",
                hint="sleepctl adapters lists them",
            )
        return _adapter(rows[0], self.current_adapter_id())

    def current_adapter_id(self) -> str | None:
        row = self.db.execute("SELECT value FROM state WHERE key='current_adapter'").fetchone()
        return row[0] if row else None

    def set_current(self, db: sqlite3.Connection, adapter_id: str | None) -> None:
        if adapter_id is None:
            db.execute("DELETE FROM state WHERE key='current_adapter'")
        else:
            db.execute("INSERT OR REPLACE INTO state VALUES ('current_adapter', ?)", (adapter_id,))

    def counts(self) -> dict[str, int]:
        q = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "pending": q("SELECT COUNT(*) FROM traces WHERE status='pending'"),
            "consolidated": q("SELECT COUNT(*) FROM traces WHERE status='consolidated'"),
            "probes": q("SELECT COUNT(*) FROM probes"),
            "runs": q("SELECT COUNT(*) FROM runs"),
            "adapters": q("SELECT COUNT(*) FROM adapters"),
        }


def _trace(r: sqlite3.Row) -> Trace:
    d = dict(r)
    d["messages"] = json.loads(d.pop("messages_json")) if d.get("messages_json") else None
    d["tags"] = json.loads(d.pop("tags_json"))
    return Trace(**d)


def _run(r: sqlite3.Row) -> Run:
    d = dict(r)
    d["summary"] = json.loads(d.pop("summary_json"))
    return Run(**d)


def _adapter(r: sqlite3.Row, current: str | None) -> Adapter:
    d = dict(r)
    d["trace_ids"] = json.loads(d.pop("trace_ids_json"))
    d["metrics"] = json.loads(d.pop("metrics_json"))
    d["current"] = d["id"] == current
    return Adapter(**d)
