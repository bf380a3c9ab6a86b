"""The outbound queue against fake remote SMTP servers and a DNS server on loopback.

The scheduler runs on a task.Clock (retry schedule, lifetime); the network is real.
"""

from __future__ import annotations

import email
from email import policy as email_policy

import pytest_twisted
from twisted.internet import defer

from mailhost.queue.spool import DELIVERED, PENDING
from tests.functional.queue_helpers import (
    MESSAGE,
    Behaviour,
    Harness,
    a,
    aaaa,
    cname,
    mx,
)


@pytest_twisted.async_yield_fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.stop()


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email_policy.default)


def dsn_parts(raw: bytes) -> tuple[str, list]:
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    return msg, [dict(block.items()) for block in status.get_payload()]


@pytest_twisted.ensureDeferred
async def test_delivers_over_mx_and_removes_entry(h):
    srv = h.server()
    await h.start({"dest.test": [mx(10, "mx.dest.test")], "mx.dest.test": [a("127.0.0.1")]})
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    assert h.on_disk() == [qid]
    await h.run()
    assert len(srv.received) == 1
    got = srv.received[0]
    assert (got.sender, got.recipients, got.data) == ("alice@example.org",
                                                      ["bob@dest.test"], MESSAGE)
    assert h.on_disk() == []
    assert h.store.delivered == {}


@pytest_twisted.ensureDeferred
async def test_preference_order_and_fallback_past_dead_and_421_hosts(h):
    good = h.server()
    busy = h.server(Behaviour(greeting="421 4.3.2 busy"), interface="127.0.0.2")
    await h.start({"dest.test": [mx(30, "good.dest.test"), mx(10, "dead.dest.test"),
                                 mx(20, "busy.dest.test")],
                   "dead.dest.test": [a("127.0.0.3")],  # nothing listens: refused
                   "busy.dest.test": [a("127.0.0.2")],
                   "good.dest.test": [a("127.0.0.1")]})
    await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    assert busy.connections == 1 and busy.received == []
    assert len(good.received) == 1
    assert h.on_disk() == []


@pytest_twisted.ensureDeferred
async def test_no_mx_falls_back_to_address_records(h):
    srv = h.server()
    await h.start({"dest.test": [a("127.0.0.1")]})
    await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    assert [r.recipients for r in srv.received] == [["bob@dest.test"]]


@pytest_twisted.ensureDeferred
async def test_cname_followed_and_aaaa_used(h):
    srv = h.server(interface="::1")
    await h.start({"dest.test": [mx(10, "alias.dest.test")],
                   "alias.dest.test": [cname("real.dest.test")],
                   "real.dest.test": [aaaa("::1")]})
    await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    assert len(srv.received) == 1


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_at_once_with_a_report(h):
    srv = h.server()
    await h.start({"dest.test": [mx(0, "")]})
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    assert srv.connections == 0
    assert h.on_disk() == []
    [report] = h.store.delivered["alice@example.org"]
    msg, blocks = dsn_parts(report)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["Date"] and msg["Message-ID"]
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.10"
    assert "null MX" in blocks[1]["Diagnostic-Code"]
    assert qid


@pytest_twisted.ensureDeferred
async def test_one_of_three_rejected_gets_one_report(h):
    srv = h.server(Behaviour(rcpt={"carol@dest.test": "550 5.1.1 no such user"}))
    await h.start({"dest.test": [mx(10, "mx.dest.test")], "mx.dest.test": [a("127.0.0.1")]})
    await h.submit("alice@example.org", ["bob@dest.test", "carol@dest.test", "dave@dest.test"])
    await h.run()
    assert srv.transactions == 1  # one connection carries all three recipients
    assert srv.received[0].recipients == ["bob@dest.test", "dave@dest.test"]
    [report] = h.store.delivered["alice@example.org"]
    msg, blocks = dsn_parts(report)
    assert len(blocks) == 2
    assert blocks[1]["Final-Recipient"] == "rfc822; carol@dest.test"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Remote-MTA"] == "dns; mx.dest.test"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    headers = list(msg.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <m1@example.org>" in headers.get_payload(decode=True) or \
        "Message-ID: <m1@example.org>" in str(headers)
    assert h.on_disk() == []


@pytest_twisted.ensureDeferred
async def test_tempfail_then_accept_on_the_retry_schedule(h):
    srv = h.server(Behaviour(tempfail_first=2))
    await h.start({"dest.test": [a("127.0.0.1")]})
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    env = h.envelope(qid)
    assert env.recipients[0].status == PENDING
    assert env.recipients[0].next_attempt == 300.0
    assert env.recipients[0].last_reply == "451 4.3.0 try again later"
    await h.advance(299)
    assert srv.transactions == 1
    await h.advance(1)
    assert srv.transactions == 2
    assert h.envelope(qid).recipients[0].next_attempt == 300.0 + 600.0
    await h.advance(600)
    assert len(srv.received) == 1
    assert h.on_disk() == []
    assert h.store.delivered == {}


