"""Recording memories: formats, duplicates, redaction, and every bad input path."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from sleepctl import list_memories, record, show_memory
from sleepctl.errors import InputError, StoreError
from sleepctl.memories import add_probe, open_store

from .conftest import EXAMPLES, cli


def test_examples_record_with_probes(home):
    res = record([EXAMPLES], home=home)
    assert len(res.added) >= 30 and res.probes_added >= 60
    with open_store(home) as st:
        assert all(len(st.probes([t])) >= 2 for t in res.added)
        assert {p.split for p in st.probes()} == {"heldout"}  # user probes are always held out
        assert {p.origin for p in st.probes()} == {"user"}
    again = record([EXAMPLES], home=home)
    assert again.added == [] and len(again.duplicates) == len(res.added)


def test_the_demo_chats_record_whole_with_their_tool_results(home):
    """make demo's set: four chats whose facts arrive in tool results, every user probe's answer in its chat."""
    from sleepctl.scoring import contains_match

    res = record([EXAMPLES.parent / "demo-traces.jsonl"], home=home)
    assert len(res.added) == 4 and res.probes_added == 11
    with open_store(home) as st:
        for t in st.traces():
            assert t.kind == "chat" and t.redactions == 0
            for p in st.probes([t.id]):
                assert contains_match(t.text, p.answer), (p.question, p.answer)
        assert sum(any(m.role == "tool" for m in t.messages) for t in st.traces()) == 3


def test_chat_text_and_notes(home, tmp_path):
    chat = tmp_path / "c.jsonl"
    chat.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Ada's cat is called Pixel."},
                    {"role": "assistant", "content": "Noted."},
                ],
                "tags": ["pets"],
            }
        )
        + "\n"
    )
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "The Zephyr repo moved to GitLab."}) + "\n")
    note = tmp_path / "n.md"
    note.write_text("# Standup\nBob is out on Friday.\n---\nCarol owns the release.\n")
    r = record([chat, text], home=home)
    assert len(r.added) == 2
    r2 = record([note], home=home, separator="---", tags=["standup"])
    assert len(r2.added) == 2
    ms = list_memories(home)
    kinds = sorted(m.kind for m in ms)
    assert kinds == ["chat", "note", "note", "text"]
    t, _ = show_memory(r.added[0], home)
    assert t.messages[0].content == "Ada's cat is called Pixel." and t.tags == ["pets"] and t.status == "pending"
    assert "standup" in show_memory(r2.added[0], home)[0].tags


def test_whitespace_variant_is_duplicate(home):
    record(text="Dana likes tea.", home=home)
    r = record(text="  Dana likes   tea.\n", home=home)
    assert r.added == [] and len(r.duplicates) == 1


def test_redaction_default_and_opt_out(home):
    secret = "Deploy with https://ci:hunter2pass@git.example.com and key sk-abcdefghijklmnopqrstuvwx123456 ok"
    r = record(text=secret, home=home)
    assert r.redactions == 2
    t, _ = show_memory(r.added[0], home)
    assert "hunter2pass" not in t.text and "sk-abc" not in t.text and "[REDACTED:url_password]" in t.text
    r2 = record(text=secret + " again", home=home, redact=False)
    assert "hunter2pass" in show_memory(r2.added[0], home)[0].text


def test_malformed_json_reports_line_and_records_nothing(home, tmp_path):
    record(text="kept memory", home=home)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "first is fine"}) + "\n" + '{"text": "broken' + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: malformed JSON"):
        record([bad], home=home)
    texts = [m.text for m in list_memories(home)]
    assert texts == ["kept memory"]  # nothing from the bad file, nothing lost


def test_one_bad_file_stops_all_files(home, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "good memory"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(InputError, match="expected a JSON object"):
        record([good, bad], home=home)
    assert not (home / "sleepctl.db").exists() or list_memories(home) == []


@pytest.mark.parametrize(
    "line, msg",
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"text": ["a"]}, "text"),
        ({"text": "   "}, "must not be empty"),
        ({"text": "x", "probes": [{"question": "q?"}]}, "answer"),
        ({"text": "x", "colour": "red"}, "colour"),
        ({"title": "no body"}, "needs a 'messages' list or a 'text' field"),
    ],
)
def test_wrong_field_types(home, tmp_path, line, msg):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(line) + "\n")
    with pytest.raises(InputError, match=msg):
        record([p], home=home)


def test_empty_and_non_utf8(home, tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="empty input"):
        record([empty], home=home)
    latin = tmp_path / "l.md"
    latin.write_bytes("caf\xe9 notes".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        record([latin], home=home)
    with pytest.raises(InputError, match="no such file"):
        record([tmp_path / "missing.jsonl"], home=home)


def test_ten_megabyte_trace_is_refused_by_limit(home, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x " * 5_000_000}) + "\n")
    with pytest.raises(InputError, match="over the limit of 1,000,000"):
        record([big], home=home)
    r = record([big], home=home, max_bytes=20_000_000)  # the limit is stated and adjustable
    assert len(r.added) == 1


def test_home_errors(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StoreError, match="cannot create home"):
        record(text="m", home=afile / "home")
    with pytest.raises(StoreError, match="not a directory"):
        record(text="m", home=afile)
    with pytest.raises(StoreError, match="no sleepctl home"):
        list_memories(tmp_path / "nowhere")


def test_probe_add(home):
    r = record(text="Ivo's bike is green.", home=home)
    p = add_probe(r.added[0][:8], "What colour is Ivo's bike?", "green", home=home)
    assert p.split == "heldout" and p.origin == "user"
    with pytest.raises(InputError, match="already has"):
        add_probe(r.added[0], "What colour is Ivo's bike?", "green", home=home)
    with pytest.raises(StoreError, match="no memory"):
        add_probe("m_nope", "q?", "a", home=home)


def _record_many(args):
    home, i = args
    return len(
        record(
            text="\n---\n".join(f"process {i} memory {k}" for k in range(3)), home=home, fmt="note", separator="---"
        ).added
    )


def test_two_processes_record_at_once(home):
    record(text="seed memory", home=home)  # the store exists; both writers race on it
    with mp.get_context("spawn").Pool(2) as pool:
        # 20 small writes from each of two processes, interleaved
        counts = pool.map(_record_many, [(home, i) for i in range(40)])
    assert sum(counts) == 40 * 3
    assert len(list_memories(home)) == 1 + 120
    db = sqlite3.connect(home / "sleepctl.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_schema_on_blank_database_and_idempotent_migrations(home):
    with open_store(home, create=True) as st:
        tables = {r[0] for r in st.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"traces", "probes", "runs", "adapters", "state", "examples", "schema_migrations"} <= tables
    with open_store(home) as st:  # reopening runs no migration twice
        assert [r[0] for r in st.db.execute("SELECT version FROM schema_migrations")] == [1, 2, 3, 4, 5]
        cols = {r[1] for r in st.db.execute("PRAGMA table_info(probes)")}
        assert "superseded_by" in cols


def test_cli_record_list_show_json(home, tmp_path):
    r = cli("record", str(EXAMPLES), "--home", str(home), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["added"]) >= 30
    ls = json.loads(cli("list", "--home", str(home), "--json", "--status", "pending").stdout)
    assert len(ls) == len(res["added"])
    one = json.loads(cli("show", ls[0]["id"], "--home", str(home), "--json").stdout)
    assert one["memory"]["id"] == ls[0]["id"] and len(one["probes"]) >= 2
    stdin = cli("record", "-", "--home", str(home), "--json", input=b'{"text": "from stdin"}\n')
    assert json.loads(stdin.stdout)["added"]


def test_cli_bad_input_exit_codes(home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    r = cli("record", str(bad), "--home", str(home))
    assert r.returncode == 2 and b"bad.jsonl:1" in r.stderr and b"Traceback" not in r.stderr
    r = cli("record", "--home", str(home))
    assert r.returncode == 2 and b"nothing to record" in r.stderr
    r = cli("list", "--home", str(tmp_path / "none"))
    assert r.returncode == 1 and b"no sleepctl home" in r.stderr
    r = cli("record", "-", "--home", str(home), input=b"\xff\xfe\x00bad")
    assert r.returncode == 2 and b"not UTF-8" in r.stderr
    r = cli("list", "--home", str(home), "--status", "sleeping")
    assert r.returncode == 2
