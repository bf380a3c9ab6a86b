"""SASL PLAIN (RFC 4616), shared by SMTP AUTH, POP3 AUTH and IMAP AUTHENTICATE.

One parser and one authorization rule, so the three protocols accept exactly the same
responses: `[authzid] NUL authcid NUL passwd`, a non-empty authcid, and an authzid that is
empty or the login name itself (no acting as another user).
"""

from __future__ import annotations

import attrs


class MalformedPlain(ValueError):
    """The PLAIN response is not `[authzid] NUL authcid NUL passwd`."""


@attrs.frozen
class Credentials:
    authzid: bytes
    authcid: bytes
    password: bytes


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616 §2: split a decoded PLAIN response; MalformedPlain if it is not one."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise MalformedPlain("malformed PLAIN response")
    return Credentials(parts[0], parts[1], parts[2])


def authzid_allowed(creds: Credentials) -> bool:
    """The authorization identity must be empty or the login name (case-insensitive)."""
    if not creds.authzid:
        return True
    try:
        return creds.authzid.decode("utf-8").lower() == creds.authcid.decode("utf-8").lower()
    except UnicodeDecodeError:
        return False
