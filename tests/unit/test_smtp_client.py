"""The outbound client's DATA encoding and reply handling."""

from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailhost.smtp.client import DataEncoder, Reply, SMTPReplyProtocol, encode_data


def unstuff(wire: bytes) -> bytes:
    """What a receiver reconstructs (RFC 5321 §4.5.2), asserting a single terminator."""
    assert wire.endswith(b"\r\n.\r\n")
    lines = wire[:-5].split(b"\r\n")
    assert b"." not in lines, "a lone dot would end DATA early"
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\n" for ln in lines)


def test_dot_at_start_and_lone_dots():
    assert encode_data(b".\n..\nx\n") == b"..\r\n...\r\nx\r\n.\r\n"


def test_missing_final_newline_is_added():
    assert encode_data(b"abc") == b"abc\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16384])
def test_chunked_encoding_is_correct_at_every_boundary(chunk):
    message = b"".join(b"x" * i + b"\n.\n.." + b"y" * (i % 5) + b"\n" for i in range(60))
    enc = DataEncoder()
    wire = b"".join(enc.encode(message[i:i + chunk])
                    for i in range(0, len(message), chunk)) + enc.finish()
    assert wire == encode_data(message)
    assert unstuff(wire) == message


def test_dot_line_at_every_offset_around_16k():
    for offset in range(16384 - 8, 16384 + 8):
        message = b"a" * (offset - 1) + b"\n.\n" + b"b\n"
        enc = DataEncoder()
        wire = enc.encode(message[:16384]) + enc.encode(message[16384:]) + enc.finish()
        assert unstuff(wire) == message


def test_crlf_input_split_between_chunks():
    enc = DataEncoder()
    wire = enc.encode(b"a\r") + enc.encode(b"\n.b\r\n") + enc.finish()
    assert wire == b"a\r\n..b\r\n.\r\n"


def test_reply_enhanced_status():
    assert Reply(550, ("5.1.1 no such user",)).status == "5.1.1"
    assert Reply(550, ("no such user",)).status == "5.0.0"
    assert Reply(451, ("5.1.1 mismatched class",)).enhanced is None
    assert str(Reply(250, ("a", "b"))) == "250 a b"


def _proto():
    clock = task.Clock()
    proto = SMTPReplyProtocol(clock, timeout=30)
    proto.makeConnection(StringTransport())
    return clock, proto


def test_multiline_reply_and_order():
    clock, proto = _proto()
    got = []
    proto.next_reply().addCallback(got.append)
    proto.dataReceived(b"250-first\r\n250-SIZE 10\r\n250 last\r\n220 next\r\n")
    assert got == [Reply(250, ("first", "SIZE 10", "last"))]
    proto.next_reply().addCallback(got.append)
    assert got[1] == Reply(220, ("next",))


def test_timeout_fails_the_command_and_aborts():
    clock, proto = _proto()
    errors = []
    proto.command("NOOP").addErrback(errors.append)
    clock.advance(29)
    assert not errors
    clock.advance(1)
    assert errors and "timeout" in str(errors[0].value)
    assert proto.transport.disconnecting or proto.transport.disconnected


def test_malformed_reply_line_aborts():
    clock, proto = _proto()
    errors = []
    proto.next_reply().addErrback(errors.append)
    proto.dataReceived(b"hello there\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    assert errors and "malformed" in str(errors[0].value)


def test_endless_multiline_reply_is_cut_off():
    clock, proto = _proto()
    errors = []
    proto.next_reply().addErrback(errors.append)
    proto.dataReceived(b"250-x\r\n" * 500)
    proto.connectionLost(Failure(ConnectionDone()))
    assert errors and "too many lines" in str(errors[0].value)
