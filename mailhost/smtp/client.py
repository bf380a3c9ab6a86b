"""Outbound ESMTP client: one transaction per connection, per-recipient results.

Twisted's `SMTPClient` dot-stuffs each 16 KiB chunk on its own (a `.` line at a chunk
boundary goes out unstuffed and may end DATA early), reports a 4xx greeting only as a
whole-message error, takes no MAIL/RCPT parameters and times out on the global reactor.
So this module keeps to a small reply-oriented protocol (`SMTPReplyProtocol`: send a
command, await its reply, with a per-command timeout on an injected clock) and writes
the transaction as straight-line code (`run_transaction`), RFC 5321 §3.3 and §4.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from io import BytesIO
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.basic import FileSender, LineReceiver
from twisted.python.failure import Failure

from mailhost.wire import TERMINATOR, DotStuffer

#: bounds on what a (possibly hostile) server may send us in one reply
MAX_REPLY_LINES = 200

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@attrs.frozen
class Reply:
    """An SMTP reply (RFC 5321 §4.2): a three-digit code and its text lines."""

    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code, if the reply carries one."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return None

    @property
    def status(self) -> str:
        """Enhanced status code, or one derived from the basic code (x.0.0)."""
        return self.enhanced or f"{str(self.code)[0]}.0.0"

    @property
    def positive(self) -> bool:
        """A success: only 2xx counts (a 3xx to RCPT or after the final dot is not one)."""
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class SMTPClientError(Exception):
    """The session failed; `reply` is what to record (a synthetic one for network errors)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class HostFailure(SMTPClientError):
    """This host cannot take the message now; try the next MX (RFC 5321 §5.1)."""


def local_reply(code: int, status: str, text: str) -> Reply:
    """A reply made up locally to describe a failure that had no server reply."""
    return Reply(code, (f"{status} {text}",))


class DataEncoder(DotStuffer):
    """Stored message bytes (LF line ends) -> SMTP DATA (RFC 5321 §4.5.2).

    `finish` also ends the data with <CRLF>.<CRLF>.
    """

    def finish(self) -> bytes:
        return super().finish() + TERMINATOR


def encode_data(message: bytes) -> bytes:
    """The whole DATA payload for a stored message, terminator included."""
    enc = DataEncoder()
    return enc.encode(message) + enc.finish()


