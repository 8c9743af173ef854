"""Day-two friction: -h everywhere, shell completion offered, --since that says what it takes."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from sleepctl.errors import InputError
from sleepctl.records import since_timestamp

from .conftest import cli, cli_json


def test_short_help_on_every_level():
    for args in ([], ["list"], ["adapters"], ["adapters", "list"], ["recipes"], ["probe", "add"]):
        r = cli(*args, "-h")
        assert r.returncode == 0 and b"Usage:" in r.stdout and b"No such option" not in r.stderr, (args, r.stderr)
    assert b"--install-completion" in cli("--help").stdout


def test_since_takes_dates_days_and_ages():
    now = datetime(2026, 11, 27, 21, 0, tzinfo=timezone.utc)
    assert since_timestamp("2026-11-27T09:00+02:00", now) == "2026-11-27T07:00:00.000+00:00"
    assert since_timestamp("3d", now) == "2026-11-24T21:00:00.000+00:00"
    assert since_timestamp("12h", now) == "2026-11-27T09:00:00.000+00:00"
    assert since_timestamp("yesterday", now) < since_timestamp("today", now) <= now.isoformat()
    for bad in ("last week", "3 fortnights", "", "2026-13-01"):
        with pytest.raises(InputError):
            since_timestamp(bad, now)


def test_list_since(tmp_path):
    home = str(tmp_path / "h")
    assert cli("record", "--text", "The offsite moved to Lisbon.", "--home", home).returncode == 0
    assert len(cli_json("list", "--home", home, "--since", "yesterday")) == 1
    assert len(cli_json("list", "--home", home, "--since", "1h")) == 1
    assert cli_json("list", "--home", home, "--since", "2999-01-01") == []
    r = cli("list", "--home", home, "--since", "yesterdy")
    lines = [x for x in r.stderr.decode().splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--since 'yesterdy' is not a date" in lines[0]


def test_list_is_one_line_per_memory_with_whole_ids_in_80_columns(tmp_path):
    """Ids are what `show` and `forget` take: never cut; a long memory is cut with an ellipsis instead of
    folding into a column of three-letter lines."""
    home = str(tmp_path / "h")
    long = "Orla Brennick moved the Kestrel build server from Dublin to Tallinn last Tuesday, " * 4
    for text in (long, "The offsite moved to Lisbon."):
        assert cli("record", "--text", text, "--tag", "infra", "--home", home).returncode == 0
    ids = [m["id"] for m in cli_json("list", "--home", home)]
    r = cli("list", "--home", home, env={"COLUMNS": "80"})
    rows = [x for x in r.stdout.decode().splitlines() if x.startswith("│")]
    assert r.returncode == 0 and len(rows) == 2 and all(len(x) <= 80 for x in rows)
    for i in ids:
        assert sum(i in x for x in rows) == 1
    assert any("Orla" in x and "…" in x for x in rows)  # the text is there, cut, on its row


def test_adapters_list_keeps_every_row_readable_in_80_columns(tmp_path):
    """Ids are what rollback and use take: whole on one line per adapter; in a narrow terminal the wide columns
    (base model, run) go, and no column is folded to an ellipsis."""
    from sleepctl.memories import open_store
    from sleepctl.records import Adapter
    from sleepctl.store import new_id, now

    home = str(tmp_path / "h")
    assert cli("record", "--text", "The offsite moved to Lisbon.", "--home", home).returncode == 0
    mem = cli_json("list", "--home", home)[0]["id"]
    ids = []
    with open_store(home) as st:
        for v, kind in ((1, "seed"), (2, "consolidate")):
            a = Adapter(
                id=new_id("a"),
                version=v,
                run_id=new_id(kind),
                kind=kind,
                base_model="qwen2.5-coder-1.5b",
                parent_id=None,
                path=str(tmp_path / f"v{v}"),
                trace_ids=[mem],
                created_at=now(),
            )
            with st.transaction() as db:
                st.insert_adapter(db, a)
                st.set_current(db, a.id)
            ids.append(a.id)
    narrow = cli("adapters", "list", "--home", home, env={"COLUMNS": "80"}).stdout.decode()
    rows = [x for x in narrow.splitlines() if " v1 " in x or " v2 " in x]
    assert len(rows) == 2 and all(len(x) <= 80 and "…" not in x for x in rows), narrow
    assert ids[0] in rows[0] and ids[1] in rows[1] and "consolidate" in rows[1] and rows[1].lstrip().startswith("*")
    wide = cli("adapters", "list", "--home", home, env={"COLUMNS": "220"}).stdout.decode()
    assert "qwen2.5-coder-1.5b" in wide and "base model" in wide and "run" in wide and "qwen" not in narrow
