"""Showing text that users supply (tenant, host and metric names, file names, database errors).

Such text reaches terminals, one-line errors and log lines. Three rules, one function each:

- :func:`escape_controls` makes control characters visible (``ESC`` → ``\\x1b``, a newline →
  ``\\n``, a right-to-left override → ``\\u202e``) and keeps every ordinary character, accents,
  CJK and emoji included: a name can neither drive the terminal (colours, titles, cursor moves,
  OSC 8 links) nor reorder or split the line it is printed on.
- :func:`quote_name` is how an error message names a user-supplied value: ``repr``-quoted (so
  ``'Acme '`` shows its trailing space) and cut to ``limit`` characters with a marker that says
  how long it was (``'AAAA'…(10240 chars)``).
- :func:`one_line` turns any message into one bounded line (controls escaped, then cut).
"""

from __future__ import annotations

__all__ = ["escape_controls", "one_line", "quote_name"]

NAME_LIMIT = 64
"""Characters of a user-supplied name that an error message shows."""

LINE_LIMIT = 1000
"""Characters of a one-line error (what follows is cut, with a marker)."""

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Invisible characters that reorder or split what a terminal shows (bidirectional controls,
# line and paragraph separators), beside the C0/C1 control characters and DEL.
_FORMAT = frozenset("\u061c\u200e\u200f\u2028\u2029"
                    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return (code < 0x20 or 0x7F <= code < 0xA0 or ch in _FORMAT
            or 0xD800 <= code < 0xE000)  # lone surrogates (undecodable bytes)


def escape_controls(text: str) -> str:
    """``text`` with every control character shown as its escape (``\\x1b``, ``\\n``)."""
    if not any(_is_control(ch) for ch in text):
        return text
    return "".join(_escape(ch) if _is_control(ch) else ch for ch in text)


def _cut(text: str, limit: int) -> tuple[str, str]:
    if len(text) <= limit:
        return text, ""
    return text[:limit], f"…({len(text)} chars)"


def quote_name(name: object, *, limit: int = NAME_LIMIT) -> str:
    """``name`` quoted like ``repr`` and cut to ``limit`` characters: ``'Acme '``. A value that
    is not a string (a number, a decoded JSON value) is shown by
    :func:`metering.errors.shown`, which is bounded for any value (a 5,000-digit integer, JSON
    nested a thousand deep)."""
    if not isinstance(name, str):
        from metering.errors import shown

        return shown(name, limit=limit)
    head, marker = _cut(name, limit)
    return repr(head) + marker


def one_line(text: str, *, limit: int = LINE_LIMIT) -> str:
    """``text`` on one line: control characters (newlines too) escaped, then cut to ``limit``."""
    head, marker = _cut(escape_controls(text.strip()), limit)
    return head + marker
