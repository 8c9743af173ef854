"""The home as state (issue 14): relative paths, read-only homes, no store made by reading, ids matched
exactly, debris swept after a full disk, private permissions, and `forget`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sleepctl import record
from sleepctl.errors import LockedError, SleepError, StoreError
from sleepctl.forget import forget
from sleepctl.memories import open_store
from sleepctl.records import Adapter, Run
from sleepctl.seed import seed
from sleepctl.store import APP_ID, MIGRATIONS, Store, now

from .conftest import EXAMPLES, cli, cli_json, write_recipe

FAST = {"training": {"max_steps": 2, "checkpoint_every": 2}, "consolidate": {"max_steps": 2, "steps_per_memory": 1.0}}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, tiny_dir) -> tuple[Path, Path]:
    """A home with three memories seeded into v1, made under umask 022. Tests copy it; none changes it."""
    root = tmp_path_factory.mktemp("seeded")
    recipe = write_recipe(root / "r.yaml", tiny_dir, **FAST)
    mem = root / "three.jsonl"
    mem.write_text("\n".join(EXAMPLES.read_text().splitlines()[:3]) + "\n")
    old = os.umask(0o022)
    try:
        record([mem], home=root / "home")
        seed(str(recipe), home=root / "home", show_progress=False)
    finally:
        os.umask(old)
    return root / "home", recipe


def _copy(seeded, tmp_path: Path, name: str = "home") -> Path:
    return Path(shutil.copytree(seeded[0], tmp_path / name, symlinks=True))


def _snapshot(root: Path, sqlite_working_files: bool = True) -> dict[str, tuple]:
    """Every path under root with its mode, mtime, size and content hash: what a write would change."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        if not sqlite_working_files and p.name.endswith(("-wal", "-shm")):
            continue
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        mtime = None if (p == root and not sqlite_working_files) else st.st_mtime_ns
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), mtime, st.st_size, digest)
    return out


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, dirs if p.is_dir() else files)


def _errors(r: subprocess.CompletedProcess) -> list[str]:
    """The error lines on stderr; a traceback anywhere fails the caller."""
    text = r.stderr.decode()
    assert "Traceback" not in text, text
    return [x for x in text.splitlines() if x.startswith("error")]


def _legacy_home(home: Path, runs: dict[str, str], adapters: dict[str, str]) -> Path:
    """A store as sleepctl wrote it before issue 14: schema 2, absolute paths, files 0644."""
    (home / "runs").mkdir(parents=True)
    db = sqlite3.connect(home / "sleepctl.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
    for version, sql in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(sql)
        db.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
    for rid, d in runs.items():
        db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?)", (rid, "seed", "done", d, now(), now(), "{}"))
    for i, (aid, p) in enumerate(adapters.items(), start=1):
        db.execute(
            "INSERT INTO adapters (id, version, run_id, kind, base_model, parent_id, path, trace_ids_json, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (aid, i, next(iter(runs)), "seed", "m", None, p, "[]", now()),
        )
    db.close()
    os.chmod(home / "sleepctl.db", 0o644)
    os.chmod(home, 0o755)
    return home


# --- paths relative to the home ------------------------------------------------------------------------------


def test_a_copied_home_writes_into_its_own_folders(seeded, tmp_path):
    original = seeded[0]
    db = sqlite3.connect(f"file:{original / 'sleepctl.db'}?mode=ro", uri=True)
    assert all(d.startswith("runs/") for (d,) in db.execute("SELECT dir FROM runs"))
    assert all(p.startswith("adapters/v001-") for (p,) in db.execute("SELECT path FROM adapters"))
    db.close()
    before = _snapshot(original)
    copy = _copy(seeded, tmp_path, "copy")
    record(text="Ilse renamed the Kestrel build server to Osprey.", home=copy)
    res = seed(str(seeded[1]), home=copy, show_progress=False)
    assert res.adapter_version == 2 and Path(res.run_dir).parent == copy / "runs"
    with open_store(copy) as st:
        assert all(Path(r.dir).parent == copy / "runs" for r in st.runs())
        assert all(Path(a.path).parent == copy / "adapters" and Path(a.path).exists() for a in st.adapters())
    assert _snapshot(original) == before  # the original home was not written


