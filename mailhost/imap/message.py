"""A message's MIME structure on the wire form (CRLF): sections, ENVELOPE, BODYSTRUCTURE.

RFC 3501 §6.4.5 (section numbering), §7.4.2 (ENVELOPE, BODY, BODYSTRUCTURE). Header
parameter parsing (RFC 2045/2231) is the stdlib's; part boundaries and byte offsets
are found here, on bytes, so sizes and line counts are exact.
"""

from __future__ import annotations

import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path

from mailhost.imap.wire import nstring

_LONE_LF = re.compile(rb"(?<!\r)\n")
_HEADER_PARSER = BytesHeaderParser(policy=compat32)
MAX_DEPTH = 8
#: MIME parts parsed per message; past it the rest stays unparsed (one opaque part):
#: a crafted message cannot make BODYSTRUCTURE cost unbounded memory and CPU
MAX_PARTS = 1000


def to_wire(data: bytes) -> bytes:
    """Stored LF line ends -> CRLF (the form IMAP sizes and offsets refer to)."""
    return _LONE_LF.sub(b"\r\n", data)


def read_wire(path: Path) -> bytes:
    """The whole message in wire form (blocking: call from a worker thread)."""
    with open(path, "rb") as f:
        return to_wire(f.read())


def read_header(path: Path) -> bytes:
    """Only the header block of a message, in wire form (blocking)."""
    out = b""
    with open(path, "rb") as f:
        while chunk := f.read(16384):
            out += chunk
            end = _header_end(out)
            if end is not None:
                return to_wire(out[:end])
            if len(out) > 4 << 20:
                break
    return to_wire(out)


def _header_end(data: bytes) -> int | None:
    if data.startswith(b"\r\n"):
        return 2
    if data.startswith(b"\n"):
        return 1
    best = None
    for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        i = data.find(sep)
        if i >= 0 and (best is None or i + len(sep) < best):
            best = i + len(sep)
    return best


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """Wire bytes -> (header including the blank line, body)."""
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    i = data.find(b"\r\n\r\n")
    if i < 0:
        return data, b""
    return data[:i + 4], data[i + 4:]


def header_fields(header: bytes) -> list[tuple[str, bytes]]:
    """[(lower-case name, raw field bytes including folds and CRLF)]."""
    fields: list[tuple[str, bytes]] = []
    for line in header.split(b"\r\n")[:-1]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        fields.append((name, line + b"\r\n"))
    return fields