@pytest_twisted.ensureDeferred
async def test_dropped_mid_data_is_retried(h):
    srv = h.server(Behaviour(drop_after=20))
    await h.start({"dest.test": [a("127.0.0.1")]})
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    rcpt = h.envelope(qid).recipients[0]
    assert rcpt.status == PENDING and rcpt.last_reply.startswith("421 4.4.2")
    srv.behaviour.drop_after = None
    await h.advance(300)
    assert len(srv.received) == 1 and srv.received[0].data == MESSAGE


@pytest_twisted.ensureDeferred
async def test_slow_server_times_out_and_is_retried(h):
    srv = h.server(Behaviour(slow=True))
    await h.start({"dest.test": [a("127.0.0.1")]}, queue="command_timeout = 1")
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    rcpt = h.envelope(qid).recipients[0]
    assert rcpt.status == PENDING and "timeout" in rcpt.last_reply
    assert srv.received == []


@pytest_twisted.ensureDeferred
async def test_lifetime_expiry_fails_and_delay_notice_sent_once(h):
    h.server(Behaviour(tempfail_first=10**6))
    await h.start({"dest.test": [a("127.0.0.1")]},
                  queue="retry = [300, 600]\nlifetime = 3000\ndelay_warning = 900")
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    for _ in range(10):
        await h.advance(600)
    assert h.on_disk() == []
    delay, failure = h.store.delivered["alice@example.org"]
    _, dblocks = dsn_parts(delay)
    assert dblocks[1]["Action"] == "delayed" and "Will-Retry-Until" in dblocks[1]
    _, fblocks = dsn_parts(failure)
    assert fblocks[1]["Action"] == "failed" and fblocks[1]["Status"] == "4.4.7"
    assert qid


@pytest_twisted.ensureDeferred
async def test_restart_in_the_middle_never_redelivers_done_recipients(h):
    srv = h.server(Behaviour(rcpt={"carol@dest.test": "450 4.2.0 mailbox busy"}))
    await h.start({"dest.test": [a("127.0.0.1")]})
    qid = await h.submit("alice@example.org", ["bob@dest.test", "carol@dest.test"])
    await h.run()
    states = {r.address: r.status for r in h.envelope(qid).recipients}
    assert states == {"bob@dest.test": DELIVERED, "carol@dest.test": PENDING}
    await h.restart()
    srv.behaviour.rcpt = {}
    await h.advance(300)
    assert [r.recipients for r in srv.received] == [["bob@dest.test"], ["carol@dest.test"]]
    assert h.on_disk() == []


