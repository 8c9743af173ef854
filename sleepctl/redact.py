"""Credential redaction before anything is stored: what reaches the weights cannot be taken back.

Layers, each replacing what it finds with `[REDACTED:kind]`:
1. RULES: credentials of a published shape (gitleaks-style: private key blocks, cloud and SaaS tokens,
   webhook URLs, URLs with a password, authorization headers, JWTs), kept as data;
2. key-name rules: a value given to a name that says secret (`*PASSWORD*`, `*SECRET*`, `*TOKEN*`,
   `*API_KEY*`, ... in any case and separator) in env files, YAML, JSON, escaped JSON, flags and prose;
3. card numbers that pass the Luhn check;
4. what no rule names: base64 that decodes to a credential, and long random-looking strings.
A token wrapped over two lines (a key pasted into a narrow terminal) is found across the line break.

Kept on purpose: hex strings (commit SHAs, sha256 digests, UUIDs) are memory content, not secrets by
shape alone; they are redacted only where a rule or a secret name says so.

Time is linear in the text (the old URL rule took 45 s on 300 KB of `a.a.a.`): every repetition is
bounded, no quantifier is nested in another, a pattern that could start anywhere begins with a cheap
look-ahead or look-behind, a private key block ends at the first END after its BEGIN, and a rule runs
only where a literal it needs occurs (`hints`), so ordinary text costs little.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

MARK = "[REDACTED:{}]"
MAX_PASSES = 4
_MARK_RE = re.compile(r"\[REDACTED:[a-z0-9_]{1,40}\]")


def _has_digit_and_letter(v: str) -> bool:
    return any(c.isdigit() for c in v) and any(c.isalpha() for c in v)


def _not_a_word(v: str) -> bool:
    # "Bearer authentication" is prose; a bearer token has a digit, a capital or a symbol
    return not v.isalpha() or not v.islower()


class Rule(NamedTuple):
    """A credential of a published shape. Where `pattern` has a group named `s`, only that part is replaced.

    `hints`: literals one of which any match contains (lower case for a `(?i)` pattern); the rule is skipped
    where none occurs, which keeps ordinary text cheap. `check`, when given, must accept the replaced part.
    """

    kind: str
    hints: tuple[str, ...]
    pattern: str
    check: Callable[[str], bool] | None = None


# Order matters only for a tie: the same span found by two rules is named by the earlier one.
RULES: list[Rule] = [
    Rule(
        "slack_webhook",
        ("hooks.slack.com",),
        r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]{20,200}",
    ),
    Rule(
        "discord_webhook",
        ("/api/webhooks/",),
        r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d{5,30}/[A-Za-z0-9_-]{20,100}",
    ),
    Rule("bearer_token", ("bearer",), r"(?i)\bbearer[ \t]{1,4}(?P<s>[A-Za-z0-9._~+/-]{12,4000}={0,2})", _not_a_word),
    Rule(
        "authorization",
        ("authorization",),
        r"(?i)\b(?:proxy-)?authorization\\?[\"']?[ \t]{0,4}[:=][ \t]{0,4}\\?[\"']?(?:basic|token|apikey|key)"
        r"[ \t]{1,4}(?P<s>[A-Za-z0-9._~+/=:-]{6,4000})",
    ),
    Rule("anthropic_key", ("sk-ant-",), r"\bsk-ant-[A-Za-z0-9_-]{20,300}"),
    Rule("openai_key", ("sk-",), r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,300}", _has_digit_and_letter),
    Rule("stripe_key", ("_live_", "_test_"), r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,250}"),
    Rule("stripe_webhook_secret", ("whsec_",), r"\bwhsec_[A-Za-z0-9+/]{20,200}"),
    Rule(
        "aws_access_key",
        ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
        r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[0-9A-Z]{16}\b",
    ),
    Rule(
        "aws_secret_key",
        ("aws",),
        r"(?i)\baws[A-Za-z0-9_.-]{0,20}?(?:secret|sk)[A-Za-z0-9_.-]{0,20}\\?[\"']?[ \t]{0,4}(?:=>|[:=])[ \t]{0,4}"
        r"\\?[\"']?(?P<s>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
    ),
    Rule(
        "github_token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        r"\b(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{40,255})\b",
    ),
    Rule("gitlab_token", ("gl",), r"\bgl(?:pat|dt|ptt|rt|cbt|oas|ft|imt|soat|agent)-[A-Za-z0-9_-]{20,100}"),
    Rule("slack_token", ("xox", "xapp-"), r"\b(?:xox[abposrce]|xapp)-[A-Za-z0-9-]{10,250}"),
    Rule("google_api_key", ("AIza",), r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"),
    Rule("google_oauth_secret", ("GOCSPX-",), r"\bGOCSPX-[A-Za-z0-9_-]{20,60}"),
    Rule("huggingface_token", ("hf_",), r"\bhf_[A-Za-z0-9]{30,60}\b"),
    Rule("npm_token", ("npm_",), r"\bnpm_[A-Za-z0-9]{36}\b"),
    Rule("pypi_token", ("pypi-AgE",), r"\bpypi-AgE[A-Za-z0-9_-]{50,400}"),
    Rule("sendgrid_key", ("SG.",), r"\bSG\.[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{16,64}"),
    Rule("twilio_key", ("AC", "SK"), r"\b(?:AC|SK)[0-9a-fA-F]{32}\b"),
    Rule("telegram_bot_token", (":AA",), r"\b\d{8,10}:AA[A-Za-z0-9_-]{33}(?![A-Za-z0-9_-])"),
    Rule("mailchimp_key", ("-us",), r"\b[0-9a-f]{32}-us\d{1,2}\b"),
    Rule("shopify_token", ("shp",), r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}\b"),
    Rule("digitalocean_token", ("_v1_",), r"\bdo[opr]_v1_[a-f0-9]{64}\b"),
    Rule("databricks_token", ("dapi",), r"\bdapi[a-f0-9]{32}(?:-\d)?\b"),
    Rule("age_secret_key", ("AGE-SECRET-KEY-1",), r"\bAGE-SECRET-KEY-1[0-9A-Z]{58}\b"),
    Rule(
        "azure_storage_key", ("accountkey",), r"(?i)\bAccountKey[ \t]{0,4}=[ \t]{0,4}(?P<s>[A-Za-z0-9+/]{40,200}={0,2})"
    ),
    Rule("azure_sas_signature", ("sig=",), r"(?i)[?&]sig=(?P<s>[A-Za-z0-9%+/=]{20,300})"),
    Rule("jwt", ("eyJ",), r"\beyJ[A-Za-z0-9_-]{8,2000}\.[A-Za-z0-9_-]{8,4000}\.[A-Za-z0-9_-]{8,2000}"),
]

# --- key names ------------------------------------------------------------------------------------------------

# A name is split into words (snake, kebab, dotted, camelCase); it says secret when a word does.
_SECRET_WORDS = {"password", "passwd", "passphrase", "passcode", "pwd", "secret", "secrets", "credential"}
_SECRET_WORDS |= {"credentials", "token", "apikey", "privatekey", "secretkey", "accesskey", "authkey"}
_SECRET_ENDINGS = ("password", "passwd", "passphrase", "secret", "token", "apikey", "secretkey", "privatekey")
_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key")}
_PAIRS |= {("session", "key"), ("signing", "key"), ("encryption", "key"), ("master", "key"), ("client", "secret")}
_WHOLE_NAMES = {"pin", "pin_code", "pincode", "pin_number", "auth", "pass_word"}
# a word after the secret word that makes the name about the secret, not the secret itself
_NOT_THE_SECRET = {
    "type", "url", "uri", "endpoint", "file", "path", "dir", "length", "len", "size", "count", "limit", "min",
    "max", "policy", "name", "expiry", "expires", "expiration", "ttl", "lifetime", "timeout", "format", "header",
    "field", "prompt", "hint", "label", "placeholder", "rules", "required", "enabled", "reset", "changed",
    "updated", "env", "var", "provider", "manager", "store", "budget", "usage", "id", "ids", "index", "strength",
    "mode", "cache", "location", "source", "version", "kind", "scope", "scopes", "host", "port",
}  # fmt: skip
_CODE_REF = re.compile(r"[A-Za-z_]\w{0,40}(?:\.[A-Za-z_]\w{0,40}){1,5}")
_WORD_SPLIT = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")

# values that are not secrets: switches, placeholders, references to where the secret is kept
_NOT_A_VALUE = {
    "true", "false", "null", "none", "nil", "yes", "no", "on", "off", "required", "optional", "empty", "unset",
    "undefined", "n/a", "na", "redacted", "hidden", "masked", "env", "the", "a", "an", "not", "in", "is", "was",
    "and", "or", "to", "for", "of", "at", "by", "from", "with", "this", "that", "it", "here", "there", "below",
    "above", "same", "stored", "saved", "kept", "set", "reset", "changed", "rotated", "correct", "incorrect",
    "wrong", "valid", "invalid", "expired", "missing", "unknown", "weak", "strong", "long", "short", "ok",
    "okay", "fine", "needed", "mandatory", "still", "now", "also", "being", "too", "very", "case-sensitive",
    "managed", "shared", "sent", "attached", "encrypted", "hashed", "different", "new", "old", "removed", "see",
    "ask", "check", "use",
}  # fmt: skip


def secret_name(name: str) -> str | None:
    """The secret word a name holds (`DB_PASSWORD` -> password), or None (`max_tokens`, `tokenizer`)."""
    words = [w.lower() for w in _WORD_SPLIT.findall(name)]
    if not words:
        return None
    if "_".join(words) in _WHOLE_NAMES:
        return words[0]
    if words[-1] == "pass":  # DB_PASS, SMTP_PASS; not pass_rate, not bypass
        return "pass"
    for i, w in enumerate(words):
        hit, j = w in _SECRET_WORDS or w.endswith(_SECRET_ENDINGS), i + 1
        if not hit and j < len(words) and (w, words[j]) in _PAIRS:
            hit, w, j = True, f"{w}_{words[j]}", j + 1
        if hit:
            return None if any(r in _NOT_THE_SECRET for r in words[j:]) else w
    return None


def _plausible_value(v: str, word: str, quoted: bool) -> bool:
    if not v or v.startswith("[REDACTED") or len(set(v)) == 1:  # '', '****', 'xxxxxx'
        return False
    if v[0] in "$<{%" or "(" in v or v.startswith(("os.environ", "process.env", "env.", "ENV[", "vault:")):
        return False  # ${DB_PASSWORD}, <your key>, {{ secret }}, getenv("X"): where it is, not what it is
    if v.isdigit() and word in ("token", "pass", "secrets", "credentials") and len(v) < 10:
        return False  # max_tokens: 48, pass: 3
    if word == "pwd" and v[:1] in "/~.":
        return False  # a working directory
    if not quoted and (_CODE_REF.fullmatch(v) or secret_name(v)):
        return False  # pad_token = tok.eos_token, f(api_key=api_key): code naming a variable
    return quoted or v.lower() not in _NOT_A_VALUE


_VALUE = (
    r"(?:(?P<q>\\?[\"'])(?P<sq>[^\"'\\\n]{1,500})"  # quoted, also inside escaped JSON
    r"|(?P<su>[^\s\"'`\\<>(){}\[\]]{1,500}))"  # bare, up to a space
)
# NAME = value, NAME: value, "NAME": "value", \\"NAME\\": \\"value\\", export NAME=value, NAME => value.
# Found from a secret stem (cheap to search for); `_key_values` walks back to where the name starts.
_ASSIGN = re.compile(
    r"(?i)(?=[pstkca])(?:pass|pwd|secret|token|key|credential|auth|pin)[A-Za-z0-9_.-]{0,40}(?P<end>)"
    r"\\?[\"']?[ \t]{0,8}(?:=>|:=|[:=])[ \t]{0,8}" + _VALUE
)
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
# the word before a bare `key:` / `token:` ("API key: x", "secret key = x")
_PREV_WORD = re.compile(r"([A-Za-z]{1,20})[ \t]$")
# --password X, --api-key=X
_FLAG = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])--(?P<name>[a-z0-9-]{0,30}(?:password|passwd|token|secret|api-key|apikey)[a-z0-9-]{0,20})"
    r"(?:=|[ \t]{1,4})" + _VALUE
)
# prose: "my password is X", "the wifi password for the office was X". Not a PIN: "the pickup PIN is 8824"
# is a fact an agent is meant to remember (a `pin: 8824` setting is redacted).
_PROSE = re.compile(
    r"(?i)\b(?=[pas])(?P<name>password|passphrase|passcode|api key|secret key|access key|access token"
    r"|auth token|private key)s?(?:[ \t]{1,4}(?:for|of|on|to|at)(?:[ \t]{1,4}[\w.@-]{1,40}){1,3})?"
    r"[ \t]{1,4}(?:is now|is set to|was changed to|changed to|set to|became|is|was|are|were)(?:[ \t]{0,2}:)?[ \t]{1,4}"
    r"(?:[\"'\u201c](?P<sq>[^\"'\u201d\n]{1,200})|(?P<su>[^\s\"',;]{1,500}))"
)

# --- the rest -----------------------------------------------------------------------------------------------

_PRIVATE_BEGIN = re.compile(r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----")
_PRIVATE_END = re.compile(r"-----END[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----")
# found from the `://`, a literal the regex engine searches for fast; the scheme is checked by hand
_URL_AUTH = re.compile(r"://(?P<user>[^\s:/@]{1,200}):(?P<s>[^\s@/]{1,200})@")
_CARD = re.compile(r"(?=[2-6])(?<![\w.-])[2-6](?:[ -]?\d){12,18}(?![\w-]|\.\d)")  # not in 0.6451612903225806
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/]{24,4000}={0,2}(?![A-Za-z0-9+/=_-])")
# `=` only as padding: NAME=value is two tokens, so the name stays and the value is named secret_assignment
_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_.-])[A-Za-z0-9+/_.-]{24,4000}={0,2}(?![A-Za-z0-9+/=_.-])")
_WORDS = re.compile(r"[A-Z]?[a-z]{3,}|[A-Z]{3,}(?![a-z])")
_CAMEL = re.compile(r"[A-Z][a-z]{2,}|[a-z]{3,}")
_SEP = re.compile(r"[-_./:+=]")
_HEX_LIKE = re.compile(r"[0-9a-fA-F-]{1,4000}")
_WRAP = re.compile(r"\n(?:(?<=[A-Za-z0-9+/=_.-]{16}\n)|(?<=[A-Za-z0-9+/=_.-]{16}\r\n))(?=[A-Za-z0-9+/=_.-]{8})")
_CONTINUATION = re.compile(r"[A-Za-z0-9+/_.-]{1,4000}={0,2}")

_COMPILED = [(r, re.compile(r.pattern), r.pattern.startswith("(?i)")) for r in RULES]
_RANK = {k: i for i, k in enumerate([r.kind for r in RULES] + ["private_key", "url_password"])}


def kinds() -> list[str]:
    """Every kind of finding, in the order the README lists them."""
    return ["private_key", "url_password", *[r.kind for r in RULES]] + [
        "secret_assignment",
        "secret_in_prose",
        "card_number",
        "base64_secret",
        "high_entropy",
    ]


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(s: str) -> bool:
    """13-19 digits passing Luhn, grouped as cards are printed (4-4-4-4, 4-6-5) if grouped at all."""
    groups = [len(g) for g in re.split(r"[ -]", s)]
    if (
        len(groups) > 1
        and not (groups[:-1] == [4] * (len(groups) - 1) and 1 <= groups[-1] <= 4)
        and groups[:2] != [4, 6]
    ):
        return False
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn(digits)


def entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _wordy(s: str) -> bool:
    return sum(len(w) for w in _WORDS.findall(s)) * 2 >= len(s)


def looks_random(tok: str) -> bool:
    """A credential-like string: long, letters and digits mixed, high entropy, not hex, not made of words.

    Tuned on the 6,457 tokens of 24+ characters in this repository's and its dependencies' sources (2 flagged:
    a JWT and a class path) and on random strings (about 80-90% of 24-40 mixed-case characters flagged;
    lower case and digits alone rarely are).
    """
    t = tok.strip("=.-_")
    if len(t) < 24 or not _has_digit_and_letter(t) or _HEX_LIKE.fullmatch(t) or _wordy(t):
        return False  # short, hashes and UUIDs, identifiers and file names
    pieces = [p for p in _SEP.split(t) if p]
    if len(pieces) >= 3 and max(map(len, pieces)) <= 12:
        return False  # a model id, a version, a file name: Qwen/Qwen2.5-Coder-1.5B-Instruct
    if sum(len(w) for w in _CAMEL.findall(t)) >= 0.6 * len(t):
        return False  # PPDocLayoutV4RepVggBlock
    segs = [x for x in t.split("/") if x]
    if (tok[0] in "/~." or len(segs) >= 3) and sum(map(_wordy, segs)) * 2 >= len(segs):
        return False  # a path (base64 has a slash or two, but its pieces are not words)
    # random base62 of n characters has an entropy near log2(n) while n < 62, and changes between lower
    # case, upper case, digit and symbol at most characters; `kv-cache-memory=148226997760` does neither
    classes = [c.islower() + 2 * c.isupper() + 3 * c.isdigit() for c in t]
    changes = sum(a != b for a, b in zip(classes, classes[1:]))
    return changes >= 0.25 * (len(t) - 1) and entropy(t) >= min(4.5, math.log2(len(t)) - 0.6)


def _b64_secret(run: str) -> bool:
    """A base64 run that decodes to text holding a credential (a key pasted through `base64`)."""
    try:
        raw = base64.b64decode(run + "=" * (-len(run.rstrip("=")) % 4), validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text) and bool(_find(text, deep=False))


def _add(spans: list, a: int, b: int, kind: str) -> None:
    if b > a:
        spans.append((a, b, kind))


def _key_values(text: str, spans: list) -> None:
    for m in _ASSIGN.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 60 and text[start - 1] in _NAME_CHARS:
            start -= 1
        name = text[start : m.end("end")]
        word = secret_name(name)
        if word is None and name.lower() in ("key", "keys"):
            prev = _PREV_WORD.search(text, max(0, start - 21), start)
            word = secret_name(f"{prev.group(1)}_{name}") if prev else None
        _value_span(m, word, "secret_assignment", spans)
    for m in _FLAG.finditer(text):
        _value_span(m, secret_name(m.group("name")), "secret_assignment", spans)
    for m in _PROSE.finditer(text):
        _value_span(m, m.group("name").split()[0].lower(), "secret_in_prose", spans)


def _value_span(m: re.Match[str], word: str | None, kind: str, spans: list) -> None:
    if word is None:
        return
    quoted = m.group("sq") is not None
    g = "sq" if quoted else "su"
    a, b = m.span(g)
    v = m.group(g)
    if not quoted:
        stripped = v.rstrip(".,;:!?")
        b -= len(v) - len(stripped)
        v = stripped
    if kind == "secret_in_prose" and not quoted and v.isdigit() and len(v) < 4:
        return  # "the password is 8 characters long"
    if _plausible_value(v, word, quoted):
        _add(spans, a, b, kind)


def _find(text: str, deep: bool = True) -> list[tuple[int, int, str]]:
    """Spans (start, end, kind) to replace, left to right, not overlapping."""
    spans: list[tuple[int, int, str]] = []
    done = 0
    for m in _PRIVATE_BEGIN.finditer(text):
        if m.start() < done:
            continue
        end = _PRIVATE_END.search(text, m.end())
        done = end.end() if end else len(text)  # no END: a truncated paste; everything after it goes
        _add(spans, m.start(), done, "private_key")
    for m in _URL_AUTH.finditer(text):
        if m.start() > 0 and text[m.start() - 1].isalnum():
            _add(spans, *m.span("s"), "url_password")
    lower = text.lower()
    for rule, pat, nocase in _COMPILED:
        if not any(h in (lower if nocase else text) for h in rule.hints):
            continue
        for m in pat.finditer(text):
            a, b = m.span("s") if "s" in pat.groupindex else m.span()
            if rule.check is None or rule.check(text[a:b]):
                _add(spans, a, b, rule.kind)
    _key_values(text, spans)
    for m in _CARD.finditer(text):
        if _card(m.group()):
            _add(spans, *m.span(), "card_number")
    if deep:
        for m in _B64.finditer(text):
            if _b64_secret(m.group()):
                _add(spans, *m.span(), "base64_secret")
        for m in _TOKEN.finditer(text):
            a, b = m.span()
            while b > a and text[b - 1] == ".":  # a token never ends in a dot; a sentence does
                b -= 1
            if looks_random(text[a:b]):
                _add(spans, a, b, "high_entropy")
    # a finding that touches an earlier redaction is that redaction: redacting twice changes nothing
    marks = [m.span() for m in _MARK_RE.finditer(text)] if "[REDACTED:" in text else []
    if marks:
        starts = [a for a, _ in marks]
        spans = [s for s in spans if not _overlaps(s, marks, starts)]
    return _merge(spans)


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Left to right, not overlapping: overlapping findings become one redaction, named by the first
    (the longest where two start together, the earlier rule where they also end together)."""
    spans = sorted(spans, key=lambda s: (s[0], -(s[1] - s[0]), _RANK.get(s[2], len(_RANK))))
    out: list[tuple[int, int, str]] = []
    for a, b, k in spans:
        if out and a < out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b, out[-1][2])
            continue
        out.append((a, b, k))
    return out


