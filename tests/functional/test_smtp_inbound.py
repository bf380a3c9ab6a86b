"""The MX role (issue 2 §3) against a real server, driven by smtplib and raw sockets."""

from __future__ import annotations

import json
import smtplib
import socket

import pytest_twisted
from twisted.internet import defer

from tests.functional.conftest import in_thread, start_server

SMTP_ROLES = ("smtp", "submission", "submissions")

DOMAINS = """\
[domains."example.org"]
catch_all = ""
[domains."example.org".aliases]
info = ["alice", "bob"]
sales = "alice"
loop1 = "loop2"
loop2 = "loop1"
fwd = ["alice", "friend@remote.test"]
[domains."catch.test"]
catch_all = "alice@example.org"
""".replace('catch_all = ""\n', "")

LIMITS = """\
[limits]
message_size = 20000
recipients = 5
line_length = 1000
bad_commands = 6
connections_per_ip = 5
"""

BODY = b"Subject: test\r\nMessage-ID: <m1@client.test>\r\n\r\nHello there.\r\n"


async def mx_server(tmp_path, extra: str = LIMITS, clock=None, roles=SMTP_ROLES,
                    domains: str = DOMAINS):
    srv = await start_server(tmp_path, extra=extra, roles=roles, domains=domains, clock=clock)
    for user in ("alice@example.org", "bob@example.org"):
        srv.add_user(user)
    return srv


async def settle(srv) -> None:
    """Wait (bounded) until the server has seen every client connection close."""
    from twisted.internet import reactor, task

    for _ in range(500):
        if not srv.ctx.connections._open:
            return
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def mx(tmp_path):
    srv = await mx_server(tmp_path)
    yield srv
    await settle(srv)
    await srv.stop()


def messages(srv, address: str) -> list[bytes]:
    new = srv.maildir(address) / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


