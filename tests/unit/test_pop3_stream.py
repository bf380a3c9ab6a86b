"""Wire encoding of POP3 message bodies, the TOP cut, and the maildrop lock registry."""

from __future__ import annotations

import io

import pytest
from twisted.internet.testing import StringTransport

from mailhost.pop3_mailbox import SessionLocks
from mailhost.pop3_stream import MessageSender, TopLimiter, WireEncoder


def reference(data: bytes) -> bytes:
    """Whole-message encoding: CRLF line ends, stuffed dots, ends with CRLF."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if not lines:
        return b""
    out = [(b"." + ln if ln.startswith(b".") else ln) for ln in lines]
    return b"\r\n".join(out) + b"\r\n"


def encode_in_chunks(data: bytes, cuts: list[int]) -> bytes:
    enc = WireEncoder()
    out, prev = [], 0
    for cut in cuts + [len(data)]:
        out.append(enc.encode(data[prev:cut]))
        prev = cut
    out.append(enc.finish())
    return b"".join(out)


SAMPLES = [
    b"",
    b"a\n",
    b".\n",
    b"..\n",
    b"Subject: x\n\n.hidden\n.\nend",
    b"crlf\r\n.dot\r\nmixed\n.x\r\n",
    b"no newline at all",
    b"\n\n.\n\n",
    b"bare\rcr.\n\r.\n",
    b"ends with cr\r",
]


@pytest.mark.parametrize("data", SAMPLES)
def test_every_single_split_matches_whole_encoding(data):
    want = reference(data) if b"\r" not in data.replace(b"\r\n", b"") else None
    whole = encode_in_chunks(data, [])
    if want is not None:
        assert whole == want
    for cut in range(len(data) + 1):
        assert encode_in_chunks(data, [cut]) == whole, cut


@pytest.mark.parametrize("data", SAMPLES)
def test_byte_by_byte_matches_whole_encoding(data):
    assert encode_in_chunks(data, list(range(1, len(data)))) == encode_in_chunks(data, [])


def test_lone_dot_line_is_stuffed_and_never_ends_the_response():
    out = encode_in_chunks(b"a\n.\nb\n", [2])
    assert out == b"a\r\n..\r\nb\r\n"
    assert b"\r\n.\r\n" not in out


def test_bare_cr_is_kept_and_counted_like_the_wire_size():
    data = b"x\ry\n"
    assert encode_in_chunks(data, []) == b"x\ry\r\n"


def top(data: bytes, n: int, cuts: list[int]) -> bytes:
    lim = TopLimiter(n)
    out, prev = [], 0
    for cut in cuts + [len(data)]:
        out.append(lim.feed(data[prev:cut]))
        prev = cut
        if lim.done:
            break
    return b"".join(out)


MESSAGE = b"From: a\nSubject: b\n\nbody 1\nbody 2\nbody 3\n"


@pytest.mark.parametrize("n,want", [
    (0, b"From: a\nSubject: b\n\n"),
    (1, b"From: a\nSubject: b\n\nbody 1\n"),
    (2, b"From: a\nSubject: b\n\nbody 1\nbody 2\n"),
    (10, MESSAGE),
])
def test_top_cuts_after_header_and_n_lines_at_any_split(n, want):
    for cut in range(len(MESSAGE) + 1):
        assert top(MESSAGE, n, [cut]) == want, cut
    assert top(MESSAGE, n, list(range(1, len(MESSAGE)))) == want


def test_top_with_crlf_blank_line_and_no_body():
    msg = b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
    for cut in range(len(msg) + 1):
        assert top(msg, 0, [cut]) == b"A: 1\r\nB: 2\r\n\r\n"
    assert top(b"A: 1\nB: 2\n", 5, []) == b"A: 1\nB: 2\n"


def test_sender_streams_in_chunks_and_fires_with_octets(monkeypatch):
    import mailhost.pop3_stream as stream

    monkeypatch.setattr(stream, "CHUNK", 7)
    data = b"line\n.dot\n" * 20
    transport = StringTransport()
    progress = []
    sender = MessageSender(io.BytesIO(data), transport, on_progress=lambda: progress.append(1))
    done = []
    sender.start().addCallback(done.append)
    assert transport.producer is sender
    while not done:
        sender.resumeProducing()
    assert transport.value() == reference(data)
    assert done == [len(reference(data))]
    assert transport.producer is None and len(progress) > 10


def test_sender_stop_producing_fails_the_deferred():
    transport = StringTransport()
    fp = io.BytesIO(b"x\n" * 10)
    sender = MessageSender(fp, transport)
    failures = []
    sender.start().addErrback(failures.append)
    sender.stopProducing()
    assert fp.closed and len(failures) == 1


def test_session_locks_are_exclusive_per_key():
    locks = SessionLocks()
    assert locks.acquire("a") and not locks.acquire("a") and locks.acquire("b")
    locks.release("a")
    assert locks.acquire("a") and locks.held("b")


def test_wire_size_from_name_and_fallback(tmp_path):
    from mailhost.store.index import MessageEntry

    (tmp_path / "new").mkdir()
    assert MessageEntry(1, "1.M1.h,S=10,W=12", "new", "", folder=tmp_path).wire_size == 12
    assert MessageEntry(1, "1.M1.h,W=7", "new", "", folder=tmp_path).wire_size == 7
    (tmp_path / "new" / "2.M2.h").write_bytes(b"a\nb\r\n")
    migrated = MessageEntry(2, "2.M2.h", "new", "", folder=tmp_path)
    assert migrated.wire_size == 6
    (tmp_path / "new" / "2.M2.h").unlink()
    assert migrated.wire_size == 6  # counted once, then kept
