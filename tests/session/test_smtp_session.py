"""SMTPSession on StringTransport with task.Clock and in-memory fakes: exact replies."""

from __future__ import annotations

import base64

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailhost import config as config_mod
from mailhost.accounts import LoginLocked, MailRealm
from mailhost.address import Address
from mailhost.service import ConnectionLimiter, InFlight
from mailhost.smtp.auth import ISMTPSubmitter, Submitter
from mailhost.smtp.policy import RecipientDecision
from mailhost.smtp.server import SMTPFactory

CONFIG = """\
hostname = "mx.example.org"
data_dir = "/nonexistent"
[domains."example.org"]
[limits]
message_size = 1000
recipients = 3
line_length = 100
bad_commands = 10
idle_timeout = 60
session_length = 600
connections_per_ip = 2
commands_per_session = 10000
"""


class FakeWriter:
    def __init__(self, mailboxes):
        self.mailboxes = mailboxes
        self.data = b""
        self.aborted = False
        self.pending: defer.Deferred | None = None
        self.committed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def commit(self):
        if self.pending is not None:
            return self.pending
        self.committed = True
        return defer.succeed([f"/mail/{m}/new/1" for m in self.mailboxes])

    def abort(self) -> None:
        self.aborted = True


class FakeStore:
    def __init__(self):
        self.writers: list[FakeWriter] = []
        self.commit_with: defer.Deferred | None = None

    def open_delivery(self, mailboxes):
        w = FakeWriter(mailboxes)
        w.pending = self.commit_with
        self.writers.append(w)
        return w


class FakePolicy:
    """alice@ and bob@example.org exist; other local users do not; remote is relaying."""

    def __init__(self):
        self.hold: list[defer.Deferred] = []
        self.slow = False

    def decide_recipient(self, address: Address, account, queue_available=True):
        if address.domain != "example.org":
            if account is None:
                d = RecipientDecision.reject(554, "5.7.1", "Relaying denied")
            else:
                d = RecipientDecision(True, forward=(str(address),)) if queue_available else \
                RecipientDecision.reject(451, "4.3.0", "Outbound delivery not available")
        elif address.without_tag().local.lower() in ("alice", "bob"):
            d = RecipientDecision(True, mailboxes=(address.without_tag().key,))
        else:
            d = RecipientDecision.reject(550, "5.1.1", "No such user here")
        if self.slow:
            pending = defer.Deferred()
            self.hold.append(pending)
            pending.addCallback(lambda _: d)
            return pending
        return d

    def may_send_as(self, account, sender):
        return sender is not None and sender.without_tag().key == account


class FakeAuthenticator:
    def __init__(self):
        self.calls = []
        self.result: defer.Deferred | None = None

    def login(self, username, password, ip, protocol, *interfaces):
        self.calls.append((username, password, ip, protocol, interfaces))
        if self.result is not None:
            return self.result
        if password == b"secret":
            key = username.decode().lower()
            return defer.succeed((ISMTPSubmitter, Submitter(key), lambda: None))
        return defer.fail(UnauthorizedLogin("bad"))


class Ctx:
    def __init__(self, extra: str = "", **limits: int):
        text = CONFIG
        for key, value in limits.items():
            text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line
                             for line in text.split("\n"))
        self.config = config_mod.loads(text + extra)
        self.clock = task.Clock()
        self.reactor = None
        self.store = FakeStore()
        self.queue = None
        self.policy = FakePolicy()
        self.connections = ConnectionLimiter(self.config.limits.connections_per_ip)
        self.inflight = InFlight()
        self.realm = MailRealm()
        self.authenticator = FakeAuthenticator()
        self.tls = object()
        self.stopping = False


@implementer(ITLSTransport)
class TLSCapableTransport(StringTransport):
    """A StringTransport that records startTLS and pretends the handshake works."""

    tls_started = None

    def startTLS(self, ctx, normal=True):  # noqa: N802 - Twisted API
        self.tls_started = ctx

    def getHandle(self):  # noqa: N802 - Twisted API
        class Conn:
            def get_protocol_version_name(self):
                return "TLSv1.3"

            def get_cipher_name(self):
                return "TLS_AES_128_GCM_SHA256"

        return Conn()


