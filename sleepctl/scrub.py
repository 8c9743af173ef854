"""`sleepctl scan` and `sleepctl redact`: what a home already holds that today's redaction rules would redact.

    sleepctl scan                # counts per rule kind and per place; never the credentials themselves
    sleepctl redact              # a dry run: what --apply would rewrite
    sleepctl redact --apply      # rewrite it: store rows in one transaction, files atomically

A home recorded with `--no-redact`, or before a rule existed, holds credentials in its memories (text,
chat messages, source, tags), probes, the store's teacher data (`examples`), run summaries and adapter
metrics, and in files: the `datasets/` cache, `runs/<id>/data.json`, dreams, eval reports, logs. Every
string of a JSON file is checked on its own, so a rewrite keeps the file valid JSON.

Weights cannot be scanned or rewritten: a credential consolidated before it was redacted stays in the
adapter (`sleepctl forget ID --retrain` retrains without the memory).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .home import Home, open_home, sleep_lock
from .ingest import content_hash
from .redact import redact_kinds
from .store import Store

# table -> the columns that hold text from memories (`*_json`: JSON whose strings are checked one by one)
COLUMNS: dict[str, tuple[str, ...]] = {
    "traces": ("text", "messages_json", "system", "source", "tags_json"),
    "probes": ("question", "answer"),
    "examples": ("prompt", "samples_json"),
    "runs": ("summary_json",),
    "adapters": ("metrics_json",),
}
TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ".log", ".csv", ".tmp"}
MAX_FILE_BYTES = 1 << 30
_STORE_FILES = {"sleepctl.db", "sleepctl.db-wal", "sleepctl.db-shm", "sleepctl.db-journal", "sleep.lock"}


class Finding(BaseModel):
    place: str  # a table of the store (store.traces, store.probes, store.examples, ...) or a folder (datasets/)
    ref: str  # the row's id, or the file's path relative to the home
    field: str  # the column; "" for a file
    kinds: dict[str, int]


class ScanReport(BaseModel):
    home: str
    status: str  # clean | found | dry-run | applied
    message: str
    total: int = 0
    by_kind: dict[str, int] = {}
    by_place: dict[str, int] = {}
    findings: list[Finding] = []
    rows: int = 0  # store rows holding any
    files: int = 0  # files holding any
    skipped: list[str] = []  # files that could not be read as text ("path: why")
    merged_probes: int = 0  # with --apply: probes that became the same question of the same memory, kept once


def scan(home: str | os.PathLike | None = None) -> ScanReport:
    """What the home holds that the rules would redact. Reads only: a read-only home works."""
    h = open_home(home)
    with Store(h.db_path, readonly=True) as st:
        rows = _rows(st)
    files, skipped = _files(h)
    return _report(h, rows, files, skipped, "found")


def redact_home(home: str | os.PathLike | None = None, apply: bool = False) -> ScanReport:
    """Without `apply`, a dry run (`scan` by another name). With it, under the home's sleep lock (no seed, dream
    or forget writes meanwhile): new file contents are written beside the old ones first, then every store row
    changes in one transaction, then the files are swapped in, and the store file is rebuilt (also when
    nothing was found: a home cleaned by hand keeps old values in free pages). A failure before the commit
    changes nothing."""
    if not apply:
        report = scan(home)
        if report.total:
            report.status = "dry-run"
            report.message = "would redact " + report.message.removeprefix("found ")
        return report
    h = open_home(home)
    with sleep_lock(h, "redact"), Store(h.db_path) as st:
        rows = _rows(st)
        files, skipped = _files(h)
        report = _report(h, rows, files, skipped, "applied")
        temps: list[tuple[Path, Path]] = []
        try:
            for path, new, _ in files:
                temps.append((_write_temp(path, new), path))
            report.merged_probes = _update_rows(st, rows) if rows else 0
        except BaseException:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, path in temps:
            os.replace(tmp, path)
        if report.total:
            report.message = "redacted " + report.message.removeprefix("found ")
        try:
            # Old values also sit in free pages (rows an earlier night deleted) and in the write-ahead log:
            # rebuilding the file and emptying the log leaves only what the store now holds.
            st.db.execute("VACUUM")
            st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            report.message += f"; the store file was not compacted ({e}): run `sleepctl redact --apply` again later"
    return report


# --- the store ----------------------------------------------------------------------------------------------

Row = tuple[str, Any, dict[str, Any], dict[str, Counter[str]]]  # table, id, new values, kinds per column


def _rows(st: Store) -> list[Row]:
    out: list[Row] = []
    for table, cols in COLUMNS.items():
        for r in st.db.execute(f"SELECT id, {', '.join(cols)} FROM {table} ORDER BY id"):
            new: dict[str, Any] = {}
            found: dict[str, Counter[str]] = {}
            for c in cols:
                if r[c] is None:
                    continue
                value, kinds = _clean_json_text(r[c]) if c.endswith("_json") else redact_kinds(r[c])
                if kinds:
                    new[c], found[c] = value, kinds
            if found:
                out.append((table, r["id"], new, found))
    return out


def _update_rows(st: Store, rows: list[Row]) -> int:
    """One transaction; old values are zeroed on disk (secure_delete), not left in free pages."""
    st.db.execute("PRAGMA secure_delete=ON")
    merged = 0
    with st.transaction() as db:
        for table, rid, new, found in rows:
            sets = dict(new)
            if table == "traces":
                old = db.execute("SELECT kind, text, redactions FROM traces WHERE id=?", (rid,)).fetchone()
                text = new.get("text", old["text"])
                h = content_hash(old["kind"], text)
                if db.execute("SELECT 1 FROM traces WHERE hash=? AND id<>?", (h, rid)).fetchone():
                    h = content_hash(old["kind"], f"{text}\n{rid}")  # redacted into another memory's twin
                sets |= {"hash": h, "redactions": old["redactions"] + sum(k.total() for k in found.values())}
            if table == "probes" and "question" in new:
                p = db.execute("SELECT trace_id FROM probes WHERE id=?", (rid,)).fetchone()
                twin = "SELECT 1 FROM probes WHERE trace_id=? AND question=? AND id<>?"
                if db.execute(twin, (p["trace_id"], new["question"], rid)).fetchone():
                    db.execute("UPDATE probes SET superseded_by=NULL WHERE superseded_by=?", (rid,))
                    db.execute("DELETE FROM probes WHERE id=?", (rid,))
                    merged += 1
                    continue
            assignments = ", ".join(f"{c}=?" for c in sets)
            db.execute(f"UPDATE {table} SET {assignments} WHERE id=?", (*sets.values(), rid))
    return merged


# --- files --------------------------------------------------------------------------------------------------

FileChange = tuple[Path, bytes, Counter[str]]


def _files(h: Home) -> tuple[list[FileChange], list[str]]:
    """Every text file under the home, symlinks neither followed nor read (a planted link must not make
    `--apply` rewrite a file outside the home)."""
    out: list[FileChange] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(h.root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.parent == h.root and name in _STORE_FILES or p.suffix.lower() not in TEXT_SUFFIXES:
                continue
            rel = p.relative_to(h.root).as_posix()
            try:
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_size > MAX_FILE_BYTES:
                    skipped.append(f"{rel}: over {MAX_FILE_BYTES >> 20} MiB")
                    continue
                text = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(f"{rel}: not UTF-8")
                continue
            except OSError as e:
                skipped.append(f"{rel}: {e.strerror}")
                continue
            new, kinds = _clean_file(p.suffix.lower(), text)
            if kinds:
                out.append((p, new.encode(), kinds))
    return out, skipped


def _clean_file(suffix: str, text: str) -> tuple[str, Counter[str]]:
    if suffix == ".json":
        return _clean_json_text(text)
    if suffix == ".jsonl":
        lines, total = [], Counter()
        for line in text.split("\n"):
            new, kinds = _clean_json_text(line) if line.strip() else (line, Counter())
            lines.append(new)
            total += kinds
        return "\n".join(lines), total
    return redact_kinds(text)


def _clean_json_text(text: str) -> tuple[str, Counter[str]]:
    """JSON with every string redacted on its own (keys too), written back as it was laid out; text that is not
    JSON is redacted as text."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return redact_kinds(text)
    total: Counter[str] = Counter()

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            new, kinds = redact_kinds(x)
            total.update(kinds)
            return new
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        return x

    try:
        new = walk(obj)
    except RecursionError:
        return redact_kinds(text)
    if not total:
        return text, total
    indent = 2 if text.lstrip()[1:2] == "\n" else None  # as the writers of this home lay JSON out
    return json.dumps(new, indent=indent) + ("\n" if text.endswith("\n") else ""), total