def test_a_moved_home_keeps_working(seeded, tmp_path):
    from sleepctl.adapters import lineage, stack_lora

    moved = Path(shutil.move(_copy(seeded, tmp_path, "here"), tmp_path / "there"))
    with open_store(moved) as st:
        stack = lineage(st, st.current_adapter_id())
        assert stack_lora(stack) is not None  # the adapter files are found where the home now is
        assert Path(st.runs()[0].dir).parent == moved / "runs"
    runs = cli_json("runs", "--home", str(moved))
    assert Path(runs[0]["dir"]).is_dir()
    # the next job's sweep knows the moved adapters and runs as registered: nothing of them is removed
    r = cli("consolidate", "--recipe", str(seeded[1]), "--home", str(moved))
    assert r.returncode == 0 and b"the current stack is one adapter" in r.stdout, r.stderr
    assert Path(stack[0].path).is_dir() and Path(runs[0]["dir"]).is_dir()


def test_an_older_home_with_absolute_paths_is_migrated(tmp_path):
    home = tmp_path / "h"
    _legacy_home(
        home,
        runs={
            "seed_01": str(home / "runs" / "seed_01"),  # written here
            "seed_02": "/old/place/home/runs/seed_02",  # written before the home was moved
            "seed_03": "relative-home/runs/seed_03",  # written with a relative --home
            "seed_04": "/srv/shared/elsewhere",  # not the home's own: kept as it was
        },
        adapters={"a_01": str(home / "adapters" / "v001-a_01"), "a_02": "/old/place/home/adapters/v002-a_02"},
    )
    (home / "runs" / "seed_01").mkdir()
    (home / "runs" / "seed_01" / "recipe.yaml").write_text("x")
    os.chmod(home / "runs" / "seed_01" / "recipe.yaml", 0o644)
    with open_store(home) as st:
        dirs = {r.id: r.dir for r in st.runs()}
        assert [r[0] for r in st.db.execute("SELECT version FROM schema_migrations")] == [1, 2, 3, 4, 5]
        assert st.db.execute("PRAGMA application_id").fetchone()[0] == APP_ID
        stored = dict(st.db.execute("SELECT id, dir FROM runs").fetchall())
        assert "system" in {r[1] for r in st.db.execute("PRAGMA table_info(traces)")}  # migration 5
        paths = {a.id: a.path for a in st.adapters()}
    assert stored == {
        "seed_01": "runs/seed_01",
        "seed_02": "runs/seed_02",
        "seed_03": "runs/seed_03",
        "seed_04": "/srv/shared/elsewhere",
    }
    assert dirs["seed_02"] == str(home / "runs" / "seed_02") and dirs["seed_04"] == "/srv/shared/elsewhere"
    assert paths == {"a_01": str(home / "adapters" / "v001-a_01"), "a_02": str(home / "adapters" / "v002-a_02")}
    for p in [home, *home.rglob("*")]:  # an older home was written world-readable: the migration closes it
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


# --- read-only homes, and reading creates nothing ---------------------------------------------------------------


def test_read_commands_work_on_a_read_only_home_and_write_nothing(seeded, tmp_path):
    home = _copy(seeded, tmp_path)
    with open_store(home, readonly=True) as st:
        mid = st.traces()[0].id
    _chmod_tree(home, 0o500, 0o400)  # as root, chmod restricts nothing: sleepctl honours the bits itself
    try:
        before = _snapshot(home)
        for args in (
            ["status"],
            ["list"],
            ["list", "--json"],
            ["show", mid],
            ["adapters", "list"],
            ["adapters", "list", "--json"],
            ["runs"],
            ["forget", "--match", "Kestrel", "--dry-run"],
        ):
            r = cli(*args, "--home", str(home))
            assert r.returncode == 0 and not _errors(r), (args, r.stderr)
        assert _snapshot(home) == before  # not a byte, not a file, not a mode changed
        r = cli("record", "--text", "one more", "--home", str(home))
        assert r.returncode == 1 and len(_errors(r)) == 1 and "not writable" in _errors(r)[0]
        r = cli("adapters", "use", "v1", "--home", str(home))
        assert r.returncode == 1 and "read-only" in _errors(r)[0]
        assert _snapshot(home) == before
    finally:
        _chmod_tree(home, 0o700, 0o600)


