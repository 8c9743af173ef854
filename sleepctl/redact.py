"""Credential redaction before anything is stored: what reaches the weights cannot be taken back."""

from __future__ import annotations

import re

# Ordered: the specific shapes first, so a private key block is not half-eaten by a generic rule.
# Where a pattern has a group named `s`, only that part is replaced, so the sentence keeps its shape.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("private_key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.S)),
    ("url_password", re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:(?P<s>[^\s@/]+)@")),
    ("bearer_token", re.compile(r"(?i)\bbearer\s+(?P<s>[A-Za-z0-9\-._~+/]{12,}=*)")),
    ("openai_key", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}")),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b")),
    ("slack_token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    (
        "secret_assignment",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret)"
            r"[\"']?\s*[:=]\s*[\"']?(?P<s>[^\s\"',;\[]{6,})"
        ),
    ),
]


def redact(text: str) -> tuple[str, int]:
    """Return the text with credentials replaced by `[REDACTED:kind]`, and how many were replaced."""
    total = 0
    for kind, pat in PATTERNS:
        tag = f"[REDACTED:{kind}]"

        def sub(m: re.Match[str], tag: str = tag) -> str:
            if "s" not in m.re.groupindex:
                return tag
            a, b = m.span("s")
            s0 = m.start()
            return m.group(0)[: a - s0] + tag + m.group(0)[b - s0 :]

        text, n = pat.subn(sub, text)
        total += n
    return text, total
