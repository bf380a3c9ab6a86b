"""Hostile and unusual input on the MX role: long lines, smuggling, garbage, error
limits, connection caps, pipelining, STARTTLS injection; the server survives each."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.functional import test_smtp_inbound as inbound
from tests.functional.conftest import in_thread
from tests.functional.test_smtp_inbound import Raw, messages, survives


def open_data(mx) -> Raw:
    """A raw session past EHLO, MAIL, RCPT alice and DATA (354): the body comes next."""
    raw = Raw(mx.ports["smtp"])
    raw.code()
    raw.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
             b"DATA\r\n")
    assert [raw.code() for _ in range(4)] == [250, 250, 250, 354]
    return raw

#: the MX-role server of the inbound tests, shared (one fixture, one definition)
mx = inbound.mx


@pytest_twisted.inlineCallbacks
def test_megabyte_line_in_command_and_data(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"NOOP " + b"A" * (1 << 20) + b"\r\nNOOP\r\n")
        first = raw.reply()
        second = raw.code()
        raw.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
                 b"DATA\r\n")
        codes = [raw.code() for _ in range(4)]
        raw.send(b"Subject: long\r\n\r\n" + b"B" * (1 << 20) + b"\r\n.\r\n")
        end = raw.reply()
        raw.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        codes += [raw.code() for _ in range(3)]
        raw.send(b"Subject: long\r\n\r\n" + b"C" * 2000 + b"\r\n.\r\n")
        end2 = raw.reply()
        raw.send(b"QUIT\r\n")
        return first, second, codes, end + end2, raw.code()

    first, second, codes, end, quit_code = yield in_thread(run)
    assert first[0].startswith(b"500 5.5.2")
    assert second == 250
    assert codes == [250, 250, 250, 354, 250, 250, 354]
    assert end[0].startswith(b"552 5.3.4")  # the 1 MB line is over the size limit too
    assert end[1].startswith(b"500 5.5.2")  # a 2000-byte line is over line_length
    assert quit_code == 221
    assert messages(mx, "alice@example.org") == []
    yield in_thread(survives, mx)


@pytest_twisted.inlineCallbacks
def test_lf_dot_lf_does_not_end_data(mx):
    def run():
        raw = open_data(mx)
        raw.send(b"Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@remote.test>\n"
                 b"RCPT TO:<bob@example.org>\nDATA\nsmuggled\r\n.\r\n")
        end = raw.code()
        raw.send(b"QUIT\r\n")
        return end, raw.code()

    end, quit_code = yield in_thread(run)
    assert (end, quit_code) == (250, 221)
    [msg] = messages(mx, "alice@example.org")
    assert b"smuggled" in msg
    assert messages(mx, "bob@example.org") == []


@pytest_twisted.inlineCallbacks
def test_garbage_gets_errors_not_tracebacks(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        replies = []
        for junk in (b"\xff\xfe\x00garbage", "MAİL FROM:<a@b.c>".encode(), b"", b"AUTH",
                     b"EHLO"):
            raw.send(junk + b"\r\n")
            replies.append(raw.reply()[-1][:9])
        raw.send(b"QUIT\r\n")
        return replies, raw.code()

    replies, quit_code = yield in_thread(run)
    assert replies == [b"500 5.5.2", b"500 5.5.2", b"500 5.5.2", b"503 5.5.1", b"501 5.5.4"]
    assert quit_code == 221
    yield in_thread(survives, mx)


@pytest_twisted.inlineCallbacks
def test_too_many_errors_closes(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"BOGUS\r\n" * 10)
        codes = []
        while True:
            try:
                codes.append(raw.code())
            except (EOFError, ConnectionResetError):
                return codes

    codes = yield in_thread(run)
    assert codes == [500] * 6 + [421]
    yield in_thread(survives, mx)


@pytest_twisted.inlineCallbacks
def test_connections_per_ip(mx):
    def run():
        held = [Raw(mx.ports["smtp"]) for _ in range(5)]
        codes = [r.code() for r in held]
        extra = Raw(mx.ports["smtp"])
        reply = extra.reply()
        closed = extra.closed()
        for r in held:
            r.close()
        extra.close()
        return codes, reply, closed

    codes, reply, closed = yield in_thread(run)
    assert codes == [220] * 5
    assert reply[0].startswith(b"421 ") and b"4.7.0" in reply[0]
    assert closed


@pytest_twisted.inlineCallbacks
def test_pipelined_commands_answered_in_order(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
                 b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<x@remote.test>\r\n"
                 b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
        codes = [raw.code() for _ in range(7)]
        raw.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<t@remote.test>\r\n"
                 b"RCPT TO:<bob@example.org>\r\nDATA\r\nSubject: q\r\n\r\nb2\r\n.\r\n"
                 b"NOOP\r\nQUIT\r\n")
        more = [raw.code() for _ in range(7)]
        return codes, more

    codes, more = yield in_thread(run)
    assert codes == [250, 250, 250, 550, 554, 250, 354]
    assert more == [250, 250, 250, 354, 250, 250, 221]
    assert len(messages(mx, "alice@example.org")) == 1
    assert len(messages(mx, "bob@example.org")) == 2


@pytest_twisted.inlineCallbacks
def test_pipelining_with_slow_policy(mx):
    """An asynchronous recipient check still gets every reply in order (Twisted 8126)."""
    from twisted.internet import reactor

    real = mx.ctx.policy.decide_recipient

    def slow(address, account, queue_available=True):
        d = defer.Deferred()
        reactor.callLater(0.01, lambda: d.callback(real(address, account,
                                                        queue_available=queue_available)))
        return d

    mx.ctx.policy.decide_recipient = slow

    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.org>\r\n"
                 b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: s\r\n\r\nx\r\n.\r\n"
                 b"QUIT\r\n")
        return [raw.code() for _ in range(7)]

    codes = yield in_thread(run)
    assert codes == [250, 250, 550, 250, 354, 250, 221]


@pytest_twisted.inlineCallbacks
def test_starttls_command_injection_discarded(mx):
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"EHLO c\r\n")
        raw.reply()
        # the injected commands arrive in the same plaintext read as STARTTLS
        raw.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n")
        ready = raw.reply()
        tls = mx.client_tls().wrap_socket(raw.sock, server_hostname="mx.example.org")
        f = tls.makefile("rb")
        # if RSET/MAIL had run inside TLS, their replies would come first
        tls.sendall(b"RCPT TO:<alice@example.org>\r\nEHLO c\r\nQUIT\r\n")
        out = f.read()
        tls.close()
        return ready, out

    ready, out = yield in_thread(run)
    assert ready[0].startswith(b"220 2.0.0")
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"503 5.5.1")  # no MAIL in effect: HELO state was reset
    assert lines[-2].startswith(b"221")
    assert not any(line.startswith(b"250 2.1.0") for line in lines)
    yield in_thread(survives, mx)


@pytest_twisted.inlineCallbacks
def test_bare_cr_cannot_smuggle_a_dot_to_the_next_hop(mx):
    """A bare CR is stored as a line end, so relaying dot-stuffs the "." after it."""
    from mailhost.smtp.client import encode_data

    def run():
        raw = open_data(mx)
        raw.send(b"Subject: cr\r\n\r\nfirst\r.\rMAIL FROM:<evil@remote.test>\r\n.\r\n")
        end = raw.code()
        raw.send(b"QUIT\r\n")
        return end

    assert (yield in_thread(run)) == 250
    [msg] = messages(mx, "alice@example.org")
    assert b"\r" not in msg
    assert msg.endswith(b"first\n.\nMAIL FROM:<evil@remote.test>\n")
    assert b"\r\n..\r\nMAIL FROM" in encode_data(msg)


@pytest_twisted.inlineCallbacks
def test_utf8_addresses_need_smtputf8(mx):
    """SMTPUTF8 is not offered, so UTF-8 addresses get 553 5.6.7 (RFC 6531 §3.2)."""
    def run():
        raw = Raw(mx.ports["smtp"])
        raw.code()
        raw.send(b"EHLO c\r\n")
        raw.code()
        raw.send("MAIL FROM:<jos\u00e9@remote.test>\r\n".encode())
        mail_utf8 = raw.reply()[-1]
        raw.send(b"MAIL FROM:<s@remote.test>\r\n")
        raw.code()
        raw.send("RCPT TO:<\u00e4lice@example.org>\r\n".encode())
        rcpt_utf8 = raw.reply()[-1]
        raw.send(b"QUIT\r\n")
        return mail_utf8, rcpt_utf8

    mail_utf8, rcpt_utf8 = yield in_thread(run)
    assert mail_utf8.startswith(b"553 5.6.7") and rcpt_utf8.startswith(b"553 5.6.7")
