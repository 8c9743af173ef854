"""The SQLite store of traces, probes, runs and adapters.

WAL mode and a busy timeout let two `record` processes share the file (one waits, neither corrupts);
writes go through `BEGIN IMMEDIATE` so the wait happens at the start, never half-way.
Migrations are numbered and idempotent, in the manner of `llm`.

Paths are stored relative to the home and resolved against it on the way out, so a copied home writes
into its own folders and a moved one keeps working. A read-only open (`readonly=True`, what read
commands use) neither migrates nor takes the write lock, and reads a home whose files are read-only.
Only a `create` open makes a new store; an empty or foreign `sleepctl.db` is refused, never adopted.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from .errors import StoreError
from .home import private_tree, writable
from .records import Adapter, Probe, Run, Trace

BUSY_TIMEOUT_MS = 60_000
APP_ID = 0x534C5043  # "SLPC" in the SQLite header: this file is a sleepctl store, not any database

Migration = str | Callable[[sqlite3.Connection, Path], None]  # SQL, or a step that needs the home


def _relative(p: str, home: Path, folder: str | None = None) -> str:
    """A stored path as the home's own: `runs/<id>` or `adapters/<name>` whatever home wrote it (a copied or
    moved home, or a relative --home), else relative if it lies under the home, else kept as it is."""
    path = Path(p)
    if folder and len(path.parts) >= 2 and path.parts[-2] == folder:
        return f"{folder}/{path.name}"
    for a, b in ((path.absolute(), home.absolute()), (path.resolve(), home.resolve())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    return p


def _m3_relative_paths(db: sqlite3.Connection, home: Path) -> None:
    """Paths relative to the home, the sleepctl mark in the header, and private files (issue 14)."""
    for rid, d in db.execute("SELECT id, dir FROM runs").fetchall():
        db.execute("UPDATE runs SET dir=? WHERE id=?", (_relative(d, home, "runs"), rid))
    for aid, p in db.execute("SELECT id, path FROM adapters").fetchall():
        db.execute("UPDATE adapters SET path=? WHERE id=?", (_relative(p, home, "adapters"), aid))
    db.execute(f"PRAGMA application_id={APP_ID}")
    private_tree(home)  # an older home was written under the user's umask, often world-readable


MIGRATIONS: list[Migration] = [
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
    # 3: paths relative to the home; the header marks the file as a sleepctl store
    _m3_relative_paths,
    # 4: `forget`: an adapter trained on memories since forgotten keeps their ids here (and not in trace_ids)
    "ALTER TABLE adapters ADD COLUMN forgotten_json TEXT NOT NULL DEFAULT '[]'",
    # 5: a conversation's system (or developer) prompt, kept beside the memory and out of its text
    "ALTER TABLE traces ADD COLUMN system TEXT",
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
    """One sleepctl.db. `readonly`: for read commands (no migration, no write lock, read-only homes work);
    `create`: make the store if there is none (only commands that write memories create a home)."""

    def __init__(self, path: Path, *, readonly: bool = False, create: bool = False):
        self.path = Path(path).absolute()
        self.home = self.path.parent  # stored paths are relative to it
        self.readonly = readonly
        if not self.path.exists():
            if readonly or not create:
                raise StoreError(
                    f"no sleepctl home at {self.home} (it has no sleepctl.db)",
                    hint="record memories first (sleepctl record FILE), or pass --home / set SLEEPCTL_HOME",
                )
            _create(self.path)
        elif self.path.is_file() and self.path.stat().st_size == 0:
            raise StoreError(
                f"{self.path} is empty, not a sleepctl store",
                hint="remove it (it holds nothing), or choose another --home",
            )
        if not readonly and not (writable(self.home) and writable(self.path)):
            raise StoreError(
                f"the home {self.home} is read-only", hint="read commands work on it; make it writable to change it"
            )
        try:
            self.db = self._connect()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"cannot open store {self.path}: {e}", hint="is the home readable and the file a sleepctl store?"
            ) from e
        try:
            self._check_mark()  # before anything is written: a foreign database is left exactly as it was
            if readonly:
                self._check_schema()
            else:
                self.db.execute("PRAGMA journal_mode=WAL")
                self._migrate()
                _private_db(self.path)
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(
                f"cannot open store {self.path}: {e}", hint="is the home writable and the file a sleepctl store?"
            ) from e
        except BaseException:
            self.db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            uri = f"file:{quote(str(self.path))}?mode=ro"
            wal = self.path.with_name(self.path.name + "-wal")
            if not (writable(self.home) and writable(self.path)) and not (wal.exists() and wal.stat().st_size):
                # a home its owner made read-only (root included): nothing writes it, so no locks and no
                # -wal/-shm files to create beside it; with a non-empty -wal, SQLite reads it in place
                uri += "&immutable=1"
            db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        else:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _check_mark(self) -> None:
        """A sleepctl store carries APP_ID in its header (older ones: their tables); any other database is
        refused rather than adopted, written to or migrated."""
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app == APP_ID or (app == 0 and {"schema_migrations", "traces", "adapters"} <= tables):
            return
        raise StoreError(
            f"{self.path} is not a sleepctl store (another program's SQLite database)",
            hint="choose another --home; sleepctl never writes into a database it did not make",
        )

    def _pending(self) -> list[int]:
        done = {r[0] for r in self.db.execute("SELECT version FROM schema_migrations")}
        return [v for v in range(1, len(MIGRATIONS) + 1) if v not in done]

    def _check_schema(self) -> None:
        """An older home read by this sleepctl: upgraded once if it is writable, else said so in one line."""
        pending = self._pending()
        if not pending:
            return
        if writable(self.home) and writable(self.path):
            Store(self.path).close()
            return
        raise StoreError(
            f"the home {self.home} is read-only and was written by an older sleepctl: it needs migration"
            f" {', '.join(map(str, pending))} before this version can read it",
            hint="make the home writable and run `sleepctl status` once, or read it with the sleepctl that wrote it",
        )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; IMMEDIATE takes the write lock up front so a waiting writer never half-writes."""
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as e:
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            mapped = _write_error(e, self.path)
            if mapped is not None:
                raise mapped from e
            raise

    def _migrate(self) -> None:
        if self._pending():  # nothing to do: no write lock taken
            with self.transaction() as db:
                _apply_migrations(db, self.home)

    # paths: relative in the store, absolute (under this home) in every record it returns ---------------
    def relative(self, p: str | os.PathLike) -> str:
        return _relative(str(p), self.home)

    def resolve(self, p: str) -> str:
        return str(self.home / p)

    def _one(self, what: str, ref: str, rows: list[sqlite3.Row], label: Callable[[sqlite3.Row], str], hint: str):
        if not rows:
            raise StoreError(f"no {what} {ref!r}", hint=hint)
        if len(rows) > 1:
            shown = ", ".join(label(r) for r in rows[:6]) + (" …" if len(rows) > 6 else "")
            many = {"memory": "memories"}.get(what, what + "s")
            raise StoreError(f"{ref!r} matches {len(rows)} {many}: {shown}", hint="give more characters of the id")
        return rows[0]

    def _by_ref(self, table: str, ref: str, prefix_cols: tuple[str, ...]) -> list[sqlite3.Row]:
        """Exactly, else by a prefix of these columns. instr(), never LIKE or GLOB: `%`, `_`, `*` are literal."""
        if not ref:
            return []
        rows = self.db.execute(f"SELECT * FROM {table} WHERE id=?", (ref,)).fetchall()
        if rows:
            return rows
        where = " OR ".join(f"instr({c}, ?)=1" for c in prefix_cols)
        return self.db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY id", (ref,) * len(prefix_cols)).fetchall()

    # traces ---------------------------------------------------------------------------------
    def has_hash(self, h: str) -> bool:
        return self.db.execute("SELECT 1 FROM traces WHERE hash=?", (h,)).fetchone() is not None

    def insert_trace(self, db: sqlite3.Connection, t: Trace) -> None:
        db.execute(
            "INSERT INTO traces (id, hash, kind, text, messages_json, source, tags_json, status, adapter_id,"
            " redactions, created_at, updated_at, system) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                t.system,
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
        """By id, or by an unambiguous prefix of its id or hash (what a user copies from `list`)."""
        rows = self._by_ref("traces", ref, ("id", "hash"))
        return _trace(self._one("memory", ref, rows, lambda r: r["id"], "sleepctl list shows the ids"))

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

    def forget(self, trace_ids: list[str]) -> None:
        """Memories out with their probes and teacher data, in one transaction; an adapter trained on them moves
        their ids from `trace_ids` to `forgotten` (its weights still hold them). A probe they superseded counts
        again. Their text is zeroed on disk, not left in free pages or in the write-ahead log."""
        self.db.execute("PRAGMA secure_delete=ON")
        rows = [(i,) for i in trace_ids]
        gone = set(trace_ids)
        with self.transaction() as db:
            db.executemany("DELETE FROM examples WHERE trace_id=?", rows)
            db.executemany("UPDATE probes SET superseded_by=NULL WHERE superseded_by=?", rows)
            db.executemany("DELETE FROM probes WHERE trace_id=?", rows)
            db.executemany("DELETE FROM traces WHERE id=?", rows)
            for r in db.execute("SELECT id, trace_ids_json, forgotten_json FROM adapters").fetchall():
                held = json.loads(r["trace_ids_json"])
                if gone & set(held):
                    keep = [i for i in held if i not in gone]
                    forgotten = json.loads(r["forgotten_json"]) + [i for i in held if i in gone]
                    db.execute(
                        "UPDATE adapters SET trace_ids_json=?, forgotten_json=? WHERE id=?",
                        (json.dumps(keep), json.dumps(forgotten), r["id"]),
                    )
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # best effort: a reader elsewhere may hold old frames

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
                (
                    run.id,
                    run.kind,
                    run.status,
                    self.relative(run.dir),
                    run.started_at,
                    run.ended_at,
                    json.dumps(run.summary),
                ),
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
        return [_run(r, self.home) for r in self.db.execute(sql + " ORDER BY id", args)]

    def run(self, ref: str) -> Run:
        """By id or an unambiguous prefix of it."""
        rows = self._by_ref("runs", ref, ("id",))
        return _run(self._one("run", ref, rows, lambda r: r["id"], "sleepctl runs shows them"), self.home)

    def fail_abandoned_runs(self) -> list[str]:
        """Runs left `running` by a process that is gone (killed, or the disk filled before it could say so).
        Only called under the home's sleep lock: every run is made by a job that holds it, so none is alive."""
        if not self.db.execute("SELECT 1 FROM runs WHERE status='running'").fetchone():
            return []
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM runs WHERE status='running'")]
            db.execute("UPDATE runs SET status='failed', ended_at=? WHERE status='running'", (now(),))
        return ids

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
                self.relative(a.path),
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
        return [_adapter(r, cur, self.home) for r in self.db.execute("SELECT * FROM adapters ORDER BY version")]

    def adapter(self, ref: str) -> Adapter:
        """By id, version number ('3' or 'v3'), or an unambiguous prefix of the id."""
        v = ref[1:] if ref.startswith("v") else ref
        rows = self.db.execute("SELECT * FROM adapters WHERE id=?", (ref,)).fetchall()
        if not rows and v.isdigit():
            rows = self.db.execute("SELECT * FROM adapters WHERE version=?", (int(v),)).fetchall()
        if not rows:
            rows = self._by_ref("adapters", ref, ("id",))
        row = self._one(
            "adapter", ref, rows, lambda r: f"v{r['version']} {r['id']}", "sleepctl adapters list shows them"
        )
        return _adapter(row, self.current_adapter_id(), self.home)

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


def _run(r: sqlite3.Row, home: Path) -> Run:
    d = dict(r)
    d["summary"] = json.loads(d.pop("summary_json"))
    d["dir"] = str(home / d["dir"])
    return Run(**d)


def _adapter(r: sqlite3.Row, current: str | None, home: Path) -> Adapter:
    d = dict(r)
    d["trace_ids"] = json.loads(d.pop("trace_ids_json"))
    d["metrics"] = json.loads(d.pop("metrics_json"))
    d["forgotten"] = json.loads(d.pop("forgotten_json", None) or "[]")
    d["current"] = d["id"] == current
    d["path"] = str(home / d["path"])
    return Adapter(**d)


def _apply_migrations(db: sqlite3.Connection, home: Path) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
    done = {r[0] for r in db.execute("SELECT version FROM schema_migrations")}
    for version, m in enumerate(MIGRATIONS, start=1):
        if version in done:
            continue
        if callable(m):
            m(db, home)
        else:
            for stmt in m.split(";"):
                if stmt.strip():
                    db.execute(stmt)
        db.execute("INSERT INTO schema_migrations(version) VALUES (?)", (version,))


def _create(path: Path) -> None:
    """A new store is made under a temporary name and linked into place: no process ever sees a half-made
    `sleepctl.db` (an empty or schemaless one is refused), and of two processes creating one, one wins."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            _apply_migrations(db, path.parent)
            db.execute("COMMIT")
        finally:
            db.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: theirs is used
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(
            f"cannot create the store {path}: {getattr(e, 'strerror', None) or e}",
            hint="is the home writable, with free disk space?",
        ) from e
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


def _private_db(path: Path) -> None:
    """The store and its -wal/-shm (SQLite gives them the store's mode) readable by the owner only."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except OSError:
            pass


def _write_error(e: BaseException, path: Path) -> StoreError | None:
    """A full disk or a read-only home as one line (the write was rolled back: nothing half-stored)."""
    if not isinstance(e, sqlite3.OperationalError):
        return None
    name, msg = getattr(e, "sqlite_errorname", "") or "", str(e)
    if name == "SQLITE_FULL" or "disk is full" in msg:
        return StoreError(
            f"cannot write {path}: the disk is full", hint="free disk space; nothing of this write was stored"
        )
    if name.startswith("SQLITE_READONLY") or "readonly database" in msg:
        return StoreError(f"cannot write {path}: the home is read-only", hint="make it writable, or use a read command")
    return None
