"""POP3 on the `pop3` role (with STLS) and `pop3s` (implicit TLS).

RFC 1939 (POP3), RFC 2449 (CAPA, response codes), RFC 2595 §4 (STLS), RFC 5034 (SASL
PLAIN), RFC 3206 (AUTH and SYS response codes). A narrow subclass of Twisted's `POP3`:
we keep its replies, CAPA/NOOP and timeout plumbing, and replace what TWISTED-NOTES.md
lists as broken — command dispatch (bad input dropped the connection), the message
commands (`DELE 0`, silent RETR errors), STLS (absent), APOP (never offered here), and
pipelining (commands ran while a login was pending).

The maildrop lives in `pop3_mailbox.py`, the streaming of message bodies in
`pop3_stream.py`; this module only parses and replies.
"""

from __future__ import annotations

import binascii
import itertools
import os
import time
from collections import deque
from typing import Any

from twisted.cred import error as cred_error
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import pop3

from mailhost import __version__, sasl
from mailhost.accounts import LoginLocked
from mailhost.pop3_mailbox import MaildirMaildrop, MessageGone
from mailhost.pop3_stream import MessageSender, SendAborted

log = Logger(namespace="mailhost.pop3")

AUTHORIZATION, TRANSACTION = "AUTHORIZATION", "TRANSACTION"

#: verb -> (states it is valid in, min args, max args, usage shown on a syntax error)
COMMANDS: dict[str, tuple[tuple[str, ...], int, int, str]] = {
    "CAPA": ((AUTHORIZATION, TRANSACTION), 0, 0, "CAPA"),
    "QUIT": ((AUTHORIZATION, TRANSACTION), 0, 0, "QUIT"),
    "STLS": ((AUTHORIZATION,), 0, 0, "STLS"),
    "USER": ((AUTHORIZATION,), 1, 1, "USER <name>"),
    "PASS": ((AUTHORIZATION,), 1, 1, "PASS <password>"),
    "AUTH": ((AUTHORIZATION,), 0, 2, "AUTH <mechanism> [<initial-response>]"),
    "STAT": ((TRANSACTION,), 0, 0, "STAT"),
    "LIST": ((TRANSACTION,), 0, 1, "LIST [<msg>]"),
    "UIDL": ((TRANSACTION,), 0, 1, "UIDL [<msg>]"),
    "RETR": ((TRANSACTION,), 1, 1, "RETR <msg>"),
    "TOP": ((TRANSACTION,), 2, 2, "TOP <msg> <lines>"),
    "DELE": ((TRANSACTION,), 1, 1, "DELE <msg>"),
    "RSET": ((TRANSACTION,), 0, 0, "RSET"),
    "NOOP": ((TRANSACTION,), 0, 0, "NOOP"),
}

#: RFC 1939 §3: an autologout timer, if any, MUST be at least 10 minutes
MIN_IDLE_TIMEOUT = 600

_session_ids = itertools.count(1)


