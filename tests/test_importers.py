"""Importers: the logs agents write (OpenAI, Anthropic, LangChain, Claude Code, mem0, Letta) recorded as memories.

Every sample in examples/formats/ is recorded and the memory text it produced is checked: tool calls rendered,
tool results kept, system prompts and non-text parts left out and counted. Then detection, errors, cumulative
logs, and random mutations of the samples (each ends in success or one error line).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sleepctl import cli as cli_mod
from sleepctl import list_memories, record, show_memory
from sleepctl.display import one_line
from sleepctl.errors import InputError
from sleepctl.importers import FOREIGN, FORMATS, detect, load_records, parse_records

from .conftest import EXAMPLES, cli

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "formats"

# sample -> (format detected, memories, texts each memory must hold, texts no memory may hold, what was left out)
CASES = {
    "openai-chat.json": (
        "openai",
        1,
        [
            'assistant: [called lookup_cluster(cluster="heron-staging")]',
            'tool: [result of lookup_cluster] {"cluster": "heron-staging", "region": "eu-north-1 (Stockholm)"',
            "user: priya: Correction from Lukas on the ticket: the move finished on 9 October",
        ],
        ["You are Ada", "developer", "4471.png"],
        {"system prompt": 1, "image": 1},
    ),
    "openai-chat-cumulative.jsonl": (
        "openai",
        1,
        [
            'assistant: [called book_venue(city="Lisbon", start="2027-05-12", end="2027-05-14", people=18)]',
            "tool: [result of book_venue] Booked: Casa do Rio, Rua da Boavista 41",
            "confirmation BW-7731).",
        ],
        ["travel desk agent"],
        {"system prompt": 1, "earlier snapshot": 2},
    ),
    "openai-responses.jsonl": (
        "responses",
        1,
        [
            "user: Which room did facilities give the design team for Thursdays?",
            'assistant: [called find_booking(team="design", weekday="thursday")]',
            "tool: [result of find_booking] Design team: room 3.14 'Kelp', every Thursday",
            "user: Update: Mirela says they swapped to room 2.08 'Moss'",
        ],
        ["facilities agent", "Look up the room booking", "floor-3.png"],
        {"system prompt": 1, "image": 1, "reasoning": 1},
    ),
    "anthropic-messages.json": (
        "anthropic",
        1,
        [
            'assistant: Let me check the tracker.\n[called get_release(product="Otterline", version="4.2")]',
            "tool: [result of get_release] Otterline 4.2: code freeze 3 Feb 2027, ship date 17 Feb 2027",
            "user: Small correction: Hannah handed sign-off to Rafael Dumont last week.",
        ],
        ["release assistant for Brightwater", "query the tracker", "EqQBCkgI", ".pdf"],
        {"system prompt": 1, "document": 1, "image": 1, "reasoning": 1},
    ),
    "langchain-messages.json": (
        "langchain",
        1,
        [
            'assistant: [called oncall_schedule(service="pelican-billing", date="2026-12-05")]\ntool:',
            "tool: [result of oncall_schedule] pelican-billing, 5-6 Dec 2026: primary Joaquim Reis",
            "user: Joaquim swapped with Sven Aalto, so Sven is primary this weekend.",
        ],
        ["on-call helper", "finish_reason", "run-1c2d"],
        {"system prompt": 1},
    ),
    "langgraph-state.json": (
        "langchain",
        1,
        [
            'assistant: [called search_contracts(vendor="Lumen", year=2026)]',
            "tool: [result of search_contracts] Lumen Analytics renewal, signed 2026-09-30: 140 seats at EUR 38",
        ],
        ["procurement agent", "Never approve"],
        {"system prompt": 1},
    ),
    "claude-code-session.jsonl": (
        "claude-code",
        2,
        ["user: ", "assistant: ", "[called Bash(command=", "tool: [result of Bash] "],
        ["Caveat:", "<command-name>", "Fix flaky invoice", "Check the CI workflow for a TZ", "toolu_"],
        {"slash command": 1, "meta message": 1, "reasoning": 1, "summary": 1, "other event": 1},
    ),
    "mem0-export.json": ("mem0", 4, [], ["tomas.brandt", "reports_to"], {"graph relation": 1}),
    "letta-passages.json": ("letta", 3, ["Ember"], ["passage-", "text-embedding"], {}),
}


def test_every_sample_has_a_case():
    assert sorted(p.name for p in SAMPLES.iterdir()) == sorted(CASES)
    assert {CASES[k][0] for k in CASES} == set(FOREIGN)  # every format has a sample


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample_is_detected_as_its_format(name):
    fmt = CASES[name][0]
    text = (SAMPLES / name).read_text()
    records, whole = load_records(text, name)
    assert detect(records, name) == fmt
    assert whole == name.endswith(".json")  # a pretty-printed .json is one document; JSONL stays JSONL
    assert {m.format for m in parse_records(text, name)} == {fmt}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample_records_through_the_cli(name, home):
    fmt, n, held, absent, left_out = CASES[name]
    r = cli("record", str(SAMPLES / name), "--home", str(home), "--json")
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    assert len(res["added"]) == n and res["redactions"] == 0
    assert res["skipped"] == left_out
    assert res["formats"] == {FOREIGN[fmt]: n}
    texts = [show_memory(i, home)[0].text for i in res["added"]]
    for t in texts:
        for h in held:
            assert h in t, (h, t)
    for a in absent:
        assert all(a not in t for t in texts), (a, texts)
    human = cli("record", str(SAMPLES / name), "--home", str(home / "again"))
    assert human.returncode == 0 and f"read as {FOREIGN[fmt]}".encode() in human.stderr
    if left_out:
        assert b"left out of the memory text: " in human.stderr
    # the system or developer prompt is out of the text but kept beside it (absent[0] is a phrase of it)
    systems = [show_memory(i, home)[0].system for i in res["added"]]
    if left_out.get("system prompt"):
        assert all(s and absent[0] in s for s in systems), systems
        assert b"system prompts are kept beside their memory" in human.stderr
    else:
        assert systems == [None] * n


def test_chat_memories_keep_roles_and_tool_results(home):
    res = record([SAMPLES / "claude-code-session.jsonl"], home=home)
    first, second = (show_memory(i, home)[0] for i in res.added)
    assert first.kind == "chat" and [m.role for m in first.messages] == [
        "user", "assistant", "tool", "assistant", "user", "assistant", "tool", "assistant"
    ]  # fmt: skip
    assert first.messages[2].content == "[result of Bash] 23:      TZ: America/Chicago"
    assert "Noor Haddad approved it" in first.messages[4].content
    assert second.text.endswith(
        "tool: [result of Bash] 16.4 (Debian 16.4-1.pgdg120+2)\nassistant: Staging runs PostgreSQL 16.4."
    )
    mem0 = record([SAMPLES / "mem0-export.json"], home=home)
    m = show_memory(mem0.added[2], home)[0]
    assert m.kind == "text" and m.text.startswith("Home office moved from Rotterdam to Utrecht") and m.tags == ["work"]
    letta = record([SAMPLES / "letta-passages.json"], home=home)
    assert show_memory(letta.added[2], home)[0].text.startswith("Correction (2026-11-19): Ember's nightly jobs")
    again = record([SAMPLES / "letta-passages.json"], home=home)
    assert again.added == [] and len(again.duplicates) == 3


def test_tool_results_and_arguments_are_redacted(home, tmp_path):
    key = "sk-proj-" + "Ab3dE5gH7jK9mN1pQ3sT5vX7zB9dF1hJ"
    p = tmp_path / "leak.json"
    p.write_text(
        json.dumps(
            [
                {"role": "user", "content": "Rotate the deploy key for Kestrel."},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "set_secret", "arguments": json.dumps({"value": key})}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": f"stored OPENAI_API_KEY={key} in vault path kv/kestrel"},
            ],
            indent=2,
        )
    )  # fmt: skip
    res = record([p], home=home)
    t = show_memory(res.added[0], home)[0]
    assert res.redactions >= 2 and key not in t.text and all(key not in m.content for m in t.messages)
    assert "[called set_secret(value=" in t.text and "vault path kv/kestrel" in t.text


def test_cumulative_log_is_stored_once_and_branches_are_kept(home, tmp_path):
    res = record([SAMPLES / "openai-chat-cumulative.jsonl"], home=home)
    assert len(res.added) == 1 and res.skipped == {"system prompt": 1, "earlier snapshot": 2}
    assert show_memory(res.added[0], home)[0].text.count("Book the team offsite") == 1
    # sleepctl's own schema too, and a branch (a regenerated reply) is not a prefix: both kept
    turn = lambda r, c: {"role": r, "content": c}  # noqa: E731
    a = [turn("user", "Where is the Kestrel server?"), turn("assistant", "Tallinn.")]
    lines = [
        {"messages": a[:1], "tags": ["infra"]},
        {"messages": a, "probes": [{"question": "Where is the Kestrel server?", "answer": "Tallinn"}]},
        {"messages": [*a, turn("user", "Who moved it?"), turn("assistant", "Orla Brennick.")]},
        {"messages": [*a, turn("user", "Who moved it?"), turn("assistant", "Orla did, last Tuesday.")]},
    ]
    p = tmp_path / "own.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = record([p], home=home)
    assert len(res.added) == 2 and res.skipped == {"earlier snapshot": 2}
    kept = [show_memory(i, home) for i in res.added]
    assert "Orla Brennick." in kept[0][0].text and "Orla did" in kept[1][0].text
    longest = max(kept, key=lambda k: len(k[0].text))  # the earlier records' tags and probes are carried to it
    assert longest[0].tags == ["infra"] and [p.answer for p in longest[1]] == ["Tallinn"]
    # an assistant's text, then in the next snapshot its tool call too: one turn, still the same conversation
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "function": {"name": "ping", "arguments": ""}}],
    }
    snaps = [[*a], [*a, call, {"role": "tool", "tool_call_id": "c", "content": "pong from tallinn-3"}]]
    p.write_text("\n".join(json.dumps({"model": "m", "messages": x}) for x in snaps) + "\n")
    res = record([p], home=home)
    assert len(res.added) == 1 and res.skipped == {"earlier snapshot": 1}
    assert show_memory(res.added[0], home)[0].text.endswith(
        "Tallinn.\n[called ping()]\ntool: [result of ping] pong from tallinn-3"
    )


def test_system_messages_of_sleepctls_own_schema_are_kept_beside_the_memory(home, tmp_path):
    key = "sk-proj-" + "aB3dE5fG7hJ9kL2mN4pQ6rS8tU0vW1xY3zC5" * 2
    p = tmp_path / "own.jsonl"
    p.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Dana's train gets in at 18:40."},
                    {"role": "system", "content": f"Tools use the key {key}."},
                ]
            }
        )
        + "\n"
    )
    res = record([p], home=home)
    t = show_memory(res.added[0], home)[0]
    assert t.text == "user: Dana's train gets in at 18:40." and res.skipped == {"system prompt": 2}
    assert [m.role for m in t.messages] == ["user"]
    # both prompts, in order, with the credential in one of them redacted like the memory's own text
    assert t.system.startswith("You are a helpful assistant.\n\nTools use the key ") and key not in t.system
    assert res.redactions == 1 and t.redactions == 1
    # the same conversation under another system prompt is the same memory: the prompt is not in the hash
    p.write_text(
        json.dumps({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Dana's train gets in at 18:40."}]})
        + "\n"
    )  # fmt: skip
    assert len(record([p], home=home).duplicates) == 1
    shown = cli("show", t.id, "--home", str(home))
    assert shown.returncode == 0 and b"system prompt (not part of the memory)" in shown.stdout
    assert b"You are a helpful assistant." in shown.stdout


def test_pretty_printed_json_of_sleepctls_own_schema(home, tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps([{"text": "The Zephyr repo moved to GitLab."}, {"text": "Ivo's bike is green."}], indent=2))
    assert len(record([p], home=home).added) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "fine"}, {"text": "x", "colour": "red"}], indent=2))
    with pytest.raises(InputError, match=r"bad.json:5: colour: Extra inputs"):  # the line the record starts on
        record([bad], home=home)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n')
    with pytest.raises(InputError, match=r"broken.json:4: malformed JSON \(Expecting ',' delimiter"):
        record([broken], home=home)
    broken.write_text('\n[\n  {"text": "a", "n": ' + "9" * 5000 + "}\n]\n")
    with pytest.raises(InputError, match=r"broken.json:2: malformed JSON \(a number too long to read\)"):
        record([broken], home=home)
    broken.write_text('[\n  {"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n]\n")
    with pytest.raises(InputError, match=r"broken.json:1: JSON nested too deeply to read"):
        record([broken], home=home)
    stdin = cli("record", "-", "--home", str(home), "--json", input=(SAMPLES / "langgraph-state.json").read_bytes())
    assert stdin.returncode == 0 and len(json.loads(stdin.stdout)["added"]) == 1
    note = cli("record", "-", "--home", str(home), "--json", input=b"[x] call the plumber about the boiler\n")
    assert note.returncode == 0  # no suffix, not JSON: still a note
    assert show_memory(json.loads(note.stdout)["added"][0], home)[0].kind == "note"


def test_notes_beside_foreign_conversations_are_all_recorded(home, tmp_path):
    """A log of OpenAI conversations (tool calls, an extra field of the agent's own) with sleepctl notes between
    them: every record is a memory with its probes. The notes were dropped without a word before."""
    p = tmp_path / "mixed.jsonl"
    recs = [
        {
            "messages": [
                {"role": "user", "content": "Which version runs in production?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": "deploys", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "version: 4.17.2"},
            ],
            "session": "s-1",
            "probes": [{"question": "Which version runs in production?", "answer": "4.17.2"}],
        },
        {"text": "The Gorsewing cap is raised to 520 per minute.", "tags": ["decisions"],
         "probes": [{"question": "What is the Gorsewing cap?", "answer": "520 per minute"}]},
        {"text": "Ivo's bike is green."},
    ]  # fmt: skip
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = record([p], home=home)
    assert len(res.added) == 3 and res.probes_added == 2
    assert res.formats == {"OpenAI Chat Completions": 1, "sleepctl text": 2}
    texts = sorted(m.text for m in list_memories(home))
    assert texts[0].startswith("Ivo's bike") and "520 per minute" in texts[1] and "4.17.2" in texts[2]


@pytest.mark.parametrize(
    "content, match",
    [
        (
            '{"title": "no body", "author": "Ada"}\n',
            r"x.jsonl:1: not a format sleepctl reads: .*OpenAI Chat Completions",
        ),
        ('[{"foo": 1}]', r"x.jsonl:1: not a format sleepctl reads: .*Anthropic Messages.*Letta passages"),
        (
            '{"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}\n'
            '{"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]}\n',
            r"x.jsonl:2: mixes formats: the records from line 1 are OpenAI Chat Completions, this one is not",
        ),
        ('{"role": "user", "content": "hi"}\n{"messages": [{"role": "user", "content": "hi"}]}\n', r"x.jsonl:2: mixes"),
        (
            '{"messages": [{"role": "wizard", "content": [{"type": "text", "text": "x"}]}]}',
            r"x.jsonl:1: messages.0.role",
        ),
        ('{"messages": [{"role": "user", "content": 7, "name": "a"}]}', r"x.jsonl:1: messages.0.content: Input should"),
        ('{"results": [{"memory": ["a"]}]}', r"x.jsonl:1:results.0: memory: Input should be a valid string"),
        (
            '{"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."}]}',
            r"no memories found: .*1 system",
        ),
    ],
)
def test_unknown_ambiguous_and_broken_records_are_one_line_errors(home, tmp_path, content, match):
    p = tmp_path / "x.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        record([p], home=home)
    r = cli("record", str(p), "--home", str(home))
    err = r.stderr.decode().strip().split("\n")
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), err


def test_forced_format(home, tmp_path):
    p = tmp_path / "plain.jsonl"  # plain messages fit several formats; --format says which
    p.write_text('{"role": "user", "content": "Kiri starts on the Loom team on Monday."}\n')
    assert detect(load_records(p.read_text(), "p")[0], "p") == "openai"
    r = cli("record", str(p), "--format", "anthropic", "--home", str(home), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["formats"] == {"Anthropic Messages": 1}
    r = cli("record", str(SAMPLES / "letta-passages.json"), "--format", "mem0", "--home", str(home))
    assert r.returncode == 2 and b"Input should be a valid list (a mem0 export)" in r.stderr
    r = cli("record", str(p), "--format", "yaml", "--home", str(home))
    assert r.returncode == 2 and b"claude-code" in r.stderr  # the accepted values are listed
    assert set(FORMATS) >= {"auto", "chat", "text", "note"}  # today's values keep working
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"messages": [{"role": "user", "content": "Kiri's desk is 4.12."}]}) + "\n")
    assert len(record([own], home=home, fmt="chat").added) == 1
    assert len(record([own], home=home, fmt="note").added) == 1  # the JSON line as a note
    with pytest.raises(InputError, match="text: Field required"):
        record([own], home=home, fmt="text")
    assert len(record([EXAMPLES], home=home).added) >= 30


def test_size_limit_applies(home):
    with pytest.raises(InputError, match=r"claude-code-session.jsonl:2: memory of .* over the limit of 200"):
        record([SAMPLES / "claude-code-session.jsonl"], home=home, max_bytes=200)


# --- fuzz-ish: random mutations of the samples --------------------------------------------------------------

ODD = ["", None, 0, -1, 1.5, True, [], {}, "x", "\u2028", "\ud800", "😀", [None], {"type": "text"}, "tool_result"]


def _mutate_obj(rng: random.Random, obj):
    """Replace, drop or retype one random node of a parsed sample."""
    paths, stack = [], [((), obj)]
    while stack:
        path, node = stack.pop()
        paths.append(path)
        kids = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        stack += [((*path, k), v) for k, v in kids]
    path = rng.choice(paths[1:] or paths)
    if not path:
        return rng.choice(ODD)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.3 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.4 and isinstance(parent, dict):
        parent[rng.choice(["role", "type", "content", "messages", "memory", "text", "sessionId", "lc"])] = parent.pop(
            path[-1]
        )
    else:
        parent[path[-1]] = rng.choice(ODD) if rng.random() < 0.8 else _mutate_obj(rng, json.loads(json.dumps(obj)))
    return obj


def _mutate(rng: random.Random, text: str) -> str:
    op = rng.random()
    if op < 0.2:  # bytes-level: cut, delete or insert a character
        i = rng.randrange(len(text))
        return rng.choice([text[:i], text[:i] + text[i + 1 :], text[:i] + rng.choice('{}[]",:\n\\ ') + text[i:]])
    if text.lstrip().startswith("[") or "\n  " in text:  # one document
        obj = json.loads(text)
        for _ in range(rng.randint(1, 3)):
            obj = _mutate_obj(rng, obj)
        return json.dumps(obj, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    if op < 0.35:
        rng.shuffle(lines)
    elif op < 0.45:
        lines = lines + lines[: rng.randint(1, len(lines))]
    else:
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(len(lines))
            lines[j] = _mutate_obj(rng, lines[j])
    return "\n".join(json.dumps(x, ensure_ascii=rng.random() < 0.5) for x in lines) + "\n"


def test_mutated_samples_end_in_success_or_one_error_line(home, tmp_path, capsys):
    rng = random.Random(12)
    samples = [(p.suffix, p.read_text()) for p in sorted(SAMPLES.iterdir())]
    outcomes = {"accepted": 0, "refused": 0}
    cases = []
    for k in range(450):
        suffix, text = rng.choice(samples)
        data = _mutate(rng, text).encode("utf-8", "surrogatepass")
        fmt = rng.choice(["auto"] * 6 + list(FORMATS[1:]))
        p = tmp_path / f"m{k}{suffix}"
        p.write_bytes(data)
        cases.append((p, fmt))
        try:
            record([p], home=home, fmt=fmt)
            outcomes["accepted"] += 1
        except Exception as e:  # noqa: BLE001 - every exception goes through the CLI's mapping
            msg, code = cli_mod.error_line(e)
            assert code == 2 and "internal error" not in msg, (k, fmt, msg, data[:3000])
            assert "\n" not in one_line(msg)
            outcomes["refused"] += 1
    assert outcomes["accepted"] > 60 and outcomes["refused"] > 60, outcomes
    for p, fmt in cases[::60]:  # and a few through the real command line
        r = cli("record", str(p), "--format", fmt, "--home", str(home))
        err = [x for x in r.stderr.decode(errors="replace").split("\n") if x.strip()]
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr.decode(errors="replace")
        if r.returncode:
            assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(m.text for m in list_memories(home))
    with capsys.disabled():
        print(f"\nmutated samples: {outcomes}")
