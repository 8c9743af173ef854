"""Redaction: the rule set, no false positives on ordinary memories, linear time, every stored field on every
input path (through the real CLI, then a tiny seed), and `scan` / `redact --apply` on a home that holds secrets.

The planted credentials below are made up: random characters in the published shapes.
"""

from __future__ import annotations

import base64
import json
import random
import re
import sqlite3
import string
import time
from pathlib import Path

import pytest

from sleepctl import record
from sleepctl.home import open_home, sleep_lock
from sleepctl.memories import add_probe, show_memory
from sleepctl.redact import find, redact, secret_name
from sleepctl.seed import seed

from .conftest import cli, write_recipe

# --- the planted secrets ------------------------------------------------------------------------------------

_R = random.Random(14)
_AN = string.ascii_letters + string.digits
_B64 = _AN + "+/"
_HEX = "0123456789abcdef"


def _rnd(n: int, alphabet: str = _AN) -> str:
    return "".join(_R.choice(alphabet) for _ in range(n))


def _luhn_card() -> str:
    body = "4" + "".join(_R.choice(string.digits) for _ in range(14))
    for c in string.digits:
        digits = [int(x) for x in reversed(body + c)]
        if sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits)) % 10 == 0:
            return body + c
    raise AssertionError


def _key_block(kind: str, headers: str = "") -> tuple[str, list[str]]:
    body = [_rnd(64, _B64) for _ in range(3)]
    return f"-----BEGIN {kind}-----\n{headers}" + "\n".join(body) + f"\n-----END {kind}-----", body


