"""The IMAP4rev1 server protocol (RFC 3501) and its factory.

Written on `Protocol` rather than as a subclass of `twisted.mail.imap4.IMAP4Server`:
Twisted's server would need most handlers replaced (UID forms, SEARCH, partial FETCH,
APPEND/COPY errors, IDLE, LITERAL+, SELECT responses) and its pipelining bug (replies
under the wrong tags with asynchronous backends, issue 9282) lives in the dispatch
core itself. Here commands run strictly one after another: input is not parsed while a
command's Deferred is pending, so every reply carries its own tag.

This module holds the reader (lines, literals, limits), the dispatcher, the session
states and the not-authenticated/any-state commands; the mailbox and selected-state
commands are the mixins in `commands_mailbox` and `commands_selected`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.logger import Logger
from twisted.python import threadable

from mailhost.imap.account import IIMAPAccount, IMAPAccount
from mailhost.imap.commands_auth import SessionCommands, Silent
from mailhost.imap.commands_mailbox import MailboxCommands
from mailhost.imap.commands_selected import SelectedCommands
from mailhost.imap.wire import (
    ATOM_CHARS,
    TAG_CHARS,
    Args,
    BadCommand,
    CommandFailed,
    Literal,
)

log = Logger(namespace="mailhost.imap")


#: pipelined input held while a command runs before we stop reading the socket
MAX_BUFFERED = 1 << 20
_LITERAL = re.compile(rb"\{(\d{1,12})(\+?)\}$")
#: states in which each command is valid (RFC 3501 §6)
ANY, NOTAUTH, AUTH, SELECTED = "any", "notauth", "auth", "selected"
_STATES = {
    "CAPABILITY": ANY, "NOOP": ANY, "LOGOUT": ANY, "ID": ANY,
    "STARTTLS": NOTAUTH, "LOGIN": NOTAUTH, "AUTHENTICATE": NOTAUTH,
    "SELECT": AUTH, "EXAMINE": AUTH, "CREATE": AUTH, "DELETE": AUTH, "RENAME": AUTH,
    "SUBSCRIBE": AUTH, "UNSUBSCRIBE": AUTH, "LIST": AUTH, "LSUB": AUTH, "STATUS": AUTH,
    "APPEND": AUTH, "NAMESPACE": AUTH, "ENABLE": AUTH, "IDLE": AUTH,
    "CHECK": SELECTED, "CLOSE": SELECTED, "UNSELECT": SELECTED, "EXPUNGE": SELECTED,
    "SEARCH": SELECTED, "FETCH": SELECTED, "STORE": SELECTED, "COPY": SELECTED,
    "MOVE": SELECTED,
}
_UID_COMMANDS = ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE")
#: RFC 3501 §7.4.1: no EXPUNGE responses during these (their non-UID forms)
_NO_EXPUNGE = ("FETCH", "STORE", "SEARCH")


class IMAPServer(protocol.Protocol, SessionCommands, MailboxCommands, SelectedCommands):
    """One IMAP session."""

    def __init__(self, ctx: Any, role: str, factory: IMAPFactory) -> None:
        self.ctx = ctx
        self.role = role
        self.factory = factory
        self.limits = ctx.config.limits
        self.tls = role == "imaps"
        self.state = NOTAUTH
        self.account: IMAPAccount | None = None
        self.selected: Any = None
        self.ip = "?"
        self._logout: Any = None
        self._buf = bytearray()
        self._pos = 0
        self._reading = False
        self._paused = False
        self._segments: list[bytes | Literal] = []
        self._cmd_size = 0
        self._literal: Literal | None = None
        self._lit_left = 0
        self._lit_sink: Any = None  # bytearray, open file, or None (discard)
        self._skip_command = False
        self._busy = False
        self._line_handler: Any = None
        self._closed = False
        self._counted = False
        self._timeout: Any = None
        self._discard_line = False
        self.commands = 0

    # --- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.ip = getattr(peer, "host", "?")
        if not self.ctx.connections.acquire(self.ip):
            self.send(b"* BYE [UNAVAILABLE] too many connections from your address")
            self._closed = True
            self.transport.loseConnection()
            return
        self._counted = True
        self.factory.open.add(self)
        self._reset_timeout()
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] mailhost IMAP4rev1 ready")

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self.factory.open.discard(self)
        if self._counted:
            self.ctx.connections.release(self.ip)
            self._counted = False
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        self._stop_idle()
        self._drop_literal()
        self.deselect()
        if self.account is not None:
            self.factory.sessions[self.account.key] -= 1
            if self.factory.sessions[self.account.key] <= 0:
                del self.factory.sessions[self.account.key]
            if self._logout:
                self._logout()
        log.info("imap session closed ip={ip} account={account} commands={commands}",
                 ip=self.ip, account=self.account.key if self.account else None,
                 commands=self.commands)

    def _reset_timeout(self) -> None:
        """RFC 3501 §5.4: at least 30 minutes once authenticated."""
        limit = self.limits.idle_timeout if self.state == NOTAUTH else \
            max(self.limits.idle_timeout, 1800)
        if self._timeout is not None and self._timeout.active():
            self._timeout.reset(limit)
        else:
            self._timeout = self.ctx.clock.callLater(limit, self._timed_out)

    def _timed_out(self) -> None:
        self.send(b"* BYE autologout; idle for too long")
        self.transport.loseConnection()

    def send(self, line: bytes) -> None:
        if not self._closed or line.startswith(b"* BYE"):
            self.transport.write(line + b"\r\n")

    def capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UIDPLUS",
                "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE"]
        if self.state == NOTAUTH:
            if self.role == "imap" and not self.tls:
                caps.append("STARTTLS")
            if self.login_allowed():
                caps += ["SASL-IR", "AUTH=PLAIN", "AUTH=LOGIN"]
            else:
                caps.append("LOGINDISABLED")
        return " ".join(caps).encode()

    def login_allowed(self) -> bool:
        return self.tls or self.ctx.config.auth.allow_cleartext

    # --- reading: lines and literals (RFC 3501 §4.3, RFC 7888) ----------------------------

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        self._reset_timeout()
        self._pump()
        if self._busy and len(self._buf) - self._pos > MAX_BUFFERED and not self._paused:
            self._paused = True  # a pipelining client waits while we work
            self.transport.pauseProducing()

    def _pump(self) -> None:
        if self._reading:  # a command finished synchronously inside _read: it goes on
            return
        self._reading = True
        try:
            self._read()
        finally:
            self._reading = False
            if self._pos > 65536 or self._pos == len(self._buf):
                del self._buf[:self._pos]
                self._pos = 0

    def _read(self) -> None:
        buf = self._buf
        while not self._closed and (not self._busy or self._line_handler):
            if self._lit_left:
                if self._pos >= len(buf):
                    return
                chunk = bytes(buf[self._pos:self._pos + self._lit_left])
                self._pos += len(chunk)
                self._lit_left -= len(chunk)
                if isinstance(self._lit_sink, bytearray):
                    self._lit_sink += chunk
                elif self._lit_sink is not None:
                    self._lit_sink.write(chunk)
                if not self._lit_left:
                    self._end_literal()
                continue
            end = buf.find(b"\n", self._pos)
            if end < 0:
                if self._discard_line:
                    self._pos = len(buf)
                elif len(buf) - self._pos > self.limits.imap_command_length:
                    self._line_too_long()
                return
            line = bytes(buf[self._pos:end])
            self._pos = end + 1
            if self._discard_line:
                self._discard_line = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.limits.imap_command_length:
                self._line_too_long(consumed=True)
                continue
            if self._line_handler is not None:
                handler, self._line_handler = self._line_handler, None
                handler(line)
                continue
            self._command_line(line)

    def _line_too_long(self, consumed: bool = False) -> None:
        """Answer BAD, drop the partial command and the rest of the line."""
        self.send(b"* BAD command line too long")
        if not consumed:
            self._pos = len(self._buf)
            self._discard_line = True
        self._reset_command()

    def _reset_command(self) -> None:
        self._segments = []
        self._cmd_size = 0
        self._skip_command = False

    def _command_line(self, line: bytes) -> None:
        self._cmd_size += len(line)
        m = _LITERAL.search(line)
        if not m:
            self._segments.append(line)
            segments, skip, size = self._segments, self._skip_command, self._cmd_size
            self._reset_command()
            if skip or size > self.limits.imap_command_length + self.limits.imap_literal * 4:
                _unlink_literal_files(segments)
            if skip:
                return
            if size > self.limits.imap_command_length + self.limits.imap_literal * 4:
                self.send(b"* BAD command too long")
                return
            self._execute(segments)
            return
        size, plus = int(m.group(1)), bool(m.group(2))
        self._segments.append(line[:m.start()])
        if self._skip_command:
            self._start_literal(size, None)
            return
        is_append, message = self._append_literal_position()
        limit = self.limits.message_size if message else self.limits.imap_literal
        tag = self._tag_of(self._segments[0])
        problem = None
        if size > limit:
            problem = b"NO [TOOBIG] literal too large" if message else \
                b"BAD literal too large"
        elif self._cmd_size + size > self.limits.imap_command_length + \
                self.limits.imap_literal * 4 and not message:
            problem = b"BAD command too long"
        elif message and self.account is None:
            problem = b"NO not authenticated"
        if problem:
            self.send(tag + b" " + problem)
            _unlink_literal_files(self._segments)  # an APPEND message already on disk
            if plus:  # RFC 7888 §4: the data is coming anyway; swallow it
                self._skip_command = True
                self._start_literal(size, None)
            else:
                self._reset_command()
            return
        if not plus:
            self.send(b"+ ready for literal data")
        if message and self.account is not None:
            # closed at the end of the literal, or removed by _drop_literal
            sink = self.account.open_incoming()
            self._literal = Literal(size, path=sink.path)
        else:
            sink = bytearray()
            self._literal = Literal(size)
            self._cmd_size += size
        self._start_literal(size, sink)

    def _start_literal(self, size: int, sink: Any) -> None:
        self._lit_left = size
        self._lit_sink = sink
        if size == 0:
            self._end_literal()

    def _end_literal(self) -> None:
        sink, self._lit_sink = self._lit_sink, None
        lit, self._literal = self._literal, None
        if self._skip_command or lit is None:
            return
        if isinstance(sink, bytearray):
            lit.data = bytes(sink)
        elif sink is not None:
            sink.close()
        self._segments.append(lit)

    def _drop_literal(self) -> None:
        """Connection lost mid-command: close and remove any APPEND file."""
        if self._lit_sink is not None and not isinstance(self._lit_sink, bytearray):
            self._lit_sink.close()
        for seg in self._segments + ([self._literal] if self._literal else []):
            if isinstance(seg, Literal) and seg.path is not None:
                seg.path.unlink(missing_ok=True)
        self._segments = []
        self._literal = None

    def _tag_of(self, first: bytes | Literal) -> bytes:
        if isinstance(first, bytes):
            tag = first.split(b" ", 1)[0]
            if tag and all(c in TAG_CHARS for c in tag):
                return tag
        return b"*"

    def _append_literal_position(self) -> tuple[bool, bool]:
        """(is APPEND, this literal is the message): after the mailbox argument."""
        first = self._segments[0]
        if not isinstance(first, bytes):
            return False, False
        words = first.split(b" ", 2)
        if len(words) < 2 or words[1].upper() != b"APPEND":
            return False, False
        if any(isinstance(seg, Literal) and seg.path is not None
               for seg in self._segments[1:]):
            # one message per APPEND (no MULTIAPPEND): later literals get the small cap,
            # so one command cannot stream any number of message-sized files to disk
            return True, False
        if len(self._segments) > 1:  # the mailbox was itself a literal
            return True, True
        return True, len(words) == 3 and bool(words[2].strip())

    # --- dispatch -------------------------------------------------------------------------

    def _execute(self, segments: list[bytes | Literal]) -> None:
        self.commands += 1
        if self.commands > self.limits.commands_per_session:
            self.send(b"* BYE too many commands in one session")
            self.transport.loseConnection()
            return
        args = Args(segments)
        tag = args.read_chars(TAG_CHARS)
        if not tag or not args.accept(b" "):
            self.send(b"* BAD missing or invalid tag")
            self._cleanup_files(segments)
            return
        verb = args.read_chars(ATOM_CHARS).decode("ascii").upper()
        uid = False
        if verb == "UID":
            if not args.accept(b" "):
                self.send(tag + b" BAD UID needs a command")
                return
            uid = True
            verb = args.read_chars(ATOM_CHARS).decode("ascii").upper()
        state = _STATES.get(verb)
        if state is None or (uid and verb not in _UID_COMMANDS):
            self.send(tag + b" BAD unknown command")
            self._cleanup_files(segments)
            return
        if state != ANY and not self._state_ok(state):
            self.send(tag + b" BAD " + self._wrong_state(state))
            self._cleanup_files(segments)
            return
        handler = getattr(self, "cmd_" + verb)
        self._busy = True
        d = defer.maybeDeferred(handler, tag, args, uid)
        d.addBoth(self._sync_selected)
        d.addCallbacks(self._ok, self._failed, callbackArgs=(tag, verb, uid),
                       errbackArgs=(tag, verb, uid))
        d.addBoth(self._finished, segments)

    def _state_ok(self, state: str) -> bool:
        if state == AUTH:
            return self.state in (AUTH, SELECTED)
        return self.state == state

    def _wrong_state(self, state: str) -> bytes:
        if self.state == NOTAUTH and state != NOTAUTH:
            return b"log in first"
        return {NOTAUTH: b"already authenticated", AUTH: b"log in first",
                SELECTED: b"no mailbox selected"}[state]

    def _sync_selected(self, result: Any) -> Any:
        """Pick up other programs' changes before the reply: the cheap check here, a real
        directory scan (a big folder takes a while) in a worker thread."""
        folder = self.selected
        if folder is None or self._closed or not folder.index.needs_scan():
            return result
        return self.blocking(folder.sync).addBoth(lambda _: result)

    def _untagged_updates(self, verb: str, uid: bool) -> None:
        if self.selected is not None and not self._closed:
            for line in self.selected.updates(uid or verb not in _NO_EXPUNGE):
                self.send(line)

    def _ok(self, text: Any, tag: bytes, verb: str, uid: bool) -> None:
        self._untagged_updates(verb, uid)
        if isinstance(text, str):
            text = text.encode("utf-8")
        self.send(tag + b" OK " + (text or f"{verb} completed".encode()))

    def _failed(self, failure: Any, tag: bytes, verb: str, uid: bool) -> None:
        if failure.check(Silent):
            return
        if failure.check(BadCommand):
            self.send(tag + b" BAD " + str(failure.value).encode("utf-8", "replace"))
            return
        self._untagged_updates(verb, uid)
        if failure.check(CommandFailed):
            code = failure.value.code
            text = str(failure.value).encode("utf-8", "replace")
            self.send(tag + b" NO " + (f"[{code}] ".encode() if code else b"") + text)
            return
        log.failure("imap command {verb} failed ip={ip}", failure, verb=verb, ip=self.ip)
        self.send(tag + b" NO [SERVERBUG] internal error; the problem has been logged")

    def _finished(self, _: Any, segments: list[bytes | Literal]) -> None:
        self._cleanup_files(segments)
        self._busy = False
        if not self._closed:
            self._pump()
            if self._paused and not self._busy:
                self._paused = False
                self.transport.resumeProducing()

    def _cleanup_files(self, segments: list[bytes | Literal]) -> None:
        for seg in segments:
            if isinstance(seg, Literal) and seg.path is not None:
                seg.path.unlink(missing_ok=True)

    def blocking(self, fn: Any, *args: Any) -> defer.Deferred:
        """Run blocking file work in the reactor's thread pool (inline without one)."""
        pool = getattr(self.ctx.reactor, "getThreadPool", None)
        if pool is None:
            return defer.maybeDeferred(fn, *args)
        return threads.deferToThreadPool(self.ctx.reactor, pool(), fn, *args)

    def open_index(self, name: str) -> defer.Deferred:
        """The shared index of a folder; loading a big one from disk runs in a thread."""
        index = self.account.loaded_index(name)
        if index is not None:
            return defer.succeed(index)
        return self.blocking(self.account.index, name)

    def in_reactor(self, fn: Any, *args: Any) -> None:
        """Call fn on the reactor thread (listeners may fire in worker threads)."""
        if threadable.isInIOThread() or not hasattr(self.ctx.reactor, "callFromThread"):
            fn(*args)
        else:
            self.ctx.reactor.callFromThread(fn, *args)


def _unlink_literal_files(segments: list) -> None:
    """Remove the tmp/ files of message literals of a command that will not run."""
    for seg in segments:
        if isinstance(seg, Literal) and seg.path is not None:
            seg.path.unlink(missing_ok=True)


class IMAPFactory(protocol.ServerFactory):
    """Builds sessions for the `imap` (STARTTLS) or `imaps` (implicit TLS) role."""

    def __init__(self, ctx: Any, role: str) -> None:
        self.ctx = ctx
        self.role = role
        #: sessions currently connected (for shutdown and tests)
        self.open: set[IMAPServer] = set()
        # shared by the imap and imaps listeners of one server
        self.sessions: Counter[str] = ctx.imap_sessions
        ctx.realm.register(IIMAPAccount, lambda key, mind: IMAPAccount(
            key, ctx.store.mailbox_path(key)))

    def buildProtocol(self, addr: Any) -> IMAPServer:
        proto = IMAPServer(self.ctx, self.role, self)
        proto.factory = self
        return proto
