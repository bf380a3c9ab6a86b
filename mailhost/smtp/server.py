"""The SMTP server: the MX role (RFC 5321 inbound) and authenticated submission
(RFC 6409, on `submission` with STARTTLS and `submissions` with implicit TLS, RFC 8314).

Built on `twisted.mail.smtp.ESMTP`, replacing what TWISTED-NOTES.md lists as broken:
input framing (bounded lines, no quadratic buffering, STARTTLS injection closed, reading
paused while a Deferred is pending so pipelined replies stay in order), the command
handlers that ignore ESMTP parameters, and the DATA path (streamed into the store).
Decisions come from `ctx.policy`, files from `ctx.store` / `ctx.queue`.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhost.smtp import commands
from mailhost.smtp.auth import ISMTPSubmitter, Submitter
from mailhost.smtp.delivery import Reply

log = Logger(namespace="mailhost.smtp")

COMMAND, DATA, AUTH = smtp.COMMAND, smtp.DATA, smtp.AUTH

#: input held while a reply is pending (pipelined commands): above PAUSE_INPUT the
#: transport stops reading; a client that still sends more than MAX_PENDING_INPUT is cut
PAUSE_INPUT = 16 * 1024
MAX_PENDING_INPUT = 256 * 1024

ROLES = ("smtp", "submission", "submissions")


@implementer(IHandshakeListener)
class SMTPSession(commands.CommandsMixin, smtp.ESMTP):
    """One SMTP connection. Framing and session limits here; commands in `commands`."""

    noisy = False

    def __init__(self, ctx: Any, role: str) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=None)
        self.ctx = ctx
        self.role = role
        config = ctx.config
        self.limits = config.limits
        self.host = config.hostname.encode("ascii")  # never smtp.DNSNAME (blocking lookup)
        self.timeout = self.limits.idle_timeout
        self.max_line = self.limits.line_length
        self.session_id = secrets.token_hex(5).upper()
        self.client_ip = "unknown"
        self._buf = b""
        self._pos = 0
        self._skip_line = False
        self._waiting = False
        self._paused = False
        self._closing = False
        self._lost = False
        self._acquired = False
        self._session_timer: Any = None
        self.bad_commands = 0
        #: commands since the last accepted message ([limits] commands_per_session):
        #: bounds junk (NOOP/RSET/VRFY loops) without cutting long, productive sessions
        self.command_count = 0
        self.message_count = 0
        self.reset_session_state()
        self.tls_active = role == "submissions"
        self.tls_info: tuple[str, str] | None = None

    # --- connection ----------------------------------------------------------------

    def callLater(self, period: float, func: Any) -> Any:  # noqa: N802 - TimeoutMixin API
        """TimeoutMixin's timer, on the injected clock (not the global reactor)."""
        return self.ctx.clock.callLater(period, func)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = str(getattr(peer, "host", peer))
        self._helo = (None, self.client_ip)
        if not self.ctx.connections.acquire(self.client_ip):
            log.info("smtp reject session={session} client_ip={client_ip} code={code} "
                     "reason={reason}", event="smtp.reject", session=self.session_id,
                     client_ip=self.client_ip, code=421, reason="too many connections")
            self.sendCode(421, self.host + b" 4.7.0 Too many connections from your address")
            self._close()
            return
        self._acquired = True
        log.info("smtp session open session={session} client_ip={client_ip} role={role}",
                 event="smtp.session_open", session=self.session_id,
                 client_ip=self.client_ip, role=self.role)
        self.sendCode(220, self.host + b" ESMTP mailhost")
        self.setTimeout(self.timeout)
        self._session_timer = self.ctx.clock.callLater(self.limits.session_length,
                                                       self._session_expired)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._closing = True
        if self.stream is not None:
            self.stream.sink.abort()
            self.stream = None
        if self._session_timer is not None and self._session_timer.active():
            self._session_timer.cancel()
        self._session_timer = None
        self.mode = COMMAND  # nothing for ESMTP's own DATA cleanup to do
        smtp.ESMTP.connectionLost(self, reason)
        if self._acquired:
            self._acquired = False
            self.ctx.connections.release(self.client_ip)
            log.info("smtp session close session={session} client_ip={client_ip} "
                     "messages={messages} account={account}", event="smtp.session_close",
                     session=self.session_id,
                     client_ip=self.client_ip, messages=self.message_count,
                     account=self.account)

    def timeoutConnection(self) -> None:
        """RFC 5321 §4.5.3.2: idle too long."""
        self._shutdown(Reply(421, "4.4.2", "Error: timeout exceeded"))

    def _session_expired(self) -> None:
        self._session_timer = None
        self._shutdown(Reply(421, "4.4.2", "Error: session too long"))

    def _shutdown(self, reply: Reply) -> None:
        """Send a 421 and close (RFC 5321 §3.8)."""
        if self._closing:
            return
        self.reply(reply.code, reply.status, reply.text, host=True)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buf, self._pos = b"", 0
        self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """Record the negotiated TLS version and cipher (for Received and the log)."""
        try:
            conn = self.transport.getHandle()
            self.tls_info = (conn.get_protocol_version_name(), conn.get_cipher_name())
        except Exception:  # noqa: BLE001 - informational only
            self.tls_info = ("TLS", "unknown")
        self.tls_active = True

    @property
    def starttls_available(self) -> bool:
        return (not self.tls_active and self.role != "submissions"
                and ITLSTransport.providedBy(self.transport))

    # --- replies -------------------------------------------------------------------

    def reply(self, code: int, status: str, text: str, host: bool = False) -> None:
        """Send one reply with its enhanced status code (RFC 2034); log rejections."""
        if code >= 400:
            log.info("smtp reject session={session} client_ip={client_ip} code={code} "
                     "status={status} text={text}", event="smtp.reject",
                     session=self.session_id, client_ip=self.client_ip, code=code,
                     status=status, text=text)
        if code >= 500 and code != 535:
            self.bad_commands += 1
        prefix = self.host + b" " if host else b""
        self.sendCode(code, prefix + f"{status} {text}".encode("utf-8", "replace"))

    def send_reply(self, r: Reply) -> None:
        self.reply(r.code, r.status, r.text)

    # --- framing -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Bounded line framing replacing LineOnlyReceiver's (TWISTED-NOTES.md)."""
        if self._closing:
            return
        self._buf = self._buf[self._pos:] + data if self._pos else self._buf + data
        self._pos = 0
        if self._waiting:
            if len(self._buf) > MAX_PENDING_INPUT:
                self._shutdown(Reply(421, "4.7.0", "Error: too much pipelined input"))
            elif len(self._buf) > PAUSE_INPUT and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self.resetTimeout()
        self._process()

    def _process(self) -> None:
        while not self._waiting and not self._closing:
            if self.mode == DATA:
                try:
                    if not self._data_chunk():
                        break
                except Exception:  # noqa: BLE001 - never a traceback to the client
                    log.failure("smtp session {session}: DATA failed",
                                session=self.session_id)
                    self.mode = COMMAND
                    self.reset_transaction()
                    self.send_reply(Reply(451, "4.3.0", "Error: internal error"))
                    self._shutdown(Reply(421, "4.3.0", "Error: closing the session"))
                continue
            buf = self._buf
            idx = buf.find(b"\r\n", self._pos)
            if idx < 0:
                if len(buf) - self._pos > self.max_line:
                    if not self._skip_line:  # answer once per over-long line
                        self._line_too_long()
                    self._discard_partial()
                break
            line = buf[self._pos:idx]
            self._pos = idx + 2
            if self._skip_line:
                self._skip_line = False
                continue
            if len(line) > self.max_line:
                self._line_too_long()
                continue
            self._dispatch(line)
            self._check_error_limits()
        if self._pos:
            self._buf = self._buf[self._pos:]
            self._pos = 0

    def _discard_partial(self) -> None:
        """Drop the start of an over-long line; skip to its end (bounded memory)."""
        keep = b"\r" if self._buf.endswith(b"\r") else b""
        self._buf, self._pos = keep, 0
        self._skip_line = True

    def lineLengthExceeded(self, line: bytes) -> None:
        """Unused by our framing (dataReceived is replaced); kept safe: reply and skip."""
        self._line_too_long()
        self._discard_partial()

    def _line_too_long(self) -> None:
        """RFC 5321 §4.5.3.1.4 / §4.2.2: 500 and carry on, until the error limit."""
        if self.mode == AUTH:
            self.mode = COMMAND
            self.sasl = None
        self.reply(500, "5.5.2", "Error: line too long")
        self._check_error_limits()

    def _check_error_limits(self) -> None:
        if self._closing:
            return
        if self.bad_commands >= self.limits.bad_commands:
            self._shutdown(Reply(421, "4.7.0", "Error: too many errors"))

    def _data_chunk(self) -> bool:
        """Consume complete DATA lines; True if the final dot was seen (RFC 5321 §4.1.1.4).

        Only `<CRLF>.<CRLF>` ends the data; `.` at a line start is unstuffed (§4.5.2).
        """
        buf, pos, stream = self._buf, self._pos, self.stream
        max_line = self.max_line
        lines: list[bytes] = []
        append = lines.append
        ended = False
        too_long = False
        start = pos
        while True:
            idx = buf.find(b"\r\n", pos)
            if idx < 0:
                break
            line = buf[pos:idx]
            pos = idx + 2
            if self._skip_line:
                self._skip_line = False
                continue
            if line[:1] == b".":
                if len(line) == 1:
                    ended = True
                    break
                line = line[1:]
            if len(line) > max_line:
                too_long = True
                continue
            if b"\r" in line:
                # a bare CR becomes a line end in the stored message (a bare LF already
                # is one), so whatever relays it later dot-stuffs what follows: no next
                # hop can be fed an unstuffed "." line (SMTP smuggling, RFC 5321 §2.3.8)
                line = line.replace(b"\r", b"\n")
            append(line)
        self._pos = pos
        stream.count(pos - start)
        if not ended and len(buf) - pos > max_line:
            too_long = True
            stream.count(len(buf) - pos)
            self._discard_partial()
        if too_long:
            # RFC 5321 §4.5.3.1.6: text lines are limited; refuse at the final dot
            stream.fail(Reply(500, "5.5.2", "Error: message line too long"))
        stream.add_lines(lines)
        if ended:
            self.mode = COMMAND
            self._skip_line = False
            self.end_of_data()
        return ended

    def discard_pending_input(self) -> None:
        """RFC 3207 §4.2 / CVE-2011-0411: plaintext pipelined after STARTTLS is dropped."""
        self._buf, self._pos, self._skip_line = b"", 0, False

    # --- asynchronous steps ----------------------------------------------------------

    def await_result(self, d: defer.Deferred, on_done: Any, pause: bool = False) -> None:
        """Call `on_done(result_or_failure)` when `d` fires, holding further input until
        then so pipelined commands are answered in order (Twisted issue 8126).

        Input that arrives meanwhile is buffered, and the transport is paused once the
        buffer passes PAUSE_INPUT (pausing for every message would cost two epoll
        syscalls per step on the hot path).
        """
        state = {"fired": False, "sync": True}

        def fired(result: Any) -> None:
            state["fired"] = True
            if state["sync"]:
                self._guarded(on_done, result)
                return None
            self._waiting = False
            if self._lost:
                if isinstance(result, Failure):
                    log.failure("step failed after the connection was lost", result)
                return None
            self._guarded(on_done, result)
            if not self._closing:
                if self._paused:
                    self._paused = False
                    self.transport.resumeProducing()
                self._check_error_limits()
                self._process()
            return None

        d.addBoth(fired)
        state["sync"] = False
        if not state["fired"]:
            self._waiting = True
            if pause or len(self._buf) - self._pos > PAUSE_INPUT:
                self._paused = True
                self.transport.pauseProducing()

    def _guarded(self, fn: Any, *args: Any) -> None:
        """Run a handler; an unexpected exception becomes a 451, never a dropped session."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the session boundary: 451, never a traceback
            log.failure("smtp session {session}: internal error", session=self.session_id)
            self.mode = COMMAND
            self.sasl = None
            self.send_reply(Reply(451, "4.3.0", "Error: internal error"))

    def _dispatch(self, line: bytes) -> None:
        self.command_count += 1
        if self.command_count > self.limits.commands_per_session:
            self._shutdown(Reply(421, "4.7.0", "Error: too many commands"))
            return
        if self.mode == AUTH:
            self._guarded(self.auth_response, line)
        else:
            self._guarded(self.command, line)


class SMTPFactory(protocol.ServerFactory):
    """Builds `SMTPSession`s for one listener role: smtp, submission or submissions."""

    noisy = False

    def __init__(self, ctx: Any, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown SMTP role {role!r}")
        self.ctx = ctx
        self.role = role
        ctx.realm.register(ISMTPSubmitter, lambda key, mind: Submitter(key))

    def buildProtocol(self, addr: Any) -> SMTPSession:
        session = SMTPSession(self.ctx, self.role)
        session.factory = self
        return session
