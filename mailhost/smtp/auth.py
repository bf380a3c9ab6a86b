"""SMTP AUTH (RFC 4954) with the SASL PLAIN (RFC 4616) and LOGIN mechanisms.

Only the parsing lives here; the protocol asks `ctx.authenticator` (twisted.cred portal
plus throttling) to check the credentials.
"""

from __future__ import annotations

import base64
import binascii

import attrs
from zope.interface import Interface

from mailhost import sasl
from mailhost.sasl import Credentials, authzid_allowed

__all__ = ["Credentials", "authzid_allowed", "parse_plain"]

MECHANISMS = (b"PLAIN", b"LOGIN")

#: RFC 4954 §4: the server challenges for LOGIN, base64 of "Username:" / "Password:"
LOGIN_USER_PROMPT = base64.b64encode(b"Username:")
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:")


class ISMTPSubmitter(Interface):
    """The avatar of an authenticated SMTP client (its account key is `account`)."""


@attrs.define
class Submitter:
    """An authenticated submission client."""

    account: str

    def logout(self) -> None:
        pass


class SASLError(Exception):
    """A malformed SASL exchange; `status`/`text` are the 501 reply's parts."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class SASLCancelled(Exception):
    """The client answered `*` (RFC 4954 §4)."""


def decode_response(line: bytes) -> bytes:
    """Decode one base64 client response; `=` is the empty response (RFC 4954 §4)."""
    line = line.strip()
    if line == b"*":
        raise SASLCancelled()
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("5.5.2", "Invalid base64 data") from None


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616 §2 (the shared parser), as an SMTP 501 5.5.2 when malformed."""
    try:
        return sasl.parse_plain(message)
    except sasl.MalformedPlain:
        raise SASLError("5.5.2", "Malformed PLAIN response") from None


class SASLExchange:
    """The server side of one AUTH exchange, fed the client's responses in order.

    `step(response)` returns either a challenge (bytes, to send as `334`) or the
    `Credentials` once complete. `response` is None when the client gave no initial
    response.
    """

    def __init__(self, mechanism: bytes) -> None:
        self.mechanism = mechanism
        self._user: bytes | None = None

    def step(self, response: bytes | None) -> bytes | Credentials:
        if self.mechanism == b"PLAIN":
            if response is None:
                return b""
            return parse_plain(decode_response(response))
        # LOGIN
        if self._user is None:
            if response is None:
                return LOGIN_USER_PROMPT
            user = decode_response(response)
            if not user:
                raise SASLError("5.5.2", "Empty user name")
            self._user = user
            return LOGIN_PASSWORD_PROMPT
        assert response is not None
        return Credentials(b"", self._user, decode_response(response))
