"""IMAPServer on StringTransport with task.Clock and a fake authenticator: exact replies,
ordering under pipelining, literals, IDLE, timeouts, STARTTLS buffer discarding."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import attrs
import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mailhost.config import AuthConfig, Config, LimitsConfig
from mailhost.imap.account import IMAPAccount
from mailhost.imap.server import IMAPFactory
from mailhost.service import ConnectionLimiter
from mailhost.store.folders import create_default_folders
from mailhost.store.maildir import MaildirStore

KEY = "alice@example.org"


class FakeAuthenticator:
    """Accepts password `secret`; answers after `delay` seconds of the fake clock."""

    def __init__(self, clock, store, delay=0.0):
        self.clock, self.store, self.delay = clock, store, delay

    def login(self, user, password, ip, proto, iface):
        if password != b"secret":
            return defer.fail(UnauthorizedLogin())
        account = IMAPAccount(KEY, self.store.mailbox_path(KEY))
        result = (iface, account, lambda: None)
        if not self.delay:
            return defer.succeed(result)
        return task.deferLater(self.clock, self.delay, lambda: result)


class FakeRealm:
    def register(self, iface, factory):
        self.factory = factory


@attrs.define
class FakeCtx:
    config: Config
    clock: task.Clock
    store: MaildirStore
    authenticator: FakeAuthenticator
    realm: FakeRealm = attrs.Factory(FakeRealm)
    connections: ConnectionLimiter = attrs.Factory(lambda: ConnectionLimiter(10))
    reactor: object = None
    accounts: object = attrs.Factory(object)
    tls: object = "tls-context"
    imap_sessions: Counter = attrs.Factory(Counter)


class TLSStringTransport(StringTransport):
    def startTLS(self, ctx):  # noqa: N802
        self.tls_started = ctx


@pytest.fixture
def ctx(tmp_path: Path):
    clock = task.Clock()
    config = Config(hostname="mx.example.org", data_dir=tmp_path,
                    limits=LimitsConfig(imap_literal=100, imap_command_length=200),
                    auth=AuthConfig(allow_cleartext=True))
    store = MaildirStore(tmp_path / "mail", "mx.example.org", None)
    create_default_folders(store.mailbox_path(KEY))
    return FakeCtx(config, clock, store, FakeAuthenticator(clock, store))


def connect(ctx, role="imap"):
    proto = IMAPFactory(ctx, role).buildProtocol(None)
    transport = TLSStringTransport(peerAddress=None)
    proto.makeConnection(transport)
    return proto, transport


def take(transport) -> list[bytes]:
    out = transport.value().split(b"\r\n")
    transport.clear()
    return [line for line in out if line]


def deliver(ctx, body: bytes = b"Subject: hi\n\nbody\n") -> None:
    root = ctx.store.mailbox_path(KEY)
    name = f"1583150000.M{len(list((root / 'new').iterdir()))}P1Q1.host"
    (root / "new" / name).write_bytes(body)


def test_greeting_and_pipelined_async_login_keep_tags(ctx):
    ctx.authenticator.delay = 1.0
    deliver(ctx)
    proto, t = connect(ctx)
    assert take(t)[0].startswith(b"* OK [CAPABILITY IMAP4rev1")
    proto.dataReceived(b"a LOGIN alice@example.org secret\r\nb SELECT INBOX\r\nc NOOP\r\n")
    assert take(t) == []  # nothing answered out of turn while LOGIN is pending
    ctx.clock.advance(1.0)
    lines = take(t)
    tagged = [line.split()[0] for line in lines if not line.startswith(b"*")]
    assert tagged == [b"a", b"b", b"c"]
    assert b"* 1 EXISTS" in lines and b"* 1 RECENT" in lines
    assert any(line.startswith(b"* OK [UIDNEXT 2]") for line in lines)
    assert any(line.startswith(b"* OK [PERMANENTFLAGS (") for line in lines)
    proto.connectionLost(None)


def test_login_failure_and_wrong_state(ctx):
    proto, t = connect(ctx)
    take(t)
    proto.dataReceived(b"a LOGIN alice@example.org nope\r\nb FETCH 1 FLAGS\r\n")
    assert take(t) == [b"a NO [AUTHENTICATIONFAILED] invalid user name or password",
                       b"b BAD log in first"]
    proto.connectionLost(None)


def test_append_literal_streams_to_tmp(ctx):
    proto, t = connect(ctx)
    proto.dataReceived(b"a LOGIN alice@example.org secret\r\n")
    take(t)
    proto.dataReceived(b"b APPEND INBOX (\\Seen) {30}\r\n")
    assert take(t) == [b"+ ready for literal data"]
    proto.dataReceived(b"Subject: streamed\r\n\r\n")
    tmp = ctx.store.mailbox_path(KEY) / "tmp"
    assert len(list(tmp.iterdir())) == 1  # on disk, not in memory
    proto.dataReceived(b"body\r\n\r\n\r\n")
    lines = take(t)
    assert lines[-1].startswith(b"b OK [APPENDUID ") and lines[-1].split()[4] == b"1]"
    assert not list(tmp.iterdir())
    cur = list((ctx.store.mailbox_path(KEY) / "cur").iterdir())
    assert len(cur) == 1 and cur[0].name.endswith(":2,S")
    proto.connectionLost(None)


def test_literal_limits(ctx):
    proto, t = connect(ctx)
    take(t)
    proto.dataReceived(b"a LOGIN {500}\r\n")
    assert take(t) == [b"a BAD literal too large"]
    proto.dataReceived(b"b LOGIN {300+}\r\n" + b"x" * 300 + b" pw\r\nc NOOP\r\n")
    assert take(t) == [b"b BAD literal too large", b"c OK NOOP completed"]
    proto.dataReceived(b"d NOOP " + b"y" * 300 + b"\r\ne NOOP\r\n")
    assert take(t) == [b"* BAD command line too long", b"e OK NOOP completed"]
    proto.connectionLost(None)


def test_unexpected_error_is_a_no_not_a_traceback(ctx, monkeypatch):
    proto, t = connect(ctx)
    proto.dataReceived(b"a LOGIN alice@example.org secret\r\n")
    take(t)
    monkeypatch.setattr(IMAPAccount, "subscriptions", lambda self: 1 / 0)
    proto.dataReceived(b"b LSUB \"\" *\r\nc NOOP\r\n")
    lines = take(t)
    assert lines == [b"b NO [SERVERBUG] internal error; the problem has been logged",
                     b"c OK NOOP completed"]
    proto.connectionLost(None)


def test_idle_reports_delivery_within_a_poll(ctx):
    proto, t = connect(ctx)
    proto.dataReceived(b"a LOGIN alice@example.org secret\r\nb SELECT INBOX\r\nc IDLE\r\n")
    assert take(t)[-1] == b"+ idling"
    deliver(ctx)
    ctx.clock.advance(0.5)
    assert take(t) == [b"* 1 EXISTS", b"* 1 RECENT"]
    proto.dataReceived(b"DONE\r\n")
    assert take(t) == [b"c OK IDLE terminated"]
    assert not ctx.clock.getDelayedCalls() or all(
        c.getTime() > 100 for c in ctx.clock.getDelayedCalls())  # only the autologout
    proto.connectionLost(None)


def test_other_session_changes_and_expunge_timing(ctx):
    deliver(ctx)
    deliver(ctx, b"Subject: two\n\nx\n")
    a, ta = connect(ctx)
    b, tb = connect(ctx)
    for proto in (a, b):
        proto.dataReceived(b"l LOGIN alice@example.org secret\r\ns SELECT INBOX\r\n")
    take(ta), take(tb)
    a.dataReceived(b"x STORE 1 +FLAGS.SILENT (\\Deleted)\r\ny EXPUNGE\r\n")
    assert take(ta) == [b"x OK STORE completed", b"* 1 EXPUNGE", b"y OK EXPUNGE completed"]
    b.dataReceived(b"f FETCH 1:* (FLAGS)\r\n")
    lines = take(tb)
    assert b"* 1 EXPUNGE" not in lines  # RFC 3501 §7.4.1: not during FETCH
    assert lines == [b"* 2 FETCH (FLAGS ())", b"f OK FETCH completed"]  # 1 is gone
    b.dataReceived(b"u UID FETCH 1:* (FLAGS)\r\n")
    lines = take(tb)
    assert lines[-2:] == [b"* 1 EXPUNGE", b"u OK FETCH completed"]
    a.connectionLost(None)
    b.connectionLost(None)


def test_starttls_discards_pipelined_input(ctx):
    ctx.config = attrs.evolve(ctx.config, auth=AuthConfig(allow_cleartext=False))
    proto, t = connect(ctx)
    assert b"LOGINDISABLED" in take(t)[0]
    proto.dataReceived(b"a STARTTLS\r\nb LOGIN alice@example.org secret\r\n")
    assert take(t) == [b"a OK begin TLS negotiation now"]
    assert t.tls_started == "tls-context"
    proto.dataReceived(b"c CAPABILITY\r\n")
    lines = take(t)
    assert b"AUTH=PLAIN" in lines[0] and b"STARTTLS" not in lines[0]
    proto.connectionLost(None)


def test_autologout_and_connection_cap(ctx):
    proto, t = connect(ctx)
    take(t)
    ctx.clock.advance(ctx.config.limits.idle_timeout + 1)
    assert take(t) == [b"* BYE autologout; idle for too long"]
    assert t.disconnecting
    proto.connectionLost(None)
    ctx.connections = ConnectionLimiter(0)
    proto, t = connect(ctx)
    assert take(t)[0].startswith(b"* BYE [UNAVAILABLE]")
    proto.connectionLost(None)


def test_authenticate_plain_with_and_without_initial_response(ctx):
    import base64

    blob = base64.b64encode(b"\0alice@example.org\0secret")
    proto, t = connect(ctx)
    take(t)
    proto.dataReceived(b"a AUTHENTICATE PLAIN " + blob + b"\r\n")
    assert take(t)[-1].startswith(b"a OK [CAPABILITY")
    proto.connectionLost(None)
    proto, t = connect(ctx)
    take(t)
    proto.dataReceived(b"a AUTHENTICATE PLAIN\r\n")
    assert take(t) == [b"+ "]
    proto.dataReceived(b"*\r\n")
    assert take(t) == [b"a BAD authentication cancelled"]
    proto.dataReceived(b"b AUTHENTICATE PLAIN\r\n" + blob + b"\r\n")
    assert take(t)[-1].startswith(b"b OK")
    proto.connectionLost(None)


def test_append_to_selected_folder_is_recent_here_only(ctx):
    a, ta = connect(ctx)
    b, tb = connect(ctx)
    for proto in (a, b):
        proto.dataReceived(b"l LOGIN alice@example.org secret\r\ns SELECT INBOX\r\n")
    take(ta), take(tb)
    a.dataReceived(b"p APPEND INBOX {13+}\r\nSubject: x\r\n\r\n\r\n")
    lines = take(ta)
    assert lines[:2] == [b"* 1 EXISTS", b"* 1 RECENT"] and lines[2].startswith(b"p OK [APPENDUID")
    b.dataReceived(b"n NOOP\r\n")
    assert take(tb) == [b"* 1 EXISTS", b"* 0 RECENT", b"n OK NOOP completed"]
    a.connectionLost(None)
    b.connectionLost(None)


def test_many_pipelined_commands_in_one_read(ctx):
    proto, t = connect(ctx)
    take(t)
    proto.dataReceived(b"".join(b"n%d NOOP\r\n" % i for i in range(5000)))
    lines = take(t)
    assert len(lines) == 5000 and lines[-1] == b"n4999 OK NOOP completed"
    proto.connectionLost(None)


def test_idle_pushes_other_sessions_changes_at_once(ctx):
    deliver(ctx)
    a, ta = connect(ctx)
    b, tb = connect(ctx)
    for proto in (a, b):
        proto.dataReceived(b"l LOGIN alice@example.org secret\r\ns SELECT INBOX\r\n")
    b.dataReceived(b"i IDLE\r\n")
    take(ta), take(tb)
    a.dataReceived(b"x STORE 1 +FLAGS (\\Flagged)\r\n")
    assert take(tb) == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged))"]  # no clock advance needed
    a.dataReceived(b"y STORE 1 +FLAGS.SILENT (\\Deleted)\r\nz EXPUNGE\r\n")
    assert take(tb) == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Deleted))", b"* 1 EXPUNGE"]
    b.dataReceived(b"DONE\r\n")
    assert take(tb) == [b"i OK IDLE terminated"]
    a.connectionLost(None)
    b.connectionLost(None)
