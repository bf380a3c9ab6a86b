"""The POP3 maildrop: a fixed snapshot of a user's Maildir INBOX for one session.

RFC 1939 §4: message numbers and sizes are fixed for the session; DELE only marks, and
the marked messages are removed in the UPDATE state (QUIT). A dropped connection removes
nothing. UIDLs come from the shared per-folder UID map (`FolderIndex`), the same one IMAP
uses, so `UIDL` is `<uidvalidity>.<uid>`: unchanged by flag changes, by the move from
new/ to cur/ and by restarts.

Disk work (the folder scan at login, opening files, renames, unlinks) runs in the
reactor's thread pool; everything else reads the in-memory snapshot.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from mailhost.store.index import FolderIndex, MessageEntry

log = Logger(namespace="mailhost.pop3")


class MessageGone(Exception):
    """The message was removed from the Maildir by another session or program."""


class MaildropError(Exception):
    """The maildrop could not be read or updated; the message says why."""


class SessionLocks:
    """One POP3 session per maildrop (RFC 1939 §8: exclusive-access lock), in-process."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        with self._lock:
            if key in self._held:
                return False
            self._held.add(key)
            return True

    def release(self, key: str) -> None:
        with self._lock:
            self._held.discard(key)

    def held(self, key: str) -> bool:
        with self._lock:
            return key in self._held


#: the process-wide registry, keyed by the Maildir root's absolute path
LOCKS = SessionLocks()

#: recently used indexes kept alive between sessions, so that a client polling every few
#: minutes gets a stamp check instead of a re-read of the uidlist and a full rescan
_RECENT: OrderedDict[str, FolderIndex] = OrderedDict()
_RECENT_MAX = 64
_recent_lock = threading.Lock()


def _shared_index(root: Path) -> FolderIndex:
    index = FolderIndex.open(root)
    with _recent_lock:
        _RECENT[str(index.folder)] = index
        _RECENT.move_to_end(str(index.folder))
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)
    return index


@implementer(IMailbox)
class MaildirMaildrop:
    """One account's INBOX as POP3 sees it. Indices are 0-based (IMailbox convention)."""

    def __init__(self, account: str, root: Path, reactor: Any,
                 locks: SessionLocks = LOCKS) -> None:
        self.account = account
        self.root = Path(root)
        self.reactor = reactor
        self.locks = locks
        self._lock_key = os.path.abspath(self.root)
        self._locked = False
        self._closing: defer.Deferred | None = None
        self.index: FolderIndex | None = None
        self.uidvalidity = 0
        self.entries: list[MessageEntry] = []
        self.sizes: list[int] = []
        self.deleted: set[int] = set()
        #: IMailbox attributes (not advertised: no EXPIRE / LOGIN-DELAY capability)
        self.loginDelay = 0
        self.messageExpiration = None

    # --- session life ------------------------------------------------------------------

    def lock(self) -> bool:
        """Take the maildrop lock; False if another POP3 session has it ([IN-USE])."""
        if not self._locked:
            self._locked = self.locks.acquire(self._lock_key)
        return self._locked

    def open(self) -> defer.Deferred:
        """Scan the folder (in a worker thread) and take the session's snapshot."""
        return self._in_thread(self._open_sync)

    def _open_sync(self) -> int:
        index = _shared_index(self.root)
        index.sync()
        entries = index.messages()
        sizes = []
        for entry in entries:
            try:
                sizes.append(entry.wire_size)
            except OSError:  # vanished since the scan: keep numbering, size unknown
                sizes.append(0)
        self.index, self.entries, self.sizes = index, entries, sizes
        self.uidvalidity = index.uidvalidity
        return len(entries)

    def logout(self) -> None:
        """Release the lock (after any UPDATE in progress has finished)."""
        if self._closing is not None and not self._closing.called:
            self._closing.addBoth(lambda _: self._release())
        else:
            self._release()

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self.locks.release(self._lock_key)

    # --- what the protocol asks -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def valid(self, i: int) -> bool:
        return 0 <= i < len(self.entries)

    def is_deleted(self, i: int) -> bool:
        return i in self.deleted

    def totals(self) -> tuple[int, int]:
        """(messages, octets) not marked deleted (STAT, RFC 1939 §5)."""
        count = total = 0
        for i, size in enumerate(self.sizes):
            if i not in self.deleted:
                count += 1
                total += size
        return count, total

    def listMessages(self, i: int | None = None) -> Any:  # noqa: N802 - IMailbox
        if i is None:
            return [0 if n in self.deleted else s for n, s in enumerate(self.sizes)]
        if not self.valid(i):
            raise ValueError(i)
        return 0 if i in self.deleted else self.sizes[i]

    def getUidl(self, i: int) -> bytes:  # noqa: N802 - IMailbox
        if not self.valid(i):
            raise ValueError(i)
        return f"{self.uidvalidity}.{self.entries[i].uid}".encode("ascii")

    def deleteMessage(self, i: int) -> None:  # noqa: N802 - IMailbox
        if not self.valid(i):
            raise ValueError(i)
        self.deleted.add(i)

    def undeleteMessages(self) -> None:  # noqa: N802 - IMailbox
        self.deleted.clear()

    def getMessage(self, i: int) -> BinaryIO:  # noqa: N802 - IMailbox (blocking)
        return self._open_file(i)

    def sync(self) -> None:
        """IMailbox.sync (blocking): remove the messages marked deleted."""
        self._commit_sync()

    # --- disk work, in the thread pool -----------------------------------------------------

    def open_message(self, i: int) -> defer.Deferred:
        """Deferred -> a binary file positioned at the start of message `i`."""
        return self._in_thread(self._open_file, i)

    def _open_file(self, i: int) -> BinaryIO:
        entry = self.entries[i]
        try:
            return open(entry.path, "rb")
        except FileNotFoundError:
            pass
        # renamed by another session (flags) or removed: rescan once and retry
        assert self.index is not None
        self.index.sync(force=True)
        live = self.index.get(entry.uid)
        if live is None:
            raise MessageGone(f"message {i + 1} was removed by another session")
        self.entries[i] = live
        try:
            return open(live.path, "rb")
        except FileNotFoundError:
            raise MessageGone(f"message {i + 1} was removed by another session") from None

    def mark_seen(self, i: int) -> defer.Deferred:
        """Set the Maildir `S` flag on message `i` (as Dovecot does after RETR)."""
        return self._in_thread(self._mark_seen_sync, i)

    def _mark_seen_sync(self, i: int) -> None:
        assert self.index is not None
        uid = self.entries[i].uid
        live = self.index.get(uid)
        if live is not None and "S" not in live.flags:
            self.index.set_flags(uid, live.flags + "S", origin=self)

    def commit(self) -> defer.Deferred:
        """RFC 1939 §6 UPDATE: remove the marked messages; Deferred -> count removed."""
        self._closing = self._in_thread(self._commit_sync)
        return self._closing

    def _commit_sync(self) -> int:
        if not self.deleted or self.index is None:
            return 0
        uids = [self.entries[i].uid for i in sorted(self.deleted)]
        try:
            removed = self.index.expunge(uids, origin=self)
        except OSError as e:
            raise MaildropError(f"cannot remove messages: {e.strerror or e}") from e
        return len(removed)

    def _in_thread(self, fn: Any, *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         fn, *args)
