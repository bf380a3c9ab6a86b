"""Modified UTF-7 for IMAP mailbox names (RFC 3501 §5.1.3), canonical forms only.

Twisted's codec accepts non-canonical encodings (two names for one mailbox); here a
name decodes only if re-encoding it gives back the same bytes.
"""

from __future__ import annotations

import base64


class MailboxNameError(ValueError):
    """Not a valid (canonical) modified UTF-7 mailbox name."""


def encode(name: str) -> str:
    """Unicode mailbox name -> modified UTF-7 (ASCII)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode(wire: str) -> str:
    """Modified UTF-7 -> Unicode; MailboxNameError unless `wire` is the canonical form."""
    out: list[str] = []
    i = 0
    n = len(wire)
    while i < n:
        ch = wire[i]
        if not (0x20 <= ord(ch) <= 0x7E):
            raise MailboxNameError("mailbox names are 7-bit (modified UTF-7)")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = wire.find("-", i + 1)
        if end < 0:
            raise MailboxNameError("unterminated modified UTF-7 sequence")
        chunk = wire[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                raw = base64.b64decode(b64, validate=True)
                out.append(raw.decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError) as e:
                raise MailboxNameError("bad modified UTF-7 sequence") from e
        i = end + 1
    text = "".join(out)
    if encode(text) != wire:
        raise MailboxNameError("non-canonical modified UTF-7")
    return text