def _planted() -> list[tuple[str, str, list[str]]]:
    """(kind, text as an agent would have it, the parts that must never be stored)."""
    s: list[tuple[str, str, list[str]]] = []

    def add(kind: str, text: str, *needles: str) -> None:
        s.append((kind, text, list(needles)))

    v = "AKIA" + _rnd(16, string.ascii_uppercase + string.digits)
    add("aws_access_key_id", f"the deploy user is {v} in us-east-1", v)
    v = _rnd(40, _B64)
    add("aws_secret_access_key", f"aws_secret_access_key = {v}", v)
    for kind, headers in (
        ("RSA PRIVATE KEY", ""),
        ("OPENSSH PRIVATE KEY", ""),
        ("PGP PRIVATE KEY BLOCK", "Version: GnuPG v2\n\n"),
        ("ENCRYPTED PRIVATE KEY", ""),
    ):
        block, body = _key_block(kind, headers)
        add(kind.lower().replace(" ", "_"), block, *body)
    for prefix, n in (("ghp_", 36), ("gho_", 36)):
        v = prefix + _rnd(n)
        add(f"github_{prefix[:3]}", f"push with {v}", v)
    v = "github_pat_" + _rnd(22) + "_" + _rnd(59)
    add("github_fine_grained_pat", f"token {v}", v)
    v = "glpat-" + _rnd(20)
    add("gitlab_pat", f"gitlab {v}", v)
    v = "xoxb-" + _rnd(12, string.digits) + "-" + _rnd(13, string.digits) + "-" + _rnd(24)
    add("slack_bot_token", f"slack {v}", v)
    v = "T" + _rnd(8, string.ascii_uppercase) + "/B" + _rnd(8, string.ascii_uppercase) + "/" + _rnd(24)
    add("slack_webhook_url", f"alerts go to https://hooks.slack.com/services/{v}", v)
    v = _rnd(18, string.digits) + "/" + _rnd(68, _AN + "_-")
    add("discord_webhook_url", f"https://discord.com/api/webhooks/{v}", v)
    for prefix in ("sk_live_", "rk_live_"):
        v = prefix + _rnd(24)
        add(f"stripe_{prefix[:2]}", f"stripe {v}", v)
    v = "hf_" + _rnd(34)
    add("huggingface_token", f"HF {v}", v)
    v = "sk-proj-" + _rnd(48)
    add("openai_project_key", f"openai {v}", v)
    v = "sk-" + _rnd(48)
    add("openai_legacy_key", f"legacy {v}", v)
    v = "sk-ant-api03-" + _rnd(80) + "-" + _rnd(6) + "AA"
    add("anthropic_key", f"claude {v}", v)
    v = "AIza" + _rnd(35, _AN + "_-")
    add("google_api_key", f"maps {v}", v)
    v = "GOCSPX-" + _rnd(28, _AN + "_-")
    add("google_oauth_secret", f"client secret {v}", v)
    v = _rnd(86, _B64) + "=="
    add("azure_account_key", f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={v};EndpointSuffix=x", v)
    v = _rnd(43) + "%3D"
    add("azure_sas_sig", f"https://acme.blob.core.windows.net/c?sv=2022-11-02&sp=r&sig={v}", v)
    v = "npm_" + _rnd(36)
    add("npm_token", f"//registry.npmjs.org/:_authToken={v}", v)
    v = "pypi-AgEIcHlwaS5vcmc" + _rnd(60, _AN + "_-")
    add("pypi_token", f"twine upload -p {v}", v)
    v = "SG." + _rnd(22, _AN + "_-") + "." + _rnd(43, _AN + "_-")
    add("sendgrid_key", f"mail {v}", v)
    for prefix in ("SK", "AC"):
        v = prefix + _rnd(32, _HEX)
        add(f"twilio_{prefix.lower()}", f"twilio {v}", v)
    v = _rnd(10, string.digits) + ":AA" + _rnd(33, _AN + "_-")
    add("telegram_bot_token", f"bot {v}", v)
    sig = _rnd(43, _AN + "_-")
    payload = base64.urlsafe_b64encode(b'{"sub":"' + _rnd(12).encode() + b'"}').decode().rstrip("=")
    add("jwt", f"session eyJhbGciOiJIUzI1NiJ9.{payload}.{sig}", sig)
    v = _rnd(40, _AN + "._-")
    add("authorization_bearer", f"Authorization: Bearer {v}", v)
    v = base64.b64encode(f"admin:{_rnd(14)}".encode()).decode()
    add("authorization_basic", f"curl -H 'Authorization: Basic {v}'", v)
    v = _rnd(14)
    add("url_password", f"postgres://app:{v}@db.internal:5432/main", v)
    v = _rnd(32)
    add("json_token_field", '{"token": "' + v + '", "user": "ada"}', v)
    v = _rnd(16)
    add("json_password_field", '{"password": "' + v + '"}', v)
    v = _rnd(16)
    add("escaped_json_password", '{\\"password\\": \\"' + v + '\\"}', v)
    v = _rnd(12)
    add("yaml_password", f"db:\n  host: db.internal\n  password: {v}\n", v)
    v = _rnd(16)
    add("env_prefixed_name", f"DB_PASSWORD={v}", v)
    v = _rnd(32)
    add("export_api_key", f"export OPENAI_API_KEY={v}", v)
    v = _rnd(40)
    add("secret_key_yaml", f"SECRET_KEY: {v}", v)
    v = _rnd(24)
    add("camel_case_name", f'{{clientSecret: "{v}"}}', v)
    add("short_password", "password: q7#Lm", "q7#Lm")
    v = _rnd(12, _AN + "!#%")
    add("cli_flag", f"mysql -u root --password {v} main", v)
    v = _rnd(10)
    add("prose_password", f"my password is {v}", v)
    v = _rnd(20)
    add("prose_api_key", f"The API key for the staging server is {v}.", v)
    v = _rnd(9)
    add("prose_passcode", f"the door passcode was changed to {v} on Monday", v)
    card = _luhn_card()
    add("card_number", f"card {card[:4]} {card[4:8]} {card[8:12]} {card[12:]} exp 09/27", card, card[4:12])
    inner = _rnd(40, _B64)
    v = base64.b64encode(f"aws_secret_access_key={inner}".encode()).decode()
    add("base64_encoded_key", f"echo {v} | base64 -d", v, inner)
    v = "ghp_" + _rnd(36)
    add("token_split_over_lines", f"the token:\n{v[:20]}\n{v[20:]}\nend", v, v[4:20], v[20:])
    v = _rnd(40)
    add("high_entropy_unnamed", f"remember {v} for later", v)
    return s


PLANTED = _planted()
NEEDLES = [n for _, _, ns in PLANTED for n in ns]
PLANTED_KINDS = len(PLANTED)  # 50 kinds; the CLI test plants each in 12 fields and forms (see _plant)

ORDINARY = [
    "Standup moved to 10:05 on Tuesdays; the retro is at 16:30.",
    "Upgraded numpy from 1.26.4 to 2.1.0 and torch to 2.4.1+cpu; Python 3.11.9.",
    "The config is /home/ada/projects/sleepctl/recipes/quick-cpu.yaml, logs in ~/.local/share/sleepctl/default/logs.",
    "Fixed in commit 53caccf4e2b1a9d8c7f6e5d4c3b2a1f0e9d8c7b6; see also 1057c8b.",
    "UUID of the bucket: 3fa85f64-5717-4562-b3fc-2c963f66afa6; digest sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
    "max_tokens: 48\ntemperature: 0.7\nnum_tokens=512\ntoken_budget: 2000\npad_token_id=tok.eos_token_id",
    "tokenizer: smollm2-135m\ntoken_type: bearer\npassword_policy: strict\npassword_min_length: 12",
    "Reset the password for the staging database on Monday; the password policy now needs 12 characters.",
    "Orla said the password is stored in Vault, and the API key is rotated monthly.",
    "The password is required. The token is valid for 3 days. Password: see 1Password.",
    "Dana's phone is +49 30 1234 5678 and the order number is 4000-1234-99; the pickup PIN is 8824.",
    "Model Qwen/Qwen2.5-Coder-1.5B-Instruct and baidu/ERNIE-4.5-21B-A3B-PT, cached under ~/.cache/sleepctl/models.",
    "The function test_redact_planted_secrets_in_every_field_and_form took 12 s; PPDocLayoutV4RepVggBlock too.",
    "Bearer authentication is what the gateway expects; a bearer token goes in the header.",
    "Timestamp 1700000000000 and epoch 1714000000; ISBN 978-3-16-148410-0; loss 0.6451612903225806.",
    "See https://wiki.example.com/kestrel/ops/runbooks/2024-11-incident-review for details.",
    "Use `export PATH=$HOME/.local/bin:$PATH` and `DB_PASSWORD=${DB_PASSWORD}` from the vault.",
    "Set password: <your password here> in the template; api_key: null until provisioned; f(api_key=api_key).",
    "The compass reads north; we bypassed the cache; first_pass: true; secretary: Jane.",
    "Kestrel 2.0 ships on 2025-03-14T09:30:00Z, build 20250314.3, port 8443, --kv-cache-memory=148226997760.",
    "We learn nothing from sk-learn-compatible-estimator-wrappers; pip install 'sleepctl[vllm]'.",
    "My password is the same as before, and your password was reset.",
    "secret_name: db-creds\nsecret_ref: vault://kv/db\ntoken_url: https://auth.example.com/oauth/token",
]


# --- the rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, secret, kind",
    [
        ("key sk-proj-abcdefghijklmnopqrstuvwxyz0123", "sk-proj-abcdefghij", "openai_key"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "aws_access_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghij", "github_token"),
        ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890", "slack_token"),
        ("Authorization: Bearer abc.def-ghi_jkl123456", "abc.def-ghi_jkl123456", "bearer_token"),
        ("db postgres://admin:s3cr3tpw@db.internal:5432/app", "s3cr3tpw", "url_password"),
        ("password = 'Tr0ub4dor&3'", "Tr0ub4dor&3", "secret_assignment"),
        ("API_KEY: 9f8e7d6c5b4a39281706", "9f8e7d6c5b4a39281706", "secret_assignment"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEA",
            "private_key",
        ),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abcdefghijklmnop", "eyJhbGciOiJIUzI1NiJ9", "jwt"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI", "aws_secret_key"),
        ("DB_PASSWORD=PgJC4u5QhOVZkU0J", "PgJC4u5QhOVZkU0J", "secret_assignment"),
        ("hf hf_MLE0EGCUUZVxNgTRH2z1LigYEFgIJiZXqp", "hf_MLE0EGCU", "huggingface_token"),
        ("my password is hunter2", "hunter2", "secret_in_prose"),
    ],
)
def test_redacts(text, secret, kind):
    out, n = redact(text)
    assert secret not in out and f"[REDACTED:{kind}]" in out and n >= 1


