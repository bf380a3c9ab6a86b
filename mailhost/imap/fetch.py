"""FETCH data items: parsing (RFC 3501 §6.4.5) and rendering (§7.4.2).

Each item says how much of the message it needs: nothing (FLAGS, UID, INTERNALDATE,
RFC822.SIZE come from the index and the `,W=` name field), the header, or the whole
message. Partial fetches `<origin.count>` return exactly that slice (Twisted issue 5613).
"""

from __future__ import annotations

import attrs

from mailhost.imap.message import Part
from mailhost.imap.wire import (
    ASTRING_CHARS,
    ATOM_CHARS,
    Args,
    BadCommand,
    format_datetime,
    literal,
)
from mailhost.store.index import MessageEntry

NEED_NONE, NEED_HEADER, NEED_FULL = 0, 1, 2
_NAME_CHARS = frozenset(ATOM_CHARS - {ord("["), ord("<")})
_SECTION_CHARS = frozenset(b"0123456789.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TEXTS = ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT")
MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
          "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
          "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}
SIMPLE = {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "UID",
          "RFC822", "RFC822.HEADER", "RFC822.TEXT"}


@attrs.frozen
class FetchItem:
    """One requested data item."""

    name: str
    numbers: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None
    peek: bool = False
    section: bool = False

    @property
    def need(self) -> int:
        if self.name in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE"):
            return NEED_NONE
        if self.name in ("ENVELOPE", "RFC822.HEADER"):
            return NEED_HEADER
        if self.section and not self.numbers and self.text.startswith("HEADER"):
            return NEED_HEADER
        return NEED_FULL

    @property
    def sets_seen(self) -> bool:
        return (self.section and not self.peek) or self.name in ("RFC822", "RFC822.TEXT")

    def label(self) -> bytes:
        """The item name echoed in the response (`BODY[1.HEADER]<0>`)."""
        if not self.section:
            return self.name.encode()
        spec = ".".join([str(n) for n in self.numbers] + ([self.text] if self.text else []))
        if self.fields:
            spec += " (" + " ".join(self.fields) + ")"
        out = f"BODY[{spec}]"
        if self.partial:
            out += f"<{self.partial[0]}>"
        return out.encode("ascii", "replace")


def parse_fetch_atts(args: Args) -> list[FetchItem]:
    """`ALL` | `FAST` | `FULL` | fetch-att | `(` fetch-att *(SP fetch-att) `)`."""
    if args.accept(b"("):
        items = [_fetch_att(args)]
        while not args.accept(b")"):
            args.sp()
            items.append(_fetch_att(args))
        return items
    start = (args.i, args.pos)
    word = args.read_chars(_NAME_CHARS).decode("ascii").upper()
    if word in MACROS and args.peek() != ord("["):
        return [FetchItem(n) for n in MACROS[word]]
    args.i, args.pos = start
    return [_fetch_att(args)]


def _fetch_att(args: Args) -> FetchItem:
    word = args.read_chars(_NAME_CHARS).decode("ascii").upper()
    if not word:
        raise BadCommand("fetch attribute expected")
    if word in ("BODY", "BODY.PEEK") and args.peek() == ord("["):
        return _section(args, peek=word == "BODY.PEEK")
    if word in SIMPLE:
        return FetchItem(word)
    raise BadCommand(f"unknown fetch attribute {word[:40]}")


def _section(args: Args, peek: bool) -> FetchItem:
    args.expect(b"[")
    spec = args.read_chars(_SECTION_CHARS).decode("ascii").upper()
    numbers: list[int] = []
    parts = spec.split(".") if spec else []
    while parts and parts[0].isdigit():
        n = int(parts.pop(0))
        if n == 0 or n > 100000:
            raise BadCommand("invalid section part number")
        numbers.append(n)
    text = ".".join(parts)
    if text not in _TEXTS or (text == "MIME" and not numbers):
        raise BadCommand("invalid section")
    fields: list[str] = []
    if text.startswith("HEADER.FIELDS"):
        args.sp()
        args.expect(b"(")
        while True:
            fields.append(args.astring(ASTRING_CHARS).decode("ascii", "replace"))
            if args.accept(b")"):
                break
            args.sp()
    args.expect(b"]")
    partial = None
    if args.accept(b"<"):
        origin = args.number()
        args.expect(b".")
        count = args.number()
        args.expect(b">")
        if count == 0:
            raise BadCommand("partial count must be positive")
        partial = (origin, count)
    return FetchItem("BODY", tuple(numbers), text, tuple(fields), partial, peek, True)


def render(item: FetchItem, entry: MessageEntry, part: Part | None, flags: bytes) -> bytes:
    """`NAME value` for one item of one message."""
    name = item.name
    if item.section:
        assert part is not None
        data = part.section(list(item.numbers), item.text, list(item.fields))
        if item.partial:
            origin, count = item.partial
            data = data[origin:origin + count]
        return item.label() + b" " + literal(data)
    if name == "FLAGS":
        return b"FLAGS " + flags
    if name == "UID":
        return b"UID %d" % entry.uid
    if name == "INTERNALDATE":
        return b'INTERNALDATE "' + format_datetime(entry.internaldate).encode() + b'"'
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % entry.wire_size
    assert part is not None
    if name == "ENVELOPE":
        return b"ENVELOPE " + part.envelope()
    if name == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + part.structure(True)
    if name == "BODY":
        return b"BODY " + part.structure(False)
    if name == "RFC822":
        return b"RFC822 " + literal(part.whole)
    if name == "RFC822.HEADER":
        return b"RFC822.HEADER " + literal(part.header)
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT " + literal(part.body)
    raise BadCommand(name)  # pragma: no cover - parse_fetch_atts admits only the above
