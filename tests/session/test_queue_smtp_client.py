"""The outbound SMTP client on a StringTransport: exact commands, per-recipient results."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailhost.smtp.client import HostFailure, SMTPReplyProtocol, Transaction, run_transaction


class Session:
    def __init__(self, txn: Transaction) -> None:
        self.clock = task.Clock()
        self.transport = StringTransport()
        self.proto = SMTPReplyProtocol(self.clock, timeout=60)
        self.proto.makeConnection(self.transport)
        self.result = defer.ensureDeferred(run_transaction(self.proto, txn))
        self.seen: list[str] = []

    def commands(self) -> list[str]:
        """Commands written since the last call (DATA payload pumped through)."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        raw = self.transport.value().decode()
        self.transport.clear()
        return [line for line in raw.split("\r\n") if line]

    def reply(self, *lines: str) -> list[str]:
        self.proto.dataReceived("".join(line + "\r\n" for line in lines).encode())
        return self.commands()


def _txn(**kw) -> Transaction:
    base = dict(helo="mx.example.org", sender="a@example.org",
                recipients=["b@dest.test", "c@dest.test"], data=b"Subject: x\n\nhi\n",
                tls="none")
    base.update(kw)
    return Transaction(**base)


def test_helo_fallback_and_per_recipient_results():
    s = Session(_txn())
    assert s.reply("220 hi") == ["EHLO mx.example.org"]
    assert s.reply("502 no EHLO here") == ["HELO mx.example.org"]
    assert s.reply("250 hello") == ["MAIL FROM:<a@example.org>"]
    assert s.reply("250 ok") == ["RCPT TO:<b@dest.test>"]
    assert s.reply("550 5.1.1 unknown") == ["RCPT TO:<c@dest.test>"]
    assert s.reply("250 ok") == ["DATA"]
    assert s.reply("354 go") == ["Subject: x", "hi", "."]
    assert s.reply("250 2.0.0 queued") == ["QUIT"]
    result = s.result.result
    assert str(result.replies["b@dest.test"]) == "550 5.1.1 unknown"
    assert str(result.replies["c@dest.test"]) == "250 2.0.0 queued"
    assert result.tls is False


def test_mail_and_rcpt_parameters_follow_extensions():
    s = Session(_txn(recipients=["b@dest.test"], smtputf8=True, eightbit=True, ret="HDRS",
                     envid="ENV1", dsn={"b@dest.test": ("FAILURE", "rfc822;b@dest.test")}))
    s.reply("220 hi")
    cmds = s.reply("250-x", "250-SIZE 1000", "250-8BITMIME", "250-SMTPUTF8", "250 DSN")
    assert cmds == ["MAIL FROM:<a@example.org> SIZE=18 BODY=8BITMIME SMTPUTF8 RET=HDRS "
                    "ENVID=ENV1"]
    assert s.reply("250 ok") == ["RCPT TO:<b@dest.test> NOTIFY=FAILURE "
                                 "ORCPT=rfc822;b@dest.test"]


def test_smtputf8_needed_but_not_offered_fails_every_recipient():
    s = Session(_txn(smtputf8=True))
    s.reply("220 hi")
    assert s.reply("250-x", "250 8BITMIME") == ["QUIT"]
    replies = s.result.result.replies
    assert {str(r) for r in replies.values()} == {
        "553 5.6.7 the next hop does not support SMTPUTF8"}


def test_tempfail_at_mail_is_a_host_failure():
    s = Session(_txn())
    s.reply("220 hi")
    s.reply("250 x")
    assert s.reply("451 4.3.0 later") == ["QUIT"]
    failure = s.result.result
    assert failure.check(HostFailure) and failure.value.reply.code == 451
    s.result.addErrback(lambda f: None)


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 5.7.1 go away"])
def test_bad_greeting_is_a_host_failure(greeting):
    s = Session(_txn())
    assert s.reply(greeting) == ["QUIT"]
    assert s.result.result.check(HostFailure)
    s.result.addErrback(lambda f: None)