@pytest.mark.parametrize("kind, text, needles", PLANTED, ids=[k for k, _, _ in PLANTED])
def test_every_planted_kind_is_redacted_once_and_for_all(kind, text, needles):
    out, n = redact(text)
    assert n >= 1 and not [x for x in needles if x in out], out
    assert redact(out) == (out, 0)  # redacting twice changes nothing: `scan` after `redact --apply` is clean


def test_redacting_twice_changes_nothing_even_for_glued_secrets():
    rng = random.Random(3)
    pieces = [t for _, t, _ in PLANTED] + ORDINARY + ["\n", " ", "=", ":", '"', "\\", "[REDACTED:x]", "\u2028"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces)[: rng.choice([None, rng.randint(0, 30)])] for _ in range(rng.randint(1, 6)))
        out, _ = redact(text)
        assert redact(out) == (out, 0), text


def test_names_keep_their_shape():
    assert redact("export OPENAI_API_KEY=abc123XYZ") == ("export OPENAI_API_KEY=[REDACTED:secret_assignment]", 1)
    assert redact('{\\"password\\": \\"pw1\\"}')[0] == '{\\"password\\": \\"[REDACTED:secret_assignment]\\"}'
    out, _ = redact("clone https://bob:pw123456@git.example.com/repo.git")
    assert out == "clone https://bob:[REDACTED:url_password]@git.example.com/repo.git"
    # a long value on one line and the next setting are two lines, not one wrapped token
    assert redact("DB_PASSWORD=abcdefghijklmnop1234\nNEXT_SETTING=1")[0].endswith("]\nNEXT_SETTING=1")


