"""`mailhost queue ...` helpers against a running queue: the server notices changes."""

from __future__ import annotations

import io

import pytest_twisted

from mailhost.queue import cli as qcli
from tests.functional.queue_helpers import Behaviour, Harness, a


@pytest_twisted.async_yield_fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.stop()


async def _deferred_entry(h: Harness) -> tuple[str, object]:
    srv = h.server(Behaviour(tempfail_first=1))
    await h.start({"dest.test": [a("127.0.0.1")]}, queue="scan_interval = 5")
    qid = await h.submit("alice@example.org", ["bob@dest.test"])
    await h.run()
    return qid, srv


async def _scan(h: Harness) -> None:
    h.clock.advance(h.config.queue.scan_interval)  # the periodic scan starts
    await h.run()  # waits for it and for whatever it started


@pytest_twisted.ensureDeferred
async def test_list_and_show(h):
    qid, _ = await _deferred_entry(h)
    out = io.StringIO()
    assert qcli.queue_list(h.config, out) == 0
    text = out.getvalue()
    assert qid in text and "<alice@example.org>" in text and "<bob@dest.test>" in text
    assert "pending" in text and "451 4.3.0 try again later" in text
    assert "1 entries, 1 recipients pending" in text
    out = io.StringIO()
    assert qcli.queue_show(h.config, qid.lower(), out) == 0
    assert "Subject: hello" in out.getvalue()
    out = io.StringIO()
    assert qcli.queue_show(h.config, "0" * 16, out) == 1
    assert "no queue entry" in out.getvalue()
    assert qcli.queue_show(h.config, "../etc", io.StringIO()) == 1


@pytest_twisted.ensureDeferred
async def test_flush_is_noticed_by_the_running_server(h):
    qid, srv = await _deferred_entry(h)
    assert qcli.queue_flush(h.config, qid, io.StringIO()) == 0
    await _scan(h)  # 5 s, long before the 300 s retry
    assert len(srv.received) == 1
    assert h.on_disk() == []


@pytest_twisted.ensureDeferred
async def test_flush_all(h):
    qid, srv = await _deferred_entry(h)
    assert qcli.queue_flush(h.config, None, io.StringIO()) == 0
    await _scan(h)
    assert len(srv.received) == 1


@pytest_twisted.ensureDeferred
async def test_delete_is_noticed_and_never_delivered(h):
    qid, srv = await _deferred_entry(h)
    assert qcli.queue_delete(h.config, qid, io.StringIO()) == 0
    assert h.on_disk() == []
    await _scan(h)
    assert qid not in h.queue.scheduler.entries
    await h.advance(600)
    assert srv.received == []
    assert qcli.queue_delete(h.config, qid, io.StringIO()) == 1


@pytest_twisted.ensureDeferred
async def test_bounce_fails_pending_and_reports(h):
    qid, srv = await _deferred_entry(h)
    assert qcli.queue_bounce(h.config, qid, io.StringIO()) == 0
    await _scan(h)
    assert h.on_disk() == []
    [report] = h.store.delivered["alice@example.org"]
    assert b"Action: failed" in report and b"bounced by the administrator" in report
    assert srv.received == []


@pytest_twisted.ensureDeferred
async def test_requests_left_while_stopped_are_done_at_start(h):
    qid, srv = await _deferred_entry(h)
    await h.queue.stopService()
    assert qcli.queue_flush(h.config, qid, io.StringIO()) == 0
    await h.restart()
    await _scan(h)
    assert len(srv.received) == 1