class POP3Server(pop3.POP3):
    """One POP3 session. `ctx` is the ServerContext, `role` "pop3" or "pop3s"."""

    noisy = False

    def __init__(self, ctx: Any, role: str) -> None:
        self.ctx = ctx
        self.role = role
        limits = ctx.config.limits
        self.secure = role == "pop3s"  # implicit TLS: service.py wrapped us already
        self.allow_cleartext = ctx.config.auth.allow_cleartext
        self.MAX_LENGTH = max(512, limits.line_length)  # RFC 2449 §4: 255 per command
        self.timeOut = max(MIN_IDLE_TIMEOUT, limits.idle_timeout)
        self.max_bad_commands = limits.bad_commands
        self.session_id = f"{int(time.time()):x}.{os.getpid():x}.{next(_session_ids)}"
        self.client_ip = "-"
        self.account: str | None = None
        self.bad_commands = 0
        self.retrieved = 0
        self.deleted_count = 0
        self.octets_sent = 0
        self.result = "disconnected"
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        self._busy = False
        self._paused = False
        self._draining = False
        self._counted = False
        self._sasl_pending = False
        self._sender: MessageSender | None = None
        self._quitting = False

    # --- connection --------------------------------------------------------------------

    def callLater(self, period: float, func: Any) -> Any:  # noqa: N802 - TimeoutMixin
        return self.ctx.clock.callLater(period, func)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "-")
        if self.ctx.stopping:
            self._refuse(b"-ERR [SYS/TEMP] server is shutting down")
            return
        if not self.ctx.connections.acquire(self.client_ip):
            self._refuse(b"-ERR [SYS/TEMP] too many connections from your address")
            return
        self._counted = True
        # RFC 1939 §4 greeting; no APOP timestamp: APOP is not offered
        self.successResponse(b"mailhost POP3 server ready")
        self.setTimeout(self.timeOut)
        log.info("pop3 connect session={session} ip={ip} role={role}",
                 session=self.session_id, ip=self.client_ip, role=self.role)

    def _refuse(self, reply: bytes) -> None:
        self.result = "refused"
        self.transport.write(reply + b"\r\n")
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        if self.factory is not None:
            self.factory.sessions.discard(self)
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.stopProducing()
        if self._counted:
            self._counted = False
            self.ctx.connections.release(self.client_ip)
        super().connectionLost(reason)
        if self.result != "refused":
            log.info("pop3 session session={session} ip={ip} role={role} account={account} "
                     "retrieved={retrieved} deleted={deleted} octets={octets} "
                     "result={result}", session=self.session_id, ip=self.client_ip,
                     role=self.role, account=self.account, retrieved=self.retrieved,
                     deleted=self.deleted_count, octets=self.octets_sent, result=self.result)

    def timeoutConnection(self) -> None:
        """RFC 1939 §3 autologout: no UPDATE state, nothing is deleted."""
        self.result = "timeout"
        if self._sender is not None:  # the client stopped reading mid-message
            self.transport.abortConnection()
            return
        self.transport.write(b"-ERR autologout: idle for too long\r\n")
        self.transport.loseConnection()

    # --- input: lines, bounded, one command at a time ----------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split into lines; run them one at a time, pausing reads while one is pending."""
        lines = (self._buffer + data).split(b"\r\n")
        self._buffer = lines.pop()
        self._lines.extend(lines)
        if len(self._buffer) > self.MAX_LENGTH:
            self._buffer = b""
            self._lines.clear()
            self._lines.append(b"\0" * (self.MAX_LENGTH + 1))  # reported in order
        self._drain()

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._lines and not self._busy and not self.transport.disconnecting:
                line = self._lines.popleft()
                if len(line) > self.MAX_LENGTH:
                    self.lineLengthExceeded(line)
                    return
                self.lineReceived(line)
            if self._busy and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        finally:
            self._draining = False

    def lineLengthExceeded(self, line: bytes) -> None:
        """Reply, drop what is buffered and close (TWISTED-NOTES: never keep the buffer)."""
        self._buffer = b""
        self._lines.clear()
        self.result = "line-too-long"
        self.failResponse(b"line too long")
        self.transport.loseConnection()

    def _long(self, d: defer.Deferred) -> defer.Deferred:
        """Hold further commands (RFC 2449 PIPELINING) until `d` has replied."""
        self._busy = True

        def internal(failure: Any) -> None:
            log.failure("pop3 internal error session={session}", failure,
                        session=self.session_id)
            if self.connected and not self._quitting:
                self.failResponse(b"[SYS/TEMP] internal server error")

        def done(_: Any) -> None:
            self._busy = False
            if self._paused and self.connected:
                self._paused = False
                self.transport.resumeProducing()
            if self.connected:
                self._drain()

        return d.addErrback(internal).addBoth(done)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if self._sasl_pending:
            self._sasl_pending = False
            self._sasl_response(line)
            return
        verb, _, rest = line.partition(b" ")
        try:
            name = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            name = ""
        spec = COMMANDS.get(name) if name.isalpha() else None
        if spec is None:
            self._bad(b"unknown command")
            return
        states, least, most, usage = spec
        state = TRANSACTION if self.mbox is not None else AUTHORIZATION
        if state not in states:
            self._bad(f"{name} is not valid in the {state} state".encode())
            return
        # RFC 1939 §7: a password may contain spaces; everything else is space-separated
        args = ([rest] if rest else []) if name == "PASS" else rest.split()
        if not least <= len(args) <= most:
            self._bad(f"syntax: {usage}".encode())
            return
        try:
            getattr(self, "do_" + name)(*args)
        except Exception:  # noqa: BLE001 - never a traceback or a silent drop
            log.failure("pop3 command failed session={session} command={command}",
                        session=self.session_id, command=name)
            self.failResponse(b"[SYS/TEMP] internal server error")

    def _bad(self, message: bytes) -> None:
        """An unknown or malformed command; too many of them end the session."""
        self.bad_commands += 1
        if self.bad_commands > self.max_bad_commands:
            self.result = "too-many-errors"
            self.failResponse(message + b"; too many bad commands, closing connection")
            self.transport.loseConnection()
            return
        self.failResponse(message)

    # --- AUTHORIZATION state -------------------------------------------------------------

    def _cleartext_refused(self) -> bool:
        """RFC 2595 §4: no passwords before TLS unless the operator allows it."""
        if self.secure or self.allow_cleartext:
            return False
        self.failResponse(b"[AUTH] plaintext authentication is disabled; use STLS first")
        return True

    def listCapabilities(self) -> list[bytes]:  # noqa: N802 - Twisted API (RFC 2449 §5)
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.mbox is None:
            if self.secure or self.allow_cleartext:
                caps += [b"USER", b"SASL PLAIN"]
            if self.role == "pop3" and not self.secure:
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION mailhost-" + __version__.encode("ascii"))
        return caps

    def do_CAPA(self) -> None:
        self.successResponse(b"Capability list follows")
        self.transport.writeSequence([c + b"\r\n" for c in self.listCapabilities()]
                                     + [b".\r\n"])

    def do_STLS(self) -> None:
        """RFC 2595 §4; discard anything pipelined after STLS (command injection)."""
        if self.role != "pop3" or self.secure:
            self.failResponse(b"STLS not available: already under TLS")
            return
        self.successResponse(b"Begin TLS negotiation")
        self._buffer = b""
        self._lines.clear()
        self._userIs = None
        self.transport.startTLS(self.ctx.tls)
        self.secure = True

    def do_USER(self, user: bytes) -> None:
        if self._cleartext_refused():
            return
        self._userIs = user
        self.successResponse(b"send PASS")

    def do_PASS(self, password: bytes) -> None:
        if self._cleartext_refused():
            return
        user, self._userIs = self._userIs, None
        if user is None:
            self._bad(b"USER first")
            return
        self._login(user, password)

    def do_AUTH(self, mechanism: bytes | None = None, initial: bytes | None = None) -> None:
        """RFC 5034: SASL PLAIN only (with or without an initial response)."""
        if mechanism is None:
            self.successResponse(b"SASL mechanisms follow")
            self.transport.write(b"PLAIN\r\n.\r\n")
            return
        if mechanism.upper() != b"PLAIN":
            self.failResponse(b"unsupported SASL mechanism")
            return
        if self._cleartext_refused():
            return
        if initial is None:
            self._sasl_pending = True
            self.transport.write(b"+ \r\n")
            return
        self._sasl_response(b"" if initial == b"=" else initial)

    def _sasl_response(self, line: bytes) -> None:
        if line.strip() == b"*":
            self.failResponse(b"authentication cancelled")
            return
        try:
            decoded = binascii.a2b_base64(line, strict_mode=True)
        except (binascii.Error, ValueError):
            self.failResponse(b"[AUTH] invalid base64 in SASL response")
            return
        try:
            creds = sasl.parse_plain(decoded)
        except sasl.MalformedPlain:
            self.failResponse(b"[AUTH] malformed PLAIN response")
            return
        if not sasl.authzid_allowed(creds):
            self.failResponse(b"[AUTH] acting as another user is not permitted")
            return
        self._login(creds.authcid, creds.password)

    def _login(self, user: bytes, password: bytes) -> None:
        d = self.ctx.authenticator.login(user, password, self.client_ip, "pop3",
                                         pop3.IMailbox)
        d.addCallbacks(self._authenticated, self._login_failed)
        self._long(d)

    def _login_failed(self, failure: Any) -> None:
        if not self.connected:
            return
        if failure.check(LoginLocked):
            self.failResponse(b"[SYS/TEMP] too many failed logins; try again later")
        elif failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            self.failResponse(b"[AUTH] invalid user name or password")
        else:
            log.failure("pop3 login error session={session}", failure,
                        session=self.session_id)
            self.failResponse(b"[SYS/TEMP] authentication is temporarily unavailable")

    def _authenticated(self, result: tuple[Any, MaildirMaildrop, Any]) -> Any:
        _, maildrop, logout = result
        if not self.connected:
            logout()
            return None
        if not maildrop.lock():
            logout()
            self.failResponse(b"[IN-USE] maildrop is in use by another POP3 session")
            return None
        self._onLogout = logout

        def opened(count: int) -> None:
            if not self.connected:
                return
            self.mbox = maildrop
            self.account = maildrop.account
            messages, octets = maildrop.totals()
            self.successResponse(f"maildrop has {messages} messages ({octets} octets)")

        def failed(failure: Any) -> None:
            log.failure("pop3 cannot open maildrop session={session} account={account}",
                        failure, session=self.session_id, account=maildrop.account)
            self._onLogout = None
            logout()
            if self.connected:
                self.failResponse(b"[SYS/TEMP] cannot open the maildrop; try again later")

        return maildrop.open().addCallbacks(opened, failed)

    # --- TRANSACTION state (RFC 1939 §5) -------------------------------------------------

    def _message(self, arg: bytes, allow_deleted: bool = False) -> int | None:
        """The 0-based index for a message-number argument, or None after an -ERR."""
        if not arg.isdigit() or len(arg) > 9:
            self._bad(b"invalid message number")
            return None
        number = int(arg)
        if not self.mbox.valid(number - 1):
            self.failResponse(f"no such message: {number}".encode())
            return None
        if self.mbox.is_deleted(number - 1) and not allow_deleted:
            self.failResponse(f"message {number} is deleted".encode())
            return None
        return number - 1

    def do_STAT(self) -> None:
        messages, octets = self.mbox.totals()
        self.successResponse(f"{messages} {octets}")

    def do_LIST(self, arg: bytes | None = None) -> None:
        if arg is not None:
            i = self._message(arg)
            if i is not None:
                self.successResponse(f"{i + 1} {self.mbox.sizes[i]}")
            return
        messages, octets = self.mbox.totals()
        deleted = self.mbox.deleted
        lines = [b"%d %d\r\n" % (n + 1, size) for n, size in enumerate(self.mbox.sizes)
                 if n not in deleted]
        self.successResponse(f"{messages} messages ({octets} octets)")
        self.transport.writeSequence(lines + [b".\r\n"])

    def do_UIDL(self, arg: bytes | None = None) -> None:
        if arg is not None:
            i = self._message(arg)
            if i is not None:
                self.successResponse(b"%d %s" % (i + 1, self.mbox.getUidl(i)))
            return
        prefix = b"%d." % self.mbox.uidvalidity
        deleted = self.mbox.deleted
        lines = [b"%d %s%d\r\n" % (n + 1, prefix, e.uid)
                 for n, e in enumerate(self.mbox.entries) if n not in deleted]
        self.successResponse(b"")
        self.transport.writeSequence(lines + [b".\r\n"])

    def do_RETR(self, arg: bytes) -> None:
        i = self._message(arg)
        if i is not None:
            self._long(self._send(i, None))

    def do_TOP(self, arg: bytes, lines: bytes) -> None:
        i = self._message(arg)
        if i is None:
            return
        if not lines.isdigit() or len(lines) > 9:
            self._bad(b"invalid line count")
            return
        self._long(self._send(i, int(lines)))

    def _send(self, i: int, top: int | None) -> defer.Deferred:
        """RETR / TOP: the status line, the streamed message, the terminating dot."""
        started = []

        def opened(fp: Any) -> Any:
            if not self.connected:
                fp.close()
                return None
            if top is None:
                self.successResponse(f"{self.mbox.sizes[i]} octets")
            else:
                self.successResponse(b"top of message follows")
            started.append(True)
            self._sender = MessageSender(fp, self.transport, top,
                                         on_progress=self.resetTimeout)
            return self._sender.start().addCallback(sent)

        def sent(octets: int) -> Any:
            self._sender = None
            self.transport.write(b".\r\n")
            self.octets_sent += octets
            if top is not None:
                return None
            self.retrieved += 1
            return self.mbox.mark_seen(i).addErrback(
                lambda f: log.failure("pop3 cannot mark seen session={session}", f,
                                      session=self.session_id))

        def failed(failure: Any) -> None:
            self._sender = None
            if failure.check(SendAborted) or not self.connected:
                return
            if started:  # mid-message: the only honest signal left is to hang up
                log.failure("pop3 read error session={session}", failure,
                            session=self.session_id)
                self.result = "read-error"
                self.transport.loseConnection()
            elif failure.check(MessageGone):
                self.failResponse(b"message was removed by another session")
            else:
                log.failure("pop3 cannot open message session={session}", failure,
                            session=self.session_id)
                self.failResponse(b"[SYS/TEMP] cannot read the message")

        return self.mbox.open_message(i).addCallback(opened).addErrback(failed)

    def do_DELE(self, arg: bytes) -> None:
        i = self._message(arg)
        if i is not None:
            self.mbox.deleteMessage(i)
            self.successResponse(f"message {i + 1} deleted")

    def do_RSET(self) -> None:
        self.mbox.undeleteMessages()
        messages, octets = self.mbox.totals()
        self.successResponse(f"maildrop has {messages} messages ({octets} octets)")

    def do_QUIT(self) -> None:
        """RFC 1939 §6: the UPDATE state removes what DELE marked, then the goodbye."""
        self._quitting = True
        if self.mbox is None:
            self.result = "quit"
            self.successResponse(b"mailhost POP3 server signing off")
            self.transport.loseConnection()
            return

        def updated(removed: int) -> None:
            self.deleted_count = removed
            self.result = "quit"
            self.successResponse(f"mailhost POP3 server signing off ({removed} messages "
                                 "deleted)")

        def failed(failure: Any) -> None:
            log.failure("pop3 update failed session={session}", failure,
                        session=self.session_id)
            self.result = "update-failed"
            self.failResponse(b"[SYS/TEMP] some deleted messages not removed")

        d = self.mbox.commit().addCallbacks(updated, failed)
        d.addBoth(lambda _: self.transport.loseConnection())
        self._long(d)


class POP3Factory(protocol.ServerFactory):
    """Builds POP3 sessions for one listener role ("pop3" or "pop3s")."""

    noisy = False

    def __init__(self, ctx: Any, role: str) -> None:
        if role not in ("pop3", "pop3s"):
            raise ValueError(f"not a POP3 role: {role!r}")
        self.ctx = ctx
        self.role = role
        #: the open sessions, closed when the listener stops (nothing is deleted)
        self.sessions: set[POP3Server] = set()
        ctx.realm.register(pop3.IMailbox, lambda key, mind: MaildirMaildrop(
            key, ctx.store.mailbox_path(key), ctx.reactor))

    def buildProtocol(self, addr: Any) -> POP3Server:
        proto = POP3Server(self.ctx, self.role)
        proto.factory = self
        self.sessions.add(proto)
        return proto

    def stopFactory(self) -> None:
        """Server shutdown: end open sessions without the UPDATE state."""
        for session in list(self.sessions):
            if session.transport is not None and session.connected:
                session.result = "shutdown"
                session.transport.abortConnection()