@pytest.mark.parametrize(
    "name, word",
    [
        ("DB_PASSWORD", "password"),
        ("OPENAI_API_KEY", "api_key"),
        ("SECRET_KEY", "secret"),
        ("clientSecret", "client_secret"),
        ("smtp_pass", "pass"),
        ("x-api-key", "api_key"),
        ("max_tokens", None),
        ("tokenizer", None),
        ("pad_token_id", None),
        ("password_policy", None),
        ("bypass", None),
        ("secretary", None),
    ],
)
def test_secret_names(name, word):
    assert secret_name(name) == word


@pytest.mark.parametrize("text", ORDINARY)
def test_leaves_ordinary_memories_alone(text):
    assert redact(text) == (text, 0), find(text)


# --- linear time --------------------------------------------------------------------------------------------

# Adversarial shapes: each repeats a prefix that some rule starts on and never lets it finish.
ADVERSARIAL = ["a.", "x://a:", "sk-", "password=", '\\"password\\": \\"', "4 ", "-----BEGIN RSA PRIVATE KEY-----\n"]
ADVERSARIAL += ["ABCDEFGHIJKLMNOPQRSTUVWXYZ012345\n", "Authorization: Basic ", "db_password_", "a@", "[REDACTED:x] "]


def _cpu_growth(fn, unit: str, small: int, factor: int = 8) -> float:
    """CPU time on `factor` times the text over CPU time on the small one (best of two each).

    Linear code grows about `factor` times; a quadratic pattern about factor**2. CPU time, not wall time,
    and a ratio, not a duration: a busy machine slows both runs alike."""

    def best(n: int) -> float:
        text = (unit * (n // len(unit) + 1))[:n]
        times = []
        for _ in range(2):
            t0 = time.process_time()
            fn(text)
            times.append(time.process_time() - t0)
        return min(times)

    return best(small * factor) / max(best(small), 1e-4)


def test_the_growth_check_catches_a_quadratic_pattern():
    # the URL rule this module replaced: 300 KB of `a.a.a.` took 45 s
    old = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:(?P<s>[^\s@/]+)@")
    assert _cpu_growth(lambda t: old.findall(t), "a.", 2_000) > 30


@pytest.mark.parametrize("unit", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_linear_time_on_adversarial_input(unit):
    # 40 KB against 320 KB: linear grows ~8x, quadratic ~64x
    assert _cpu_growth(redact, unit, 40_000) < 24


# --- every field, every input path, through the CLI and a tiny seed ------------------------------------------


FORMS = ("chat", "text", "note", "stdin", "--text")


def _plant(tmp_path: Path, home: Path, no_redact: bool = False) -> tuple[int, int]:
    """Every planted secret in 12 places: the text of one memory (the five input forms take turns: a chat
    message, a text record, a note, stdin, --text), and, for all of them, a chat record's tags, source, probe
    question and answer, a text record's the same, --tag, and `probe add`'s question and answer.
    Memory texts hold each secret once, to keep the seed short. Returns (placements, redactions: as `record`
    reports them, and the markers in the probe `probe add` stored)."""
    flag = ["--no-redact"] if no_redact else []
    every = [t for _, t, _ in PLANTED]
    mine = {f: [t for i, t in enumerate(every) if i % len(FORMS) == n] for n, f in enumerate(FORMS)}
    fields = {
        "tags": every,
        "source": " | ".join(every),
        "probes": [{"question": f"What is {k}? {t}", "answer": t} for k, t, _ in PLANTED],
    }
    messages = [{"role": "user", "content": t} for t in mine["chat"]] + [{"role": "assistant", "content": "Noted."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages} | fields) + "\n")
    text = "\n\n".join(["planted as a text record", *mine["text"]])
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": text} | fields) + "\n")
    (tmp_path / "note.md").write_text("\n\n".join(["planted as a note", *mine["note"]]))
    stdin = json.dumps({"text": "\n\n".join(["planted on stdin", *mine["stdin"]])}) + "\n"
    option = "\n\n".join(["planted with --text", *mine["--text"]])
    tags = [x for t in every for x in ("--tag", t)]
    home_json = ["--home", str(home), "--json", *flag]
    runs = [
        cli("record", str(tmp_path / "chat.jsonl"), str(tmp_path / "text.jsonl"), *home_json),
        cli("record", str(tmp_path / "note.md"), *home_json),
        cli("record", "-", *home_json, input=stdin.encode()),
        cli("record", "--text", option, *tags, *home_json),
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr.decode()
    results = [json.loads(r.stdout) for r in runs]
    first, q, a = results[0]["added"][0], "Which keys? " + "\n\n".join(every), "\n\n".join(every)
    if no_redact:  # `probe add` has no --no-redact: a home recorded by an older sleepctl
        add_probe(first, q, a, home=home, redact=False)
    else:
        p = cli("probe", "add", first, "-q", q, "-a", a, "--home", str(home), "--json")
        assert p.returncode == 0, p.stderr.decode()
        probe = json.loads(p.stdout)
        results.append({"redactions": (probe["question"] + probe["answer"]).count("[REDACTED:")})
    return 12 * len(PLANTED), sum(r["redactions"] for r in results)


def _leaks(home: Path) -> dict[str, list[str]]:
    """Planted parts found in any file under the home, the store's own bytes included."""
    found = {}
    for p in sorted(home.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits = [n for n in NEEDLES if n.encode() in data or json.dumps(n)[1:-1].encode() in data]
            if hits:
                found[str(p.relative_to(home))] = hits
    return found


@pytest.fixture(scope="module")
def tiny_recipe(tiny_dir, tmp_path_factory) -> Path:
    """A short night: the test is about what is stored and copied, not about what is learned."""
    # the teacher data is the memories restated: every memory's full text copied into the store and the files
    data = {"questions_per_memory": 0, "entity_prompts": 0, "restatements": 1, "probes_per_memory": 0}
    return write_recipe(
        tmp_path_factory.mktemp("recipe") / "r.yaml",
        tiny_dir,
        data=data | {"max_new_tokens": 4, "max_prompt_tokens": 256},
        loss={"lmbda": 0.0, "lmbda_warmup_steps": 0},
        training={"max_steps": 1},
        anchor={"drift_prompts": 0},
    )


def test_no_planted_secret_is_stored_or_copied_by_a_seed(home, tmp_path, tiny_recipe):
    placements, redactions = _plant(tmp_path, home)
    res = seed(str(tiny_recipe), home=home, show_progress=False)
    assert res.status == "done"
    data = json.loads((Path(res.run_dir) / "data.json").read_text())
    assert data["examples"] and any("[REDACTED:" in x for e in data["examples"] for x in e["samples"])
    leaks = _leaks(home)
    print(f"planted {PLANTED_KINDS} kinds in {placements} places; redacted {redactions}; leaked {len(leaks)}")
    assert not leaks, f"planted {PLANTED_KINDS} kinds in {placements} places, redacted {redactions}: {leaks}"
    listing = cli("list", "--home", str(home), "--json")
    assert listing.returncode == 0 and not [n for n in NEEDLES if n in listing.stdout.decode()]


def test_scan_and_redact_apply_on_a_home_recorded_without_redaction(home, tmp_path, tiny_recipe):
    _plant(tmp_path, home, no_redact=True)
    res = seed(str(tiny_recipe), home=home, show_progress=False)
    assert res.status == "done" and _leaks(home)  # the secrets are in the store and the run's files

    scan = cli("scan", "--home", str(home), "--json")
    assert scan.returncode == 0
    report = json.loads(scan.stdout)
    assert report["status"] == "found" and report["total"] >= len(NEEDLES)
    places = set(report["by_place"])
    assert {"store.traces", "store.probes", "store.examples", "datasets/", "runs/"} <= places, places
    human = cli("scan", "--home", str(home))
    for out in (scan, human):  # counts and places, never the secrets
        assert not [n for n in NEEDLES if n in out.stdout.decode() + out.stderr.decode()]

    before = _snapshot(home)
    dry = cli("redact", "--home", str(home), "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["status"] == "dry-run"
    assert _snapshot(home) == before  # a dry run changes nothing

    applied = cli("redact", "--apply", "--home", str(home), "--json")
    assert applied.returncode == 0, applied.stderr.decode()
    assert json.loads(applied.stdout)["total"] == report["total"]
    assert not _leaks(home)  # rows, their old pages and write-ahead log, files
    again = json.loads(cli("scan", "--home", str(home), "--json").stdout)
    assert again["status"] == "clean" and again["total"] == 0
    for p in home.rglob("*.json"):
        json.loads(p.read_text())  # files stay valid JSON
    # the home still works: a second night resumes from the redacted teacher data
    assert cli("list", "--home", str(home)).returncode == 0


def _snapshot(home: Path) -> tuple:
    files = {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if not k.startswith("sleepctl.db")}
    with sqlite3.connect(f"file:{home / 'sleepctl.db'}?mode=ro", uri=True) as db:
        rows = list(db.iterdump())
    return files, rows


def test_bad_input_to_scan_and_redact_is_one_line(home, tmp_path):
    def one_line(r, code: int, needle: str) -> None:
        lines = [x for x in r.stderr.decode().split("\n") if x.strip()]
        assert r.returncode == code and len(lines) == 1 and needle in lines[0], r.stderr.decode()

    one_line(cli("scan", "--home", str(tmp_path / "nowhere")), 1, "no sleepctl home")
    one_line(cli("redact", "--apply", "--home", str(tmp_path / "nowhere")), 1, "no sleepctl home")
    (tmp_path / "file").write_text("x")
    one_line(cli("scan", "--home", str(tmp_path / "file")), 1, "not a directory")
    record(text="password: hunter2x", home=home, redact=False)
    with sleep_lock(open_home(home), "seed"):  # a night at work: --apply waits for it, exit 75 for cron
        one_line(cli("redact", "--apply", "--home", str(home)), 75, "holds")
    assert cli("scan", "--home", str(home), "--json").returncode == 0
    r = cli("redact", "--bogus", "--home", str(home))
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_apply_merges_twins_keeps_links_and_reports_unreadable_files(home, tmp_path):
    keys = ["sk-proj-" + _rnd(40) for _ in range(3)]
    a = record(text=f"deploy token {keys[0]}", home=home, redact=False).added[0]
    record(text=f"deploy token {keys[1]}", home=home, redact=False)  # redacts into the first one's twin
    add_probe(a, f"Which key, {keys[0]}?", "that one", home=home, redact=False)
    add_probe(a, f"Which key, {keys[1]}?", "that one", home=home, redact=False)  # the same question, redacted
    run = home / "runs" / "seed_x"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text(f"pasted {keys[0]}\n")
    (run / "dreams.jsonl").write_text(json.dumps({"dream": keys[1]}) + "\nnot json " + keys[2] + "\n")
    (run / "latin1.log").write_bytes(b"caf\xe9 " + keys[2].encode())
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"key": keys[2]}))
    (home / "datasets").mkdir(exist_ok=True)
    (home / "datasets" / "link.json").symlink_to(outside)  # a planted link: never followed, never rewritten

    res = cli("redact", "--apply", "--home", str(home), "--json")
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout)
    assert report["merged_probes"] == 1 and report["skipped"] == ["runs/seed_x/latin1.log: not UTF-8"]
    assert {"store.traces", "store.probes", "runs/"} <= set(report["by_place"])
    assert outside.read_text() == json.dumps({"key": keys[2]}) and (home / "datasets" / "link.json").is_symlink()
    assert not [k for k in keys if k in (run / "notes.txt").read_text() + (run / "dreams.jsonl").read_text()]
    assert json.loads((run / "dreams.jsonl").read_text().split("\n")[0]) == {"dream": "[REDACTED:openai_key]"}
    texts = [t["text"] for t in json.loads(cli("list", "--home", str(home), "--json").stdout)]
    assert texts == ["deploy token [REDACTED:openai_key]"] * 2
    again = record(text=f"deploy token {keys[2]}", home=home)  # redacted on the way in: a duplicate now
    assert again.added == [] and len(again.duplicates) == 1


def test_a_secret_in_a_stored_system_prompt_is_found_and_redacted(home, tmp_path):
    key = "sk-proj-" + _rnd(40)
    p = tmp_path / "chat.jsonl"
    msgs = [
        {"role": "system", "content": f"Call the API with {key}."},
        {"role": "user", "content": "Ivo's bike is green."},
    ]
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    mid = record([p], home=home, redact=False).added[0]  # a home recorded by an older sleepctl, or --no-redact
    scan = json.loads(cli("scan", "--home", str(home), "--json").stdout)
    assert "store.traces" in scan["by_place"]
    assert cli("redact", "--apply", "--home", str(home)).returncode == 0
    t = show_memory(mid, home)[0]
    assert key not in t.system and "[REDACTED:" in t.system and t.text == "user: Ivo's bike is green."


def test_a_key_at_the_end_of_a_sentence_keeps_the_full_stop():
    key = "sk-proj-" + _rnd(40)
    token = "q8Zr2LmX7vTn4KpW9yBc3HdF6sJg1NaE5uRt0VxY"  # no rule names it: found as random text
    assert redact(f"Call the API with {key}.") == ("Call the API with [REDACTED:openai_key].", 1)
    text, n = redact(f"The session cookie is {token}. Then log in.")
    assert n == 1 and text.endswith("[REDACTED:high_entropy]. Then log in.") and token not in text
