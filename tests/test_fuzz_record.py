"""Fuzz `sleepctl record`: random bytes, random JSON shapes, record shapes with random field types, odd Unicode.

Every case must end in success or in one error line with exit code 2 (bad input), never a traceback and never
`error_line`'s "internal error" (an exception nobody mapped: a bug). Most cases run in-process through
`record()` and the CLI's own error mapping, which is fast; some run through the real command line. After them
all the store passes `PRAGMA integrity_check`, holds every memory recorded before, and gained exactly what the
accepted cases added. The figures (cases, accepted, refused by kind) are printed at the end.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from sleepctl import cli, list_memories, record
from sleepctl.display import one_line

from .conftest import EXAMPLES
from .conftest import cli as run_cli
from .test_display import assert_plain

SEED = 14
N_API = 1200
N_CLI = 24  # of which the fixed cases below

ODD = [
    "\u2028", "\u2029", "\x85", "\x00", "\ufeff", "\u202e", "\u200f", "e\u0301", "\u0300\u0301\u0302", "😀",
    "\x1b[2J", "\x1b]0;t\x07", "[/b]", "[bold]", "\r", "\t", "\x0b", "\x0c", "\x1c", "\x7f", "\x9b", "日本語",
    "\uffff", "\U0010ffff", "\ufffd", " ", "\\", '"', "{", "}",
]  # fmt: skip
# Put into JSON text as written, so the decoder makes them: lone and paired surrogates, escaped NUL.
JSON_ESCAPES = ["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\ud83d", "\\u0000", "\\u2028", "\\udbff\\udfff"]
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xfe\xff"]
KEYS = ["text", "messages", "tags", "source", "probes", "role", "content", "question", "answer", "", " ", "TEXT",
        "text\x00", "😀", "\u202e", "__proto__", "x" * 300]  # fmt: skip


@dataclass
class Case:
    shape: str
    data: bytes | None = None  # a file's bytes, or None for --text
    text: str | None = None
    suffix: str = ".jsonl"
    fmt: str = "auto"
    separator: str | None = None
    max_bytes: int = 1_000_000


def odd_text(rng: random.Random, n: int = 12) -> str:
    words = [
        rng.choice(ODD) if rng.random() < 0.3 else rng.choice(["Ada", "cat", "repo", "Friday", "42"]) for _ in range(n)
    ]
    return " ".join(words)


def value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 4 or r < 0.5:
        return rng.choice(
            [
                None,
                True,
                0,
                -1,
                rng.randint(-(10**20), 10**20),
                1.5,
                float("nan"),
                float("inf"),
                1e308,
                "",
                odd_text(rng, rng.randint(1, 8)),
                rng.choice(string.printable) * rng.randint(0, 50),
            ]
        )
    if r < 0.75:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(KEYS): value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def record_obj(rng: random.Random) -> dict:
    """sleepctl's own shapes (text, chat), each field sometimes of a random type."""
    maybe = lambda good: good if rng.random() < 0.8 else value(rng)  # noqa: E731
    if rng.random() < 0.5:
        obj = {"text": maybe(odd_text(rng, rng.randint(0, 30)))}
    else:
        roles = ["user", "assistant", "system", "tool", "admin", "", None]
        msgs = [
            {"role": rng.choice(roles) if rng.random() < 0.3 else "user", "content": maybe(odd_text(rng))}
            for _ in range(rng.randint(0, 4))
        ]
        obj = {"messages": maybe(msgs)}
    if rng.random() < 0.4:
        obj["tags"] = maybe([odd_text(rng, 2) for _ in range(rng.randint(0, 3))])
    if rng.random() < 0.3:
        obj["source"] = maybe(odd_text(rng, 3))
    if rng.random() < 0.4:
        obj["probes"] = maybe(
            [
                {"question": maybe(odd_text(rng, 5) + "?"), "answer": maybe(odd_text(rng, 2))}
                for _ in range(rng.randint(0, 3))
            ]
        )
    if rng.random() < 0.1:
        obj[rng.choice(KEYS)] = value(rng)
    return obj


def dumps(rng: random.Random, obj) -> str:
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)  # raw U+2028, NUL escapes, etc. both ways


def deep(rng: random.Random) -> str:
    d = rng.choice([100, 900, 1_500, 10_000, 50_000])
    inner = "[" * d + "]" * d if rng.random() < 0.5 else '{"a": ' * d + "1" + "}" * d
    return inner if rng.random() < 0.3 else '{"text": "deep", "tags": ' + inner + "}"


def lines_to_bytes(rng: random.Random, lines: list[str]) -> bytes:
    sep = rng.choice(["\n", "\r\n", "\n\n"])
    s = sep.join(lines) + (sep if rng.random() < 0.8 else "")
    b = s.encode("utf-8", "surrogatepass")
    return (b"\xef\xbb\xbf" + b) if rng.random() < 0.1 else b


