"""IMAP wire syntax: reading command arguments, writing strings, sequence sets, dates.

A command arrives as segments: text (bytes without the CRLF) and `Literal`s read in
between (RFC 3501 §4.3). `Args` walks them with the primitives of the RFC 3501 §9
grammar; any violation raises `BadCommand` (answered `BAD` with the reason).
"""

from __future__ import annotations

import calendar
import datetime
import re
import time
from bisect import bisect_left, bisect_right
from pathlib import Path

import attrs


class BadCommand(Exception):
    """Syntax error: answered with a tagged BAD and this reason."""


class CommandFailed(Exception):
    """Well-formed but impossible: answered with a tagged NO (`code` like TRYCREATE)."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


@attrs.define
class Literal:
    """One literal of a command: bytes in memory, or a file in tmp/ (APPEND)."""

    size: int
    data: bytes | None = None
    path: Path | None = None


_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0, 0x20)) | {0x7F}
ATOM_CHARS = frozenset(c for c in range(0x21, 0x7F) if c not in _ATOM_SPECIALS)
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
LIST_CHARS = ASTRING_CHARS | {ord("%"), ord("*")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}


class Args:
    """A cursor over the segments of one command."""

    def __init__(self, segments: list[bytes | Literal]) -> None:
        self.segs = segments or [b""]
        self.i = 0
        self.pos = 0

    # --- low level --------------------------------------------------------------------

    def _text(self) -> bytes | None:
        seg = self.segs[self.i] if self.i < len(self.segs) else b""
        return seg if isinstance(seg, bytes) else None

    def peek(self) -> int | None:
        """The next byte; None at the end of a text segment (a literal or the end)."""
        seg = self._text()
        if seg is None or self.pos >= len(seg):
            return None
        return seg[self.pos]

    def at_literal(self) -> bool:
        seg = self._text()
        return seg is not None and self.pos >= len(seg) and self.i + 1 < len(self.segs)

    def at_end(self) -> bool:
        seg = self._text()
        return seg is not None and self.pos >= len(seg) and self.i + 1 >= len(self.segs)

    def take_literal(self) -> Literal:
        if not self.at_literal():
            raise BadCommand("literal expected")
        lit = self.segs[self.i + 1]
        self.i += 2
        self.pos = 0
        assert isinstance(lit, Literal)
        return lit

    def read_chars(self, allowed: frozenset[int]) -> bytes:
        seg = self._text()
        if seg is None:
            return b""
        start = self.pos
        while self.pos < len(seg) and seg[self.pos] in allowed:
            self.pos += 1
        return seg[start:self.pos]

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            raise BadCommand(f"expected {char.decode()!r}")
        self.pos += 1

    def accept(self, char: bytes) -> bool:
        if self.peek() == char[0]:
            self.pos += 1
            return True
        return False

    def sp(self) -> None:
        self.expect(b" ")

    def end(self) -> None:
        if not self.at_end():
            raise BadCommand("unexpected extra arguments")

    # --- RFC 3501 §9 primitives -------------------------------------------------------

    def atom(self, allowed: frozenset[int] = ATOM_CHARS) -> str:
        raw = self.read_chars(allowed)
        if not raw:
            raise BadCommand("atom expected")
        return raw.decode("ascii")

    def quoted(self) -> bytes:
        self.expect(b'"')
        seg = self._text() or b""
        out = bytearray()
        while True:
            if self.pos >= len(seg):
                raise BadCommand("unterminated quoted string")
            c = seg[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(seg) or seg[self.pos] not in (0x22, 0x5C):
                    raise BadCommand("bad escape in quoted string")
                c = seg[self.pos]
                self.pos += 1
            elif c in (0x0D, 0x0A, 0):
                raise BadCommand("bad character in quoted string")
            out.append(c)

    def string(self) -> bytes:
        if self.at_literal():
            lit = self.take_literal()
            if lit.data is None:
                raise BadCommand("literal not allowed here")
            return lit.data
        if self.peek() == 0x22:
            return self.quoted()
        raise BadCommand("string expected")

    def astring(self, allowed: frozenset[int] = ASTRING_CHARS) -> bytes:
        if self.at_literal() or self.peek() == 0x22:
            return self.string()
        raw = self.read_chars(allowed)
        if not raw:
            raise BadCommand("string expected")
        return raw

    def mailbox(self) -> str:
        """A mailbox name as sent (modified UTF-7 text); INBOX is case-insensitive."""
        raw = self.astring()
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            name = raw.decode("utf-8", errors="replace")
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        raw = self.astring(LIST_CHARS)
        return raw.decode("utf-8", errors="replace")

    def number(self) -> int:
        raw = self.read_chars(frozenset(b"0123456789"))
        if not raw or len(raw) > 20:
            raise BadCommand("number expected")
        return int(raw)

    def paren_atoms(self) -> list[str]:
        """`(a b c)` -> ['a', 'b', 'c'] (flag lists, STATUS items)."""
        self.expect(b"(")
        items: list[str] = []
        while not self.accept(b")"):
            if items:
                self.sp()
            if self.peek() == 0x5C:
                self.pos += 1
                items.append("\\" + self.atom(ATOM_CHARS | {ord("*")}))
            else:
                items.append(self.atom())
        return items

    def flag_list(self) -> list[str]:
        """Flags as `(\\Seen foo)` or as bare flags separated by spaces (STORE)."""
        if self.peek() == 0x28:
            return self.paren_atoms()
        items = []
        while True:
            if self.peek() == 0x5C:
                self.pos += 1
                items.append("\\" + self.atom())
            else:
                items.append(self.atom())
            if self.peek() != 0x20:
                return items
            self.sp()


# --- sequence sets (RFC 3501 §9 sequence-set) -----------------------------------------

_SEQ = re.compile(rb"^(\d+|\*)(?::(\d+|\*))?$")


def parse_sequence_set(raw: str) -> list[tuple[int | None, int | None]]:
    """`1:3,7,9:*` -> [(1, 3), (7, 7), (9, None)]; None stands for `*`."""
    out: list[tuple[int | None, int | None]] = []
    if not raw:
        raise BadCommand("sequence set expected")
    for part in raw.encode("ascii").split(b","):
        m = _SEQ.match(part)
        if not m:
            raise BadCommand("invalid sequence set")
        lo = None if m.group(1) == b"*" else int(m.group(1))
        hi_raw = m.group(2) if m.group(2) is not None else m.group(1)
        hi = None if hi_raw == b"*" else int(hi_raw)
        if lo == 0 or hi == 0 or (lo or 0) > 0xFFFFFFFF or (hi or 0) > 0xFFFFFFFF:
            raise BadCommand("invalid sequence number 0 or too large")
        out.append((lo, hi))
    return out


def select_positions(ranges: list[tuple[int | None, int | None]], uids: list[int],
                     by_uid: bool) -> list[int]:
    """0-based positions in sorted `uids` matched by a sequence set (MSNs or UIDs).

    Ranges are intersected with what exists (bisect), so `1:4294967295` costs
    O(messages), not O(range).
    """
    count = len(uids)
    if not count:
        return []
    star = uids[-1] if by_uid else count
    hits: set[int] = set()
    spans: list[tuple[int, int]] = []
    for lo, hi in ranges:
        a = star if lo is None else lo
        b = star if hi is None else hi
        if a > b:
            a, b = b, a
        if by_uid:
            start, stop = bisect_left(uids, a), bisect_right(uids, b)
        else:
            start, stop = a - 1, min(b, count)
        if start < stop:
            spans.append((start, stop))
    if len(spans) == 1:
        return list(range(*spans[0]))
    for start, stop in spans:
        hits.update(range(start, stop))
    return sorted(hits)


def format_sequence_set(numbers: list[int]) -> str:
    """[1,2,3,5] -> '1:3,5' (for COPYUID/APPENDUID)."""
    out: list[str] = []
    nums = sorted(numbers)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out)


# --- writing strings (RFC 3501 §4.3, §4.5) --------------------------------------------

_SAFE_QUOTED = frozenset(range(0x20, 0x7F))


def istring(value: bytes | str) -> bytes:
    """A quoted string when possible, else a literal."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if len(value) < 1024 and all(c in _SAFE_QUOTED for c in value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


