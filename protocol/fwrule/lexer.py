"""The rule-language lexer: text in, one token at a time out.

The lexer is **first-match in a fixed order**, not longest-match, exactly as the reference
grammar declares its token rules:

    whitespace, end of input, keywords, ``-`` ``,`` ``=`` ``(`` ``)``, STRING, IPV4ADDR,
    IPV6ADDR, CIDRSUFFIX, WORD

Consequences worth remembering: ``-1`` is ``-`` then ``1``; ``20-40`` is one WORD (the ``-``
rule cannot match at the ``2``); ``all-web`` is the keyword ``ALL`` followed by ``-`` (a keyword
only needs a non-word character after it, and ``-`` is not a word character), while
``web-all`` is one WORD. Keywords are recognised in exactly two spellings, all upper-case and
all lower-case; ``From`` or ``Tcp`` are WORDs and fail later in the parser.

Tokens are produced lazily (:meth:`Lexer.next_token`) because that is when the reference
reports lexer errors: only when the parser asks for the token that cannot be lexed, so a
syntax error earlier in the text wins.

Positions. Error messages count characters the way the reference (JavaScript) does: in UTF-16
code units, and columns restart after a line break. :attr:`Token.end_col` is that column just
past the token; lexer errors use the length of the consumed input, shown at most as 20
characters behind ``...`` (so the number never exceeds 23).

Whitespace is what JavaScript's ``\\s`` matches, as in the reference: the ASCII spaces (space,
tab, LF, CR, FF, VT) and U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F,
U+3000 and U+FEFF. (Python's ``\\s`` differs: it also takes U+001C-U+001F and U+0085 and
misses U+FEFF, so the class is spelled out.) U+2028/U+2029 separate tokens but, as in the
reference, do not restart the error column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FwruleError

#: Every keyword of the language (version 4). Each matches only all-upper or all-lower.
KEYWORDS: tuple[str, ...] = (
    "FROM",
    "TO",
    "IP",
    "SUBNET",
    "ANY",
    "ALL",
    "TAG",
    "VM",
    "VMS",
    "OR",
    "AND",
    "BLOCK",
    "ALLOW",
    "PORT",
    "PORTS",
    "TCP",
    "UDP",
    "ICMP",
    "ICMP6",
    "AH",
    "ESP",
    "TYPE",
    "CODE",
    "PRIORITY",
)
_KEYWORD_SPELLINGS: dict[str, str] = {}
for _kw in KEYWORDS:
    _KEYWORD_SPELLINGS[_kw] = _kw
    _KEYWORD_SPELLINGS[_kw.lower()] = _kw

#: JavaScript's ``\s`` (ECMAScript WhiteSpace and LineTerminator), what the reference skips
JS_WHITESPACE = " \t\n\r\f\v\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_WHITESPACE = re.compile(f"[{JS_WHITESPACE}]+")
_WORD_CHARS = re.compile(r"[A-Za-z0-9_]+")
_PUNCT = frozenset("-,=()")
_STRING = re.compile(r'"(?:\\["bfnrt/()\\]|\\u[a-fA-F0-9]{4}|[^"\\])*"')
_IPV4 = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV6 = re.compile(r"[0-9a-f]*:[0-9a-f]*:[0-9a-f:]*")
_CIDR = re.compile(r"/[0-9]{1,3}")
_WORD = re.compile(r"[-A-Za-z0-9_]+")
# How the reference finds line breaks when it updates its column counter (JavaScript's "."
# stops at CR, LF, U+2028 and U+2029).
_LINE_TAIL = re.compile("(?:\r\n?|\n)[^\n\r\u2028\u2029]*")

_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "(": "(",
    ")": ")",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def utf16_len(text: str) -> int:
    """Length of ``text`` in UTF-16 code units (what JavaScript's ``length`` reports)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def utf16_key(text: str) -> bytes:
    """Sort key that orders strings by UTF-16 code units, as JavaScript's default sort does."""
    return text.encode("utf-16-be", "surrogatepass")


def _utf16_units(text: str) -> bytes:
    return text.encode("utf-16-le", "surrogatepass")


def _from_units(units: bytes) -> str:
    # A slice may split a surrogate pair; show the broken half as U+FFFD.
    return units.decode("utf-16-le", "replace")


def unescape_string(body: str) -> str:
    """Decode the inside of a STRING token (already known to be well formed).

    ``\\uXXXX`` escapes that form a surrogate pair are joined into one character, so
    ``"\\ud83d\\ude00"`` and a literal emoji give the same tag.
    """
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = body[i + 1]
        if esc == "u":
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(_SIMPLE_ESCAPES[esc])
            i += 2
    text = "".join(out)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return text


@dataclass(frozen=True, slots=True)
class Token:
    """One lexed token.

    ``kind`` is the terminal name (``"FROM"``, ``"WORD"``, ``"STRING"``, ``"("``, ``"EOF"``...),
    ``text`` the characters matched (quotes and escapes included for a STRING), ``value`` what
    the parser uses (the unescaped body of a STRING, else ``text``), ``start``/``end`` offsets
    into the input (Python characters) and ``end_col`` the reference's column just past it.
    """

    kind: str
    text: str
    value: str
    start: int
    end: int
    end_col: int


class Lexer:
    """Splits rule text into tokens on demand; the last token is always ``EOF``."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._col = 0
        self._done = False

    def _advance(self, chunk: str) -> None:
        self._pos += len(chunk)
        tails = _LINE_TAIL.findall(chunk)
        if tails:
            tail = tails[-1]
            brk = 2 if tail.startswith("\r\n") else 1
            self._col = utf16_len(tail) - brk
        else:
            self._col += utf16_len(chunk)

    def _error(self) -> FwruleError:
        past = _utf16_units(self._text[: self._pos])
        if len(past) > 40:
            shown = "..." + _from_units(past[-40:])
        else:
            shown = _from_units(past)
        shown = shown.replace("\n", "")
        upcoming = _from_units(_utf16_units(self._text[self._pos :])[:40]).replace("\n", "")
        return FwruleError(
            "rule",
            f"Error at character {utf16_len(shown)}: '{upcoming}', found: unexpected text",
        )

    def _make(self, kind: str, text: str, value: str | None = None) -> Token:
        start = self._pos
        self._advance(text)
        return Token(kind, text, text if value is None else value, start, self._pos, self._col)

    def next_token(self) -> Token:
        """Return the next token, or raise the reference's "unexpected text" error."""
        text = self._text
        if self._done:
            return Token("EOF", "", "", self._pos, self._pos, self._col)
        m = _WHITESPACE.match(text, self._pos)
        if m:
            self._advance(m.group())
        pos = self._pos
        if pos >= len(text):
            self._done = True
            return Token("EOF", "", "", pos, pos, self._col)
        m = _WORD_CHARS.match(text, pos)
        if m and m.group() in _KEYWORD_SPELLINGS:
            return self._make(_KEYWORD_SPELLINGS[m.group()], m.group())
        ch = text[pos]
        if ch in _PUNCT:
            return self._make(ch, ch)
        m = _STRING.match(text, pos)
        if m:
            return self._make("STRING", m.group(), unescape_string(m.group()[1:-1]))
        for kind, pattern in (
            ("IPV4ADDR", _IPV4),
            ("IPV6ADDR", _IPV6),
            ("CIDRSUFFIX", _CIDR),
            ("WORD", _WORD),
        ):
            m = pattern.match(text, pos)
            if m:
                return self._make(kind, m.group())
        raise self._error()


def tokenize(text: str) -> list[Token]:
    """Lex the whole text (a debugging aid; the parser lexes lazily)."""
    lexer = Lexer(text)
    tokens = [lexer.next_token()]
    while tokens[-1].kind != "EOF":
        tokens.append(lexer.next_token())
    return tokens
