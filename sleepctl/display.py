"""Stored content printed as plain text.

Memories, probes, tags, sources, model names and model output come from the agent, not from sleepctl.
Printed as rich markup, `[/b]` in a memory crashes the command; printed raw, an ANSI/OSC escape or a bidi
override in a memory drives the terminal. Every command that echoes such text goes through here: it becomes
a rich `Text` (never parsed as markup) with control characters shown as escapes (`\\x1b`, `\\u202e`).
"""

from __future__ import annotations

from rich.text import Text

# Bidi controls reorder what is shown ("Trojan Source"); line/paragraph separators break lines in some terminals.
_INVISIBLE = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
MAX_ERROR_CHARS = 500  # an error quoting a 1 MB key is still one readable line


def _table(multiline: bool) -> dict[int, str]:
    t = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}  # C0, DEL, C1 (0x9b is CSI)
    t.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
    t.update({ord(c): f"\\u{ord(c):04x}" for c in _INVISIBLE})
    t.update({c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)})  # lone surrogates would crash the UTF-8 encoder
    if multiline:
        del t[0x09], t[0x0A]
    return t


_ONE_LINE, _MULTI_LINE = _table(False), _table(True)


def safe(value: object, multiline: bool = False) -> str:
    """`value` as text that cannot drive the terminal; `multiline` keeps newlines and tabs."""
    return str(value).translate(_MULTI_LINE if multiline else _ONE_LINE)


def plain(value: object, style: str = "", multiline: bool = False) -> Text:
    """A rich renderable of `value` that is never parsed as markup."""
    return Text(safe(value, multiline), style=style)


def line(*parts: object | tuple[object, str]) -> Text:
    """One line assembled from plain parts; a `(value, style)` pair is styled, nothing is parsed as markup."""
    return Text.assemble(*((safe(p[0]), p[1]) if isinstance(p, tuple) else safe(p) for p in parts))


def one_line(message: str) -> str:
    """An error message on one line: its own lines joined with '; ', escapes shown, long ones cut."""
    s = safe("; ".join(x.strip() for x in str(message).split("\n") if x.strip()))
    return s if len(s) <= MAX_ERROR_CHARS else s[: MAX_ERROR_CHARS - 1] + "…"