def test_a_read_only_home_that_needs_a_migration_says_so(tmp_path):
    ro = _legacy_home(tmp_path / "ro", runs={"seed_01": str(tmp_path / "ro" / "runs" / "seed_01")}, adapters={})
    _chmod_tree(ro, 0o500, 0o400)
    try:
        before = _snapshot(ro)
        r = cli("status", "--home", str(ro))
        assert r.returncode == 1 and len(_errors(r)) == 1
        assert "read-only" in _errors(r)[0] and "migration 3, 4, 5" in _errors(r)[0]
        assert _snapshot(ro) == before
    finally:
        _chmod_tree(ro, 0o700, 0o600)
    rw = _legacy_home(tmp_path / "rw", runs={"seed_01": str(tmp_path / "rw" / "runs" / "seed_01")}, adapters={})
    assert cli_json("status", "--home", str(rw))["runs"] == 1  # a writable one is upgraded once, then read
    with Store(rw / "sleepctl.db", readonly=True) as st:
        assert st.runs()[0].dir == str(rw / "runs" / "seed_01")


def test_reading_never_creates_or_adopts_a_store(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["status"], ["list"], ["show", "m_1"], ["adapters", "list"], ["runs"], ["forget", "--match", "x"]):
        r = cli(*args, "--home", str(empty))
        assert r.returncode == 1 and len(_errors(r)) == 1 and "no sleepctl home" in _errors(r)[0], (args, r.stderr)
    assert list(empty.iterdir()) == []
    r = cli("status", "--home", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and not (tmp_path / "nowhere").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    db = sqlite3.connect(foreign / "sleepctl.db")
    db.execute("CREATE TABLE notes (body TEXT)")
    db.execute("INSERT INTO notes VALUES ('not yours')")
    db.commit()
    db.close()
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "sleepctl.db").touch()
    for home, why in ((foreign, "not a sleepctl store"), (zero, "is empty")):
        before = _snapshot(home)
        for args in (
            ["status"],
            ["list"],
            ["record", "--text", "adopt me"],
            ["adapters", "use", "v1"],
            ["forget", "--match", "x", "--yes"],
        ):
            r = cli(*args, "--home", str(home))
            assert r.returncode == 1 and len(_errors(r)) == 1 and why in _errors(r)[0], (args, r.stderr)
        assert _snapshot(home) == before  # never written, never migrated, nothing made beside it
    r = cli("record", "--text", "a first memory", "--home", str(empty))  # writing makes a home
    assert r.returncode == 0
    with Store(empty / "sleepctl.db", readonly=True) as st:
        assert st.db.execute("PRAGMA application_id").fetchone()[0] == APP_ID and st.counts()["pending"] == 1


# --- ids -----------------------------------------------------------------------------------------------------------


