"""RFC 3464 reports: structure, fields, what is returned."""

from __future__ import annotations

import email
from email import policy

from mailhost.queue import dsn
from mailhost.queue.spool import FAILED, Envelope, Recipient

ORIGINAL = b"From: a@example.org\nSubject: hi\nMessage-ID: <x@example.org>\n\nsecret body\n"


def _env(**kw) -> Envelope:
    return Envelope(id="0" * 16, sender="a@example.org", created=1000.0,
                    recipients=[Recipient("b@dest.test", status=FAILED, status_code="5.1.1",
                                          last_reply="550 5.1.1 unknown",
                                          remote_mta="mx.dest.test", last_attempt=1100.0,
                                          orcpt="rfc822;B@dest.test")], **kw)


def _parse(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


def test_failure_report_structure():
    env = _env(envid="E1")
    raw = dsn.build_report("mx.example.org", env, env.recipients, dsn.FAILED, ORIGINAL, 2000.0)
    msg = _parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert b"\nTo: <a@example.org>\n" in raw
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] and msg["Message-ID"].endswith("@mx.example.org>")
    assert msg.get_content_type() == "multipart/report"
    human, status, returned = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "550 5.1.1 unknown" in human.get_content()
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; mx.example.org"
    assert per_msg["Original-Envelope-Id"] == "E1"
    assert per_rcpt["Original-Recipient"] == "rfc822;B@dest.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; b@dest.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"secret body" not in raw
    assert b"Message-ID: <x@example.org>" in raw


def test_ret_full_returns_the_message():
    env = _env(ret="FULL")
    raw = dsn.build_report("h.test", env, env.recipients, dsn.FAILED, ORIGINAL, 2000.0)
    returned = list(_parse(raw).iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"secret body" in raw


def test_delay_report():
    env = _env()
    raw = dsn.build_report("h.test", env, env.recipients, dsn.DELAYED, ORIGINAL, 5000.0,
                           will_retry_until=9000.0)
    per_rcpt = list(_parse(raw).iter_parts())[1].get_payload()[1]
    assert per_rcpt["Action"] == "delayed"
    assert "Will-Retry-Until" in per_rcpt
    assert b"Delayed Mail" in raw


def test_internationalised_recipient_uses_utf8_type():
    env = _env()
    env.recipients[0].address = "jörg@dest.test"
    raw = dsn.build_report("h.test", env, env.recipients, dsn.FAILED, ORIGINAL, 2000.0)
    assert "Final-Recipient: utf-8; jörg@dest.test".encode() in raw
    assert b"message/global-delivery-status" in raw


def test_notify():
    r = Recipient("x@y.test")
    assert dsn.wants(r, "FAILURE") and dsn.wants(r, "DELAY") and not dsn.wants(r, "SUCCESS")
    r.notify = "NEVER"
    assert not dsn.wants(r, "FAILURE")
    r.notify = "SUCCESS,DELAY"
    assert not dsn.wants(r, "FAILURE") and dsn.wants(r, "DELAY")