def _write_temp(path: Path, data: bytes) -> Path:
    """The new content beside the file, with its mode, on disk before anything is swapped in."""
    tmp = path.with_name(f".{path.name}.redact.tmp")
    tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


# --- the report ---------------------------------------------------------------------------------------------


def _report(h: Home, rows: list[Row], files: list[FileChange], skipped: list[str], status: str) -> ScanReport:
    findings = [
        Finding(place=f"store.{table}", ref=str(rid), field=c, kinds=dict(k))
        for table, rid, _, found in rows
        for c, k in found.items()
    ]
    for path, _, kinds in files:
        rel = path.relative_to(h.root)
        place = f"{rel.parts[0]}/" if len(rel.parts) > 1 else "./"
        findings.append(Finding(place=place, ref=rel.as_posix(), field="", kinds=dict(kinds)))
    by_kind: Counter[str] = Counter()
    by_place: Counter[str] = Counter()
    for f in findings:
        by_kind.update(f.kinds)
        by_place[f.place] += sum(f.kinds.values())
    total = by_kind.total()
    r = ScanReport(
        home=str(h.root),
        status=status if total else "clean",
        message="",
        total=total,
        by_kind=dict(by_kind.most_common()),
        by_place=dict(by_place.most_common()),
        findings=findings,
        rows=len(rows),
        files=len(files),
        skipped=skipped,
    )
    where = ", ".join(f"{p} {n}" for p, n in by_place.most_common())
    r.message = (
        f"found {total} credentials in {len(rows)} store rows and {len(files)} files ({where})"
        if total
        else "nothing to redact: no stored field or file holds what the rules find"
    )
    return r