def test_ids_match_exactly_or_by_an_unambiguous_prefix_never_a_pattern(home, small_memories):
    record([small_memories], home=home)
    with open_store(home) as st:
        ts = st.traces()
        with st.transaction() as db:
            for v, aid in enumerate(["a_00aa11", "a_00aa22"], start=1):
                path = str(home / "adapters" / f"v{v:03d}-{aid}")
                st.insert_adapter(
                    db,
                    Adapter(
                        id=aid,
                        version=v,
                        run_id="seed_00ab1",
                        kind="seed",
                        base_model="m",
                        parent_id=None,
                        path=path,
                        trace_ids=[],
                        created_at=now(),
                    ),
                )
        for rid in ("seed_00ab1", "seed_00ab2"):
            st.insert_run(Run(id=rid, kind="seed", status="done", dir=str(home / "runs" / rid), started_at=now()))
        for ref in ("%", "_", "m%", "m_%", "*", ""):
            with pytest.raises(StoreError, match="no memory"):
                st.trace(ref)
        with pytest.raises(StoreError, match=r"'m_' matches 3 memories: m_"):
            st.trace("m_")
        assert st.trace(ts[1].id).id == ts[1].id
        assert st.trace(ts[1].id[:-1]).id == ts[1].id
        assert st.trace(ts[1].hash[:12]).id == ts[1].id
        for ref in ("%", "seed_00ab_", "seed%", "_eed_00ab1"):  # LIKE took `_` and `%` as wildcards
            with pytest.raises(StoreError, match="no run"):
                st.run(ref)
        with pytest.raises(StoreError, match="matches 2 runs: seed_00ab1, seed_00ab2"):
            st.run("seed_00ab")
        assert st.run("seed_00ab2").id == "seed_00ab2"
        with pytest.raises(StoreError, match="matches 2 adapters: v1 a_00aa11, v2 a_00aa22"):
            st.adapter("a_00aa")
        assert st.adapter("v2").id == st.adapter("2").id == st.adapter("a_00aa2").id == "a_00aa22"
    for args in (["adapters", "use", "%"], ["adapters", "use", "a__0aa11"], ["show", "%"], ["eval", "%"]):
        r = cli(*args, "--home", str(home))
        assert r.returncode == 1 and len(_errors(r)) == 1 and "no " in _errors(r)[0], (args, r.stderr)
    r = cli("adapters", "use", "a_00aa", "--home", str(home))
    assert r.returncode == 1 and "v1 a_00aa11, v2 a_00aa22" in _errors(r)[0]
    r = cli("probe", "add", "m%", "-q", "q?", "-a", "a", "--home", str(home))
    assert r.returncode == 1 and "no memory 'm%'" in _errors(r)[0]
    assert cli_json("adapters", "use", "a_00aa1", "--home", str(home))["current"]["version"] == 1


# --- a full disk ------------------------------------------------------------------------------------------------


def test_disk_full_while_publishing_leaves_debris_the_next_start_sweeps(seeded, tmp_path, monkeypatch):
    home = _copy(seeded, tmp_path)
    record(text="The Halberd API moved its on-call handbook to the wiki.", home=home)
    with open_store(home) as st:
        memories = sorted(t.id for t in st.traces())
        v1 = st.adapters()[0]
    v1_files = _snapshot(Path(v1.path))

    def full(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "insert_adapter", full)  # the adapter folder is in place, its row cannot be written
    monkeypatch.setattr(Store, "update_run", full)  # and the run cannot be marked failed either
    with pytest.raises(SleepError, match="disk is full") as e:
        seed(str(seeded[1]), home=home, show_progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    with open_store(home) as st:
        failed = st.runs("seed")[-1]
        assert failed.status == "running" and st.counts()["adapters"] == 1
    unregistered = [p for p in (home / "adapters").iterdir() if p.name.startswith("v002-")]
    assert len(unregistered) == 1
    planted = [
        home / "adapters" / ".tmp-a_0dead",
        Path(failed.dir) / "checkpoints" / ".tmp-step-000099",
        home / "runs" / "seed_0000dead",  # a run folder whose row was never written
        home / "datasets" / "0123abcd.tmp",
    ]
    for p in planted:
        p.mkdir(parents=True) if not p.name.endswith(".tmp") else p.write_text("{")

    # the next start of a job that publishes (here one with nothing to do) sweeps, under the sleep lock
    r = cli("consolidate", "--recipe", str(seeded[1]), "--home", str(home))
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in [*unregistered, *planted])
    with open_store(home) as st:
        assert st.run(failed.id).status == "failed"
        assert sorted(t.id for t in st.traces()) == memories  # every stored thing survived
        assert [a.id for a in st.adapters()] == [v1.id] and st.current_adapter_id() == v1.id
    assert _snapshot(Path(v1.path)) == v1_files
    assert Path(failed.dir, "data.json").exists()
    res = seed(str(seeded[1]), home=home, show_progress=False)  # the same command resumes the failed run
    assert res.run_id == failed.id and res.adapter_version == 2
    with open_store(home) as st:
        assert st.run(failed.id).status == "done" and st.counts()["pending"] == 0


