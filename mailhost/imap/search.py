"""SEARCH (RFC 3501 §6.4.4): every key, CHARSET UTF-8/US-ASCII, our own matcher.

`parse_search` turns the arguments into a tree of tuples; `Matcher` evaluates it per
message. Header keys compare RFC 2047-decoded values, BODY/TEXT decoded text parts,
all as case-insensitive substrings. Keys that need message content say so
(`needs_content`) so the server reads files in a worker thread only when it must.
"""

from __future__ import annotations

import datetime
import email
import email.policy
from collections.abc import Callable
from email.header import decode_header, make_header
from email.utils import parsedate_tz

from mailhost.imap.mailbox import FLAG_LETTERS, canonical_flag
from mailhost.imap.message import Part, field_value
from mailhost.imap.wire import (
    ATOM_CHARS,
    Args,
    BadCommand,
    CommandFailed,
    parse_date,
    parse_sequence_set,
    select_positions,
)
from mailhost.store.index import MessageEntry

Node = tuple
MAX_DEPTH = 50
CHARSETS = ("UTF-8", "US-ASCII")
_SEQ_CHARS = frozenset(b"0123456789:*,")

_FLAG_KEYS = {"ANSWERED": ("R", True), "DELETED": ("T", True), "DRAFT": ("D", True),
              "FLAGGED": ("F", True), "SEEN": ("S", True), "UNANSWERED": ("R", False),
              "UNDELETED": ("T", False), "UNDRAFT": ("D", False),
              "UNFLAGGED": ("F", False), "UNSEEN": ("S", False)}
_HEADER_KEYS = {"BCC", "CC", "FROM", "SUBJECT", "TO"}
_DATE_KEYS = {"BEFORE": ("internal", "before"), "ON": ("internal", "on"),
              "SINCE": ("internal", "since"), "SENTBEFORE": ("sent", "before"),
              "SENTON": ("sent", "on"), "SENTSINCE": ("sent", "since")}