def connect(ctx=None, role="smtp", transport=None):
    ctx = ctx or Ctx()
    proto = SMTPFactory(ctx, role).buildProtocol(None)
    transport = transport or TLSCapableTransport()
    proto.makeConnection(transport)
    if role == "submissions":
        proto.handshakeCompleted()
    return ctx, proto, transport


def talk(proto, transport, data: bytes) -> list[bytes]:
    transport.clear()
    proto.dataReceived(data)
    return transport.value().split(b"\r\n")[:-1]


@pytest.fixture
def session():
    ctx, proto, transport = connect()
    yield ctx, proto, transport
    proto.connectionLost(None)


def test_greeting_and_ehlo_exact(session):
    ctx, proto, transport = session
    assert transport.value() == b"220 mx.example.org ESMTP mailhost\r\n"
    assert talk(proto, transport, b"EHLO client.test\r\n") == [
        b"250-mx.example.org", b"250-SIZE 1000", b"250-8BITMIME", b"250-PIPELINING",
        b"250-ENHANCEDSTATUSCODES", b"250 STARTTLS"]
    assert talk(proto, transport, b"HELO client.test\r\n") == [b"250 mx.example.org"]


def test_simple_commands_exact(session):
    ctx, proto, transport = session
    assert talk(proto, transport, b"NOOP\r\nnoop whatever\r\nVRFY alice\r\nVRFY\r\n"
                                  b"EXPN staff\r\nHELP\r\nRSET\r\nRSET x\r\n") == [
        b"250 2.0.0 Ok", b"250 2.0.0 Ok",
        b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
        b"501 5.5.4 Syntax: VRFY address", b"502 5.5.1 Error: command not implemented",
        b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT STARTTLS "
        b"AUTH",
        b"250 2.0.0 Ok", b"501 5.5.4 Syntax: RSET"]
    assert talk(proto, transport, b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert transport.disconnecting


def test_transaction_stored_with_headers(session):
    ctx, proto, transport = session
    replies = talk(proto, transport,
                   b"EHLO client.test\r\nMAIL FROM:<s@remote.test> BODY=8BITMIME SIZE=50\r\n"
                   b"RCPT TO:<Alice+x@example.org>\r\nDATA\r\n")
    assert replies[-3:] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok",
                            b"354 End data with <CR><LF>.<CR><LF>"]
    replies = talk(proto, transport, b"Subject: hi\r\n\r\n..dot\r\nlf\n.\nstill\r\n.\r\n")
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as " + proto.session_id.encode())
    [writer] = ctx.store.writers
    assert writer.mailboxes == ["alice@example.org"] and writer.committed
    lines = writer.data.split(b"\n")
    assert lines[0] == b"Return-Path: <s@remote.test>"
    assert lines[1] == b"Received: from client.test ([192.168.1.1])"
    assert lines[2].startswith(b"\tby mx.example.org (mailhost) with ESMTP id ")
    assert lines[3].startswith(b"\tfor <Alice+x@example.org>; ")
    # a bare LF is not a line end in SMTP (only CRLF.CRLF ends DATA); kept as data
    assert lines[4:] == [b"Subject: hi", b"", b".dot", b"lf", b".", b"still", b""]


def test_command_sequence_errors(session):
    ctx, proto, transport = session
    assert talk(proto, transport, b"MAIL FROM:<a@b.example>\r\n") == [
        b"503 5.5.1 Error: send HELO/EHLO first"]
    assert talk(proto, transport, b"EHLO c\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
                                  b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n"
                                  b"DATA\r\n")[-5:] == [
        b"503 5.5.1 Error: need MAIL command", b"503 5.5.1 Error: need MAIL command",
        b"250 2.1.0 Ok", b"503 5.5.1 Error: nested MAIL command",
        b"554 5.5.1 Error: no valid recipients"]


