"""Authenticated submission (issue 3): STARTTLS + AUTH on `submission`, implicit TLS on
`submissions`, throttling and lockout, sender ownership, added headers."""

from __future__ import annotations

import base64
import json
import smtplib

import pytest_twisted
from twisted.internet import defer, task

from tests.functional.conftest import in_thread
from tests.functional.test_smtp_inbound import (
    LIMITS,
    Raw,
    messages,
    mx_server,
    queued,
    settle,
    smtp_error,
    survives,
)

AUTH = """\
[auth]
free_failures = 2
delay = 0.0
lockout_failures = 4
lockout = 60
window = 120
"""

PASSWORD = "secret"
BODY = b"Subject: from a user\r\n\r\nHi.\r\n"


@pytest_twisted.async_yield_fixture
async def sub(tmp_path):
    srv = await mx_server(tmp_path, extra=LIMITS + AUTH)
    yield srv
    await settle(srv)
    await srv.stop()


def submission(srv, user="alice@example.org", password=PASSWORD):
    s = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10)
    s.ehlo("laptop.local")
    s.starttls(context=srv.client_tls())
    s.ehlo("laptop.local")
    if user is not None:
        try:
            s.login(user, password)
        except smtplib.SMTPException:
            s.close()
            raise
    return s


def submit(srv, sender, rcpts, body=BODY, **kw):
    with submission(srv, **kw) as s:
        return s.sendmail(sender, rcpts, body)


@pytest_twisted.inlineCallbacks
def test_starttls_login_and_send(sub):
    refused = yield in_thread(submit, sub, "alice@example.org",
                              ["bob@example.org", "friend@remote.test"])
    assert refused == {}
    [msg] = messages(sub, "bob@example.org")
    assert msg.startswith(b"Return-Path: <alice@example.org>\n")
    assert b"with ESMTPSA id" in msg  # RFC 3848
    assert b"([127.0.0.1])" in msg
    assert b"\nDate: " in msg and b"\nMessage-ID: <" in msg  # RFC 6409 §8
    header, _, body = msg.partition(b"\n\n")
    assert b"Message-ID" in header and body == b"Hi.\n"
    [(envelope, data)] = queued(sub)
    assert envelope["sender"] == "alice@example.org"
    assert [r["address"] for r in envelope["recipients"]] == ["friend@remote.test"]
    assert b"Message-ID: <" in data and not data.startswith(b"Return-Path")


@pytest_twisted.inlineCallbacks
def test_existing_date_and_message_id_kept(sub):
    body = (b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <own@laptop>\r\n"
            b"Subject: x\r\n\r\nbody\r\n")
    yield in_thread(submit, sub, "alice@example.org", ["bob@example.org"], body)
    [msg] = messages(sub, "bob@example.org")
    assert msg.count(b"Date:") == 1 and msg.count(b"Message-ID:") == 1
    assert b"Message-ID: <own@laptop>" in msg


@pytest_twisted.inlineCallbacks
def test_implicit_tls_submissions(sub):
    def run():
        with smtplib.SMTP_SSL("127.0.0.1", sub.ports["submissions"],
                              context=sub.client_tls(), timeout=10) as s:
            s.ehlo("laptop.local")
            assert not s.has_extn("starttls")
            assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"]
            s.login("Alice@Example.org", PASSWORD)  # login names are case-insensitive
            return s.sendmail("alice@example.org", ["bob@example.org"], BODY)

    assert (yield in_thread(run)) == {}
    [msg] = messages(sub, "bob@example.org")
    assert b"(using TLSv1" in msg and b"with ESMTPSA" in msg


@pytest_twisted.inlineCallbacks
def test_auth_login_mechanism_and_initial_response(sub):
    def run():
        with submission(sub, user=None) as s:
            s.user, s.password = "alice@example.org", PASSWORD
            code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
            return code

    assert (yield in_thread(run)) == 235


@pytest_twisted.inlineCallbacks
def test_bad_password_535(sub):
    code, text = yield in_thread(smtp_error, submission, sub, "alice@example.org", "wrong")
    assert code == 535 and text.startswith(b"5.7.8")
    code, text = yield in_thread(smtp_error, submission, sub, "nobody@example.org", "x")
    assert code == 535


@pytest_twisted.inlineCallbacks
def test_plain_authzid_must_match(sub):
    def run(authzid):
        with submission(sub, user=None) as s:
            blob = base64.b64encode(authzid + b"\0alice@example.org\0" + PASSWORD.encode())
            return s.docmd("AUTH", "PLAIN " + blob.decode())

    code, text = yield in_thread(run, b"bob@example.org")
    assert code == 535
    code, text = yield in_thread(run, b"ALICE@example.org")
    assert code == 235