def nstring(value: bytes | str | None) -> bytes:
    return b"NIL" if value is None else istring(value)


def literal(value: bytes) -> bytes:
    return b"{%d}\r\n" % len(value) + value


# --- dates (RFC 3501 §9 date, date-time) ----------------------------------------------

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
          "Dec"]
_DATE = re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_DATETIME = re.compile(r"^([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")


def parse_date(text: str) -> tuple[int, int, int]:
    """`1-Feb-1994` -> (1994, 2, 1)."""
    m = _DATE.match(text)
    month = m and m.group(2).capitalize()
    if not m or month not in MONTHS:
        raise BadCommand("invalid date")
    ymd = int(m.group(3)), MONTHS.index(month) + 1, int(m.group(1))
    try:
        datetime.date(*ymd)
    except ValueError as e:
        raise BadCommand("invalid date") from e
    return ymd


def parse_datetime(text: str) -> float:
    """`17-Jul-1996 02:44:25 -0700` -> POSIX seconds."""
    m = _DATETIME.match(text)
    month = m and m.group(2).capitalize()
    if not m or month not in MONTHS:
        raise BadCommand("invalid date-time")
    try:
        fields = (int(m.group(3)), MONTHS.index(month) + 1, int(m.group(1).strip()),
                  int(m.group(4)), int(m.group(5)), int(m.group(6)))
        datetime.datetime(*fields)
        secs = calendar.timegm(fields + (0, 0, 0))
    except (ValueError, OverflowError) as e:
        raise BadCommand("invalid date-time") from e
    offset = (int(m.group(8)) * 3600 + int(m.group(9)) * 60) * (1 if m.group(7) == "+" else -1)
    return float(secs - offset)


def format_datetime(seconds: float) -> str:
    """POSIX seconds -> `17-Jul-1996 09:44:25 +0000` (INTERNALDATE, in UTC)."""
    t = time.gmtime(seconds)
    return (f"{t.tm_mday:02d}-{MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