def field_value(raw: bytes) -> bytes:
    """The unfolded value of one raw field."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    return re.sub(rb"\r\n(?=[ \t])", b"", value).strip()


def select_fields(header: bytes, names: list[str], negate: bool) -> bytes:
    """BODY[HEADER.FIELDS (..)] / HEADER.FIELDS.NOT: the chosen lines + blank line."""
    wanted = {n.lower() for n in names}
    out = [raw for name, raw in header_fields(header) if (name in wanted) != negate]
    return b"".join(out) + b"\r\n"


class Part:
    """One MIME entity: header, body, content type, children or encapsulated message."""

    def __init__(self, data: bytes, default: str = "text/plain", depth: int = 0,
                 budget: list[int] | None = None) -> None:
        budget = [MAX_PARTS] if budget is None else budget
        budget[0] -= 1
        self.header, self.body = split_header(data)
        self.fields = header_fields(self.header)
        self.msg: Message = _HEADER_PARSER.parsebytes(self.header)
        ctype = self.msg.get_content_type() if "content-type" in self.msg else default
        if "/" not in ctype:
            ctype = default
        self.maintype, self.subtype = ctype.split("/", 1)
        self.children: list[Part] = []
        self.message: Part | None = None
        if depth >= MAX_DEPTH or budget[0] <= 0:
            return
        if self.maintype == "multipart":
            boundary = self.msg.get_param("boundary")
            if isinstance(boundary, tuple):
                boundary = boundary[2]
            if boundary:
                child_default = "message/rfc822" if self.subtype == "digest" else "text/plain"
                bodies = split_multipart(self.body, boundary.encode("utf-8", "replace"))
                self.children = [Part(p, child_default, depth + 1, budget)
                                 for p in bodies[:max(budget[0], 1)]]
        elif self.maintype == "message" and self.subtype == "rfc822":
            self.message = Part(self.body, "text/plain", depth + 1, budget)

    @property
    def whole(self) -> bytes:
        return self.header + self.body

    def get(self, name: str) -> bytes | None:
        for fname, raw in self.fields:
            if fname == name:
                return field_value(raw)
        return None

    # --- section addressing (RFC 3501 §6.4.5) -------------------------------------------

    def subpart(self, numbers: list[int]) -> Part | None:
        part: Part | None = self
        for n in numbers:
            if part is None:
                return None
            if part.message is not None and part is not self:
                part = part.message
            if part.children:
                part = part.children[n - 1] if 0 < n <= len(part.children) else None
            elif n == 1:
                part = part if part.maintype != "multipart" else None
            else:
                return None
        return part

    def section(self, numbers: list[int], text: str, names: list[str]) -> bytes:
        """The bytes of BODY[<numbers>.<text> (<names>)]; empty when it does not exist."""
        part = self.subpart(numbers)
        if part is None:
            return b""
        if text == "MIME":
            return part.header if numbers else b""
        if numbers and text in ("HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            part = part.message
            if part is None:
                return b""
        if text == "":
            return part.whole if not numbers else part.body
        if text == "HEADER":
            return part.header
        if text == "TEXT":
            return part.body
        if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return select_fields(part.header, names, text.endswith(".NOT"))
        return b""

    # --- ENVELOPE and BODYSTRUCTURE (RFC 3501 §7.4.2) -----------------------------------

    def envelope(self) -> bytes:
        def addresses(*names: str) -> bytes:
            for name in names:
                value = self.get(name)
                if value is not None:
                    return address_list(value)
            return b"NIL"

        items = [nstring(self.get("date")), nstring(self.get("subject")),
                 addresses("from"), addresses("sender", "from"),
                 addresses("reply-to", "from"), addresses("to"), addresses("cc"),
                 addresses("bcc"), nstring(self.get("in-reply-to")),
                 nstring(self.get("message-id"))]
        return b"(" + b" ".join(items) + b")"

    def structure(self, extensible: bool = True) -> bytes:
        if self.maintype == "multipart":
            inner = b"".join(c.structure(extensible) for c in self.children) or \
                b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 0 0)'
            out = inner + b" " + nstring(self.subtype.upper())
            if extensible:
                out += b" " + self._params() + b" " + self._disposition() + b" " + \
                    self._language() + b" " + nstring(self.get("content-location"))
            return b"(" + out + b")"
        encoding = (self.get("content-transfer-encoding") or b"7BIT").upper()
        items = [nstring(self.maintype.upper()), nstring(self.subtype.upper()),
                 self._params(), nstring(self.get("content-id")),
                 nstring(self.get("content-description")), nstring(encoding),
                 b"%d" % len(self.body)]
        if self.message is not None:
            items += [self.message.envelope(), self.message.structure(extensible),
                      b"%d" % line_count(self.body)]
        elif self.maintype == "text":
            items.append(b"%d" % line_count(self.body))
        if extensible:
            items += [nstring(self.get("content-md5")), self._disposition(),
                      self._language(), nstring(self.get("content-location"))]
        return b"(" + b" ".join(items) + b")"

    def _params(self, header: str = "content-type") -> bytes:
        if header == "content-type" and "content-type" not in self.msg:
            if self.maintype == "text":
                return b'("CHARSET" "US-ASCII")'
            return b"NIL"
        params = self.msg.get_params(header=header, failobj=[])[1:]
        if header == "content-type" and self.maintype == "text" and \
                not any(k.lower() == "charset" for k, _ in params):
            params = [("charset", "US-ASCII"), *params]  # RFC 2045 §5.2 default
        if not params:
            return b"NIL"
        out = []
        for key, value in params:
            if isinstance(value, tuple):
                value = value[2]
            out += [nstring(key.upper()), nstring(value if value is not None else "")]
        return b"(" + b" ".join(out) + b")"

    def _disposition(self) -> bytes:
        value = self.msg.get("content-disposition")
        if not value:
            return b"NIL"
        kind = str(value).split(";", 1)[0].strip()
        return b"(" + nstring(kind.upper()) + b" " + \
            self._params("content-disposition") + b")"

    def _language(self) -> bytes:
        value = self.get("content-language")
        if not value:
            return b"NIL"
        langs = [v.strip() for v in value.split(b",") if v.strip()]
        return b"(" + b" ".join(nstring(v) for v in langs) + b")"


def line_count(body: bytes) -> int:
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The bodies between `--boundary` delimiter lines (RFC 2046 §5.1.1)."""
    delim = b"--" + boundary
    parts: list[bytes] = []
    starts: list[tuple[int, int]] = []  # (delimiter start, content start)
    pos = 0
    while True:
        i = body.find(delim, pos)
        if i < 0:
            break
        pos = i + len(delim)
        if i != 0 and body[i - 2:i] != b"\r\n":
            continue
        closing = body[pos:pos + 2] == b"--"
        eol = body.find(b"\r\n", pos)
        content = len(body) if eol < 0 else eol + 2
        starts.append((i, -1 if closing else content))
        if closing:
            break
    for (_, content), (next_delim, _) in zip(starts, starts[1:], strict=False):
        if content < 0:
            break
        end = next_delim - 2 if next_delim >= 2 else next_delim
        parts.append(body[content:max(content, end)])
    if starts and starts[-1][1] >= 0:  # no closing delimiter: the rest is the last part
        parts.append(body[starts[-1][1]:])
    return parts


def address_list(value: bytes) -> bytes:
    """An address header -> IMAP address list `((name adl mailbox host) ...)`."""
    text = value.decode("utf-8", "replace")
    out = []
    for name, addr in getaddresses([text]):
        if not addr and not name:
            continue
        local, _, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append(b"(" + b" ".join([nstring(name or None), b"NIL", nstring(local or None),
                                     nstring(host or None)]) + b")")
    if not out:
        return b"NIL"
    return b"(" + b"".join(out) + b")"