def parse_search(args: Args) -> Node:
    """`[CHARSET x] key *(SP key)` -> ('and', [...]). CommandFailed on a bad charset."""
    if _peek_word(args) == "CHARSET":
        args.read_chars(ATOM_CHARS)
        args.sp()
        charset = args.astring().decode("ascii", "replace").upper()
        if charset not in CHARSETS:
            raise CommandFailed("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        args.sp()
    keys = [_key(args, 0)]
    while not args.at_end():
        args.sp()
        keys.append(_key(args, 0))
    return ("and", keys)


def _peek_word(args: Args) -> str:
    start = (args.i, args.pos)
    word = args.read_chars(ATOM_CHARS).decode("ascii").upper()
    args.i, args.pos = start
    return word


def _string(args: Args) -> str:
    args.sp()
    return args.astring().decode("utf-8", "replace")


def _key(args: Args, depth: int) -> Node:
    if depth > MAX_DEPTH:
        raise BadCommand("search keys nested too deeply")
    if args.accept(b"("):
        keys = [_key(args, depth + 1)]
        while not args.accept(b")"):
            args.sp()
            keys.append(_key(args, depth + 1))
        return ("and", keys)
    if args.peek() is not None and args.peek() in _SEQ_CHARS:
        return ("seq", parse_sequence_set(args.read_chars(_SEQ_CHARS).decode()))
    word = args.read_chars(ATOM_CHARS).decode("ascii").upper()
    if not word:
        raise BadCommand("search key expected")
    if word == "ALL":
        return ("all",)
    if word in _FLAG_KEYS:
        return ("flag",) + _FLAG_KEYS[word]
    if word in ("RECENT", "NEW", "OLD"):
        return (word.lower(),)
    if word in ("KEYWORD", "UNKEYWORD"):
        args.sp()
        flag = canonical_flag(args.atom())
        if flag in FLAG_LETTERS:
            return ("flag", FLAG_LETTERS[flag], word == "KEYWORD")
        return ("keyword", flag, word == "KEYWORD")
    if word in _HEADER_KEYS:
        return ("header", word.lower(), _string(args))
    if word == "HEADER":
        name = _string(args)
        return ("header", name.lower(), _string(args))
    if word in ("BODY", "TEXT"):
        return (word.lower(), _string(args))
    if word in ("LARGER", "SMALLER"):
        args.sp()
        return (word.lower(), args.number())
    if word in _DATE_KEYS:
        args.sp()
        raw = args.astring().decode("ascii", "replace")
        return ("date",) + _DATE_KEYS[word] + (parse_date(raw),)
    if word == "UID":
        args.sp()
        return ("uid", parse_sequence_set(args.read_chars(_SEQ_CHARS).decode()))
    if word == "NOT":
        args.sp()
        return ("not", _key(args, depth + 1))
    if word == "OR":
        args.sp()
        a = _key(args, depth + 1)
        args.sp()
        return ("or", a, _key(args, depth + 1))
    raise BadCommand(f"unknown search key {word[:40]}")


def needs_content(node: Node) -> int:
    """0: index data only; 1: the header; 2: the whole message."""
    kind = node[0]
    if kind == "and":
        return max((needs_content(n) for n in node[1]), default=0)
    if kind == "or":
        return max(needs_content(node[1]), needs_content(node[2]))
    if kind == "not":
        return needs_content(node[1])
    if kind == "header" or (kind == "date" and node[1] == "sent"):
        return 1
    if kind in ("body", "text"):
        return 2
    return 0


def decode_words(raw: bytes) -> str:
    """RFC 2047 encoded words -> text (best effort)."""
    text = raw.decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return text


def body_text(whole: bytes) -> str:
    """Decoded text of every text/* part (transfer encoding and charset undone)."""
    msg = email.message_from_bytes(whole, policy=email.policy.default)
    out = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        try:
            out.append(part.get_content())
        except (LookupError, ValueError, AssertionError):
            payload = part.get_payload(decode=True) or b""
            out.append(payload.decode("utf-8", "replace"))
    return "\n".join(out)


class Matcher:
    """Evaluates a search tree against messages of one selected folder."""

    def __init__(self, tree: Node, uids: list[int], recent: set[int]) -> None:
        self.tree = tree
        self.uids = uids
        self.recent = recent
        self._sets: dict[int, set[int]] = {}
        self._fast = self._compile(tree)

    def _set(self, node: Node, by_uid: bool) -> set[int]:
        key = id(node)
        if key not in self._sets:
            self._sets[key] = {self.uids[p] for p in select_positions(node[1], self.uids,
                                                                      by_uid)}
        return self._sets[key]

    def match(self, entry: MessageEntry, part: Callable[[], Part | None]) -> bool:
        if self._fast is not None:
            return self._fast(entry)
        return self._eval(self.tree, entry, _Lazy(part))

    def _compile(self, node: Node) -> Callable[[MessageEntry], bool] | None:
        """A closure for trees of index-only keys (fast SEARCH on big folders)."""
        kind = node[0]
        if kind == "and":
            fns = [self._compile(n) for n in node[1]]
            if any(f is None for f in fns):
                return None
            if len(fns) == 1:
                return fns[0]
            return lambda e: all(f(e) for f in fns)
        if kind in ("or", "not"):
            fns = [self._compile(n) for n in node[1:]]
            if any(f is None for f in fns):
                return None
            if kind == "not":
                return lambda e: not fns[0](e)
            return lambda e: fns[0](e) or fns[1](e)
        if kind == "flag":
            letter, want = node[1], node[2]
            return (lambda e: letter in e.flags) if want else (lambda e: letter not in e.flags)
        if kind in ("all", "keyword", "recent", "new", "old", "larger", "smaller", "seq",
                    "uid") or (kind == "date" and node[1] == "internal"):
            return lambda e: self._eval(node, e, _NO_CONTENT)
        return None

    def _eval(self, node: Node, entry: MessageEntry, lazy: _Lazy) -> bool:
        kind = node[0]
        if kind == "and":
            return all(self._eval(n, entry, lazy) for n in node[1])
        if kind == "or":
            return self._eval(node[1], entry, lazy) or self._eval(node[2], entry, lazy)
        if kind == "not":
            return not self._eval(node[1], entry, lazy)
        if kind == "all":
            return True
        if kind == "flag":
            return (node[1] in entry.flags) == node[2]
        if kind == "keyword":
            return (node[1] in entry.keywords) == node[2]
        if kind == "recent":
            return entry.uid in self.recent
        if kind == "new":
            return entry.uid in self.recent and "S" not in entry.flags
        if kind == "old":
            return entry.uid not in self.recent
        if kind == "larger":
            return entry.wire_size > node[1]
        if kind == "smaller":
            return entry.wire_size < node[1]
        if kind == "seq":
            return entry.uid in self._set(node, False)
        if kind == "uid":
            return entry.uid in self._set(node, True)
        if kind == "date":
            return self._date(node, entry, lazy)
        if kind == "header":
            return self._header(node[1], node[2], lazy)
        if kind == "body":
            return node[1].casefold() in lazy.body_text().casefold()
        if kind == "text":
            needle = node[1].casefold()
            return needle in lazy.header_text().casefold() or \
                needle in lazy.body_text().casefold()
        return False  # pragma: no cover - parse_search builds only the above

    def _header(self, name: str, needle: str, lazy: _Lazy) -> bool:
        part = lazy.part()
        if part is None:
            return False
        values = [field_value(raw) for fname, raw in part.fields if fname == name]
        if not values:
            return False
        if not needle:
            return True
        needle = needle.casefold()
        return any(needle in decode_words(v).casefold() for v in values)

    def _date(self, node: Node, entry: MessageEntry, lazy: _Lazy) -> bool:
        _, which, op, (y, m, d) = node
        wanted = datetime.date(y, m, d)
        if which == "internal":
            day = datetime.datetime.fromtimestamp(entry.internaldate,
                                                  datetime.UTC).date()
        else:
            part = lazy.part()
            parsed = parsedate_tz(decode_words(part.get("date") or b"")) if part else None
            if not parsed:
                return False
            try:
                day = datetime.date(parsed[0], parsed[1], parsed[2])
            except ValueError:
                return False
        if op == "before":
            return day < wanted
        if op == "on":
            return day == wanted
        return day >= wanted


class _Lazy:
    """Message content loaded at most once, only if a key asks for it."""

    def __init__(self, load: Callable[[], Part | None]) -> None:
        self._load = load
        self._part: Part | None = None
        self._loaded = False
        self._body: str | None = None

    def part(self) -> Part | None:
        if not self._loaded:
            self._part = self._load()
            self._loaded = True
        return self._part

    def header_text(self) -> str:
        part = self.part()
        return decode_words(part.header) if part else ""

    def body_text(self) -> str:
        if self._body is None:
            part = self.part()
            self._body = body_text(part.whole) if part else ""
        return self._body


_NO_CONTENT = _Lazy(lambda: None)
