"""One POP3 session on a StringTransport: exact replies, bad input, pipelining, timeouts.

The maildrop is the real one on a temp Maildir; its "thread pool" runs work inline, the
clock is a task.Clock and the authenticator is a fake, so every reply is synchronous.
"""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure

from mailhost import __version__
from mailhost.accounts import LoginLocked
from mailhost.config import loads
from mailhost.pop3 import POP3Factory
from mailhost.pop3_mailbox import MaildirMaildrop, SessionLocks
from mailhost.service import ConnectionLimiter
from tests.functional.test_pop3_helpers import drop_message

USER = b"alice@example.org"
IMPL = b"IMPLEMENTATION mailhost-" + __version__.encode()


class InlinePool:
    def callInThreadWithCallback(self, on_result, fn, *args, **kwargs):  # noqa: N802
        try:
            result = fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            on_result(False, Failure())
        else:
            on_result(True, result)


class InlineReactor(task.Clock):
    def getThreadPool(self):  # noqa: N802
        return InlinePool()

    def callFromThread(self, fn, *args, **kwargs):  # noqa: N802
        fn(*args, **kwargs)


class FakeAuthenticator:
    """alice@example.org / secret; locked@example.org is locked out; `hold` delays."""

    def __init__(self, reactor, root, locks):
        self.reactor, self.root, self.locks = reactor, root, locks
        self.calls = []
        self.hold: defer.Deferred | None = None

    def login(self, user, password, ip, protocol, iface):
        self.calls.append((user, password, ip, protocol, iface))
        if user == b"locked@example.org":
            return defer.fail(LoginLocked("locked"))
        if (user, password) != (USER, b"secret"):
            return defer.fail(UnauthorizedLogin("bad"))
        box = MaildirMaildrop(user.decode(), self.root, self.reactor, self.locks)
        result = (iface, box, box.logout)
        if self.hold is not None:
            return self.hold.addCallback(lambda _: result)
        return defer.succeed(result)


class TLSStringTransport(StringTransport):
    tls = None

    def startTLS(self, context):  # noqa: N802
        self.tls = context


class Env:
    def __init__(self, tmp_path, toml=""):
        self.reactor = InlineReactor()
        self.root = tmp_path / "mail" / "example.org" / "alice"
        self.locks = SessionLocks()
        config = loads(f'hostname = "mx.example.org"\ndata_dir = "{tmp_path}"\n'
                       f'[domains."example.org"]\n{toml}')
        self.auth = FakeAuthenticator(self.reactor, self.root, self.locks)
        self.ctx = SimpleNamespace(
            config=config, reactor=self.reactor, clock=self.reactor, stopping=False,
            authenticator=self.auth, tls=object(),
            connections=ConnectionLimiter(config.limits.connections_per_ip),
            realm=SimpleNamespace(register=lambda iface, factory: None),
            store=SimpleNamespace(mailbox_path=lambda key: self.root))

    def session(self, role="pop3"):
        factory = POP3Factory(self.ctx, role)
        proto = factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        proto.makeConnection(transport)
        return proto, transport


def send(proto, transport, data: bytes) -> bytes:
    transport.clear()
    proto.dataReceived(data)
    return transport.value()


def pump(proto, transport) -> bytes:
    """Drive the RETR/TOP producer as a real transport would."""
    out = b""
    while transport.producer is not None:
        transport.producer.resumeProducing()
    out = transport.value()
    return out


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


@pytest.fixture
def clear_env(tmp_path):
    return Env(tmp_path, "[auth]\nallow_cleartext = true\n")


def login(proto, transport):
    reply = send(proto, transport, b"USER alice@example.org\r\nPASS secret\r\n")
    assert reply.endswith(b"octets)\r\n"), reply
    return reply


def test_greeting_has_no_apop_timestamp(env):
    proto, t = env.session()
    assert t.value() == b"+OK mailhost POP3 server ready\r\n"