def _overlaps(s: tuple[int, int, str], marks: list[tuple[int, int]], starts: list[int]) -> bool:
    i = bisect.bisect_right(starts, s[1] - 1) - 1  # the last mark starting inside or before the span
    return i >= 0 and marks[i][1] > s[0]


def _line_breaks_in_tokens(text: str) -> list[tuple[int, int]]:
    """Spans of line breaks inside a token: 16 token characters before, 8 after, no space."""
    return [(m.start() - (text[m.start() - 1] == "\r"), m.end()) for m in _WRAP.finditer(text)]


def find(text: str) -> list[tuple[int, int, str]]:
    """Spans (start, end, kind) of credentials in `text`, including tokens wrapped over two lines."""
    if not text:
        return []
    spans = _find(text)
    breaks = _line_breaks_in_tokens(text)
    if not breaks:
        return spans
    # Scan once more with those line breaks removed; keep what crosses one and goes on as a token
    # (a `KEY=long-value` line followed by `NEXT_KEY=1` is two lines, not one token).
    joined = "".join(text[a:b] for a, b in zip([0] + [e for _, e in breaks], [s for s, _ in breaks] + [len(text)]))
    at, removed, total = [], [], 0  # where each break was in `joined`; characters removed up to it
    for s, e in breaks:
        at.append(s - total)
        total += e - s
        removed.append(total)

    def orig(j: int, end: bool = False) -> int:
        k = bisect.bisect_left(at, j) if end else bisect.bisect_right(at, j)
        return j + (removed[k - 1] if k else 0)

    extra = []
    for a, b, kind in _find(joined):
        k = bisect.bisect_right(at, a)
        if k == len(at) or at[k] >= b:
            continue  # crosses no break: found on the text as it is
        oa, ob = orig(a), orig(b, end=True)
        if all(_CONTINUATION.fullmatch(line.rstrip("\r")) for line in text[oa:ob].split("\n")[1:]):
            extra.append((oa, ob, kind))
    return _merge(spans + extra) if extra else spans


def redact(text: str) -> tuple[str, int]:
    """Return the text with credentials replaced by `[REDACTED:kind]`, and how many were replaced."""
    out, kinds = redact_kinds(text)
    return out, kinds.total()


def redact_kinds(text: str) -> tuple[str, Counter[str]]:
    """Like `redact`, with what was replaced counted by kind (never the credentials themselves).

    Replacing can make a new finding where two were glued together (`4111 1111 1111 1111-----BEGIN ...`: the
    card ends at the key block's marker, not at a dash), so it runs again until nothing is found (a few
    passes at most), and redacting redacted text changes nothing: `scan` after `redact --apply` is clean."""
    total: Counter[str] = Counter()
    for _ in range(MAX_PASSES):
        spans = find(text)
        if not spans:
            break
        out, pos = [], 0
        for a, b, kind in spans:
            out.append(text[pos:a])
            out.append(MARK.format(kind))
            pos = b
        out.append(text[pos:])
        text = "".join(out)
        total.update(k for _, _, k in spans)
    return text, total
