"""containerd's filter syntax (``filters.ParseAll``), as used by Snapshots.List / Walk.

    selectors := selector ("," selector)*          all must match
    selector  := fieldpath [operator value]         no operator: "is present"
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." (Go escapes); for ~= also /.../ or |...|

Several filter strings are ORed. Snapshot fields (containerd's adaptor): ``name``
and ``parent`` are always present (so ``parent==""`` matches base layers),
``kind`` is active|view|committed, ``labels.<key>`` is present when the label is.

    match = compile_filters(['labels."containerd.io/snapshot.ref"==sha256:..,parent==""'])
    match(info)  # -> bool
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from .errors import InvalidArgument
from .snapshots import Info, Kind

_EOF = ""
_QUOTES = '/|"'
_SEPARATORS = ",."
_OPERATOR_CHARS = "=!~"


@dataclass
class _Selector:
    fieldpath: list[str]
    op: str            # "present", "==", "!=", "~="
    value: str = ""
    regex: re.Pattern | None = None

    def match(self, field: Callable[[list[str]], tuple[str, bool]]) -> bool:
        value, present = field(self.fieldpath)
        if self.op == "present":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        return bool(self.regex.search(value))


def _is_field_char(c: str) -> bool:
    return c == "_" or ("A" <= c <= "Z") or ("a" <= c <= "z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    if c == "," or c.isspace():
        return False
    cat = unicodedata.category(c)
    return not cat.startswith("C")   # letters, digits, punctuation, symbols


class _Scanner:
    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.value_mode = False

    def _err(self, pos: int, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error: [{self.s}] at {pos}: {msg}")

    def peek(self) -> str:
        j = self.i
        while j < len(self.s) and self.s[j].isspace():
            j += 1
        return self.s[j] if j < len(self.s) else _EOF

    def scan(self) -> tuple[int, str, str]:
        """(pos, token kind, text); kinds: eof, quoted, sep, op, value, field."""
        s = self.s
        while self.i < len(s) and s[self.i].isspace():
            self.i += 1
        pos = self.i
        if self.i >= len(s):
            return pos, "eof", ""
        c = s[self.i]
        if c == "\0":
            raise self._err(pos, "unexpected null")
        if c in _QUOTES:
            j = self.i + 1
            while True:
                if j >= len(s) or s[j] == "\n":
                    raise self._err(pos, "quoted literal not terminated")
                if s[j] == "\\":
                    j += 2
                    continue
                if s[j] == c:
                    break
                j += 1
            self.i = j + 1
            return pos, "quoted", s[pos:self.i]
        if c in _SEPARATORS:
            self.value_mode = False
            self.i += 1
            return pos, "sep", c
        if c in _OPERATOR_CHARS:
            j = self.i
            while j < len(s) and s[j] in _OPERATOR_CHARS:
                j += 1
            self.i = j
            self.value_mode = True
            return pos, "op", s[pos:j]
        if self.value_mode:
            j = self.i
            while j < len(s) and _is_value_char(s[j]):
                j += 1
            self.i = j
            self.value_mode = False
            return pos, "value", s[pos:j]
        if _is_field_char(c):
            j = self.i
            while j < len(s) and _is_field_char(s[j]):
                j += 1
            self.i = j
            return pos, "field", s[pos:j]
        raise self._err(pos, f"unexpected input {c!r}")


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _unquote(text: str, allow_alt: bool, err) -> str:
    q = text[0]
    if not allow_alt and q != '"':
        raise err("invalid quote encountered")
    if len(text) < 2 or text[-1] != q:
        raise err("unquoting failed")
    body, out, i = text[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            if c == q:
                raise err("unquoting failed")
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            raise err("unquoting failed")
        e = body[i + 1]
        i += 2
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
        elif e == q:
            out.append(q)
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i:i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise err("unquoting failed")
            out.append(chr(int(digits, 16)))
            i += n
        elif e in "01234567":
            digits = body[i - 1:i + 2]
            if len(digits) != 3 or not all(d in "01234567" for d in digits):
                raise err("unquoting failed")
            out.append(chr(int(digits, 8)))
            i += 2
        elif q in "/|":
            out.append("\\" + e)   # a regex escape stays as it is
        else:
            raise err("unquoting failed")
    return "".join(out)


def parse(text: str) -> list[_Selector]:
    """One filter string -> its selectors (all must match). Empty: matches everything."""
    if text == "":
        return []
    sc = _Scanner(text)
    selectors: list[_Selector] = []
    while True:
        selectors.append(_selector(sc))
        pos, kind, tok = sc.scan()
        if kind == "eof":
            return selectors
        if kind != "sep" or tok != ",":
            raise sc._err(pos, f"unexpected input: {tok!r}")


def _field(sc: _Scanner) -> str:
    pos, kind, tok = sc.scan()
    if kind == "field":
        return tok
    if kind == "quoted":
        return _unquote(tok, False, lambda m: sc._err(pos, m))
    raise sc._err(pos, "expected field or quoted")


def _selector(sc: _Scanner) -> _Selector:
    path = [_field(sc)]
    while sc.peek() == ".":
        sc.scan()
        path.append(_field(sc))
    nxt = sc.peek()
    if nxt in (",", _EOF):
        return _Selector(path, "present")
    pos, kind, tok = sc.scan()
    if kind != "op" or tok not in ("==", "!=", "~="):
        raise sc._err(pos, f'expected an operator ("=="|"!="|"~="), got {tok!r}')
    vpos, vkind, vtok = sc.scan()
    if vkind in ("value", "field"):
        value = vtok
    elif vkind == "quoted":
        value = _unquote(vtok, tok == "~=", lambda m: sc._err(vpos, m))
    elif vkind == "eof":
        raise sc._err(vpos, "unexpected end of input, expected a value")
    else:
        raise sc._err(vpos, "expected value or quoted")
    sel = _Selector(path, tok, value)
    if tok == "~=":
        try:
            sel.regex = re.compile(value)
        except re.error as e:
            raise sc._err(vpos, f"bad regular expression {value!r}: {e}") from None
    return sel


def snapshot_field(info: Info) -> Callable[[list[str]], tuple[str, bool]]:
    """containerd's snapshot adaptor."""
    def field(path: list[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return (info.kind.label, True) if info.kind != Kind.UNKNOWN else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False
    return field


def compile_filters(filters: list[str] | None) -> Callable[[Info], bool]:
    """Any of ``filters`` (each a comma-AND of selectors) matches; none given: everything.
    InvalidArgument on a syntax error."""
    parsed = [parse(f) for f in (filters or [])]
    if not parsed:
        return lambda info: True

    def match(info: Info) -> bool:
        field = snapshot_field(info)
        return any(all(sel.match(field) for sel in sels) for sels in parsed)
    return match
