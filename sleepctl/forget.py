"""`forget`: memories taken out of the home, and, with `retrain`, out of the current adapter's weights.

    sleepctl forget m_1a2b3c --dry-run        # what would go
    sleepctl forget --match "Kestrel" --yes   # every memory whose text contains it (plain, any case)
    sleepctl forget m_1a2b3c --retrain        # and consolidate the rest into a fresh adapter, made current

A forgotten memory goes with its probes, its teacher data (the store's `examples`, and the `datasets/`
cache files that hold any of it) and the entries that name it in run files (`runs/<id>/data.json`,
dreams, eval reports). Weights cannot be edited: every adapter trained on it keeps its id in `forgotten`
(`adapters list` shows it). `retrain` consolidates the current stack's remaining memories into one fresh
adapter on the plain base (consolidate.py), made current whatever the gate says; `adapters prune` then
deletes the old ones outside the current lineage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .adapters import lineage, set_current
from .engines import release_engines
from .errors import UsageError
from .home import Home, open_home, sleep_lock, write_atomic
from .runs import sweep
from .store import Store


class ForgetResult(BaseModel):
    status: str  # dry-run | done | nothing
    message: str
    exit_code: int = 0
    memories: list[str] = []  # ids forgotten (or, in a dry run, that would be)
    probes: int = 0
    examples: int = 0
    datasets: list[str] = []  # cache files deleted, relative to the home
    run_files: list[str] = []  # run files rewritten without their entries
    adapters: list[str] = []  # versions (v2) marked as holding forgotten memories
    current_holds_forgotten: bool = False  # the current stack's weights still hold forgotten memories
    retrain: dict[str, Any] | None = None  # the consolidation's result, with `retrain`


def forget(
    ids: list[str] | None = None,
    *,
    match: str | None = None,
    home: str | os.PathLike | None = None,
    dry_run: bool = False,
    retrain: bool = False,
    recipe: str | None = None,
    overrides: dict | None = None,
    show_progress: bool = True,
    keep_engines: bool = False,
) -> ForgetResult:
    """Forget memories by id (or unambiguous prefix) or by `match`, a plain case-insensitive substring of
    their text. With neither, `retrain` alone retrains a stack that still holds forgotten memories.
    Holds the home's sleep lock: no seed, dream or consolidation runs on them meanwhile."""
    if ids and match is not None:
        raise UsageError("give memory ids or --match, not both")
    if match is not None and not match.strip():
        raise UsageError("--match needs some text")
    h = open_home(home)
    if dry_run:  # a read: no lock, no write, a read-only home works
        with Store(h.db_path, readonly=True) as st:
            return _forget(h, st, ids or [], match, dry_run=True)
    try:
        with sleep_lock(h, "forget"), Store(h.db_path) as st:
            sweep(h, st)
            res = ForgetResult(status="retrain", message="")
            if ids or match is not None:
                res = _forget(h, st, ids or [], match, dry_run=False)
            if retrain:
                _retrain(h, st, res, recipe, overrides, show_progress)
            res.current_holds_forgotten = any(a.forgotten for a in lineage(st, st.current_adapter_id()))
    finally:
        if not keep_engines:
            release_engines()
    if res.current_holds_forgotten and res.retrain is None:
        res.message += "; the current adapter's weights still hold forgotten memories: `sleepctl forget --retrain`"
    res.message = res.message.removeprefix("; ")
    return res