class SMTPReplyProtocol(LineReceiver):
    """Sends commands and hands out replies in order, each with a timeout."""

    delimiter = b"\n"
    MAX_LENGTH = 8192

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()
        self._waiting: deque[defer.Deferred[Reply]] = deque()
        self._lost: Failure | None = None
        self.connected_d: defer.Deferred[None] = defer.Deferred()
        self.closed_d: defer.Deferred[None] = defer.Deferred()
        self.tls = False

    # -- receiving
    def connectionMade(self) -> None:
        self.connected_d.callback(None)

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._fail(local_reply(421, "4.5.0", f"malformed reply line {text[:80]!r}"))
            return
        self._lines.append(text[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            self._fail(local_reply(421, "4.5.0", "reply has too many lines"))
            return
        if text[3:4] != "-":
            reply = Reply(int(text[:3]), tuple(self._lines))
            self._lines = []
            if self._waiting:
                self._waiting.popleft().callback(reply)
            else:
                self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(local_reply(421, "4.5.0", "reply line too long"))

    def _fail(self, reply: Reply) -> None:
        self._lost = Failure(SMTPClientError(reply))
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if self._lost is None:
            self._lost = reason
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(self._lost)
        if not self.closed_d.called:
            self.closed_d.callback(None)

    # -- sending
    def next_reply(self, timeout: float | None = None) -> defer.Deferred[Reply]:
        """The next reply from the server; errback on timeout or connection loss."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(self._lost)
        d: defer.Deferred[Reply] = defer.Deferred()
        self._waiting.append(d)
        limit = self.timeout if timeout is None else timeout

        def expire() -> None:
            if d in self._waiting:
                self._waiting.remove(d)
                self._fail(local_reply(421, "4.4.2", "timeout waiting for a reply"))
                d.errback(self._lost)

        call = self.clock.callLater(limit, expire)

        def cancel_timer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(cancel_timer)

    def command(self, line: str, timeout: float | None = None) -> defer.Deferred[Reply]:
        self.transport.write(line.encode("utf-8") + b"\r\n")
        return self.next_reply(timeout)

    def start_tls(self, context: Any) -> None:
        """Start TLS after the 220 (RFC 3207 §4.2); anything the server sent in plaintext
        after that reply would otherwise be read as a reply under TLS (injection)."""
        if self.clearLineBuffer() or self._replies or self._lines:
            raise HostFailure(local_reply(421, "4.7.0",
                                          "server sent data after its STARTTLS reply"))
        self.transport.startTLS(context)
        self.tls = True

    def send_data(self, payload: bytes) -> defer.Deferred[Any]:
        """Stream an encoded DATA payload, honouring the transport's flow control."""
        return FileSender().beginFileTransfer(BytesIO(payload), self.transport)

    def quit(self) -> None:
        """Say QUIT (RFC 5321 §4.1.1.10) and close without waiting long for the reply."""
        if self._lost is not None or self.transport is None:
            return
        d = self.command("QUIT", timeout=min(self.timeout, 10.0))
        d.addBoth(lambda _: self.transport.loseConnection())


@attrs.define
class Transaction:
    """What to send, and how (TLS policy, credentials, MAIL/RCPT parameters)."""

    helo: str
    sender: str
    recipients: list[str]
    data: bytes
    #: "none", "opportunistic", "required" (any TLS) or "verified" (context verifies)
    tls: str = "opportunistic"
    tls_context: Any = None
    auth: tuple[str, str] | None = None
    smtputf8: bool = False
    eightbit: bool = False
    ret: str | None = None
    envid: str | None = None
    #: per recipient: (NOTIFY, ORCPT) as given at our RCPT TO (RFC 3461)
    dsn: dict[str, tuple[str | None, str | None]] = attrs.field(factory=dict)


@attrs.define
class TransactionResult:
    tls: bool
    replies: dict[str, Reply]


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (RFC 5321 §4.1.1.1) -> their parameters, upper-cased keys."""
    ext = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        ext[keyword.upper()] = params
    return ext


def _reason(failure: Failure, stage: str) -> Reply:
    if failure.check(SMTPClientError):
        return failure.value.reply
    if failure.check(SSL.Error):
        return local_reply(421, "4.7.5", f"TLS failure during {stage}: {failure.value}")
    text = failure.getErrorMessage() or failure.type.__name__
    return local_reply(421, "4.4.2", f"connection lost during {stage}: {text}")


async def _hello(proto: SMTPReplyProtocol, helo: str) -> dict[str, str]:
    reply = await proto.command(f"EHLO {helo}")
    if reply.code == 250:
        return _extensions(reply)
    reply = await proto.command(f"HELO {helo}")  # RFC 5321 §3.2 fallback
    if reply.code != 250:
        raise HostFailure(reply)
    return {}


async def _secure_and_auth(proto: SMTPReplyProtocol, txn: Transaction,
                           ext: dict[str, str]) -> dict[str, str]:
    if txn.tls != "none" and "STARTTLS" in ext:
        reply = await proto.command("STARTTLS")  # RFC 3207 §4
        if reply.code != 220:
            raise HostFailure(local_reply(421, "4.7.0", f"STARTTLS refused: {reply}"))
        proto.start_tls(txn.tls_context)
        ext = await _hello(proto, txn.helo)  # RFC 3207 §4.2: forget what we knew
    elif txn.tls in ("required", "verified"):
        raise HostFailure(local_reply(421, "4.7.10", "TLS required but not offered"))
    if txn.auth is not None:
        if "AUTH" not in ext or "PLAIN" not in ext["AUTH"].upper().split():
            raise HostFailure(local_reply(421, "4.7.0", "AUTH PLAIN not offered"))
        user, password = txn.auth
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        reply = await proto.command(f"AUTH PLAIN {token}")  # RFC 4954 §4, RFC 4616
        if reply.code != 235:  # a local configuration problem: defer, never bounce
            raise HostFailure(local_reply(454, "4.7.0", f"authentication failed: {reply}"))
    return ext


def _mail_params(txn: Transaction, ext: dict[str, str]) -> str:
    params = []
    if "SIZE" in ext:
        size = len(txn.data) + txn.data.count(b"\n")  # RFC 1870: as sent, with CRLF
        params.append(f"SIZE={size}")
    if txn.eightbit and "8BITMIME" in ext:
        params.append("BODY=8BITMIME")  # RFC 6152
    if txn.smtputf8:
        params.append("SMTPUTF8")  # RFC 6531 §3.4
    if "DSN" in ext:  # RFC 3461 §4.3, §4.4
        if txn.ret:
            params.append(f"RET={txn.ret}")
        if txn.envid:
            params.append(f"ENVID={txn.envid}")
    return "".join(" " + p for p in params)


def _rcpt_params(txn: Transaction, rcpt: str, ext: dict[str, str]) -> str:
    if "DSN" not in ext or rcpt not in txn.dsn:
        return ""
    notify, orcpt = txn.dsn[rcpt]
    out = f" NOTIFY={notify}" if notify else ""
    return out + (f" ORCPT={orcpt}" if orcpt else "")


class _Failed:
    """A pipelined reply that failed, held until its turn comes (no unhandled errors)."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


def _settle(d: defer.Deferred[Reply]) -> defer.Deferred[Any]:
    return d.addErrback(_Failed)


async def _unsettle(d: defer.Deferred[Any]) -> Reply:
    result = await d
    if isinstance(result, _Failed):
        result.failure.raiseException()
    return result


async def _drain(proto: SMTPReplyProtocol, pipelined: list[defer.Deferred[Any]]) -> None:
    """Consume the replies to pipelined commands after MAIL failed; should a server have
    answered DATA with 354 anyway, end the empty data so QUIT is read as a command."""
    if not pipelined:
        return
    replies = [await d for d in pipelined]
    last = replies[-1]
    if isinstance(last, Reply) and last.code == 354:
        proto.transport.write(b".\r\n")
        await _unsettle(_settle(proto.next_reply()))


async def run_transaction(proto: SMTPReplyProtocol, txn: Transaction) -> TransactionResult:
    """Deliver one message to one connected server.

    Raises HostFailure when this host did not take responsibility for anything (bad
    greeting, EHLO, TLS, AUTH, MAIL 4xx, connection lost before MAIL was accepted): the
    caller then tries the next MX. Otherwise every recipient gets a reply: its RCPT
    reply, or the DATA/end-of-data reply, or a local 4.4.2 if the connection dropped.
    """
    stage = "greeting"
    try:
        greeting = await proto.next_reply()
        if greeting.code != 220:  # RFC 5321 §3.1: 554 or 421 greeting
            raise HostFailure(greeting)
        stage = "EHLO"
        ext = await _hello(proto, txn.helo)
        stage = "STARTTLS"
        ext = await _secure_and_auth(proto, txn, ext)
        if txn.smtputf8 and "SMTPUTF8" not in ext:
            bad = local_reply(553, "5.6.7", "the next hop does not support SMTPUTF8")
            proto.quit()
            return TransactionResult(proto.tls, {r: bad for r in txn.recipients})
        stage = "MAIL FROM"
        mail_d = proto.command(f"MAIL FROM:<{txn.sender}>{_mail_params(txn, ext)}")
        # RFC 2920 §3.1: with PIPELINING, RCPTs and DATA go out with MAIL; replies are
        # matched to commands in order by the protocol.
        pipelined: list[defer.Deferred[Any]] = []
        if "PIPELINING" in ext:
            pipelined = [_settle(proto.command(
                f"RCPT TO:<{rcpt}>{_rcpt_params(txn, rcpt, ext)}")) for rcpt in txn.recipients]
            pipelined.append(_settle(proto.command("DATA", timeout=min(proto.timeout, 120.0))))
        reply = await mail_d
        if reply.code != 250:
            await _drain(proto, pipelined)
            if reply.permanent:
                proto.quit()
                return TransactionResult(proto.tls, {r: reply for r in txn.recipients})
            raise HostFailure(reply)
    except HostFailure:
        proto.quit()
        raise
    except Exception:  # noqa: BLE001 - any failure before MAIL means: try the next host
        raise HostFailure(_reason(Failure(), stage)) from None

    replies: dict[str, Reply] = {}
    try:
        stage = "RCPT TO"
        for i, rcpt in enumerate(txn.recipients):
            replies[rcpt] = await (_unsettle(pipelined[i]) if pipelined else proto.command(
                f"RCPT TO:<{rcpt}>{_rcpt_params(txn, rcpt, ext)}"))
        accepted = [r for r in txn.recipients if replies[r].positive]
        stage = "DATA"
        if pipelined:
            reply = await _unsettle(pipelined[-1])
            if reply.code == 354 and not accepted:
                proto.transport.write(b".\r\n")  # nothing to send; end the data at once
                await proto.next_reply()
        elif accepted:
            reply = await proto.command("DATA", timeout=min(proto.timeout, 120.0))
        if not accepted:
            proto.quit()
            return TransactionResult(proto.tls, replies)
        if reply.code != 354:
            if reply.code < 400:  # a 250 here sent no body: not a delivery (§4.1.1.4)
                reply = local_reply(451, "4.5.0", f"unexpected reply to DATA: {reply}")
            replies.update({r: reply for r in accepted})
            proto.quit()
            return TransactionResult(proto.tls, replies)
        stage = "message body"
        await proto.send_data(encode_data(txn.data))
        reply = await proto.next_reply()  # RFC 5321 §4.5.3.2.6 (command_timeout)
        replies.update({r: reply for r in accepted})
        proto.quit()
    except Exception:  # noqa: BLE001 - recorded per recipient; the scheduler retries
        failure = Failure()
        lost = _reason(failure, stage)
        for r in txn.recipients:
            if r not in replies or not replies[r].permanent:
                replies[r] = lost
    return TransactionResult(proto.tls, replies)