def inject(rng: random.Random, line: str) -> bytes:
    """A JSON line with escapes or invalid UTF-8 pushed into one of its strings."""
    i = line.find('"', line.find(":") + 1) + 1 or len(line) // 2
    if rng.random() < 0.6:
        return (line[:i] + rng.choice(JSON_ESCAPES) + line[i:]).encode()
    return line[:i].encode() + rng.choice(BAD_UTF8) + line[i:].encode()


def make_case(rng: random.Random, k: int) -> Case:
    kind = rng.choices(
        ["bytes", "json", "record", "records", "deep", "unicode", "note", "text", "huge"],
        weights=[10, 12, 25, 10, 6, 14, 8, 10, 5],
    )[0]
    suffix = rng.choice([".jsonl"] * 4 + [".json", ".ndjson", ".md", ".txt", "", ".bin"])
    fmt = rng.choice(["auto"] * 5 + ["chat", "text", "note"])
    if kind == "bytes":
        b = rng.randbytes(rng.choice([0, 1, 5, 64, 700, 4000]))
        data = (b'{"text": "' + b) if rng.random() < 0.3 else b
        return Case(kind, data, suffix=suffix, fmt=fmt)
    if kind == "json":
        lines = [dumps(rng, value(rng)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.1:  # numbers json.dumps will not write: 5,000 digits, an exponent past float
            lines.append('{"text": "n", "n": ' + rng.choice(["9" * 5000, "1e999999", "-0.0e-99999", "0" * 4400]) + "}")
        return Case(kind, lines_to_bytes(rng, lines), fmt=fmt)
    if kind == "record":
        return Case(kind, lines_to_bytes(rng, [dumps(rng, record_obj(rng))]), suffix=suffix, fmt=fmt)
    if kind == "records":
        lines = [dumps(rng, record_obj(rng)) for _ in range(rng.randint(2, 6))]
        return Case(kind, lines_to_bytes(rng, lines), fmt=rng.choice(["auto", "auto", "chat", "text"]))
    if kind == "deep":
        return Case(kind, lines_to_bytes(rng, [deep(rng)]))
    if kind == "unicode":
        lines = [dumps(rng, record_obj(rng)) for _ in range(rng.randint(1, 3))]
        j = rng.randrange(len(lines))
        data = b"\n".join(inject(rng, x) if i == j else x.encode() for i, x in enumerate(lines)) + b"\n"
        return Case(kind, data)
    if kind == "note":
        text = "\n".join(odd_text(rng, rng.randint(0, 20)) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.4:
            text = text.replace(" ", "\n---\n", 1)
        return Case(kind, text.encode(), suffix=rng.choice([".md", ".txt", ""]), fmt=rng.choice(["auto", "note"]),
                    separator=rng.choice([None, "---", "", "\u2028"]))  # fmt: skip
    if kind == "text":
        t = odd_text(rng, rng.randint(0, 30))
        if rng.random() < 0.2:
            t += rng.choice(["\ud800", "\udcff"])  # what a non-UTF-8 argv becomes (PEP 383), or a bad API caller
        return Case(kind, None, text=t, fmt=rng.choice(["auto", "note", "text", "chat"]))
    # huge: long strings and keys, sometimes over the size limit
    n = rng.choice([10_000, 100_000, 300_000])
    blob = "".join(rng.choice(string.ascii_letters + " .,:/@=-_" + "".join(ODD[:12])) for _ in range(n // 10)) * 10
    obj = {"text": blob} if rng.random() < 0.7 else {"text": "ok", blob[:5000]: 1}
    return Case(kind, lines_to_bytes(rng, [dumps(rng, obj)]), max_bytes=rng.choice([1_000_000, 50_000, 1]))


# Refusals, named by what they say; anything else is a test failure.
KINDS = [
    ("not UTF-8", r"not UTF-8|not valid UTF-8"),
    ("lone surrogate", r"lone surrogate"),
    ("nested too deeply", r"nested too deeply"),
    ("malformed JSON", r"malformed JSON"),
    ("not a JSON object", r"expected a JSON object"),
    ("no text or messages", r"needs a 'messages' list or a 'text'"),
    ("over the size limit", r"over the limit"),
    ("empty", r"empty input|no memories found|nothing to record"),
    ("invalid fields", r":\d+: .*(Input should|Field required|Extra inputs|must not be empty|no message has content)"),
]


def kind_of(msg: str) -> str:
    for name, pat in KINDS:
        if re.search(pat, msg):
            return name
    raise AssertionError(f"unexpected refusal: {msg}")


def attempt(case: Case, home: Path, tmp: Path, k: int) -> tuple[str, int, str]:
    """Record in-process; ('accepted', 0, '') or (kind, exit code, the one line main would print)."""
    try:
        if case.data is None:
            res = record(text=case.text, home=home, fmt=case.fmt, separator=case.separator, max_bytes=case.max_bytes)
        else:
            p = tmp / f"case{k}{case.suffix}"
            p.write_bytes(case.data)
            res = record([p], home=home, fmt=case.fmt, separator=case.separator, max_bytes=case.max_bytes)
    except Exception as e:  # noqa: BLE001 - the point: every exception goes through the CLI's mapping
        msg, code = cli.error_line(e)
        line = one_line(msg)
        assert "internal error" not in line, f"case {k} ({case.shape}): {line}\n{case!r:.2000}"
        return kind_of(line), code, line
    return "accepted", 0, str(len(res.added))


FIXED_CLI = [
    (["record", "-"], b'{"text": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n", 2),
    (["record", "-"], b'{"text": "lone \\ud800 here"}\n', 2),
    (["record", "-"], '{"text": "raw \u2028 and \x85 inside"}\r\n'.encode(), 0),
    (["record", "-"], b'{"text": "dup", "source": "src [/src] \\u001b[2J"}\n', 0),
    (["record", "-"], b'{"text": "dup", "source": "src [/src] \\u001b[2J"}\n', 0),  # the duplicate report
    (["record", "--text", b"not \xff utf-8"], None, 2),
    (["record", "-"], b"\xff\xfe\x00\x00garbage", 2),
    (["record", "-", "--format", "note"], "a note \u202e [/b] \x1b]0;x\x07".encode(), 0),
]


def test_fuzz_record(home, tmp_path, capsys):
    rng = random.Random(SEED)
    before = record([EXAMPLES], home=home)
    kept = {m.id: m.text for m in list_memories(home)}
    assert len(kept) >= 30
    t0 = time.time()
    outcomes: Counter[str] = Counter()
    codes: Counter[int] = Counter()
    added = 0
    cases = [make_case(rng, k) for k in range(N_API)]
    for k, case in enumerate(cases):
        kind, code, info = attempt(case, home, tmp_path, k)
        outcomes[kind] += 1
        codes[code] += 1
        if kind == "accepted":
            added += int(info)
        else:
            assert code == 2, f"case {k} ({case.shape}): bad input must exit 2: {info}"
    api_s = time.time() - t0
    assert len(list_memories(home)) == len(kept) + added  # a refused file adds nothing, an accepted one all of it

    # the real command line: fixed cases, then generated ones with file data spread over the shapes
    h = ["--home", str(home)]
    picks = [c for c in cases if c.data is not None and len(c.data) < 200_000][:: N_API // (N_CLI - len(FIXED_CLI))]
    runs = list(FIXED_CLI)
    for k, c in enumerate(picks[: N_CLI - len(FIXED_CLI)]):
        p = tmp_path / f"cli{k}{c.suffix}"
        p.write_bytes(c.data)
        runs.append((["record", str(p), "--format", c.fmt, "--max-bytes", str(c.max_bytes)], None, None))
    cli_outcomes: Counter[str] = Counter()
    for args, stdin, want in runs:
        r = run_cli(*args, *h, input=stdin)
        err = [x for x in r.stderr.decode(errors="replace").split("\n") if x.strip()]
        assert "Traceback" not in r.stderr.decode(errors="replace"), (args, r.stderr[-3000:])
        assert want is None or r.returncode == want, (args, r.returncode, r.stderr[-2000:])
        assert r.returncode in (0, 2), (args, r.returncode, r.stderr[-2000:])
        if r.returncode:
            assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0], (args, err)
            cli_outcomes[kind_of(err[0])] += 1
        else:
            assert_plain(r.stdout.decode() + r.stderr.decode(), f"record {args}")
            cli_outcomes["accepted"] += 1

    # the store: intact, nothing recorded before lost, and every read command prints what the fuzz stored
    with sqlite3.connect(home / "sleepctl.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    now = {m.id: m.text for m in list_memories(home)}
    assert all(now.get(i) == t for i, t in kept.items()), "a memory stored before the fuzz changed or went"
    assert len(now) >= len(kept) + added
    runner = CliRunner()
    for args in (["list", *h], ["status", *h], *(["show", i, *h] for i in list(now)[-15:])):
        r = runner.invoke(cli.app, args, env={"COLUMNS": "200"})
        assert r.exit_code == 0, (args, r.output[-2000:], r.exception)
        assert_plain(r.output, " ".join(args[:2]))

    with capsys.disabled():
        refused = {k: v for k, v in outcomes.most_common() if k != "accepted"}
        print(
            f"\nfuzz record (seed {SEED}): {N_API} in-process cases in {api_s:.1f} s: {outcomes['accepted']} accepted,"
            f" {sum(refused.values())} refused {refused}; {len(runs)} CLI cases: {dict(cli_outcomes)};"
            f" {len(before.added)} memories from before intact, {len(now)} stored, integrity_check ok"
        )
    assert outcomes["accepted"] > 50 and len(refused) >= 6  # the generator reaches both sides
