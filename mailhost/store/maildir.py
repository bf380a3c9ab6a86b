"""Maildir++ on disk: durable delivery, unique names, flags in file names.

Delivery follows the Maildir spec (cr.yp.to/proto/maildir.html): write in tmp/ under a
unique name, fsync, then link into new/ and fsync the directory — only then is the
message delivered. File names carry `,S=<size>,W=<wire size>` (as Dovecot does) so
POP3 and IMAP know sizes without reading bodies, and flags after `:2,` so other Maildir
tools see them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import threads
from zope.interface import implementer

from mailhost.interfaces import IMailStore, IMessageWriter

#: Maildir flag letters, in the order the spec requires them in file names.
FLAG_LETTERS = "DFPRST"

_counter = itertools.count(1)


def unique_name(hostname: str | None = None) -> str:
    """A Maildir unique name: `<sec>.M<usec>P<pid>Q<n>.<host>`."""
    host = (hostname or socket.gethostname()).replace("/", r"\057").replace(":", r"\072")
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{host}"


def split_name(filename: str) -> tuple[str, str]:
    """`key,S=..:2,FS` -> (`key,S=..`, `FS`): the stable base and the flag letters."""
    base, sep, info = filename.partition(":")
    if sep and info.startswith("2,"):
        return base, info[2:]
    return base, ""


def sizes_from_name(base: str) -> tuple[int | None, int | None]:
    """Read `,S=<n>` and `,W=<n>` fields from a Maildir base name."""
    size = wire = None
    for part in base.split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            size = int(part[2:])
        elif part.startswith("W=") and part[2:].isdigit():
            wire = int(part[2:])
    return size, wire


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_maildir(path: Path) -> None:
    """Create a Maildir (cur/, new/, tmp/) with private permissions."""
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


class DeliveryError(Exception):
    """A message could not be stored; nothing was delivered."""


#: bytes a message keeps in memory before its file in tmp/ is created
SPILL_SIZE = 256 * 1024


@implementer(IMessageWriter)
class MaildirWriter:
    """One message for one or more mailboxes: written once, linked into each on commit.

    Small messages stay in memory and their tmp/ file is created, written and fsynced in
    a worker thread at commit (one thread hop per message; creating a file can wait for
    the file system journal, which must not stall the reactor). Past `SPILL_SIZE` the
    bytes go to the tmp/ file of the first mailbox as they arrive (page-cache writes), so
    a large message is never held whole. `commit` fires with the delivered paths.
    """

    def __init__(self, reactor, mailboxes: list[Path], hostname: str) -> None:
        if not mailboxes:
            raise ValueError("no mailboxes")
        self._reactor = reactor
        self._mailboxes = mailboxes
        self._hostname = hostname
        self._name = unique_name(hostname)
        self._tmp = mailboxes[0] / "tmp" / self._name
        self._file: Any = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.size = 0
        self._lines = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.size += len(data)
        self._lines += data.count(b"\n")
        if self._buffered > SPILL_SIZE:
            if self._file is None:
                self._file = open(self._tmp, "xb", buffering=1 << 20)  # noqa: SIM115 - closed at commit or abort
            self._file.writelines(self._chunks)
            self._chunks, self._buffered = [], 0

    def commit(self):
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self._commit_sync)

    def _commit_sync(self) -> list[Path]:
        """Write + fsync the file, link it into every mailbox, fsync each directory."""
        done: list[Path] = []
        chunks, self._chunks = self._chunks, []
        try:
            if self._file is None:
                self._file = open(self._tmp, "xb")  # noqa: SIM115 - closed below
            self._file.writelines(chunks)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            wire = self.size + self._lines  # every LF becomes CRLF on the wire
            name = f"{self._name},S={self.size},W={wire}"
            for box in self._mailboxes:
                target = box / "new" / name
                try:
                    os.link(self._tmp, target)
                except OSError as e:
                    if e.errno not in (18, 1, 31, 95):  # EXDEV, EPERM, EMLINK, EOPNOTSUPP
                        raise
                    _copy_durably(self._tmp, box / "tmp" / name, target)
                done.append(target)
            for box in {p.parent for p in done}:
                fsync_dir(box)
        except OSError as e:
            for path in done:
                _unlink_quietly(path)
            raise DeliveryError(f"{e.strerror or e}") from e
        finally:
            if self._file is not None and not self._file.closed:
                self._file.close()
            _unlink_quietly(self._tmp)
            self._done = True
        return done

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._chunks = []
            if self._file is not None:
                self._file.close()
                _unlink_quietly(self._tmp)


def _copy_durably(src: Path, tmp: Path, target: Path) -> None:
    with open(src, "rb") as fin, open(tmp, "xb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.rename(tmp, target)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@implementer(IMailStore)
class MaildirStore:
    """All mailboxes under `<data_dir>/mail/<domain>/<user>/` (Maildir++ roots)."""

    def __init__(self, mail_dir: Path, hostname: str, reactor) -> None:
        self.mail_dir = Path(mail_dir)
        self.hostname = hostname
        self.reactor = reactor

    def mailbox_path(self, key: str) -> Path:
        """The Maildir++ root of account `user@domain` (key already lower-case)."""
        local, _, domain = key.rpartition("@")
        if not local or not domain or "/" in local or local in (".", "..") or \
                local.startswith(".") or "/" in domain or domain.startswith("."):
            raise ValueError(f"unsafe mailbox key {key!r}")
        return self.mail_dir / domain / local

    def open_delivery(self, mailboxes: list[str]) -> MaildirWriter:
        paths = []
        for key in dict.fromkeys(mailboxes):
            path = self.mailbox_path(key)
            if not (path / "tmp").is_dir():
                make_maildir(path)
            paths.append(path)
        return MaildirWriter(self.reactor, paths, self.hostname)


class IncomingMessage:
    """A message arriving in pieces (an IMAP APPEND literal) into `<root>/tmp/`.

    CRLF line ends are stored as LF, the Maildir convention SMTP delivery follows too
    (readers turn LF back into CRLF); a lone CR is kept, and a CR at the end of one piece
    is held until the next shows whether an LF follows. `close` ends the file; the folder
    index then makes it durable and gives it a UID (`FolderIndex.add`).
    """

    def __init__(self, root: Path, hostname: str | None = None) -> None:
        self.path = root / "tmp" / unique_name(hostname)
        self._file = open(self.path, "xb", buffering=65536)  # noqa: SIM115 - see close
        self._cr = False

    def write(self, chunk: bytes) -> None:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        self._file.write(chunk.replace(b"\r\n", b"\n"))

    def close(self) -> None:
        if self._cr:
            self._file.write(b"\r")
            self._cr = False
        self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        _unlink_quietly(self.path)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
