"""Spool files: JSON envelopes, atomic writes, crash leftovers, control requests."""

from __future__ import annotations

import pytest_twisted

from mailhost.queue.scheduler import retry_delay
from mailhost.queue.spool import (
    SPILL_SIZE,
    Envelope,
    Recipient,
    Spool,
    SpoolFiles,
    new_queue_id,
    valid_queue_id,
)


def _env() -> Envelope:
    return Envelope(id=new_queue_id(), sender="", created=5.0,
                    recipients=[Recipient("a@b.test", notify="NEVER")], ret="HDRS")


def test_envelope_round_trip_is_json():
    env = _env()
    raw = env.to_json()
    assert raw.startswith(b"{") and b'"version": 1' in raw
    assert Envelope.from_json(raw) == env


def test_write_entry_then_list_and_remove(tmp_path):
    files = SpoolFiles(tmp_path / "queue")
    files.ensure()
    env = _env()
    files.write_entry(env, [b"Subject: x\n", b"\nbody\n"])
    assert list(files.ids()) == [env.id]
    assert files.read_data(env.id) == b"Subject: x\n\nbody\n"
    assert list(files.tmp.iterdir()) == []
    assert files.remove(env.id)
    assert list(files.ids()) == [] and not files.remove(env.id)


def test_save_after_delete_does_not_resurrect(tmp_path):
    files = SpoolFiles(tmp_path)
    files.ensure()
    env = _env()
    files.write_entry(env, [b"x\n"])
    files.remove(env.id)
    assert files.save_envelope(env) is False
    assert list(files.ids()) == []


def test_orphans_are_cleaned(tmp_path):
    files = SpoolFiles(tmp_path)
    files.ensure()
    (files.tmp / "half.tmp").write_bytes(b"x")
    files.data_path("A" * 16).write_bytes(b"no envelope")
    removed = files.clean_orphans()
    assert sorted(removed) == sorted(["half.tmp", "A" * 16 + ".msg"])


def test_control_requests(tmp_path):
    files = SpoolFiles(tmp_path)
    qid = new_queue_id()
    files.request("flush", "ALL")
    files.request("bounce", qid)
    assert sorted(files.take_requests()) == [("bounce", qid), ("flush", "ALL")]
    assert files.take_requests() == []


def test_queue_ids():
    assert valid_queue_id(new_queue_id())
    assert not valid_queue_id("../../etc/passwd")


def test_retry_schedule_grows_and_caps():
    schedule = (300, 600, 1200, 2400, 4800, 9600, 14400)
    assert [retry_delay(schedule, n) for n in (1, 2, 3, 7, 8, 50)] == [
        300, 600, 1200, 14400, 14400, 14400]


@pytest_twisted.inlineCallbacks
def test_large_entry_spills_to_disk_and_commits_byte_identical(tmp_path):
    from twisted.internet import reactor

    committed = []
    spool = Spool(tmp_path / "queue", reactor, on_commit=committed.append)
    spool.files.ensure()
    writer = spool.open_entry(_env())
    line = b"0123456789" * 10 + b"\n"
    for _ in range(4000):  # ~400 KiB, past SPILL_SIZE
        writer.write(line)
    assert writer._file is not None and writer._buffered <= SPILL_SIZE
    qid = yield writer.commit()
    assert spool.files.read_data(qid) == line * 4000
    assert list(spool.files.tmp.iterdir()) == []
    assert committed and committed[0].size == len(line) * 4000


def test_aborted_spilled_entry_leaves_nothing(tmp_path):
    from twisted.internet import reactor

    spool = Spool(tmp_path / "queue", reactor)
    spool.files.ensure()
    writer = spool.open_entry(_env())
    writer.write(b"x" * (SPILL_SIZE + 1))
    writer.abort()
    assert list(spool.files.tmp.iterdir()) == []
    assert list(spool.files.ids()) == []


def test_startup_cleanup_spares_entries_committed_meanwhile(tmp_path):
    import os

    files = SpoolFiles(tmp_path)
    files.ensure()
    old_tmp, new_tmp = files.tmp / "old.tmp", files.tmp / "new.tmp"
    for p in (old_tmp, new_tmp):
        p.write_bytes(b"x")
    os.utime(old_tmp, (1000, 1000))
    lonely = files.envelope_path("B" * 16)  # an envelope whose data file is gone
    lonely.write_bytes(b"{}")
    os.utime(lonely, (1000, 1000))
    being_committed = files.data_path("C" * 16)  # data renamed, envelope not yet written
    being_committed.write_bytes(b"data")
    removed = files.clean_orphans(older_than=2000)
    assert sorted(removed) == sorted(["old.tmp", "B" * 16 + ".json"])
    assert new_tmp.exists() and being_committed.exists()
