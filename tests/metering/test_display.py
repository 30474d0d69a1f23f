"""How user-supplied text is shown: control characters escaped, names quoted and cut."""

from __future__ import annotations

import pytest

from metering.display import escape_controls, one_line, quote_name


@pytest.mark.parametrize(("raw", "shown"), [
    ("a\x1b[31mred", "a\\x1b[31mred"),                    # CSI: colours, cursor moves
    ("\x1b]0;pwned\x07title", "\\x1b]0;pwned\\x07title"),  # OSC: window title, BEL
    ("\x1b]8;;http://evil/\x1b\\link", "\\x1b]8;;http://evil/\\x1b\\link"),  # OSC 8 link
    ("two\nlines\rback\ttab", "two\\nlines\\rback\\ttab"),
    ("del\x7f c1\x9b31m", "del\\x7f c1\\x9b31m"),            # DEL, the 8-bit CSI
    ("abc\u202edcba", "abc\\u202edcba"),                     # right-to-left override
    ("line\u2028sep", "line\\u2028sep"),
    ("undecodable\udcff", "undecodable\\udcff"),
])
def test_control_characters_are_escaped_visibly(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown


def test_ordinary_unicode_is_kept() -> None:
    text = "Café 日本語 テナント 😀 👩‍💻 naïve [bold] :smile: back\\slash"
    assert escape_controls(text) == text


def test_names_are_quoted_so_that_spaces_show() -> None:
    assert quote_name("Acme ") == "'Acme '"
    assert quote_name("acme") == "'acme'"
    assert quote_name("a\x1b[2Jb") == "'a\\x1b[2Jb'"
    assert quote_name("日本") == "'日本'"


def test_long_names_are_cut_with_their_length() -> None:
    shown = quote_name("A" * 10240)
    assert shown.endswith("…(10240 chars)")
    assert len(shown) < 100
    assert quote_name("B" * 64) == "'" + "B" * 64 + "'"  # at the limit: whole, no marker


def test_one_line_escapes_newlines_and_cuts() -> None:
    assert one_line("first\nsecond") == "first\\nsecond"
    cut = one_line("x" * 5000, limit=100)
    assert cut == "x" * 100 + "…(5000 chars)"
