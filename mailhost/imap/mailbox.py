"""The selected mailbox as one session sees it: MSN -> UID map, \\Recent, pending updates.

Changes by other sessions (FolderIndex listeners) and by other programs (`sync`) are
collected here and turned into untagged EXISTS / EXPUNGE / FETCH responses only when
the session may send them (RFC 3501 §7.4.1, §5.5).
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable

from mailhost.store.index import FolderChanges, FolderIndex, MessageEntry

#: IMAP system flag -> Maildir letter (P is "passed", shown as the $Forwarded keyword)
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "$Forwarded": "P", "\\Answered": "R",
                "\\Seen": "S", "\\Deleted": "T"}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}
_CANONICAL = {k.lower(): k for k in FLAG_LETTERS}
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


def canonical_flag(flag: str) -> str:
    """Case-insensitive system flags get their canonical spelling (RFC 3501 §2.3.2)."""
    return _CANONICAL.get(flag.lower(), flag)


def entry_flags(entry: MessageEntry, recent: bool = False) -> list[str]:
    """The IMAP flags of a message: letters, keywords and \\Recent."""
    flags = [LETTER_FLAGS[c] for c in entry.flags if c in LETTER_FLAGS]
    flags += sorted(entry.keywords)
    if recent:
        flags.append("\\Recent")
    return flags


def split_flags(flags: Iterable[str]) -> tuple[str, frozenset[str]]:
    """IMAP flags -> (Maildir letters, keywords); \\Recent is ignored."""
    letters = []
    keywords = set()
    for flag in flags:
        flag = canonical_flag(flag)
        if flag in FLAG_LETTERS:
            letters.append(FLAG_LETTERS[flag])
        elif not flag.startswith("\\"):
            keywords.add(flag)
    return "".join(sorted(set(letters))), frozenset(keywords)


def format_flags(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(flags).encode("ascii", "replace") + b")"


_added_claims: weakref.WeakKeyDictionary[FolderIndex, set[int]] = weakref.WeakKeyDictionary()
_claims_lock = threading.Lock()


def _claim_added(index: FolderIndex, uids: list[int]) -> list[int]:
    """\\Recent for a message added by APPEND/COPY goes to the first read-write session
    told about it (RFC 3501 §2.3.2); remembered per index so only one session gets it."""
    with _claims_lock:
        claimed = _added_claims.setdefault(index, set())
        mine = [u for u in uids if u not in claimed]
        claimed.update(mine)
        if len(claimed) > 10000:
            claimed.difference_update(sorted(claimed)[:5000])
        return mine


class SelectedFolder:
    """One session's view of a selected folder."""

    def __init__(self, name: str, index: FolderIndex, readonly: bool,
                 owner: object = None) -> None:
        self.name = name
        self.owner = owner
        self.index = index
        self.readonly = readonly
        self._lock = threading.Lock()
        self._removed: set[int] = set()
        self._added: set[int] = set()
        self._flagged: set[int] = set()
        self.uids: list[int] = []
        self.recent: set[int] = set()
        self.keywords: set[str] = set()
        self.gone = False
        #: called (maybe from a worker thread) after changes arrive; set while IDLE
        self.wakeup: Callable[[], None] | None = None

    def open(self) -> None:
        """Sync, take this session's \\Recent messages, start listening (blocking)."""
        self.index.sync()
        self.index.add_listener(self._changed)
        entries = self.index.messages()
        self.uids = [e.uid for e in entries]
        fresh = [e.uid for e in entries if e.subdir == "new"]
        self.recent = set(fresh if self.readonly else self.index.claim_new(fresh))
        self.keywords = {k for e in entries for k in e.keywords}

    def close(self) -> None:
        self.index.remove_listener(self._changed)

    def _changed(self, index: FolderIndex, changes: FolderChanges, origin: object) -> None:
        """Listener: may run in a worker thread; only records."""
        if changes.added and not self.readonly:
            fresh = [u for u in changes.added if (e := index.get(u)) and e.subdir == "new"]
            claimed = index.claim_new(fresh) if fresh else []
            if origin is not None:  # APPEND/COPY/MOVE put it straight into cur/
                claimed += _claim_added(index, [u for u in changes.added if u not in fresh])
        else:
            claimed = [u for u in changes.added if (e := index.get(u)) and e.subdir == "new"]
        with self._lock:
            self._added.update(changes.added)
            self.recent.update(claimed)
            self._removed.update(changes.removed)
            if origin is not self.owner:
                self._flagged.update(changes.flags_changed)
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup()

    def sync(self) -> None:
        """Pick up changes made by other programs (cheap when nothing changed)."""
        try:
            self.index.sync()
        except FileNotFoundError:
            self.gone = True

    # --- numbering ---------------------------------------------------------------------

    def msn(self, uid: int) -> int | None:
        pos = bisect_left(self.uids, uid)
        if pos < len(self.uids) and self.uids[pos] == uid:
            return pos + 1
        return None

    @property
    def exists(self) -> int:
        return len(self.uids)

    def flag_names(self) -> list[str]:
        return [*SYSTEM_FLAGS, "$Forwarded", *sorted(self.keywords - {"$Forwarded"})]

    # --- untagged updates --------------------------------------------------------------

    def updates(self, allow_expunge: bool) -> list[bytes]:
        """Untagged lines for what changed since the last call (RFC 3501 §7.4.1)."""
        lines: list[bytes] = []
        with self._lock:
            removed, added, flagged = self._removed, self._added, self._flagged
            self._flagged = set()
            if allow_expunge:
                self._removed = set()
            self._added = set()
        if allow_expunge and removed:
            gone = set()
            for uid in sorted(removed, reverse=True):
                msn = self.msn(uid)
                if msn is not None:
                    lines.append(b"* %d EXPUNGE" % msn)
                    gone.add(uid)
            if gone:
                self.uids = [u for u in self.uids if u not in gone]
                self.recent -= gone
        last = self.uids[-1] if self.uids else 0
        new = sorted(u for u in added if u > last
                     and not (allow_expunge and u in removed))
        new_keywords: set[str] = set()
        if new:
            self.uids.extend(new)
            for uid in new:
                entry = self.index.get(uid)
                if entry is not None:
                    new_keywords |= entry.keywords
        for uid in flagged:
            entry = self.index.get(uid)
            if entry is not None:
                new_keywords |= entry.keywords
        if new_keywords - self.keywords:
            self.keywords |= new_keywords
            lines.append(b"* FLAGS " + format_flags(self.flag_names()))
        if new:
            lines.append(b"* %d EXISTS" % len(self.uids))
            lines.append(b"* %d RECENT" % len(self.recent))
        for uid in sorted(flagged):
            msn = self.msn(uid)
            entry = self.index.get(uid)
            if msn is None or entry is None:
                continue
            lines.append(b"* %d FETCH (UID %d FLAGS %s)" % (
                msn, uid, format_flags(entry_flags(entry, uid in self.recent))))
        return lines