DISK_FULL_DRIVER = """
import errno, sys
import sleepctl.loop as loop
from sleepctl.cli import main

def full(rf, step, *a, **kw):
    (rf.ckpt_dir / f".tmp-step-{step:06d}").mkdir(parents=True, exist_ok=True)
    raise OSError(errno.ENOSPC, "No space left on device")

loop.save_checkpoint = full
sys.argv = ["sleepctl", *sys.argv[1:]]
main()
"""


def test_disk_full_writing_a_checkpoint_is_one_line_and_fails_the_run(seeded, tmp_path):
    home = _copy(seeded, tmp_path)
    record(text="Dana moved the Marrow review to Thursday.", home=home)
    driver = tmp_path / "driver.py"
    driver.write_text(DISK_FULL_DRIVER)
    r = subprocess.run(
        [
            sys.executable,
            str(driver),
            "seed",
            "-r",
            str(seeded[1]),
            "--set",
            "training.checkpoint_every=1",
            "--home",
            home,
        ],
        capture_output=True,
        env=dict(os.environ, COLUMNS="200"),
        timeout=600,
    )
    errors = _errors(r)
    assert r.returncode == 1 and len(errors) == 1 and "No space left on device" in errors[0], r.stderr
    with open_store(home) as st:
        run = st.runs("seed")[-1]
    assert run.status == "failed"
    assert list(Path(run.dir, "checkpoints").glob(".tmp-*"))
    r = cli("consolidate", "--recipe", str(seeded[1]), "--home", str(home))
    assert r.returncode == 0 and not list(Path(run.dir, "checkpoints").glob(".tmp-*"))


# --- permissions -------------------------------------------------------------------------------------------------