@pytest_twisted.inlineCallbacks
def test_auth_refused_before_tls_and_not_advertised(sub):
    def run():
        with smtplib.SMTP("127.0.0.1", sub.ports["submission"], timeout=10) as s:
            s.ehlo("laptop.local")
            assert not s.has_extn("auth")
            assert s.has_extn("starttls")
            auth = s.docmd("AUTH", "PLAIN " + base64.b64encode(
                b"\0alice@example.org\0secret").decode())
            mail = s.docmd("MAIL", "FROM:<alice@example.org>")
            return auth, mail

    auth, mail = yield in_thread(run)
    assert auth[0] == 530 and auth[1].startswith(b"5.7.0")
    assert mail[0] == 530


@pytest_twisted.inlineCallbacks
def test_mail_before_auth_530(sub):
    def run():
        with submission(sub, user=None) as s:
            return s.docmd("MAIL", "FROM:<alice@example.org>")

    code, text = yield in_thread(run)
    assert code == 530 and text.startswith(b"5.7.0")


@pytest_twisted.inlineCallbacks
def test_sender_must_be_owned(sub):
    def run():
        with submission(sub) as s:
            other = s.docmd("MAIL", "FROM:<bob@example.org>")
            null = s.docmd("MAIL", "FROM:<>")
            tagged = s.docmd("MAIL", "FROM:<alice+lists@example.org>")
            return other, null, tagged

    other, null, tagged = yield in_thread(run)
    assert other[0] == 553 and other[1].startswith(b"5.7.1")
    assert null[0] == 553
    assert tagged[0] == 250


@pytest_twisted.inlineCallbacks
def test_remote_recipient_goes_to_the_queue(sub):
    def run():
        with submission(sub) as s:
            return s.sendmail("alice@example.org", ["friend@remote.test"],
                              b"Subject: out\r\n\r\nbye\r\n")

    assert (yield in_thread(run)) == {}
    (envelope,) = (sub.data_dir / "queue").glob("*.json")
    entry = json.loads(envelope.read_text())
    assert entry["sender"] == "alice@example.org"
    assert [r["address"] for r in entry["recipients"]] == ["friend@remote.test"]
    data = envelope.with_suffix(".msg").read_bytes()
    assert b"with ESMTPSA" in data and b"\nDate: " in data and b"\nMessage-ID: <" in data


@pytest_twisted.inlineCallbacks
def test_mx_role_offers_no_auth(sub):
    def run():
        with smtplib.SMTP("127.0.0.1", sub.ports["smtp"], timeout=10) as s:
            s.ehlo("c")
            s.starttls(context=sub.client_tls())
            s.ehlo("c")
            assert not s.has_extn("auth")
            return s.docmd("AUTH", "PLAIN AGFAYg==")

    code, _ = yield in_thread(run)
    assert code == 503


@pytest_twisted.inlineCallbacks
def test_user_added_and_deleted_while_running(sub):
    sub.add_user("carol@example.org", "carolpw")
    yield in_thread(submit, sub, "carol@example.org", ["bob@example.org"],
                    user="carol@example.org", password="carolpw")
    sub.del_user("carol@example.org")
    code, _ = yield in_thread(smtp_error, submission, sub, "carol@example.org", "carolpw")
    assert code == 535


@pytest_twisted.inlineCallbacks
def test_hide_client_ip(tmp_path):
    srv = yield defer.ensureDeferred(mx_server(
        tmp_path, extra=LIMITS + AUTH + "[submission]\nhide_client_ip = true\n"))
    try:
        yield in_thread(submit, srv, "alice@example.org", ["bob@example.org"])
        [msg] = messages(srv, "bob@example.org")
        assert b"127.0.0.1" not in msg
        assert b"Received: from laptop.local\n" in msg
    finally:
        yield defer.ensureDeferred(settle(srv))
        yield srv.stop()


@pytest_twisted.inlineCallbacks
def test_lockout_and_recovery(tmp_path):
    clock = task.Clock()
    srv = yield defer.ensureDeferred(mx_server(tmp_path, extra=LIMITS + AUTH, clock=clock))
    try:
        def attempt(password):
            with submission(srv, user=None) as s:  # one PLAIN attempt per call
                blob = base64.b64encode(b"\0alice@example.org\0" + password.encode())
                return s.docmd("AUTH", "PLAIN " + blob.decode())[0]

        codes = []
        for _ in range(4):
            codes.append((yield in_thread(attempt, "wrong")))
        codes.append((yield in_thread(attempt, PASSWORD)))  # locked: even the right one
        assert codes == [535, 535, 535, 535, 454]
        clock.advance(121)
        assert (yield in_thread(attempt, PASSWORD)) == 235
    finally:
        yield defer.ensureDeferred(settle(srv))
        yield srv.stop()
        for call in clock.getDelayedCalls():
            call.cancel()


