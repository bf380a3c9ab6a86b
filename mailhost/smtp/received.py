"""Trace and origination headers the SMTP server adds: `Return-Path`, `Received`
(RFC 5321 §4.4), and the `Date` / `Message-ID` a submission server supplies when the
client left them out (RFC 6409 §8.2, §8.3).

Everything that came from the client (HELO argument) is reduced to a safe character set
before it reaches a header, so no CR/LF or comment-breaking characters can be injected.
"""

from __future__ import annotations

import datetime
import re
import secrets
from collections.abc import Sequence

_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_ADDRESS_LITERAL = re.compile(r"^\[[A-Za-z0-9.:\-]{1,64}\]$")
_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")

#: how much of a Message-ID header value is remembered (for the log only)
MESSAGE_ID_MAX = 998


def valid_helo(helo: str) -> bool:
    """True if `helo` is a domain or an address literal (RFC 5321 §4.1.1.1)."""
    return bool(_DOMAIN.match(helo) or _ADDRESS_LITERAL.match(helo))


def comment_safe(text: str, limit: int = 64) -> str:
    """Reduce client text to printable ASCII that cannot end an RFC 5322 comment."""
    out = "".join(c if 0x21 <= ord(c) <= 0x7e and c not in "()\\" else "?" for c in text)
    return out[:limit]


def address_literal(ip: str) -> str:
    """`127.0.0.1` -> `[127.0.0.1]`, `::1` -> `[IPv6:::1]` (RFC 5321 §4.1.3)."""
    if ":" in ip:
        return f"[IPv6:{ip}]"
    return f"[{ip}]"


def rfc5322_date(seconds: float, local: bool = False) -> str:
    """An RFC 5322 §3.3 date-time for a POSIX timestamp."""
    import email.utils

    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    if local:
        when = when.astimezone()
    return email.utils.format_datetime(when)


def received_header(*, helo: str | None, client_ip: str, hostname: str, protocol: str,
                    transaction_id: str, recipients: Sequence[str], seconds: float,
                    tls: tuple[str, str] | None = None, hide_ip: bool = False) -> bytes:
    """The `Received` field (RFC 5321 §4.4), folded, LF line ends, no final newline.

    `protocol` is the RFC 3848 WITH keyword (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA);
    `tls` is (protocol version, cipher name). The `for` clause is only written for a
    single recipient, so one stored copy never discloses the other recipients.
    """
    name = helo or ""
    if hide_ip:
        origin = name if valid_helo(name) else "unknown"
        parts = [f"Received: from {origin}"]
    elif name and valid_helo(name):
        parts = [f"Received: from {name} ({address_literal(client_ip)})"]
    else:
        shown = f" (HELO {comment_safe(name)})" if name else ""
        parts = [f"Received: from {address_literal(client_ip)}{shown}"]
    if tls is not None:
        parts.append(f"(using {comment_safe(tls[0])} with cipher {comment_safe(tls[1])})")
    parts.append(f"by {hostname} (mailhost) with {protocol} id {transaction_id}")
    if len(recipients) == 1:
        parts.append(f"for <{recipients[0]}>; {rfc5322_date(seconds)}")
    else:
        parts[-1] += f"; {rfc5322_date(seconds)}"
    text = "\n\t".join(parts)
    # whatever happened above, never let a line break or NUL through
    return text.encode("utf-8", "replace").replace(b"\r", b"?").replace(b"\0", b"?")


def return_path(sender: str | None) -> bytes:
    """`Return-Path: <sender>` (RFC 5321 §4.4), written by the final delivery server."""
    return f"Return-Path: <{sender or ''}>".encode("utf-8", "replace")


def new_message_id(transaction_id: str, hostname: str) -> str:
    return f"<{transaction_id}.{secrets.token_hex(4)}@{hostname}>"


# header scanning -------------------------------------------------------------------------

HEADER, END_BLANK, END_BODY = 0, 1, 2


class HeaderScanner:
    """Follows the header section of a message streamed line by line, in constant memory.

    Records whether `Date` and `Message-ID` are present (RFC 5322 §3.6) and remembers the
    Message-ID value (bounded) for the log.
    """

    def __init__(self) -> None:
        self.in_headers = True
        self.has_date = False
        self.has_message_id = False
        self.message_id: str | None = None
        self._capture = False

    def scan(self, line: bytes) -> int:
        """Classify one line (no line end): HEADER, END_BLANK or END_BODY."""
        if not line:
            self.in_headers = False
            return END_BLANK
        first = line[:1]
        if first in (b" ", b"\t"):
            if self._capture and self.message_id is None:
                self._remember(line)
            return HEADER
        self._capture = False
        m = _FIELD_NAME.match(line)
        if m is None:
            self.in_headers = False
            return END_BODY
        name = line[:m.end() - 1].lower()
        if name == b"date":
            self.has_date = True
        elif name == b"message-id":
            self.has_message_id = True
            if self.message_id is None:
                self._capture = True
                self._remember(line[m.end():])
        return HEADER

    def _remember(self, value: bytes) -> None:
        text = value.strip()[:MESSAGE_ID_MAX].decode("utf-8", "replace")
        if text:
            self.message_id = text
            self._capture = False