@pytest_twisted.ensureDeferred
async def test_dots_at_every_offset_around_16k_arrive_identical(h):
    srv = h.server()
    await h.start({"dest.test": [a("127.0.0.1")]})
    head = b"From: alice@example.org\nTo: bob@dest.test\nSubject: dots\n\n"
    bodies = []
    # stored offsets around 16 KiB, and (CRLF adds a byte per line) the offsets that
    # land around 16 KiB of the encoded stream
    for offset in range(16384 - 260, 16384 + 40):
        filler = b"x" * 70 + b"\n"
        pad = offset - len(head)
        body = (filler * (pad // len(filler)))
        body += b"y" * (pad % len(filler) - 1) + b"\n" if pad % len(filler) else b""
        bodies.append(head + body + b".\n..\n.x\n.\n" + b"z\n")
    for data in bodies:
        await h.submit("alice@example.org", ["bob@dest.test"], data)
    await h.run()
    assert sorted(r.data for r in srv.received) == sorted(bodies)


@pytest_twisted.ensureDeferred
async def test_failed_bounce_goes_to_postmaster_once_then_stops(h):
    srv = h.server(Behaviour(rcpt={"bob@dest.test": "550 5.1.1 no",
                                   "postmaster@example.org": "550 5.1.1 no"}))
    await h.start({"dest.test": [a("127.0.0.1")], "example.org": [a("127.0.0.1")]},
                  route=lambda address: None)
    await h.submit("", ["bob@dest.test"])
    await h.run()
    await h.run()
    rcpts = [c for c in srv.commands if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<bob@dest.test>", "RCPT TO:<postmaster@example.org>"]
    assert all(c == "MAIL FROM:<> SIZE=" + c.split("SIZE=")[1] for c in srv.commands
               if c.startswith("MAIL"))
    assert h.on_disk() == []
    assert h.store.delivered == {}


@pytest_twisted.ensureDeferred
async def test_remote_sender_gets_report_through_the_queue(h):
    srv = h.server(Behaviour(rcpt={"bob@dest.test": "550 5.1.1 no"}))
    await h.start({"dest.test": [a("127.0.0.1")], "sender.test": [a("127.0.0.1")]})
    await h.submit("zed@sender.test", ["bob@dest.test"])
    await h.run()
    await h.run()
    [report] = srv.received
    assert report.sender == "" and report.recipients == ["zed@sender.test"]
    _, blocks = dsn_parts(report.data)
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@dest.test"


@pytest_twisted.ensureDeferred
async def test_concurrent_destinations_and_failed_entry_state(h):
    srv = h.server(Behaviour(rcpt={"x@other.test": "554 5.7.1 denied"}))
    await h.start({"dest.test": [a("127.0.0.1")], "other.test": [a("127.0.0.1")]},
                  queue="concurrency = 1\nper_destination = 1")
    ids = [await h.submit("alice@example.org", ["bob@dest.test", "x@other.test"])
           for _ in range(3)]
    await h.run()
    assert len(srv.received) == 3
    assert len(h.store.delivered["alice@example.org"]) == 3
    assert h.on_disk() == []
    assert len(set(ids)) == 3


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_attempt_in_flight(h):
    h.server(Behaviour(slow=True))
    await h.start({"dest.test": [a("127.0.0.1")]}, queue="command_timeout = 1")
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    h.clock.advance(0)
    await defer.succeed(None)
    await h.queue.stopService()
    assert h.on_disk() == [qid]


@pytest_twisted.ensureDeferred
async def test_report_for_unknown_local_sender_goes_to_postmaster(h):
    h.server(Behaviour(rcpt={"bob@dest.test": "550 5.1.1 no"}))

    def route(address):
        if address == "postmaster@example.org":
            return ["postmaster@example.org"]
        return [] if address.endswith("@example.org") else None

    await h.start({"dest.test": [a("127.0.0.1")]}, route=route)
    await h.submit("ghost@example.org", ["bob@dest.test"])
    await h.run()
    assert list(h.store.delivered) == ["postmaster@example.org"]
    assert h.on_disk() == []


@pytest_twisted.ensureDeferred
async def test_finished_entry_left_by_a_crash_is_removed_at_start(h):
    srv = h.server()
    await h.start({"dest.test": [a("127.0.0.1")]})
    await h.queue.stopService()
    from mailhost.queue.spool import Envelope, Recipient
    env = Envelope(id="ABCDEF0123456789", sender="alice@example.org", created=0.0,
                   recipients=[Recipient("bob@dest.test", status=DELIVERED)])
    h.queue.spool.files.write_entry(env, [MESSAGE])
    await h.restart()
    await h.run()
    assert h.on_disk() == [] and srv.connections == 0


@pytest_twisted.ensureDeferred
async def test_nonexistent_domain_fails_permanently(h):
    await h.start({"dest.test": [a("127.0.0.1")]})
    await h.submit("alice@example.org", ["bob@nope.test"])
    await h.run()
    [report] = h.store.delivered["alice@example.org"]
    _, blocks = dsn_parts(report)
    assert blocks[1]["Status"] == "5.1.2"
    assert h.on_disk() == []


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_temporary(h):
    await h.start({"dest.test": [a("127.0.0.1")]})
    h.dns.authority.servfail.add(b"dest.test")
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    rcpt = h.envelope(qid).recipients[0]
    assert rcpt.status == PENDING and rcpt.last_reply.startswith("451 4.4.3")
    assert h.store.delivered == {}


@pytest_twisted.ensureDeferred
async def test_per_destination_limit_bounds_parallel_connections(h):
    srv = h.server()
    await h.start({"dest.test": [a("127.0.0.1")]}, queue="per_destination = 2")
    for _ in range(8):
        await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    assert len(srv.received) == 8
    assert 1 <= srv.max_active <= 2


@pytest_twisted.ensureDeferred
async def test_mx_pointing_at_ourselves_is_not_used(h):
    srv = h.server()
    await h.start({"dest.test": [mx(20, "mx.example.org"), mx(10, "backup.dest.test")],
                   "mx.example.org": [a("127.0.0.2")], "backup.dest.test": [a("127.0.0.1")],
                   "loop.test": [mx(10, "mx.example.org"), mx(20, "backup.dest.test")]})
    await h.submit("alice@example.org", ["bob@dest.test", "carol@loop.test"])
    await h.run()
    assert [r.recipients for r in srv.received] == [["bob@dest.test"]]
    [report] = h.store.delivered["alice@example.org"]
    assert b"5.4.6" in report and b"carol@loop.test" in report
    assert b"Final-Recipient: rfc822; bob@dest.test" not in report


@pytest_twisted.ensureDeferred
async def test_attempts_and_reports_are_logged_with_stable_keys(h):
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h.server(Behaviour(rcpt={"carol@dest.test": "550 5.1.1 no"}))
        await h.start({"dest.test": [mx(10, "mx.dest.test")],
                       "mx.dest.test": [a("127.0.0.1")]})
        qid = await h.submit("alice@example.org", ["bob@dest.test", "carol@dest.test"])
        await h.run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    attempts = {e["recipient"]: e for e in events if e.get("event") == "queue.attempt"}
    bob = attempts["bob@dest.test"]
    assert (bob["queue_id"], bob["mx"], bob["ip"], bob["tls"], bob["result"]) == (
        qid, "mx.dest.test", "127.0.0.1", False, "delivered")
    assert bob["code"] == 250 and "delay" in bob
    assert attempts["carol@dest.test"]["result"] == "failed"
    [report] = [e for e in events if e.get("event") == "queue.dsn"]
    assert (report["queue_id"], report["to"], report["recipients"]) == (
        qid, "alice@example.org", ["carol@dest.test"])
