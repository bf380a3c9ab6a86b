"""One SMTP mail transaction: its envelope, and the message streamed into the store
and/or the outbound queue.

The protocol hands over unstuffed lines (no line ends) in batches; they are written with
LF line ends into buffered writers (no per-line Deferreds, no fsync until commit). The
`250` after DATA is only sent once every commit has fired (DESIGN.md: durable or
nothing): the local copies first, then the queue entry; if the queue fails, the local
copies are removed again and the client gets a 4xx.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhost.address import Address
from mailhost.smtp.received import END_BODY, HEADER, HeaderScanner

log = Logger(namespace="mailhost.smtp")


@attrs.define
class Reply:
    """An SMTP reply: code, enhanced status (RFC 3463) and text."""

    code: int
    status: str
    text: str




@attrs.define
class Envelope:
    """MAIL FROM and the accepted RCPT TOs (RFC 5321 §3.3), with their routing."""

    sender: Address | None
    body: str | None = None
    recipients: list[str] = attrs.field(factory=list)
    mailboxes: dict[str, None] = attrs.field(factory=dict)
    forward: dict[str, None] = attrs.field(factory=dict)

    @property
    def sender_text(self) -> str:
        return str(self.sender) if self.sender is not None else ""


class MessageSink:
    """Writes one message into the store writer and/or the queue writer.

    Both writers buffer small messages and do their file work in a worker thread at
    commit (creating a file can wait for the file system journal, which must not stall
    the reactor). An error while opening or writing is kept and reported at the final
    dot (451, nothing delivered).
    """

    def __init__(self, ctx: Any, envelope: Envelope) -> None:
        self.ctx = ctx
        self.envelope = envelope
        self.store_writer: Any = None
        self.queue_writer: Any = None
        self.aborted = False
        self.error: Failure | None = None
        # the transaction is in flight from DATA to its final reply: shutdown waits for it
        self._in_flight: defer.Deferred = ctx.inflight.track(defer.Deferred())

    def _settled(self) -> None:
        if not self._in_flight.called:
            self._in_flight.callback(None)

    def open(self, store_prefix: bytes, queue_prefix: bytes) -> None:
        """Start opening the writers and write the trace headers; never raises."""
        env = self.envelope
        try:
            if env.forward:
                params = {"body": env.body, "ret": None, "envid": None}
                self.queue_writer = self.ctx.queue.open_entry(
                    env.sender_text, list(env.forward), params)
                self.queue_writer.write(queue_prefix)
        except Exception:  # noqa: BLE001 - reported at the final dot
            self.error = Failure()
            return
        if not env.mailboxes:
            return

        try:  # cheap: the store creates the file at commit, in a worker thread
            self.store_writer = self.ctx.store.open_delivery(list(env.mailboxes))
            self.store_writer.write(store_prefix)
        except Exception:  # noqa: BLE001 - disk trouble: 451 at the final dot
            if self.store_writer is not None:
                self.store_writer.abort()
                self.store_writer = None
            self.error = Failure()

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self.store_writer is not None:
                self.store_writer.write(data)
            if self.queue_writer is not None:
                self.queue_writer.write(data)
        except Exception:  # noqa: BLE001 - disk full, I/O error: 451 at the final dot
            log.failure("writing a message failed")
            self.error = Failure()

    def abort(self) -> None:
        self._settled()
        self.aborted = True
        for writer in (self.store_writer, self.queue_writer):
            if writer is not None:
                try:
                    writer.abort()
                except Exception:  # noqa: BLE001 - best effort cleanup
                    log.failure("aborting a message writer failed")
        self.store_writer = self.queue_writer = None

    def commit(self) -> defer.Deferred:
        """Deferred -> (stored paths, queue id); fails if any copy could not be made."""

        def settled(result: Any) -> Any:
            self._settled()
            return result

        return self._commit().addBoth(settled)

    @defer.inlineCallbacks
    def _commit(self):
        if self.error is not None:
            error = self.error
            self.abort()
            error.raiseException()
        stored: list[Path] = []
        queue_id = None
        store_writer, queue_writer = self.store_writer, self.queue_writer
        self.store_writer = self.queue_writer = None
        try:
            if store_writer is not None:
                stored = list((yield store_writer.commit()) or [])
                store_writer = None
        except Exception:
            if queue_writer is not None:
                queue_writer.abort()
            raise
        if queue_writer is not None:
            try:
                queue_id = yield queue_writer.commit()
            except Exception:
                if stored:
                    yield threads.deferToThreadPool(
                        self.ctx.reactor, self.ctx.reactor.getThreadPool(), _unlink_all,
                        stored)
                raise
        return stored, queue_id


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


class MessageStream:
    """The DATA phase of a transaction: size, line-length and header bookkeeping.

    `add_lines` gets dot-unstuffed lines; `extra_headers` (a callable) supplies header
    lines to insert at the end of the header section (submission's Date/Message-ID).
    """

    def __init__(self, sink: MessageSink, size_limit: int,
                 extra_headers: Any = None) -> None:
        self.sink = sink
        self.size_limit = size_limit
        self.extra_headers = extra_headers
        self.scanner = HeaderScanner()
        self.received = 0  # bytes received in DATA (what the size limit counts)
        self.written = 0
        self.failure: Reply | None = None

    def fail(self, reply: Reply) -> None:
        """Refuse the message at the final dot; stop writing now."""
        if self.failure is None:
            self.failure = reply
            self.sink.abort()

    def count(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received > self.size_limit:
            self.fail(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))

    def add_lines(self, lines: list[bytes]) -> None:
        if self.failure is not None or not lines:
            return
        if self.scanner.in_headers:
            lines = self._scan(lines)
        data = b"\n".join(lines) + b"\n"
        self.sink.write(data)  # errors are kept by the sink: 451 at the final dot
        self.written += len(data)

    def _scan(self, lines: list[bytes]) -> list[bytes]:
        scanner = self.scanner
        for i, line in enumerate(lines):
            kind = scanner.scan(line)
            if kind == HEADER:
                continue
            insert = self._header_end()
            if kind == END_BODY:
                insert.append(b"")  # a body line came first: keep the headers apart
            return lines[:i] + insert + lines[i:]
        return lines

    def _header_end(self) -> list[bytes]:
        if self.extra_headers is None:
            return []
        return list(self.extra_headers(self.scanner))

    def finish(self) -> None:
        """At the final dot: close a header section that never ended."""
        if self.failure is None and self.scanner.in_headers:
            self.scanner.in_headers = False
            extra = self._header_end()
            if extra:
                data = b"\n".join(extra) + b"\n"
                self.sink.write(data)
                self.written += len(data)