def _forget(h: Home, st: Store, refs: list[str], match: str | None, dry_run: bool) -> ForgetResult:
    if match is not None:
        needle = match.casefold()
        ids = [t.id for t in st.traces() if needle in t.text.casefold()]
    else:
        ids = list(dict.fromkeys(st.trace(r).id for r in refs))  # an unknown id fails here, before anything goes
    if not ids:
        what = f"no memory contains {match!r}" if match is not None else "no memory given"
        return ForgetResult(status="nothing", message=f"nothing to forget: {what}")
    gone = set(ids)
    q = ",".join("?" * len(ids))
    count = lambda sql: st.db.execute(sql.format(q), ids).fetchone()[0]  # noqa: E731
    res = ForgetResult(
        status="dry-run" if dry_run else "done",
        message="",
        memories=ids,
        probes=count("SELECT COUNT(*) FROM probes WHERE trace_id IN ({})"),
        examples=count("SELECT COUNT(*) FROM examples WHERE trace_id IN ({})"),
        adapters=[f"v{a.version}" for a in st.adapters() if gone & set(a.trace_ids)],
    )
    datasets = [p for p in _json_files(h.datasets_dir) if _names(_load(p), gone)]
    run_files = [p for d in (h.runs_dir, h.root / "evals") for p in _json_files(d, nested=True)]
    run_files = [p for p in run_files if _names(_load(p), gone)]
    res.datasets = [str(p.relative_to(h.root)) for p in datasets]
    res.run_files = [str(p.relative_to(h.root)) for p in run_files]
    what = f"{len(ids)} memories, {res.probes} probes, {res.examples} teacher examples"
    marked = f"; adapters {', '.join(res.adapters)} marked as holding forgotten memories" if res.adapters else ""
    if dry_run:
        res.message = f"would forget {what}, {len(datasets)} cache files and entries in {len(run_files)} run files"
        res.message += marked.replace("marked", "would be marked")
        return res
    # Files first: a crash between the two leaves memories whose copies are already gone (forget them again),
    # never forgotten memories whose copies remain.
    for p in datasets:
        p.unlink(missing_ok=True)
    for p in run_files:
        _write_json(p, _scrub(_load(p), gone))
    st.forget(ids)
    res.message = f"forgot {what}, {len(datasets)} cache files and entries in {len(run_files)} run files{marked}"
    return res


def _retrain(h: Home, st: Store, res: ForgetResult, recipe: str | None, overrides: dict | None, show: bool) -> None:
    """Consolidate the current stack's remaining memories into a fresh adapter, if that stack holds any
    forgotten one; with nothing left to hold, the base model becomes current."""
    from .consolidate import consolidate_locked
    from .evaluate import job_recipe

    current = st.current_adapter_id()
    stack = lineage(st, current)
    if not any(a.forgotten for a in stack):
        res.message += "; the current adapter holds no forgotten memory: nothing to retrain"
        return
    if not st.traces(status="consolidated"):
        set_current(st, None)
        res.retrain = {"status": "base", "message": "no memory of the current stack remains: the base model is current"}
        res.message += "; " + res.retrain["message"]
        return
    cfg = job_recipe(st, recipe, overrides, st.adapter(current))
    c = consolidate_locked(cfg, h, st, if_needed=False, show_progress=show, retrain=True)
    res.retrain = c.model_dump()
    res.exit_code = c.exit_code
    res.message += "; " + c.message


# --- files that name memories ------------------------------------------------------------------------------


def _json_files(d: Path, nested: bool = False) -> list[Path]:
    """`d/*.json`, or `d/*/*.json` for run and eval folders (their checkpoints hold no memory text)."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*/*.json" if nested else "*.json") if p.is_file() and not p.is_symlink())


def _load(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None  # a torn or foreign file: left as it is


def _names(obj: Any, ids: set[str]) -> bool:
    return _scrub(obj, ids) != obj


def _scrub(obj: Any, ids: set[str]) -> Any:
    """`obj` without what names a forgotten memory: list items whose `trace_id` is one, keys that are one."""
    if isinstance(obj, list):
        return [_scrub(x, ids) for x in obj if not (isinstance(x, dict) and x.get("trace_id") in ids)]
    if isinstance(obj, dict):
        return {k: _scrub(v, ids) for k, v in obj.items() if k not in ids}
    return obj


def _write_json(p: Path, obj: Any) -> None:
    indent = 2 if p.read_text()[:2] == "{\n" else None  # as it was written
    write_atomic(p, json.dumps(obj, indent=indent))
