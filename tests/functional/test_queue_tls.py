"""Outbound TLS: opportunistic STARTTLS, required verified TLS per domain, smarthost
with STARTTLS or implicit TLS and AUTH PLAIN, SMTPUTF8/8BITMIME passed on."""

from __future__ import annotations

import pytest_twisted

from mailhost.queue.spool import PENDING
from tests.functional.queue_helpers import MESSAGE, Behaviour, Harness, a, mx, tls_material


@pytest_twisted.async_yield_fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.stop()


ZONE = {"dest.test": [mx(10, "mx.dest.test")], "mx.dest.test": [a("127.0.0.1")],
        "relay.test": [a("127.0.0.1")]}


@pytest_twisted.ensureDeferred
async def test_opportunistic_starttls_without_verification(h, tmp_path):
    context, _ = tls_material(tmp_path, "some-other-name.test")
    srv = h.server(Behaviour(tls_context=context))
    await h.start(ZONE)
    await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    [got] = srv.received
    assert got.tls and got.data == MESSAGE
    assert "STARTTLS" in srv.commands


@pytest_twisted.ensureDeferred
async def test_plaintext_when_peer_offers_no_tls(h):
    srv = h.server()
    await h.start(ZONE)
    await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    assert [r.tls for r in srv.received] == [False]


@pytest_twisted.ensureDeferred
async def test_required_tls_refuses_unverified_then_accepts_trusted(h, tmp_path):
    context, trust = tls_material(tmp_path, "mx.dest.test")
    srv = h.server(Behaviour(tls_context=context))
    _, other_trust = tls_material(tmp_path / "other", "mx.dest.test")
    h.trust_root = other_trust  # a different certificate: verification must fail
    await h.start(ZONE, queue='require_tls = ["dest.test"]')
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    rcpt = h.envelope(qid).recipients[0]
    assert rcpt.status == PENDING and srv.received == []
    h.trust_root = trust
    await h.restart()
    await h.advance(300)
    assert [r.tls for r in srv.received] == [True]


@pytest_twisted.ensureDeferred
async def test_required_tls_not_offered_is_deferred(h):
    srv = h.server()
    await h.start(ZONE, queue='require_tls = ["dest.test"]')
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    rcpt = h.envelope(qid).recipients[0]
    assert rcpt.status == PENDING and "4.7.10" in rcpt.last_reply
    assert not any(c.startswith("MAIL") for c in srv.commands)


@pytest_twisted.ensureDeferred
async def test_smarthost_starttls_with_auth_plain(h, tmp_path):
    context, trust = tls_material(tmp_path, "relay.test")
    srv = h.server(Behaviour(tls_context=context, auth=("relayuser", "pw")))
    h.trust_root = trust
    await h.start({"relay.test": [a("127.0.0.1")]}, queue=(
        f'smarthost = "relay.test:{srv.port}"\nsmarthost_tls = "starttls"\n'
        'smarthost_username = "relayuser"\nsmarthost_password = "pw"'))
    await h.submit("alice@example.org", ["bob@nowhere.test", "carol@elsewhere.test"])
    await h.run()
    assert srv.authenticated == ["relayuser"]
    [got] = srv.received
    assert got.tls and got.recipients == ["bob@nowhere.test", "carol@elsewhere.test"]


@pytest_twisted.ensureDeferred
async def test_smarthost_implicit_tls(h, tmp_path):
    context, trust = tls_material(tmp_path, "relay.test")
    srv = h.server(Behaviour(tls_context=context, implicit=True, auth=("u", "p")))
    h.trust_root = trust
    await h.start({"relay.test": [a("127.0.0.1")]}, queue=(
        f'smarthost = "relay.test:{srv.port}"\nsmarthost_tls = "implicit"\n'
        'smarthost_username = "u"\nsmarthost_password = "p"'))
    await h.submit("alice@example.org", ["bob@nowhere.test"])
    await h.run()
    assert srv.authenticated == ["u"] and [r.tls for r in srv.received] == [True]


@pytest_twisted.ensureDeferred
async def test_smarthost_bad_credentials_are_retried_not_bounced(h, tmp_path):
    context, trust = tls_material(tmp_path, "relay.test")
    srv = h.server(Behaviour(tls_context=context, auth=("u", "right")))
    h.trust_root = trust
    await h.start({"relay.test": [a("127.0.0.1")]}, queue=(
        f'smarthost = "relay.test:{srv.port}"\n'
        'smarthost_username = "u"\nsmarthost_password = "wrong"'))
    qid = await h.submit("alice@example.org", ["bob@nowhere.test"])
    await h.run()
    assert h.envelope(qid).recipients[0].status == PENDING
    assert h.store.delivered == {}


@pytest_twisted.ensureDeferred
async def test_smtputf8_and_8bitmime_passed_on_when_supported(h):
    srv = h.server()
    await h.start(ZONE)
    data = "From: jörg@example.org\nSubject: grüße\n\nbody é\n".encode()
    await h.submit("jörg@example.org", ["bob@dest.test"], data,
                   {"smtputf8": True, "body": "8BITMIME"})
    await h.run()
    [mail] = srv.mail_commands
    assert mail.startswith("MAIL FROM:<jörg@example.org>")
    assert "SMTPUTF8" in mail and "BODY=8BITMIME" in mail
    assert srv.received[0].data == data


@pytest_twisted.ensureDeferred
async def test_smtputf8_message_fails_when_peer_lacks_it(h):
    srv = h.server(Behaviour(extensions=("8BITMIME",)))
    await h.start(ZONE)
    await h.submit("jörg@example.org", ["bob@dest.test"],
                   "Subject: grüße\n\nx\n".encode(), {"smtputf8": True})
    await h.run()
    assert srv.mail_commands == []
    [report] = h.store.delivered["jörg@example.org"]
    assert b"5.6.7" in report