@pytest_twisted.inlineCallbacks
def test_sessions_stay_responsive_during_logins(sub):
    """Hash verification runs in the thread pool: NOOPs are answered meanwhile."""
    from twisted.internet import reactor

    def login():
        with submission(sub):
            pass

    def noops():
        raw = Raw(sub.ports["smtp"])
        raw.code()
        codes = []
        for _ in range(20):
            raw.send(b"NOOP\r\n")
            codes.append(raw.code())
        raw.send(b"QUIT\r\n")
        raw.code()
        return codes

    logins = [in_thread(login) for _ in range(4)]
    watcher = in_thread(noops)
    codes = yield watcher
    yield defer.gatherResults(logins)
    assert codes == [250] * 20
    assert reactor.running


@pytest_twisted.inlineCallbacks
def test_auth_garbage(sub):
    def run():
        raw = Raw(sub.ports["submissions"])
        tls = sub.client_tls().wrap_socket(raw.sock, server_hostname="mx.example.org")
        f = tls.makefile("rb")
        f.readline()
        out = []
        for line in (b"EHLO x", b"AUTH", b"AUTH CRAM-MD5", b"AUTH PLAIN !!!notbase64",
                     b"AUTH PLAIN AGFsaWNl", b"AUTH LOGIN", b"*"):
            tls.sendall(line + b"\r\n")
            while True:
                reply = f.readline()
                if reply[3:4] != b"-":
                    break
            out.append(reply[:9])
        tls.sendall(b"QUIT\r\n")
        out.append(f.readline()[:3])
        tls.close()
        return out

    out = yield in_thread(run)
    assert out == [b"250 AUTH ", b"501 5.5.4", b"504 5.5.4", b"501 5.5.2", b"501 5.5.2",
                   b"334 VXNlc", b"501 5.7.0", b"221"]
    yield in_thread(survives, sub)


@pytest_twisted.inlineCallbacks
def test_failed_logins_are_delayed(tmp_path):
    """After `free_failures`, the 535 only comes after the throttle's delay (per IP and
    per account); other sessions are served meanwhile."""
    from twisted.internet import reactor

    clock = task.Clock()
    throttle = AUTH.replace("delay = 0.0", "delay = 5.0")
    srv = yield defer.ensureDeferred(mx_server(tmp_path, extra=LIMITS + throttle,
                                               clock=clock))
    try:
        def attempt(conn, password):
            blob = base64.b64encode(b"\0alice@example.org\0" + password.encode())
            conn.send(b"AUTH PLAIN " + blob + b"\r\n")

        def open_tls():
            raw = Raw(srv.ports["submissions"])
            raw.sock = srv.client_tls().wrap_socket(raw.sock,
                                                    server_hostname="mx.example.org")
            raw.file = raw.sock.makefile("rb")
            assert raw.code() == 220
            raw.send(b"EHLO c\r\n")
            raw.reply()
            return raw

        conn = yield in_thread(open_tls)
        for _ in range(2):  # free failures: answered at once
            yield in_thread(attempt, conn, "wrong")
            assert (yield in_thread(conn.code)) == 535
            conn.close()
            conn = yield in_thread(open_tls)
        yield in_thread(attempt, conn, "wrong")
        pending = in_thread(conn.code)
        # meanwhile another session works normally
        other = yield in_thread(lambda: (lambda r: (r.code(), r.send(b"NOOP\r\n"),
                                                    r.code(), r.close()))(
            Raw(srv.ports["smtp"])))
        assert other[0] == 220 and other[2] == 250
        assert not pending.called
        for _ in range(1000):  # wait (bounded) until the hash check has failed
            if any(getattr(c.func, "__name__", "") == "errback"
                   for c in clock.getDelayedCalls()):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        assert not pending.called
        clock.advance(5)
        assert (yield pending) == 535
        conn.close()
    finally:
        yield defer.ensureDeferred(settle(srv))
        yield srv.stop()
        for call in clock.getDelayedCalls():
            call.cancel()


@pytest_twisted.inlineCallbacks
def test_smtp_auth_on_mx_role_when_enabled(tmp_path):
    srv = yield defer.ensureDeferred(mx_server(
        tmp_path, extra=LIMITS + AUTH + "smtp_auth = true\n"))
    try:
        def run():
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                s.ehlo("laptop")
                assert not s.has_extn("auth")  # only under TLS
                s.starttls(context=srv.client_tls())
                s.ehlo("laptop")
                assert s.has_extn("auth")
                s.login("alice@example.org", PASSWORD)
                return s.sendmail("alice@example.org", ["friend@remote.test"], BODY)

        assert (yield in_thread(run)) == {}
        [(envelope, data)] = queued(srv)
        assert [r["address"] for r in envelope["recipients"]] == ["friend@remote.test"]
        assert b"with ESMTPSA" in data
    finally:
        yield defer.ensureDeferred(settle(srv))
        yield srv.stop()