def test_capa_before_and_after_tls_and_login(env, clear_env):
    proto, t = env.session()
    assert send(proto, t, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSTLS\r\n" + IMPL + b"\r\n.\r\n")
    assert send(proto, t, b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert t.tls is env.ctx.tls
    assert send(proto, t, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nUSER\r\nSASL PLAIN\r\n" + IMPL + b"\r\n.\r\n")
    login(proto, t)
    assert send(proto, t, b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\n" + IMPL + b"\r\n.\r\n")
    p2, t2 = clear_env.session()
    assert b"USER\r\nSASL PLAIN\r\nSTLS\r\n" in send(p2, t2, b"CAPA\r\n")


def test_pop3s_has_no_stls_and_allows_login(env):
    proto, t = env.session("pop3s")
    caps = send(proto, t, b"CAPA\r\n")
    assert b"STLS" not in caps and b"USER\r\n" in caps
    assert send(proto, t, b"STLS\r\n") == b"-ERR STLS not available: already under TLS\r\n"
    login(proto, t)


def test_cleartext_login_refused_before_stls(env):
    proto, t = env.session()
    refusal = b"-ERR [AUTH] plaintext authentication is disabled; use STLS first\r\n"
    assert send(proto, t, b"USER alice@example.org\r\n") == refusal
    assert send(proto, t, b"PASS secret\r\n") == refusal
    assert send(proto, t, b"AUTH PLAIN AGFAYgBj\r\n") == refusal
    assert env.auth.calls == []


def test_stls_discards_pipelined_input_and_resets_user(env):
    proto, t = env.session()
    assert send(proto, t, b"STLS\r\nUSER alice@example.org\r\nPASS secret\r\nPA") == \
        b"+OK Begin TLS negotiation\r\n"
    assert send(proto, t, b"SS secret\r\n") == b"-ERR unknown command\r\n"
    assert send(proto, t, b"PASS secret\r\n") == b"-ERR USER first\r\n"
    assert env.auth.calls == []
    assert send(proto, t, b"STLS\r\n") == b"-ERR STLS not available: already under TLS\r\n"


def test_login_stat_list_uidl_exact(env):
    drop_message(env.root, b"a\n", when=1000)
    drop_message(env.root, b"bb\ncc\n", when=1001)
    proto, t = env.session("pop3s")
    assert login(proto, t).endswith(b"+OK maildrop has 2 messages (11 octets)\r\n")
    assert env.auth.calls[0][2:4] == ("192.0.2.7", "pop3")
    assert env.auth.calls[0][4] is IMailbox
    assert send(proto, t, b"STAT\r\n") == b"+OK 2 11\r\n"
    assert send(proto, t, b"LIST\r\n") == b"+OK 2 messages (11 octets)\r\n1 3\r\n2 8\r\n.\r\n"
    assert send(proto, t, b"list 2\r\n") == b"+OK 2 8\r\n"
    v = proto.mbox.uidvalidity
    assert send(proto, t, b"UIDL\r\n") == b"+OK \r\n1 %d.1\r\n2 %d.2\r\n.\r\n" % (v, v)
    assert send(proto, t, b"UIDL 2\r\n") == b"+OK 2 %d.2\r\n" % v
    assert send(proto, t, b"DELE 1\r\n") == b"+OK message 1 deleted\r\n"
    assert send(proto, t, b"LIST\r\n") == b"+OK 1 messages (8 octets)\r\n2 8\r\n.\r\n"
    assert send(proto, t, b"UIDL\r\n") == b"+OK \r\n2 %d.2\r\n.\r\n" % v
    assert send(proto, t, b"STAT\r\n") == b"+OK 1 8\r\n"
    assert send(proto, t, b"RSET\r\n") == b"+OK maildrop has 2 messages (11 octets)\r\n"
    assert send(proto, t, b"NOOP\r\n") == b"+OK \r\n"


def test_retr_streams_crlf_and_dot_stuffing_then_marks_seen(env):
    body = b"Subject: s\n\n.one\n..two\nthree"
    path = drop_message(env.root, body)
    proto, t = env.session("pop3s")
    login(proto, t)
    t.clear()
    proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
    assert t.value() == b"+OK 32 octets\r\n"  # NOOP waits for the message to finish
    assert pump(proto, t) == (b"+OK 32 octets\r\nSubject: s\r\n\r\n..one\r\n...two\r\n"
                              b"three\r\n.\r\n+OK \r\n")
    assert not path.exists()
    assert (env.root / "cur" / (path.name + ":2,S")).exists()
    t.clear()
    proto.dataReceived(b"TOP 1 1\r\n")
    assert pump(proto, t) == b"+OK top of message follows\r\nSubject: s\r\n\r\n..one\r\n.\r\n"


def test_top_does_not_mark_seen(env):
    path = drop_message(env.root, b"A: b\n\nx\ny\n")
    proto, t = env.session("pop3s")
    login(proto, t)
    t.clear()
    proto.dataReceived(b"TOP 1 0\r\n")
    assert pump(proto, t) == b"+OK top of message follows\r\nA: b\r\n\r\n.\r\n"
    assert path.exists()


@pytest.mark.parametrize("command,reply", [
    (b"RETR", b"-ERR syntax: RETR <msg>"),
    (b"RETR 1 2", b"-ERR syntax: RETR <msg>"),
    (b"DELE 0", b"-ERR no such message: 0"),
    (b"RETR 0", b"-ERR no such message: 0"),
    (b"RETR 3", b"-ERR no such message: 3"),
    (b"RETR +1", b"-ERR invalid message number"),
    (b"RETR 1x", b"-ERR invalid message number"),
    (b"TOP 1", b"-ERR syntax: TOP <msg> <lines>"),
    (b"TOP 1 -1", b"-ERR invalid line count"),
    (b"LIST 1 2", b"-ERR syntax: LIST [<msg>]"),
    (b"UIDL x", b"-ERR invalid message number"),
    (b"APOP alice abc", b"-ERR unknown command"),
    (b"LAST", b"-ERR unknown command"),
    (b"\xc3\xa9", b"-ERR unknown command"),
    (b"", b"-ERR unknown command"),
    (b"USER bob", b"-ERR USER is not valid in the TRANSACTION state"),
    (b"STLS", b"-ERR STLS is not valid in the TRANSACTION state"),
    (b"RETR 1234567890", b"-ERR invalid message number"),
])
def test_bad_commands_in_transaction_get_err_and_session_goes_on(env, command, reply):
    drop_message(env.root, b"x\n")
    drop_message(env.root, b"y\n")
    proto, t = env.session("pop3s")
    login(proto, t)
    assert send(proto, t, command + b"\r\n") == reply + b"\r\n"
    assert send(proto, t, b"NOOP\r\n") == b"+OK \r\n"


def test_deleted_message_errors(env):
    drop_message(env.root, b"x\n")
    proto, t = env.session("pop3s")
    login(proto, t)
    send(proto, t, b"DELE 1\r\n")
    for cmd in (b"DELE 1", b"RETR 1", b"TOP 1 0", b"LIST 1", b"UIDL 1"):
        assert send(proto, t, cmd + b"\r\n") == b"-ERR message 1 is deleted\r\n"


def test_commands_before_login(env):
    proto, t = env.session("pop3s")
    assert send(proto, t, b"STAT\r\n") == b"-ERR STAT is not valid in the AUTHORIZATION state\r\n"
    assert send(proto, t, b"PASS x\r\n") == b"-ERR USER first\r\n"
    assert send(proto, t, b"USER\r\n") == b"-ERR syntax: USER <name>\r\n"
    assert send(proto, t, b"USER alice@example.org\r\nPASS wrong\r\n") == (
        b"+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n")
    assert send(proto, t, b"USER locked@example.org\r\nPASS x\r\n") == (
        b"+OK send PASS\r\n-ERR [SYS/TEMP] too many failed logins; try again later\r\n")
    assert send(proto, t, b"PASS pass with spaces\r\n") == b"-ERR USER first\r\n"
    send(proto, t, b"USER alice@example.org\r\nPASS pass with spaces\r\n")
    assert env.auth.calls[-1][1] == b"pass with spaces"


def test_auth_plain_forms(env):
    good = base64.b64encode(b"\0alice@example.org\0secret")
    proto, t = env.session("pop3s")
    assert send(proto, t, b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert send(proto, t, b"AUTH CRAM-MD5\r\n") == b"-ERR unsupported SASL mechanism\r\n"
    assert send(proto, t, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert send(proto, t, b"*\r\n") == b"-ERR authentication cancelled\r\n"
    assert send(proto, t, b"AUTH PLAIN !!!\r\n") == b"-ERR [AUTH] invalid base64 in SASL response\r\n"
    assert send(proto, t, b"AUTH PLAIN =\r\n") == b"-ERR [AUTH] malformed PLAIN response\r\n"
    other = base64.b64encode(b"bob@example.org\0alice@example.org\0secret")
    assert send(proto, t, b"AUTH PLAIN " + other + b"\r\n") == \
        b"-ERR [AUTH] acting as another user is not permitted\r\n"
    assert send(proto, t, b"AUTH PLAIN\r\n" + good + b"\r\n") == \
        b"+ \r\n+OK maildrop has 0 messages (0 octets)\r\n"


def test_pipelined_commands_wait_for_a_pending_login(env):
    drop_message(env.root, b"x\n")
    env.auth.hold = defer.Deferred()
    proto, t = env.session("pop3s")
    assert send(proto, t, b"USER alice@example.org\r\nPASS secret\r\nSTAT\r\nNOOP\r\n") == \
        b"+OK send PASS\r\n"
    assert t.producerState == "paused"
    t.clear()
    env.auth.hold.callback(None)
    assert t.value() == b"+OK maildrop has 1 messages (3 octets)\r\n+OK 1 3\r\n+OK \r\n"
    assert t.producerState == "producing"


def test_quit_updates_and_drop_does_not(env):
    paths = [drop_message(env.root, b"%d\n" % i, when=10 + i) for i in range(3)]
    proto, t = env.session("pop3s")
    login(proto, t)
    send(proto, t, b"DELE 2\r\n")
    proto.connectionLost(None)  # dropped: no UPDATE
    assert all(p.exists() for p in paths)
    assert not env.locks.held(str(env.root.absolute()))
    proto, t = env.session("pop3s")
    login(proto, t)
    send(proto, t, b"DELE 2\r\n")
    assert send(proto, t, b"QUIT\r\n") == \
        b"+OK mailhost POP3 server signing off (1 messages deleted)\r\n"
    assert t.disconnecting
    assert [p.exists() for p in paths] == [True, False, True]
    proto.connectionLost(None)
    assert not env.locks.held(str(env.root.absolute()))


def test_second_session_is_in_use(env):
    first, t1 = env.session("pop3s")
    login(first, t1)
    second, t2 = env.session("pop3s")
    assert send(second, t2, b"USER alice@example.org\r\nPASS secret\r\n").endswith(
        b"-ERR [IN-USE] maildrop is in use by another POP3 session\r\n")
    assert send(second, t2, b"STAT\r\n").startswith(b"-ERR")
    first.connectionLost(None)
    login(second, t2)


def test_idle_timeout_is_at_least_ten_minutes(env, tmp_path):
    proto, t = env.session()
    assert env.ctx.config.limits.idle_timeout == 300
    env.reactor.advance(599)
    assert not t.disconnecting
    send(proto, t, b"CAPA\r\n")  # activity restarts the timer
    env.reactor.advance(599)
    assert not t.disconnecting
    t.clear()
    env.reactor.advance(1)
    assert t.value() == b"-ERR autologout: idle for too long\r\n" and t.disconnecting
    proto.connectionLost(None)
    assert not env.reactor.getDelayedCalls()
    long_env = Env(tmp_path / "b", "[limits]\nidle_timeout = 900\n")
    proto, _ = long_env.session()
    assert proto.timeOut == 900
    proto.connectionLost(None)


def test_stalled_reader_during_retr_is_aborted_on_timeout(env):
    drop_message(env.root, b"x\n" * 10)
    proto, t = env.session("pop3s")
    login(proto, t)
    send(proto, t, b"RETR 1\r\n")
    assert t.producer is not None  # the client never drains the transport
    env.reactor.advance(600)
    assert t.disconnecting
    proto.connectionLost(None)
    assert t.producer is not None  # StringTransport keeps it; the sender was stopped
    assert proto._sender is None


def test_message_removed_by_another_session(env):
    path = drop_message(env.root, b"x\n")
    proto, t = env.session("pop3s")
    login(proto, t)
    path.unlink()
    assert send(proto, t, b"RETR 1\r\n") == b"-ERR message was removed by another session\r\n"
    assert send(proto, t, b"NOOP\r\n") == b"+OK \r\n"


def test_message_renamed_by_another_program_is_still_found(env):
    path = drop_message(env.root, b"x\n")
    proto, t = env.session("pop3s")
    login(proto, t)
    path.rename(env.root / "cur" / (path.name + ":2,F"))
    t.clear()
    proto.dataReceived(b"RETR 1\r\n")
    assert pump(proto, t) == b"+OK 3 octets\r\nx\r\n.\r\n"


def test_bad_command_limit_and_long_line(tmp_path):
    env = Env(tmp_path, "[limits]\nbad_commands = 2\nline_length = 600\n")
    proto, t = env.session("pop3s")
    assert send(proto, t, b"X\r\nY\r\n") == b"-ERR unknown command\r\n" * 2
    assert send(proto, t, b"Z\r\nCAPA\r\n") == \
        b"-ERR unknown command; too many bad commands, closing connection\r\n"
    assert t.disconnecting
    proto, t = env.session("pop3s")
    assert send(proto, t, b"N" * 700) == b"-ERR line too long\r\n"
    assert t.disconnecting
    proto, t = env.session("pop3s")
    assert send(proto, t, b"CAPA " + b"x" * 700 + b"\r\nCAPA\r\n") == b"-ERR line too long\r\n"


def test_connection_cap_per_ip(tmp_path):
    env = Env(tmp_path, "[limits]\nconnections_per_ip = 1\n")
    first, _ = env.session()
    second, t = env.session()
    assert t.value() == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
    assert t.disconnecting
    second.connectionLost(None)
    first.connectionLost(None)
    third, t = env.session()
    assert t.value().startswith(b"+OK")
    third.connectionLost(None)