def test_connection_lost_after_data_is_temporary_for_accepted_only():
    s = Session(_txn())
    s.reply("220 hi")
    s.reply("250 x")
    s.reply("250 ok")
    s.reply("550 5.1.1 no")
    s.reply("250 ok")
    s.reply("354 go")
    s.proto.connectionLost(Failure(ConnectionDone()))
    replies = s.result.result.replies
    assert replies["b@dest.test"].code == 550
    assert str(replies["c@dest.test"]).startswith("421 4.4.2 connection lost")


def test_required_tls_not_offered():
    s = Session(_txn(tls="required"))
    s.reply("220 hi")
    assert s.reply("250 x") == ["QUIT"]
    assert "4.7.10" in str(s.result.result.value.reply)
    s.result.addErrback(lambda f: None)


def test_starttls_refused_is_a_host_failure():
    s = Session(_txn(tls="opportunistic"))
    s.reply("220 hi")
    assert s.reply("250-x", "250 STARTTLS") == ["STARTTLS"]
    assert s.reply("454 4.7.0 not now") == ["QUIT"]
    assert s.result.result.check(HostFailure)
    s.result.addErrback(lambda f: None)


def test_pipelining_sends_mail_rcpts_and_data_together():
    s = Session(_txn())
    s.reply("220 hi")
    assert s.reply("250-x", "250 PIPELINING") == [
        "MAIL FROM:<a@example.org>", "RCPT TO:<b@dest.test>", "RCPT TO:<c@dest.test>", "DATA"]
    assert s.reply("250 ok", "250 ok", "451 4.2.1 later", "354 go") == ["Subject: x", "hi", "."]
    assert s.reply("250 2.0.0 queued") == ["QUIT"]
    replies = s.result.result.replies
    assert replies["b@dest.test"].code == 250 and replies["c@dest.test"].code == 451


def test_pipelined_mail_failure_consumes_every_reply_before_quit():
    s = Session(_txn())
    s.reply("220 hi")
    s.reply("250-x", "250 PIPELINING")
    assert s.reply("550 5.7.1 sender refused", "503 5.5.1 no MAIL", "503 5.5.1 no MAIL",
                   "554 5.5.1 no valid recipients") == ["QUIT"]
    replies = s.result.result.replies
    assert {str(r) for r in replies.values()} == {"550 5.7.1 sender refused"}


def test_pipelined_data_accepted_without_recipients_is_ended_empty():
    s = Session(_txn(recipients=["b@dest.test"]))
    s.reply("220 hi")
    s.reply("250-x", "250 PIPELINING")
    assert s.reply("250 ok", "550 5.1.1 no", "354 go") == ["."]
    assert s.reply("554 5.5.1 no valid recipients") == ["QUIT"]
    assert s.result.result.replies["b@dest.test"].code == 550


def test_250_to_data_is_not_a_delivery():
    """Only 354 starts the body; a 250 there means nothing was sent (RFC 5321 §4.1.1.4)."""
    s = Session(_txn(recipients=["b@dest.test"]))
    s.reply("220 hi")
    assert s.reply("250 hello") == ["MAIL FROM:<a@example.org>"]
    assert s.reply("250 ok") == ["RCPT TO:<b@dest.test>"]
    assert s.reply("250 ok") == ["DATA"]
    assert s.reply("250 2.0.0 taken anyway") == ["QUIT"]
    reply = s.result.result.replies["b@dest.test"]
    assert reply.code == 451 and not reply.positive


def test_plaintext_after_the_starttls_reply_is_refused():
    """Replies injected after 220 in plaintext must not be read under TLS."""
    s = Session(_txn(tls="opportunistic"))
    s.reply("220 hi")
    assert s.reply("250-x", "250 STARTTLS") == ["STARTTLS"]
    s.reply("220 go ahead", "250-injected", "250 AUTH PLAIN")
    assert s.result.result.check(HostFailure)
    assert "after its STARTTLS reply" in str(s.result.result.value.reply)
    s.result.addErrback(lambda f: None)