def send(port: int, sender: str, rcpts: list[str], body: bytes = BODY, helo="client.test"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo(helo)
        return s.sendmail(sender, rcpts, body)


def smtp_error(fn, *args):
    """Run fn; return the (code, message) of the SMTP error it raised."""
    try:
        fn(*args)
    except smtplib.SMTPRecipientsRefused as e:
        return next(iter(e.recipients.values()))
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error
    raise AssertionError("no SMTP error")


class Raw:
    """A raw line-oriented client for hostile input."""

    def __init__(self, port: int, host: str = "127.0.0.1", family=socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        """One (possibly multi-line) reply, as its lines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("connection closed")
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])

    def closed(self) -> bool:
        try:
            return self.file.readline() == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def survives(srv) -> None:
    """A fresh connection still gets a 220 and can deliver."""
    send(srv.ports["smtp"], "check@remote.test", ["bob@example.org"],
         b"Subject: still alive\r\n\r\nok\r\n")
    assert any(b"still alive" in m for m in messages(srv, "bob@example.org"))


# --- delivery ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_delivery_with_trace_headers(mx):
    refused = yield in_thread(send, mx.ports["smtp"], "sender@remote.test",
                              ["alice@example.org"])
    assert refused == {}
    [msg] = messages(mx, "alice@example.org")
    lines = msg.split(b"\n")
    assert lines[0] == b"Return-Path: <sender@remote.test>"
    assert lines[1] == b"Received: from client.test ([127.0.0.1])"
    assert lines[2].startswith(b"\tby mx.example.org (mailhost) with ESMTP id ")
    assert lines[3].startswith(b"\tfor <alice@example.org>; ")
    assert msg.endswith(b"Subject: test\nMessage-ID: <m1@client.test>\n\nHello there.\n")
    assert b"\r" not in msg


@pytest_twisted.inlineCallbacks
def test_tag_and_case_insensitive(mx):
    yield in_thread(send, mx.ports["smtp"], "s@remote.test", ["ALICE+news@Example.ORG"])
    [msg] = messages(mx, "alice@example.org")
    assert b"for <ALICE+news@example.org>" in msg


@pytest_twisted.inlineCallbacks
def test_unknown_user_550(mx):
    code, text = yield in_thread(smtp_error, send, mx.ports["smtp"], "s@remote.test",
                                 ["nobody@example.org"])
    assert code == 550 and text.startswith(b"5.1.1")


@pytest_twisted.inlineCallbacks
def test_no_open_relay_from_loopback(mx):
    code, text = yield in_thread(smtp_error, send, mx.ports["smtp"], "s@example.org",
                                 ["victim@remote.test"])
    assert code == 554 and text.startswith(b"5.7.1")


@pytest_twisted.inlineCallbacks
def test_no_open_relay_from_ipv6_loopback(tmp_path):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
        have_v6 = True
    except OSError:
        have_v6 = False
    listen = 'smtp = ["tcp:0:interface=127.0.0.1"' + \
        (', "tcp6:0:interface=\\\\:\\\\:1"' if have_v6 else "") + ']\n'
    srv = yield defer.ensureDeferred(
        mx_server(tmp_path, roles=("submission",), domains=listen + DOMAINS))
    try:
        # the policy decision itself, whatever the address family
        from mailhost.address import parse_address
        decision = srv.ctx.policy.decide_recipient(parse_address("v@remote.test"), None,
                                                   queue_available=True)
        assert (decision.accepted, decision.code, decision.status) == (False, 554, "5.7.1")
        if have_v6:
            port = yield srv.port_of("smtp", 1)

            def relay_v6():
                with smtplib.SMTP("::1", port, timeout=10) as s:
                    s.ehlo("client.test")
                    code, text = s.mail("s@example.org")
                    assert code == 250
                    return s.rcpt("victim@remote.test")

            code, text = yield in_thread(relay_v6)
            assert code == 554 and text.startswith(b"5.7.1")

            def local_v6():
                with smtplib.SMTP("::1", port, timeout=10) as s:
                    s.ehlo("client.test")
                    s.sendmail("s@remote.test", ["bob@example.org"], BODY)

            yield in_thread(local_v6)
            [msg] = messages(srv, "bob@example.org")
            assert b"([IPv6:::1])" in msg
    finally:
        yield defer.ensureDeferred(settle(srv))
        yield srv.stop()


@pytest_twisted.inlineCallbacks
def test_alias_expansion_hard_links(mx):
    yield in_thread(send, mx.ports["smtp"], "s@remote.test", ["Info@example.org"])
    a = list((mx.maildir("alice@example.org") / "new").iterdir())
    b = list((mx.maildir("bob@example.org") / "new").iterdir())
    assert len(a) == len(b) == 1
    assert a[0].stat().st_ino == b[0].stat().st_ino  # one file, linked into both


@pytest_twisted.inlineCallbacks
def test_alias_loop_refused(mx):
    code, text = yield in_thread(smtp_error, send, mx.ports["smtp"], "s@remote.test",
                                 ["loop1@example.org"])
    assert code == 550 and text.startswith(b"5.4.6")


@pytest_twisted.inlineCallbacks
def test_catch_all(mx):
    yield in_thread(send, mx.ports["smtp"], "s@remote.test", ["anything@catch.test"])
    assert len(messages(mx, "alice@example.org")) == 1


def queued(srv) -> list[tuple[dict, bytes]]:
    """The entries in the real outbound queue: (JSON envelope, message bytes)."""
    root = srv.data_dir / "queue"
    return [(json.loads(p.read_text()), p.with_suffix(".msg").read_bytes())
            for p in sorted(root.glob("*.json"))]


@pytest_twisted.inlineCallbacks
def test_local_and_remote_copies(mx):
    """A forwarding alias: the local copy in the Maildir, the remote one in the queue."""
    yield in_thread(send, mx.ports["smtp"], "s@remote.test", ["fwd@example.org"])
    [msg] = messages(mx, "alice@example.org")
    [(envelope, data)] = queued(mx)
    assert envelope["sender"] == "s@remote.test"
    assert [r["address"] for r in envelope["recipients"]] == ["friend@remote.test"]
    assert data.startswith(b"Received: from client.test")  # no Return-Path when relaying
    assert msg.startswith(b"Return-Path: <s@remote.test>\n")
    assert data.endswith(b"Hello there.\n")


@pytest_twisted.inlineCallbacks
def test_queue_failure_delivers_nothing(mx):
    """The queue cannot write (its tmp/ is not a directory): 451, and no local copy."""
    tmp = mx.data_dir / "queue" / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"in the way")
    code, text = yield in_thread(smtp_error, send, mx.ports["smtp"], "s@remote.test",
                                 ["fwd@example.org"])
    assert code == 451 and text.startswith(b"4.3.0")
    assert messages(mx, "alice@example.org") == []
    tmp.unlink()
    tmp.mkdir()


@pytest_twisted.inlineCallbacks
def test_store_failure_451(mx):
    def broken(mailboxes):
        raise OSError(28, "No space left on device")

    mx.ctx.store.open_delivery = broken
    code, text = yield in_thread(smtp_error, send, mx.ports["smtp"], "s@remote.test",
                                 ["alice@example.org"])
    assert code == 451 and text.startswith(b"4.3.0")
    del mx.ctx.store.open_delivery
    yield in_thread(survives, mx)


# --- limits ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_oversize_declared_at_mail(mx):
    def run():
        with smtplib.SMTP("127.0.0.1", mx.ports["smtp"], timeout=10) as s:
            s.ehlo("client.test")
            assert s.esmtp_features["size"] == "20000"
            return s.mail("s@remote.test", ["SIZE=20001"])

    code, text = yield in_thread(run)
    assert code == 552 and text.startswith(b"5.3.4")


@pytest_twisted.inlineCallbacks
def test_oversize_during_data(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        assert raw.code() == 220
        raw.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
                 b"DATA\r\n")
        codes = [raw.code() for _ in range(4)]
        line = b"x" * 900 + b"\r\n"
        for _ in range(40):
            raw.send(line)
        raw.send(b".\r\nNOOP\r\n")
        reply = raw.reply()
        return codes, reply, raw.code()

    codes, reply, noop = yield in_thread(run)
    assert codes == [250, 250, 250, 354]
    assert reply[0].startswith(b"552 5.3.4")
    assert noop == 250
    assert messages(mx, "alice@example.org") == []


@pytest_twisted.inlineCallbacks
def test_too_many_recipients(mx):
    def run():
        with smtplib.SMTP("127.0.0.1", mx.ports["smtp"], timeout=10) as s:
            s.ehlo("c")
            s.mail("s@remote.test")
            return [s.rcpt("alice@example.org") for _ in range(6)]

    replies = yield in_thread(run)
    assert [c for c, _ in replies] == [250] * 5 + [452]
    assert replies[-1][1].startswith(b"4.5.3")


# --- TLS -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_starttls_received_header_has_cipher(mx):
    def run():
        with smtplib.SMTP("127.0.0.1", mx.ports["smtp"], timeout=10) as s:
            s.ehlo("client.test")
            assert s.has_extn("starttls")
            s.starttls(context=mx.client_tls())
            s.ehlo("client.test")
            assert not s.has_extn("starttls")
            assert not s.has_extn("auth")  # auth.smtp_auth is off on the MX role
            s.sendmail("s@remote.test", ["alice@example.org"], BODY)
            return s.sock.version(), s.sock.cipher()[0]

    version, cipher = yield in_thread(run)
    [msg] = messages(mx, "alice@example.org")
    assert f"(using {version} with cipher {cipher})".encode() in msg
    assert b"with ESMTPS id" in msg


# --- timeouts with an injected clock ---------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_idle_timeout_and_session_length(tmp_path):
    from twisted.internet import task

    clock = task.Clock()
    srv = yield defer.ensureDeferred(mx_server(
        tmp_path, clock=clock, extra=LIMITS + "idle_timeout = 30\nsession_length = 100\n"))
    try:
        def connect():
            raw = Raw(srv.ports["smtp"])
            assert raw.code() == 220
            return raw

        raw = yield in_thread(connect)
        clock.advance(31)
        reply = yield in_thread(raw.reply)
        assert reply[0].startswith(b"421 mx.example.org 4.4.2")
        assert (yield in_thread(raw.closed))

        busy = yield in_thread(connect)
        for step in (25, 25, 25, 26):  # never idle, but too long in total
            code = yield in_thread(lambda: (busy.send(b"NOOP\r\n"), busy.code())[1])
            assert code == 250
            clock.advance(step)
        reply = yield in_thread(busy.reply)
        assert b"4.4.2" in reply[0] and b"session too long" in reply[0]
    finally:
        yield srv.stop()
        for call in clock.getDelayedCalls():
            call.cancel()


@pytest_twisted.inlineCallbacks
def test_refuses_mail_while_stopping(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"EHLO c\r\n")
        raw.reply()
        mx.ctx.stopping = True
        raw.send(b"MAIL FROM:<s@remote.test>\r\n")
        return raw.reply(), raw.closed()

    reply, closed = yield in_thread(run)
    mx.ctx.stopping = False
    assert b"421" in reply[0] and b"4.3.2" in reply[0]
    assert closed


@pytest_twisted.inlineCallbacks
def test_log_events(mx):
    from twisted.logger import globalLogPublisher

    events = []

    def observer(event):
        if event.get("log_namespace") == "mailhost.smtp":
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield in_thread(send, mx.ports["smtp"], "s@remote.test", ["alice@example.org"])
        yield in_thread(smtp_error, send, mx.ports["smtp"], "s@remote.test",
                        ["nobody@example.org"])
        yield defer.ensureDeferred(settle(mx))
    finally:
        globalLogPublisher.removeObserver(observer)
    kinds = [e.get("event") for e in events]
    assert kinds.count("smtp.session_open") == 2 and kinds.count("smtp.session_close") == 2
    [accepted] = [e for e in events if e.get("event") == "smtp.accepted"]
    assert accepted["client_ip"] == "127.0.0.1" and accepted["helo"] == "client.test"
    assert accepted["sender"] == "s@remote.test"
    assert accepted["recipients"] == ["alice@example.org"]
    assert accepted["message_id"] == "<m1@client.test>" and accepted["size"] > 0
    assert accepted["files"][0].startswith(str(mx.maildir("alice@example.org")))
    assert accepted["session"] == events[0]["session"]
    [reject] = [e for e in events if e.get("event") == "smtp.reject"]
    assert (reject["code"], reject["status"]) == (550, "5.1.1")