def test_recipient_rejections_and_limit(session):
    ctx, proto, transport = session
    replies = talk(proto, transport, b"EHLO c\r\nMAIL FROM:<>\r\n"
                   b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<x@remote.test>\r\n"
                   b"RCPT TO:<bad address>\r\nRCPT TO:<alice@example.org> NOTIFY=NEVER\r\n"
                   b"RCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                   b"RCPT TO:<BOB@example.org>\r\nRCPT TO:<alice@example.org>\r\n")
    assert replies[-8:] == [
        b"550 5.1.1 <nobody@example.org>: Recipient address rejected: No such user here",
        b"554 5.7.1 <x@remote.test>: Recipient address rejected: Relaying denied",
        b"501 5.5.4 Syntax: RCPT TO:<address>",
        b"555 5.5.4 Unsupported option",
        b"250 2.1.5 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok",
        b"452 4.5.3 Error: too many recipients"]


def test_mail_parameters(session):
    ctx, proto, transport = session
    talk(proto, transport, b"EHLO c\r\n")
    for params, reply in [
            (b" SIZE=1001", b"552 5.3.4 Message size exceeds fixed maximum message size"),
            (b" SIZE=abc", b"501 5.5.4 Error: bad SIZE parameter"),
            (b" BODY=BINARYMIME", b"501 5.5.4 Error: bad BODY parameter"),
            (b" RET=FULL", b"555 5.5.4 Unsupported option: RET"),
            (b" SIZE=1 SIZE=2", b"501 5.5.4 Error: invalid parameter")]:
        assert talk(proto, transport, b"MAIL FROM:<a@b.example>" + params + b"\r\n") == \
            [reply]
    assert talk(proto, transport, b"MAIL FROM:<not an address>\r\n") == [
        b"501 5.5.4 Syntax: MAIL FROM:<address>"]


def test_oversize_data_streamed_and_refused():
    ctx, proto, transport = connect()
    talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                           b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
    for _ in range(20):
        assert talk(proto, transport, b"x" * 80 + b"\r\n") == []
    [writer] = ctx.store.writers
    assert writer.aborted and len(writer.data) < 1000 + 200  # stopped at the limit
    assert talk(proto, transport, b".\r\nNOOP\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size", b"250 2.0.0 Ok"]
    proto.connectionLost(None)


def test_long_lines_and_error_limit():
    ctx, proto, transport = connect(Ctx(bad_commands=4))
    assert talk(proto, transport, b"NOOP " + b"a" * 500) == [
        b"500 5.5.2 Error: line too long"]
    assert talk(proto, transport, b"b" * 5000) == []  # still the same line: no new reply
    assert len(proto._buf) <= 1
    assert talk(proto, transport, b"\r\nNOOP\r\n") == [b"250 2.0.0 Ok"]
    replies = talk(proto, transport, b"\xff\r\n\r\nFOO\r\nNOOP\r\n")
    assert replies == [b"500 5.5.2 Error: command not recognized",
                       b"500 5.5.2 Error: bad syntax",
                       b"500 5.5.2 Error: command not recognized",
                       b"421 mx.example.org 4.7.0 Error: too many errors"]
    assert transport.disconnecting
    proto.connectionLost(None)


def test_helo_injection_refused_and_received_sanitised():
    ctx, proto, transport = connect()
    assert talk(proto, transport, b"EHLO evil\nX-Injected: yes\r\n") == [
        b"501 5.5.4 Error: invalid hostname"]
    talk(proto, transport, b"HELO (evil)\\\r\nMAIL FROM:<a@b.example>\r\n"
                           b"RCPT TO:<alice@example.org>\r\nDATA\r\nbody\r\n.\r\n")
    [writer] = ctx.store.writers
    assert b"Received: from [192.168.1.1] (HELO ?evil??)\n" in writer.data
    assert b"with SMTP id" in writer.data
    assert b"\n\nbody\n" in writer.data  # a body without headers is kept apart
    proto.connectionLost(None)


def test_pipelining_waits_for_slow_policy():
    ctx, proto, transport = connect()
    ctx.policy.slow = True
    replies = talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                   b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
                   b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert replies[-1] == b"250 2.1.0 Ok"  # nothing after the pending RCPT yet
    transport.clear()
    ctx.policy.hold.pop(0).callback(None)
    assert transport.value() == b"550 5.1.1 <nobody@example.org>: Recipient address " \
                                b"rejected: No such user here\r\n"
    transport.clear()
    ctx.policy.hold.pop(0).callback(None)
    assert transport.value().split(b"\r\n")[:-1] == [
        b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>",
        b"250 2.0.0 Ok: queued as " + proto.session_id.encode() + b"01", b"221 2.0.0 Bye"]
    proto.connectionLost(None)


def test_reply_only_after_commit_and_failure_451():
    ctx, proto, transport = connect()
    ctx.store.commit_with = defer.Deferred()
    talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                           b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert len(ctx.inflight) == 1  # from DATA on, shutdown waits for this transaction
    assert talk(proto, transport, b"x\r\n.\r\nNOOP\r\n") == []
    assert len(ctx.inflight) == 1
    ctx.store.commit_with.errback(OSError("disk on fire"))
    assert transport.value().split(b"\r\n")[:-1] == [
        b"451 4.3.0 Error: cannot store the message, try again later", b"250 2.0.0 Ok"]
    assert len(ctx.inflight) == 0
    proto.connectionLost(None)


def test_starttls_discards_pipelined_input_and_resets():
    ctx, proto, transport = connect()
    talk(proto, transport, b"EHLO c\r\n")
    assert talk(proto, transport, b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@b.example>\r\n") == [
        b"220 2.0.0 Ready to start TLS"]
    assert transport.tls_started is ctx.tls
    proto.handshakeCompleted()
    assert proto.tls_info == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert talk(proto, transport, b"MAIL FROM:<a@b.example>\r\nSTARTTLS\r\nEHLO c\r\n") == [
        b"503 5.5.1 Error: send HELO/EHLO first", b"503 5.5.1 Error: TLS already active",
        b"250-mx.example.org", b"250-SIZE 1000", b"250-8BITMIME", b"250-PIPELINING",
        b"250 ENHANCEDSTATUSCODES"]
    proto.connectionLost(None)


def test_no_starttls_without_tls_transport():
    ctx, proto, transport = connect(transport=StringTransport())
    assert b"STARTTLS" not in b"".join(talk(proto, transport, b"EHLO c\r\n"))
    assert talk(proto, transport, b"STARTTLS\r\n") == [b"454 4.7.0 TLS not available"]
    proto.connectionLost(None)


def test_idle_timeout_and_session_length():
    ctx, proto, transport = connect()
    ctx.clock.advance(61)
    assert transport.value().endswith(b"421 mx.example.org 4.4.2 Error: timeout exceeded\r\n")
    assert transport.disconnecting
    proto.connectionLost(None)
    ctx2, proto2, transport2 = connect()
    for _ in range(11):
        ctx2.clock.advance(55)
        proto2.dataReceived(b"NOOP\r\n")
    assert b"421 mx.example.org 4.4.2 Error: session too long" in transport2.value()
    proto2.connectionLost(None)
    assert not ctx2.clock.getDelayedCalls()


def test_connections_per_ip():
    ctx = Ctx()
    sessions = [connect(ctx) for _ in range(2)]
    _, proto, transport = connect(ctx)
    assert transport.value() == \
        b"421 mx.example.org 4.7.0 Too many connections from your address\r\n"
    proto.connectionLost(None)
    for _, p, _ in sessions:
        p.connectionLost(None)
    assert not ctx.connections._open


def test_stopping_refuses_mail(session):
    ctx, proto, transport = session
    talk(proto, transport, b"EHLO c\r\n")
    ctx.stopping = True
    assert talk(proto, transport, b"MAIL FROM:<a@b.example>\r\n") == [
        b"421 mx.example.org 4.3.2 Service shutting down, try again later"]
    assert transport.disconnecting


# --- submission ----------------------------------------------------------------------


def plain(authcid: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return base64.b64encode(authzid + b"\0" + authcid + b"\0" + password)


def test_submission_requires_tls_then_auth():
    ctx, proto, transport = connect(role="submission")
    ehlo = talk(proto, transport, b"EHLO c\r\n")
    assert b"250-STARTTLS" in ehlo[-2:] or b"250 STARTTLS" in ehlo
    assert not any(b"AUTH" in line for line in ehlo)
    assert talk(proto, transport, b"AUTH PLAIN " + plain(b"alice@example.org", b"secret") +
                b"\r\nMAIL FROM:<alice@example.org>\r\n") == [
        b"530 5.7.0 Must issue a STARTTLS command first",
        b"530 5.7.0 Must issue a STARTTLS command first"]
    assert not ctx.authenticator.calls
    talk(proto, transport, b"STARTTLS\r\n")
    proto.handshakeCompleted()
    ehlo = talk(proto, transport, b"EHLO c\r\n")
    assert ehlo[-1] == b"250 AUTH PLAIN LOGIN"
    assert talk(proto, transport, b"MAIL FROM:<alice@example.org>\r\n") == [
        b"530 5.7.0 Authentication required"]
    proto.connectionLost(None)


def test_auth_plain_and_sender_ownership():
    ctx, proto, transport = connect(role="submissions")
    talk(proto, transport, b"EHLO c\r\n")
    assert talk(proto, transport, b"AUTH PLAIN " + plain(b"Alice@Example.org", b"secret") +
                b"\r\n") == [b"235 2.7.0 Authentication successful"]
    assert ctx.authenticator.calls[0][:4] == (b"Alice@Example.org", b"secret",
                                              "192.168.1.1", "smtp")
    assert talk(proto, transport, b"AUTH PLAIN =\r\nMAIL FROM:<bob@example.org>\r\n"
                b"MAIL FROM:<alice+x@example.org>\r\nRCPT TO:<f@remote.test>\r\n") == [
        b"503 5.5.1 Error: already authenticated",
        b"553 5.7.1 Sender address rejected: not owned by user alice@example.org",
        b"250 2.1.0 Ok",
        b"451 4.3.0 <f@remote.test>: Recipient address rejected: Outbound delivery not "
        b"available"]  # no queue
    proto.connectionLost(None)


def test_submission_adds_date_and_message_id():
    ctx, proto, transport = connect(role="submissions")
    talk(proto, transport, b"EHLO laptop\r\nAUTH PLAIN " +
         plain(b"alice@example.org", b"secret") + b"\r\n")
    replies = talk(proto, transport, b"MAIL FROM:<alice@example.org>\r\n"
                   b"RCPT TO:<bob@example.org>\r\nDATA\r\nSubject: s\r\nX-A: 1\r\n"
                   b"\r\nbody\r\n.\r\n")
    assert replies[-1].startswith(b"250 2.0.0")
    [writer] = ctx.store.writers
    head, _, body = writer.data.partition(b"\n\n")
    assert b"with ESMTPSA id" in head and b"(using TLSv1.3 with cipher" in head
    fields = head.split(b"\n")
    assert fields[-4:-2] == [b"Subject: s", b"X-A: 1"]
    assert fields[-2].startswith(b"Date: ") and fields[-1].startswith(b"Message-ID: <")
    assert body == b"body\n"


def test_auth_failures_and_exchanges():
    ctx, proto, transport = connect(role="submissions")
    talk(proto, transport, b"EHLO c\r\n")
    assert talk(proto, transport, b"AUTH PLAIN " + plain(b"alice@example.org", b"nope") +
                b"\r\n") == [b"535 5.7.8 Error: authentication failed"]
    assert talk(proto, transport, b"AUTH PLAIN " +
                plain(b"alice@example.org", b"secret", b"bob@example.org") + b"\r\n") == [
        b"535 5.7.8 Error: authorization identity not permitted"]
    assert talk(proto, transport, b"AUTH LOGIN\r\n") == [b"334 VXNlcm5hbWU6"]
    assert talk(proto, transport, b"*\r\n") == [b"501 5.7.0 Authentication aborted"]
    assert talk(proto, transport, b"AUTH PLAIN\r\n") == [b"334 "]
    assert talk(proto, transport, b"%%%\r\n") == [b"501 5.5.2 Invalid base64 data"]
    assert talk(proto, transport, b"AUTH PLAIN " + base64.b64encode(b"no-nuls") +
                b"\r\n") == [b"501 5.5.2 Malformed PLAIN response"]
    assert talk(proto, transport, b"AUTH\r\nAUTH DIGEST-MD5\r\n") == [
        b"501 5.5.4 Syntax: AUTH mechanism",
        b"504 5.5.4 Error: unsupported authentication mechanism"]
    ctx.authenticator.result = defer.fail(LoginLocked("locked"))
    assert talk(proto, transport, b"AUTH LOGIN " + base64.b64encode(b"alice@example.org") +
                b"\r\n" + base64.b64encode(b"secret") + b"\r\n") == [
        b"334 UGFzc3dvcmQ6", b"454 4.7.0 Error: too many failed logins, try again later"]
    proto.connectionLost(None)


def test_auth_pending_holds_pipelined_commands():
    ctx, proto, transport = connect(role="submissions")
    talk(proto, transport, b"EHLO c\r\n")
    ctx.authenticator.result = defer.Deferred()
    assert talk(proto, transport, b"AUTH PLAIN " + plain(b"alice@example.org", b"secret") +
                b"\r\nMAIL FROM:<alice@example.org>\r\n") == []
    ctx.authenticator.result.callback((ISMTPSubmitter, Submitter("alice@example.org"),
                                       lambda: None))
    assert transport.value().split(b"\r\n")[:-1] == [
        b"235 2.7.0 Authentication successful", b"250 2.1.0 Ok"]
    proto.connectionLost(None)


def test_mx_role_auth_disabled_unless_configured():
    ctx, proto, transport = connect()
    assert talk(proto, transport, b"AUTH PLAIN AAAA\r\n") == [
        b"503 5.5.1 Error: authentication not enabled"]
    proto.connectionLost(None)
    ctx, proto, transport = connect(Ctx("[auth]\nsmtp_auth = true\n"))
    talk(proto, transport, b"EHLO c\r\n")
    assert talk(proto, transport, b"AUTH PLAIN AAAA\r\n") == [
        b"530 5.7.0 Must issue a STARTTLS command first"]
    proto.connectionLost(None)


def test_command_limit_counts_commands_since_last_message():
    ctx, proto, transport = connect(Ctx(commands_per_session=6))
    message = (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
               b"x\r\n.\r\n")
    talk(proto, transport, b"EHLO c\r\n")
    for _ in range(5):  # 3 commands each, but every message resets the count
        assert talk(proto, transport, message)[-1].startswith(b"250 2.0.0 Ok: queued")
    replies = talk(proto, transport, b"NOOP\r\n" * 8)
    assert replies[-1] == b"421 mx.example.org 4.7.0 Error: too many commands"
    assert replies[:-1] == [b"250 2.0.0 Ok"] * 6
    proto.connectionLost(None)


def test_http_request_closes():
    ctx, proto, transport = connect()
    assert talk(proto, transport, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n") == [
        b"221 2.7.0 Error: not an HTTP server, goodbye"]
    assert transport.disconnecting
    proto.connectionLost(None)


class HeldThreadPool:
    """A reactor + thread pool stand-in that runs thread work only when told to."""

    def __init__(self):
        self.jobs = []

    def getThreadPool(self):  # noqa: N802 - Twisted API
        return self

    def callFromThread(self, f, *args, **kw):  # noqa: N802 - Twisted API
        f(*args, **kw)

    def callInThreadWithCallback(self, on_result, f, *args, **kw):  # noqa: N802
        self.jobs.append((on_result, f, args, kw))

    def run_all(self):
        jobs, self.jobs = self.jobs, []
        for on_result, f, args, kw in jobs:
            try:
                on_result(True, f(*args, **kw))
            except Exception as e:  # noqa: BLE001
                on_result(False, e)


def test_open_failure_reported_at_the_final_dot():
    ctx = Ctx()

    def broken(mailboxes):
        raise OSError(28, "No space left on device")

    ctx.store.open_delivery = broken
    _, proto, transport = connect(ctx)
    replies = talk(proto, transport, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                   b"RCPT TO:<alice@example.org>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n")
    assert replies[-3:] == [b"354 End data with <CR><LF>.<CR><LF>",
                            b"451 4.3.0 Error: cannot store the message, try again later",
                            b"250 2.0.0 Ok"]
    proto.connectionLost(None)
