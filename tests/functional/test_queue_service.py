"""End to end through makeService: submission to a remote recipient and a forwarding
alias reach a fake remote server via the loopback DNS server."""

from __future__ import annotations

import smtplib

import pytest_twisted
from twisted.internet import reactor, task

from tests.functional.conftest import in_thread, start_server
from tests.functional.queue_helpers import DNSFixture, FakeServer, a, mx


async def _until(predicate, limit: int = 400) -> None:
    for _ in range(limit):
        if predicate():
            return
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_submission_and_forwarding_are_relayed(tmp_path):
    remote = FakeServer()
    dns = DNSFixture("test", {"dest.test": [mx(10, "mx.dest.test")],
                              "mx.dest.test": [a("127.0.0.1")]})
    extra = (f'[queue]\ndns_servers = ["127.0.0.1:{dns.address[1]}"]\n'
             f"remote_port = {remote.port}\n")
    domains = '[domains."example.org"]\n[domains."example.org".aliases]\nfwd = "ext@dest.test"\n'
    srv = await start_server(tmp_path, extra=extra, roles=("smtp", "submission"),
                             domains=domains)
    try:
        srv.add_user("alice@example.org", "secret")

        def submit():
            with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=20) as c:
                c.starttls(context=srv.client_tls())
                c.login("alice@example.org", "secret")
                c.sendmail("alice@example.org", ["bob@dest.test"],
                           b"Subject: out\r\n\r\nto the world\r\n.leading dot\r\n")
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as c:
                c.sendmail("zed@elsewhere.test", ["fwd@example.org"],
                           b"Subject: fwd\r\n\r\nplease forward\r\n")

        await in_thread(submit)
        await _until(lambda: len(remote.received) >= 2)
        got = {tuple(r.recipients): r for r in remote.received}
        out = got[("bob@dest.test",)]
        assert out.sender == "alice@example.org"
        assert b"\nSubject: out\n" in out.data
        assert out.data.endswith(b"\n\nto the world\n.leading dot\n")
        assert b"Received:" in out.data
        fwd = got[("ext@dest.test",)]
        assert fwd.sender == "zed@elsewhere.test" and b"please forward" in fwd.data
        await _until(lambda: not list((srv.data_dir / "queue").glob("*.json")))
        assert not list((srv.data_dir / "queue").glob("*.json"))
    finally:
        await srv.stop()
        await remote.stop()
        await dns.stop()
