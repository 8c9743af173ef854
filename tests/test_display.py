"""Stored content is printed as plain text: no markup crash, no escape sequence reaching the terminal."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sleepctl import cli, record
from sleepctl.display import one_line, safe
from sleepctl.evaluate import EvalReport, MethodResult, ProbeResult
from sleepctl.memories import open_store
from sleepctl.records import Adapter, Run
from sleepctl.store import new_id, now

# What an agent's memory may hold: markup that crashed rich, OSC/CSI escapes, a carriage return, a bidi
# override, C1 CSI (0x9b), NUL and DEL.
HOSTILE = (
    "bold [/b] then [bold red]x[/] title \x1b]0;pwned\x07 clear \x1b[2J cr \r rtl \u202e 9b \x9b nul \x00 del \x7f"
)
# Allowed in output: newline, and nothing else below 0x20 or in 0x7f-0x9f; no bidi controls.
FORBIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def assert_plain(text: str, where: str) -> None:
    bad = FORBIDDEN.search(text)
    assert bad is None, f"{where}: raw {bad.group()!r} in output: {text[max(0, bad.start() - 60) : bad.end() + 20]!r}"


def test_safe_shows_escapes():
    assert safe("a\x1b[2Jb\x07\r\x9b\u202e\ud800") == "a\\x1b[2Jb\\x07\\r\\x9b\\u202e\\ud800"
    assert safe("two\nlines\tand tab") == "two\\nlines\\tand tab"
    assert safe("two\nlines\tand tab", multiline=True) == "two\nlines\tand tab"
    assert safe("[/b] ünïcødé 日本 😀 e\u0301") == "[/b] ünïcødé 日本 😀 e\u0301"  # text and combining marks stay
    assert one_line("first\nsecond\r\n\nthird") == "first; second; third"
    assert len(one_line("x" * 10_000)) == 500


@pytest.fixture
def hostile_home(home, tmp_path):
    """A home whose memory, probe, tags, source, run and adapter all carry HOSTILE text."""
    src = tmp_path / "hostile.jsonl"
    rec = {
        "text": f"first line {HOSTILE}\nsecond line\t[/i]",
        "source": f"src [/src] {HOSTILE}",
        "tags": ["[/t]", "\x1b[31mred"],
        "probes": [{"question": f"what [/q] {HOSTILE}?", "answer": f"[/a] {HOSTILE}"}],
    }
    src.write_text(json.dumps(rec) + "\n")
    mem = record([src], home=home).added[0]
    with open_store(home) as st:
        run_id = new_id("r")
        st.insert_run(
            Run(id=run_id, kind=f"seed[/k]{HOSTILE}", status="done", dir=str(home / "runs" / run_id), started_at=now())
        )
        a = Adapter(
            id=new_id("a"),
            version=1,
            run_id=run_id,
            kind=f"seed[/k]{HOSTILE}",
            base_model=f"model[/m]{HOSTILE}",
            parent_id=None,
            path=str(home / "adapters" / "v001"),
            trace_ids=[mem],
            created_at=now(),
        )
        with st.transaction() as db:
            st.insert_adapter(db, a)
            st.set_current(db, a.id)
    return home, src, mem


def test_every_read_command_prints_hostile_content_plain(hostile_home):
    home, src, mem = hostile_home
    runner = CliRunner()
    h = ["--home", str(home)]
    commands = [
        ["record", str(src), *h],  # a duplicate: its report names the source
        ["record", "--text", f"by flag {HOSTILE}", "--tag", "[/x]", *h],
        ["list", *h],
        ["list", "--json", *h],
        ["show", mem, *h],
        ["show", mem, "--json", *h],
        ["probe", "add", mem, "-q", f"another [/q] {HOSTILE}?", "-a", f"[/a]{HOSTILE}", *h],
        ["status", *h],
        ["adapters", "list", *h],
        ["adapters", "list", "--json", *h],
        ["adapters", "use", "v1", *h],
        ["runs", *h],
        ["recipes", "show", "quick-cpu", "--set", f"description={json.dumps(HOSTILE)}"],
    ]
    outputs = {}
    for args in commands:
        r = runner.invoke(cli.app, args, env={"COLUMNS": "400"})
        assert r.exit_code == 0, (args, r.output, r.exception)
        assert_plain(r.output, " ".join(args[:2]))
        outputs[tuple(args)] = r.output
    shown = outputs[("show", mem, *h)]
    assert "[/b]" in shown and "\\x1b]0;pwned\\x07" in shown and "\\u202e" in shown  # shown, not obeyed or lost
    assert "\nsecond line" in shown  # a multi-line memory keeps its lines
    listed = runner.invoke(cli.app, ["list", "--json", *h]).output
    assert any("[/b]" in m["text"] and "\x1b]0;pwned" in m["text"] for m in json.loads(listed))  # JSON loses nothing


def test_eval_report_prints_hostile_content_plain(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buf, width=200))
    monkeypatch.setattr(cli, "err", Console(file=buf, width=200, soft_wrap=True))
    res = ProbeResult(
        probe_id="p1",
        trace_id=f"m1{HOSTILE}",
        question=f"Q [/q] {HOSTILE}",
        reference=f"[/ref] {HOSTILE}",
        output=f"[/out] {HOSTILE}",
        contains=True,
        f1=1.0,
    )
    methods = [
        MethodResult(method=m, group="new", n=1, contains=1.0, f1=1.0, results=[res]) for m in ("sleep", "in-context")
    ]
    rep = EvalReport(
        target=None,
        adapter_version=1,
        student=f"student[/s]{HOSTILE}",
        probes_new=1,
        probes_retention=0,
        methods=methods,
        perplexity={"sleep": 10.0},
        notes=[f"note [/n] {HOSTILE}"],
        path=f"/tmp/[/p]{HOSTILE}",
    )
    cli.print_report(rep, per_memory=True)
    text = buf.getvalue()
    assert_plain(text, "eval report")
    assert "Q [/q]" in text and "[/ref]" in text and "note [/n]" in text
