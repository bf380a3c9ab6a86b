"""Streaming a Maildir file onto a POP3 connection (RFC 1939 §3 multi-line responses).

Files on disk have LF line ends; the wire wants CRLF, a leading "." doubled, and the
response ended by CRLF "." CRLF. `WireEncoder` does both conversions chunk by chunk with
the state carried across chunk boundaries (a CR at the end of one chunk, a "." at the
start of the next), so a 50 MB message never has to be in memory at once. `TopLimiter`
cuts a message after its header and `n` body lines (RFC 1939 §7 TOP). `MessageSender` is
a pull producer reading the file in chunks as the transport drains.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from twisted.internet import defer, interfaces
from zope.interface import implementer

from mailhost.wire import DotStuffer

CHUNK = 1024 * 1024


#: the POP3 name of the shared encoder (RFC 1939 §3 byte-stuffing)
WireEncoder = DotStuffer


class TopLimiter:
    """Passes the header, the blank line and `lines` body lines, then nothing.

    Works on raw file bytes (before `WireEncoder`) and keeps its place across chunks.
    """

    def __init__(self, lines: int) -> None:
        self._left = lines
        self._in_header = True
        self._line_len = 0  # bytes of the current line seen so far
        self._line_first = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        if not self._in_header and self._left <= 0:
            self.done = True
            return b""
        pos = 0
        while True:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                if pos < len(chunk):
                    if self._line_len == 0:
                        self._line_first = chunk[pos:pos + 1]
                    self._line_len += len(chunk) - pos
                return chunk
            if self._line_len == 0 and nl > pos:
                self._line_first = chunk[pos:pos + 1]
            length = self._line_len + nl - pos
            self._line_len = 0
            pos = nl + 1
            if self._in_header:
                if length == 0 or (length == 1 and self._line_first == b"\r"):
                    self._in_header = False  # RFC 5322 §2.1: the header ends here
                    if self._left <= 0:
                        self.done = True
                        return chunk[:pos]
                self._line_first = b""
                continue
            self._left -= 1
            if self._left <= 0:
                self.done = True
                return chunk[:pos]


@implementer(interfaces.IPullProducer)
class MessageSender:
    """Pull producer: file -> optional TopLimiter -> WireEncoder -> transport.

    `deferred` fires with the number of bytes written (excluding the terminator, which
    the protocol writes) or fails if the file cannot be read; it fails with
    ConnectionDone-like `SendAborted` when the transport stops the producer.
    """

    def __init__(self, fp: BinaryIO, transport: Any, top: int | None = None,
                 on_progress: Any = None) -> None:
        self.fp = fp
        self.transport = transport
        self.encoder = WireEncoder()
        self.limiter = TopLimiter(top) if top is not None else None
        self.on_progress = on_progress
        self.sent = 0
        self.deferred: defer.Deferred = defer.Deferred()

    def start(self) -> defer.Deferred:
        self.transport.registerProducer(self, False)
        return self.deferred

    def resumeProducing(self) -> None:
        if self.fp is None:
            return
        try:
            chunk = self.fp.read(CHUNK)
        except OSError as e:
            self._finish(e)
            return
        if self.on_progress is not None:
            self.on_progress()
        if chunk and self.limiter is not None:
            chunk = self.limiter.feed(chunk)
            if self.limiter.done:
                out = self.encoder.encode(chunk) + self.encoder.finish()
                self._write(out)
                self._finish(None)
                return
        if not chunk:
            self._write(self.encoder.finish())
            self._finish(None)
            return
        self._write(self.encoder.encode(chunk))

    def _write(self, data: bytes) -> None:
        if data:
            self.sent += len(data)
            self.transport.write(data)

    def _finish(self, error: Exception | None) -> None:
        fp, self.fp = self.fp, None
        if fp is None:
            return
        fp.close()
        self.transport.unregisterProducer()
        if error is None:
            self.deferred.callback(self.sent)
        else:
            self.deferred.errback(error)

    def stopProducing(self) -> None:
        fp, self.fp = self.fp, None
        if fp is not None:
            fp.close()
            self.deferred.errback(SendAborted("connection closed during transfer"))


class SendAborted(Exception):
    """The transport stopped the transfer (the client went away)."""