def test_home_is_private_whatever_the_umask(seeded, tmp_path):
    home = seeded[0]  # recorded and seeded under umask 022
    kinds = {p.relative_to(home).parts[0] for p in home.rglob("*")}
    assert {"sleepctl.db", "runs", "adapters", "datasets", "logs", "sleep.lock"} <= kinds
    for p in [home, *home.rglob("*")]:
        assert stat.S_IMODE(p.lstat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh"
        record(text="A new home under umask 022.", home=fresh)
        with open_store(fresh, readonly=True):  # the SQLite working files, made by a reader, too
            for p in [fresh, *fresh.rglob("*")]:
                assert stat.S_IMODE(p.lstat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    finally:
        os.umask(old)


# --- forget -------------------------------------------------------------------------------------------------------


def _holding(home: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_forget_removes_a_memory_from_every_file_and_marks_its_adapter(seeded, tmp_path):
    home = _copy(seeded, tmp_path)
    with open_store(home) as st:
        victim = next(t for t in st.traces() if "Quillfeather" in t.text)
        others = sorted(t.id for t in st.traces() if t.id != victim.id)
        run = st.runs("seed")[0]
    report = Path(run.dir) / "eval.json"  # an eval report quoting its probe
    report.write_text(
        json.dumps(
            {"methods": [{"results": [{"trace_id": victim.id, "question": "Who is Quillfeather?"}]}], "n": 1},
            indent=2,
        )
    )
    where = _holding(home, b"Quillfeather")
    assert "sleepctl.db" in where and f"runs/{run.id}/data.json" in where
    assert any(x.startswith("datasets/") for x in where)

    stored = _snapshot(home, sqlite_working_files=False)
    r = cli("forget", victim.id, "--home", str(home))  # no --yes and no terminal to ask on
    assert r.returncode == 2 and "--yes" in _errors(r)[0]
    plan = cli_json("forget", victim.id[:-1], "--dry-run", "--home", str(home))
    assert plan["status"] == "dry-run" and plan["memories"] == [victim.id] and plan["adapters"] == ["v1"]
    assert plan["probes"] >= 1 and plan["examples"] >= 1 and len(plan["datasets"]) == 1
    assert f"runs/{run.id}/data.json" in plan["run_files"] and f"runs/{run.id}/eval.json" in plan["run_files"]
    assert _snapshot(home, sqlite_working_files=False) == stored  # asking and a dry run changed nothing

    r = cli("forget", victim.id, "--yes", "--home", str(home))
    assert r.returncode == 0 and not _errors(r), r.stderr
    assert b"forgot 1 memories" in r.stdout and b"forget --retrain" in r.stdout
    assert _holding(home, b"Quillfeather") == []  # not in the store, its free pages or its log; not in any file
    with open_store(home) as st:
        assert sorted(t.id for t in st.traces()) == others
        assert not [p for p in st.probes() if p.trace_id == victim.id]
        assert set(st.examples([victim.id, *others])) == set(others)  # the others keep their teacher data
    data = json.loads((Path(run.dir) / "data.json").read_text())
    assert {e["trace_id"] for e in data["examples"]} == set(others)
    assert json.loads(report.read_text())["methods"][0]["results"] == []
    ads = cli_json("adapters", "list", "--home", str(home))
    assert ads[0]["forgotten"] == [victim.id] and sorted(ads[0]["trace_ids"]) == others
    r = cli("list", "--home", str(home))
    assert r.returncode == 0 and b"since forgotten" in r.stderr

    r = cli("forget", victim.id, "--yes", "--home", str(home))
    assert r.returncode == 1 and len(_errors(r)) == 1 and "no memory" in _errors(r)[0]
    from sleepctl.home import open_home, sleep_lock

    with sleep_lock(open_home(home), "seed"), pytest.raises(LockedError):
        forget(others[:1], home=home)


def test_forget_match_is_plain_text_in_any_case(home):
    record(text="The budget is 100% approved for Zed.", home=home)
    record(text="The budget is 1000 approved for Zed.", home=home)
    record(text="Nothing about budgets here.", home=home)
    assert forget(match="1_0", home=home).status == "nothing"  # `_` is a character, not a wildcard
    res = forget(match="100%", home=home)
    assert res.status == "done" and len(res.memories) == 1
    res = forget(match="zED", home=home, dry_run=True)
    assert res.status == "dry-run" and len(res.memories) == 1
    assert forget(match="zed", home=home).status == "done"
    assert [t.text for t in open_store(home, readonly=True).traces()] == ["Nothing about budgets here."]
    with pytest.raises(SleepError, match="not both"):
        forget(["m_1"], match="x", home=home)


def test_forget_retrain_consolidates_the_rest_into_a_current_adapter(seeded, tmp_path):
    home = _copy(seeded, tmp_path)
    with open_store(home) as st:
        victim = next(t for t in st.traces() if "Quillfeather" in t.text)
        others = sorted(t.id for t in st.traces() if t.id != victim.id)
        v1 = st.current_adapter_id()
    res = forget([victim.id], home=home, retrain=True, recipe=str(seeded[1]), show_progress=False)
    assert res.exit_code == 0 and res.retrain["made_current"] and not res.current_holds_forgotten
    assert res.retrain["init_kept"] is None  # a stack that knows the forgotten memory is never a starting point
    with open_store(home) as st:
        cur = st.adapter(st.current_adapter_id())
        assert cur.kind == "consolidate" and cur.replaces == v1 and cur.parent_id is None
        assert sorted(cur.trace_ids) == others and cur.forgotten == []
        assert st.adapter(v1).forgotten == [victim.id]
        data = json.loads((Path(st.run(cur.run_id).dir) / "data.json").read_text())
    assert set(data) == set(others)  # it learnt from the remaining memories' teacher data only
    res = forget(others, home=home, retrain=True, show_progress=False)  # nothing left to hold
    assert res.retrain["status"] == "base"
    with open_store(home) as st:
        assert st.current_adapter_id() is None and st.counts()["pending"] == 0
