"""The queue spool: one data file plus one JSON envelope per message, written atomically.

Layout of `<data_dir>/queue/`:

    <id>.msg        the message bytes (LF line ends), exactly as received
    <id>.json       the envelope; its presence is the commit point of the entry
    tmp/            files being written (temp, fsync, rename)
    control/        requests from the `mailhost queue` CLI (flush-<id>, bounce-<id>)

The data file is renamed into place before the envelope, so an envelope never points at a
missing data file. No pickle: envelopes are plain JSON that an operator can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from mailhost.interfaces import IMessageWriter
from mailhost.store.maildir import fsync_dir

ENVELOPE_VERSION = 1

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


@attrs.define
class Recipient:
    """One envelope recipient and where its delivery stands."""

    address: str
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    #: the last reply, e.g. "450 4.2.0 mailbox busy" (or a network error description)
    last_reply: str = ""
    #: enhanced status code (RFC 3463) of the last result, e.g. "5.1.1"
    status_code: str = ""
    remote_mta: str = ""
    #: RFC 3461 §4.1 NOTIFY value ("NEVER" or a comma list of SUCCESS,FAILURE,DELAY)
    notify: str | None = None
    #: RFC 3461 §4.2 ORCPT value, e.g. "rfc822;user@example.org"
    orcpt: str | None = None
    #: a failure DSN covering this recipient has been sent (or was not wanted)
    reported: bool = False


@attrs.define
class Envelope:
    """The envelope of a queued message (RFC 5321 §2.3.1) and its delivery state."""

    id: str
    sender: str
    recipients: list[Recipient]
    created: float
    size: int = 0
    #: RFC 3461 §4.3 RET ("FULL" or "HDRS") and §4.4 ENVID
    ret: str | None = None
    envid: str | None = None
    #: RFC 6531 SMTPUTF8 and RFC 6152 BODY=8BITMIME given at MAIL FROM
    smtputf8: bool = False
    body: str | None = None
    #: "normal", "dsn" (a report we generated) or "postmaster" (a failed report, copied
    #: to postmaster; it is never reported on again: no bounce loops)
    kind: str = "normal"
    delay_warned: bool = False

    def to_json(self) -> bytes:
        data = attrs.asdict(self)
        data["version"] = ENVELOPE_VERSION
        return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw.decode("utf-8"))
        if data.pop("version", None) != ENVELOPE_VERSION:
            raise ValueError("unknown envelope version")
        rcpt_fields = {f.name for f in attrs.fields(Recipient)}
        data["recipients"] = [
            Recipient(**{k: v for k, v in r.items() if k in rcpt_fields})
            for r in data["recipients"]]
        env_fields = {f.name for f in attrs.fields(Envelope)}
        return cls(**{k: v for k, v in data.items() if k in env_fields})

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == PENDING]

    def finished(self) -> bool:
        """True when nothing is left to do: every recipient delivered or reported."""
        return all(r.status == DELIVERED or (r.status == FAILED and r.reported)
                   for r in self.recipients)


def new_queue_id() -> str:
    """A fresh queue id: 16 upper-case hex digits, safe as a file name."""
    return secrets.token_hex(8).upper()


def valid_queue_id(qid: str) -> bool:
    return len(qid) == 16 and all(c in "0123456789ABCDEF" for c in qid)


# --- synchronous file operations (run in a thread, or by the CLI) --------------------

def write_atomic(tmp_dir: Path, final: Path, chunks: list[bytes] | bytes,
                 sync_dir: bool = True) -> None:
    """Write to a temp file, fsync it, rename it to `final`, fsync the directory."""
    tmp = tmp_dir / f"{final.name}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "wb") as f:
        if isinstance(chunks, bytes):
            f.write(chunks)
        else:
            for chunk in chunks:
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    if sync_dir:
        fsync_dir(final.parent)


class SpoolFiles:
    """Paths and synchronous operations on a queue directory (shared with the CLI)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.control = self.root / "control"

    def ensure(self) -> None:
        for d in (self.root, self.tmp, self.control):
            d.mkdir(parents=True, exist_ok=True)

    def data_path(self, qid: str) -> Path:
        return self.root / f"{qid}.msg"

    def envelope_path(self, qid: str) -> Path:
        return self.root / f"{qid}.json"

    def ids(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for p in sorted(self.root.glob("*.json")):
            if valid_queue_id(p.stem):
                yield p.stem

    def read_envelope(self, qid: str) -> Envelope:
        return Envelope.from_json(self.envelope_path(qid).read_bytes())

    def read_data(self, qid: str) -> bytes:
        return self.data_path(qid).read_bytes()

    def write_entry(self, env: Envelope, chunks: list[bytes]) -> None:
        """Commit a new entry: data first, then the envelope (the commit point)."""
        if not self.tmp.is_dir():
            self.ensure()
        write_atomic(self.tmp, self.data_path(env.id), chunks, sync_dir=False)
        write_atomic(self.tmp, self.envelope_path(env.id), env.to_json())

    def write_entry_from(self, env: Envelope, data_file: Path) -> None:
        """Commit a new entry whose data is already fsynced in `data_file` (in tmp/)."""
        os.rename(data_file, self.data_path(env.id))
        write_atomic(self.tmp, self.envelope_path(env.id), env.to_json())

    def save_envelope(self, env: Envelope | str, data: bytes | None = None) -> bool:
        """Rewrite an envelope (or the serialised `data` of entry `env`); False, and
        nothing written, if the entry was deleted."""
        qid = env if isinstance(env, str) else env.id
        if data is None:
            assert not isinstance(env, str)
            data = env.to_json()
        if not self.envelope_path(qid).exists():
            return False
        write_atomic(self.tmp, self.envelope_path(qid), data)
        return True

    def remove(self, qid: str) -> bool:
        """Remove an entry, envelope first; True if it existed."""
        existed = False
        for p in (self.envelope_path(qid), self.data_path(qid)):
            try:
                p.unlink()
                existed = True
            except FileNotFoundError:
                pass
        if existed:
            fsync_dir(self.root)
        return existed

    def clean_orphans(self, older_than: float | None = None) -> list[str]:
        """Remove crash leftovers: temp files, and data files or envelopes without their
        other half. Only files last changed before `older_than` (the time loading began)
        are touched, so entries being committed right now by SMTP sessions are safe."""
        def stale(p: Path) -> bool:
            try:
                return older_than is None or p.stat().st_mtime < older_than
            except FileNotFoundError:
                return False

        removed = []
        for p in list(self.tmp.glob("*")):
            if stale(p):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        for p in list(self.root.glob("*.msg")):
            if not self.envelope_path(p.stem).exists() and stale(p):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        for p in list(self.root.glob("*.json")):
            if not self.data_path(p.stem).exists() and stale(p):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def request(self, action: str, qid: str) -> None:
        """Leave a control request (`flush`/`bounce`) for the running server."""
        self.ensure()
        write_atomic(self.tmp, self.control / f"{action}-{qid}", b"")

    def take_requests(self) -> list[tuple[str, str]]:
        """Read and remove pending control requests: [(action, id or 'ALL')]."""
        out = []
        if not self.control.is_dir():
            return out
        for p in sorted(self.control.iterdir()):
            if not p.is_file():
                continue
            action, _, qid = p.name.partition("-")
            p.unlink(missing_ok=True)
            if action in ("flush", "bounce") and (qid == "ALL" or valid_queue_id(qid)):
                out.append((action, qid))
        return out


# --- the reactor-side spool -----------------------------------------------------------

#: bytes a queue entry keeps in memory before it spills to a file in tmp/
SPILL_SIZE = 256 * 1024


@implementer(IMessageWriter)
class SpoolWriter:
    """A queue entry being received; `commit` makes it durable, then hands it on.

    Small messages are buffered in memory; past `SPILL_SIZE` the bytes go to a file in
    tmp/ (page-cache writes, like Maildir delivery), so a large message is never held
    whole. The fsyncs and renames run in a worker thread at commit, so the reactor
    never blocks on the disk.
    """

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self._spool = spool
        self.envelope = envelope
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._file: Any = None
        self._tmp: Path | None = None
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("queue entry already committed or aborted")
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered > SPILL_SIZE:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            files = self._spool.files
            if not files.tmp.is_dir():
                files.ensure()
            self._tmp = files.tmp / f"{self.envelope.id}.msg.{secrets.token_hex(4)}.tmp"
            self._file = open(self._tmp, "xb", buffering=1 << 20)  # noqa: SIM115 - closed at commit or abort
        self._file.writelines(self._chunks)
        self._chunks, self._buffered = [], 0

    def commit(self) -> defer.Deferred[str]:
        """Fires with the queue id once data and envelope are fsynced and renamed."""
        if self._done:
            raise RuntimeError("queue entry already committed or aborted")
        self._done = True
        self.envelope.size = self.size
        chunks, self._chunks = self._chunks, []
        files = self._spool.files
        if self._file is None:
            d = self._spool.in_thread(files.write_entry, self.envelope, chunks)
        else:
            f, tmp, self._file = self._file, self._tmp, None

            def finish_file() -> None:
                try:
                    f.writelines(chunks)
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    f.close()
                try:
                    files.write_entry_from(self.envelope, tmp)
                except OSError:
                    _unlink_quietly(tmp)
                    raise

            d = self._spool.in_thread(finish_file)
        d.addCallback(lambda _: self._spool.committed(self.envelope))
        return d

    def abort(self) -> None:
        self._done = True
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
            _unlink_quietly(self._tmp)


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Spool:
    """The queue directory seen from the reactor: all disk work runs in a thread pool."""

    def __init__(self, root: Path, reactor: IReactorThreads,
                 on_commit: Callable[[Envelope], Any] | None = None) -> None:
        self.files = SpoolFiles(root)
        self._reactor = reactor
        self.on_commit = on_commit

    def in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         f, *args)

    def open_entry(self, envelope: Envelope) -> SpoolWriter:
        return SpoolWriter(self, envelope)

    def committed(self, envelope: Envelope) -> str:
        if self.on_commit is not None:
            self.on_commit(envelope)
        return envelope.id

    def load_all(self) -> defer.Deferred[list[Envelope]]:
        """Clean crash leftovers and read every envelope (at startup)."""
        started = time.time()

        def load() -> list[Envelope]:
            self.files.ensure()
            self.files.clean_orphans(older_than=started)
            return self._read_all()
        return self.in_thread(load)

    def _read_all(self) -> list[Envelope]:
        out = []
        for qid in self.files.ids():
            try:
                out.append(self.files.read_envelope(qid))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # vanished (CLI delete) or unreadable: left for the operator
        return out

    def scan(self) -> defer.Deferred[tuple[list[str], list[tuple[str, str]]]]:
        """Ids present on disk and pending control requests (for the periodic scan)."""
        def scan() -> tuple[list[str], list[tuple[str, str]]]:
            return list(self.files.ids()), self.files.take_requests()
        return self.in_thread(scan)

    def read_envelope(self, qid: str) -> defer.Deferred[Envelope]:
        return self.in_thread(self.files.read_envelope, qid)

    def read_data(self, qid: str) -> defer.Deferred[bytes]:
        return self.in_thread(self.files.read_data, qid)

    def save(self, envelope: Envelope) -> defer.Deferred[bool]:
        # serialised here, on the reactor: the scheduler changes envelopes on this thread
        return self.in_thread(self.files.save_envelope, envelope.id, envelope.to_json())

    def remove(self, qid: str) -> defer.Deferred[bool]:
        return self.in_thread(self.files.remove, qid)
