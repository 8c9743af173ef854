"""Every failure is one line on stderr with the documented exit code; JSONL lines end at "\\n" only."""

from __future__ import annotations

import errno
import json
import sqlite3

from sleepctl import cli, list_memories, record, show_memory
from sleepctl.memories import open_store

from .conftest import cli as run


def one_error(r, code: int, *needles: str) -> str:
    """Assert exit `code` and exactly one non-empty stderr line holding every needle; return that line."""
    lines = [x for x in r.stderr.decode().split("\n") if x.strip()]
    assert r.returncode == code and len(lines) == 1, (r.returncode, r.stderr.decode()[-2000:])
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0] and "internal error" not in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_bad_input_is_one_line_and_stores_nothing(home, tmp_path):
    record(text="kept before", home=home)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 10_000 + "]" * 10_000 + "}\n")
    one_error(run("record", str(deep), "--home", str(home)), 2, "deep.jsonl:1", "nested too deeply")
    one_error(run("record", "-", "--home", str(home), input=b'{"text": "a \\ud800 b"}\n'), 2, "<stdin>:1", "\\ud800")
    one_error(run("record", "--text", b"caf\xe9 latin-1", "--home", str(home)), 2, "--text: not UTF-8", "0xe9")
    one_error(run("record", "--text", "x", "--tag", b"\xff", "--home", str(home)), 2, "--tag")
    one_error(run("record", "--text", "x", "--max-bytes", "0", "--home", str(home)), 2, "--max-bytes")
    assert [m.text for m in list_memories(home)] == ["kept before"]
    ok = run("record", "-", "--home", str(home), input=b'{"text": "paired \\ud83d\\ude00 is an emoji"}\n')
    assert ok.returncode == 0, ok.stderr
    assert any("\U0001f600" in m.text for m in list_memories(home))


def test_options_and_overrides_are_one_line(home):
    one_error(run("recipes", "show", "--set", "lora.r=[1,"), 2, "--set 'lora.r=[1,'", "not valid YAML")
    one_error(run("recipes", "show", "--set", "dream.max_minutes=.nan"), 2, "dream.max_minutes", "finite")
    one_error(run("recipes", "show", "--set", "optim.weight_decay=.inf"), 2, "optim.weight_decay", "finite")
    for bad in ("nan", "inf", "-1"):
        one_error(run("dream", "--max-minutes", bad, "--home", str(home)), 2, "--max-minutes must be positive")
    one_error(run("dream", "--max-dreams", "0", "--home", str(home)), 2, "--max-dreams")
    one_error(run("seed", "--steps", "-3", "--home", str(home)), 2, "--steps")


def test_damaged_store_is_one_line_naming_the_file(home, tmp_path):
    big = tmp_path / "many.jsonl"
    big.write_text("".join(json.dumps({"text": f"memory {i} " + "lorem ipsum " * 300}) + "\n" for i in range(30)))
    record([big], home=home)
    db = home / "sleepctl.db"
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    for page in range(2 * 4096, len(data), 4096):  # break every b-tree page header after the schema's
        data[page : page + 32] = b"\x07\xff\xff\x00" * 8
    db.write_bytes(bytes(data))
    line = one_error(run("list", "--home", str(home)), 1, str(db), "damaged", ".recover")
    assert "lorem" not in line


def test_error_line_maps_disk_full_and_bugs():
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    assert cli.error_line(full)[1] == 1 and cli.error_line(full)[0].startswith("disk full")
    enospc = OSError(errno.ENOSPC, "No space left on device", "/h/runs/r1/ckpt.pt")
    msg, code = cli.error_line(enospc)
    assert code == 1 and msg.startswith("disk full writing /h/runs/r1/ckpt.pt")
    assert cli.error_line(RuntimeError("PytorchStreamWriter: No space left on device"))[0].startswith("disk full")
    msg, code = cli.error_line(ZeroDivisionError("boom"))  # a bug says it is one, and how to see it
    assert code == 1 and "internal error: ZeroDivisionError: boom" in msg and "SLEEPCTL_DEBUG=1" in msg


def test_jsonl_splits_on_newline_only(home, tmp_path):
    odd = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
    f = tmp_path / "odd.jsonl"
    lines = [json.dumps({"text": f"one{odd}raw"}, ensure_ascii=False), json.dumps({"text": "two"})]
    assert all(c in lines[0] for c in "\u2028\x85")  # raw, not escaped: the case str.splitlines breaks
    f.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    # a raw \x0b inside a string is not strict JSON; it is taken as it is rather than refused
    f.write_bytes(f.read_bytes().replace(b"\\u000b", b"\x0b").replace(b"\\u000c", b"\x0c"))
    res = record([f], home=home)
    assert len(res.added) == 2
    assert show_memory(res.added[0], home)[0].text == f"one{odd}raw"
    note = tmp_path / "n.md"
    note.write_text(f"first{odd}note\r\n---\r\nsecond note\r\n")
    res = record([note], home=home, separator="---")
    assert [show_memory(i, home)[0].text for i in res.added] == [f"first{odd}note", "second note"]
    with open_store(home) as st:
        assert st.counts()["pending"] == 4
