"""The per-folder UID map shared by POP3 (UIDL) and IMAP (UID, UIDVALIDITY, keywords).

One `mailhost-uidlist` file per Maildir folder:

    V<uidvalidity> N<uidnext>
    <uid> <base name> [keyword ...]

A message's identity is its Maildir base name (the part before `:2,`), so moving from
new/ to cur/ or changing flags — by us or by another Maildir tool — keeps its UID. New
UIDs are appended to the file (fsynced); removals rewrite it atomically (temp, fsync,
rename). UIDs are strictly ascending and never reused: uidnext only grows, and a torn
last line from a crash is ignored, uidnext being recomputed as above every UID seen.

All sessions in the process share one `FolderIndex` per folder (`FolderIndex.open`), so
changes made by one session reach the others' listeners (IMAP IDLE, untagged updates).
Methods are thread-safe; callers may run `sync` in a worker thread for large folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from mailhost.store.maildir import (
    fsync_dir,
    fsync_file,
    make_maildir,
    sizes_from_name,
    unique_name,
)

UIDLIST = "mailhost-uidlist"


@attrs.define
class MessageEntry:
    """One message of a folder as the index knows it."""

    uid: int
    base: str
    subdir: str
    flags: str
    keywords: frozenset[str] = frozenset()
    folder: Path = attrs.field(default=Path("."), repr=False)
    #: the wire size once known (from `,W=`, else counted once and kept)
    _wire: int | None = attrs.field(default=None, repr=False, eq=False)

    @property
    def filename(self) -> str:
        if self.subdir == "new" and not self.flags:
            return self.base
        return f"{self.base}:2,{self.flags}"

    @property
    def path(self) -> Path:
        return self.folder / self.subdir / self.filename

    @property
    def size(self) -> int:
        """Bytes on disk (LF line ends)."""
        size, _ = sizes_from_name(self.base)
        if size is None:
            size = self.path.stat().st_size
        return size

    @property
    def wire_size(self) -> int:
        """Bytes on the wire with CRLF line ends (POP3 LIST, IMAP RFC822.SIZE).

        Read from the `,W=` field of the name; a file without one (a Maildir migrated
        from another server) is counted once and the result kept.
        """
        wire = self._wire
        if wire is None:
            base = self.base
            at = base.rfind(",W=")
            if at >= 0:
                end = base.find(",", at + 3)
                digits = base[at + 3:] if end < 0 else base[at + 3:end]
                if digits.isdigit():
                    wire = int(digits)
            if wire is None:
                wire = _count_wire_size(self.path)
            self._wire = wire
        return wire

    @property
    def internaldate(self) -> float:
        """Delivery time: the leading seconds of the unique name, else the file mtime."""
        head = self.base.split(".", 1)[0]
        if head.isdigit():
            return float(head)
        return self.path.stat().st_mtime


def _count_wire_size(path: Path) -> int:
    size = lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            lines += chunk.count(b"\n") - chunk.count(b"\r\n")
    return size + lines


@attrs.frozen
class FolderChanges:
    """What a sync found: UIDs added, removed and whose flags changed."""

    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    flags_changed: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.flags_changed)


Listener = Callable[["FolderIndex", FolderChanges, object], None]


class FolderIndex:
    """UIDs of one Maildir folder, kept in step with the directory on `sync()`."""

    _open: weakref.WeakValueDictionary[str, FolderIndex] = weakref.WeakValueDictionary()
    _open_lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, create: bool = True) -> FolderIndex:
        """The process-wide shared index of `folder` (created if missing)."""
        key = os.path.abspath(folder)
        with cls._open_lock:
            index = cls._open.get(key)
            if index is None:
                index = cls(Path(key), create=create)
                cls._open[key] = index
            return index

    @classmethod
    def forget(cls, folder: Path) -> None:
        """Drop the shared index of a folder that was deleted or renamed away."""
        with cls._open_lock:
            cls._open.pop(os.path.abspath(folder), None)

    def __init__(self, folder: Path, create: bool = True) -> None:
        self.folder = folder
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        if create:
            make_maildir(folder)
        self.uidvalidity = 0
        self.uidnext = 1
        self._by_uid: dict[int, MessageEntry] = {}
        self._by_base: dict[str, MessageEntry] = {}
        self._dir_stamp: tuple[int, int] | None = None
        #: when to scan again although the stamp is unchanged (it was fresh at the scan)
        self._recheck_at = float("inf")
        self._load()

    # --- persistence ------------------------------------------------------------------

    @property
    def _uidlist(self) -> Path:
        return self.folder / UIDLIST

    def _load(self) -> None:
        try:
            text = self._uidlist.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            self.uidvalidity = _new_uidvalidity()
            self.uidnext = 1
            self._rewrite()
            return
        lines = text.split("\n")
        header = lines[0].split()
        for field in header:
            if field.startswith("V") and field[1:].isdigit():
                self.uidvalidity = int(field[1:])
            elif field.startswith("N") and field[1:].isdigit():
                self.uidnext = int(field[1:])
        complete = lines[1:-1] if not text.endswith("\n") else lines[1:]
        by_uid, by_base, folder = self._by_uid, self._by_base, self.folder
        empty: frozenset[str] = frozenset()
        last = 0
        ordered = True
        for line in complete:
            parts = line.split()
            if len(parts) < 2 or not parts[0].isdigit():
                continue
            uid = int(parts[0])
            # subdir "" = not seen on disk yet; the first sync fills it in
            entry = MessageEntry(uid, parts[1], "", "",
                                 frozenset(parts[2:]) if len(parts) > 2 else empty, folder)
            if uid in by_uid:  # a later record (keywords changed) replaces the earlier
                by_base.pop(by_uid[uid].base, None)
            elif uid < last:
                ordered = False
            by_uid[uid] = entry
            by_base[entry.base] = entry
            last = max(last, uid)
        self.uidnext = max(self.uidnext, last + 1)
        if not self.uidvalidity:
            self.uidvalidity = _new_uidvalidity()
        if not ordered:
            self._by_uid = dict(sorted(by_uid.items()))
        if not text.endswith("\n"):  # a torn last record: rewrite before appending
            self._rewrite()

    def _rewrite(self) -> None:
        """Write the whole uidlist atomically (temp, fsync, rename, fsync dir)."""
        tmp = self.folder / f".{UIDLIST}.{unique_name()}"
        lines = [f"V{self.uidvalidity} N{self.uidnext}\n"]
        lines += [_record(e) for e in self._by_uid.values()]
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._uidlist)
        fsync_dir(self.folder)

    def _append(self, records: list[str]) -> None:
        with open(self._uidlist, "a", encoding="utf-8") as f:
            f.writelines(records)
            f.flush()
            os.fsync(f.fileno())

    # --- reading ----------------------------------------------------------------------

    def messages(self) -> list[MessageEntry]:
        """Every message in UID order (a copy; entries are live objects)."""
        with self._lock:
            return list(self._by_uid.values())

    def get(self, uid: int) -> MessageEntry | None:
        with self._lock:
            return self._by_uid.get(uid)

    def uids(self) -> list[int]:
        with self._lock:
            return list(self._by_uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    # --- synchronising with the directory ------------------------------------------------

    def _stamp(self) -> tuple[int, int]:
        return (os.stat(self.folder / "new").st_mtime_ns,
                os.stat(self.folder / "cur").st_mtime_ns)

    def needs_scan(self) -> bool:
        """Cheap (two stats): would `sync` look at the directories? Callers on the reactor
        thread use it to send only real scans to a worker thread."""
        try:
            return self._stamp() != self._dir_stamp or time.time_ns() >= self._recheck_at
        except FileNotFoundError:
            return True

    def sync(self, origin: object = None, force: bool = False) -> FolderChanges:
        """Scan new/ and cur/; assign UIDs to new files, drop vanished ones."""
        with self._lock:
            now = time.time_ns()
            stamp = self._stamp()
            unchanged = not force and stamp == self._dir_stamp
            if unchanged and (now < self._recheck_at or not self._unknown_in_new()):
                if now >= self._recheck_at:  # the recheck found nothing new
                    fresh = now - max(stamp) < 2_000_000_000
                    self._recheck_at = now + 1_000_000_000 if fresh else float("inf")
                return FolderChanges()
            present: dict[str, tuple[str, str]] = {}
            for sub in ("new", "cur"):
                with os.scandir(self.folder / sub) as it:
                    for de in it:
                        name = de.name
                        if name[0] == ".":
                            continue
                        base, _, info = name.partition(":")
                        present[base] = (sub, info[2:] if info.startswith("2,") else "")
            added: list[MessageEntry] = []
            changed: list[int] = []
            for base, (sub, flags) in present.items():
                entry = self._by_base.get(base)
                if entry is None:
                    added.append(MessageEntry(0, base, sub, flags, frozenset(), self.folder))
                elif entry.subdir != sub or entry.flags != flags:
                    if entry.flags != flags and entry.subdir:
                        changed.append(entry.uid)
                    entry.subdir, entry.flags = sub, flags
            removed = [uid for uid, e in self._by_uid.items() if e.base not in present]
            for uid in removed:
                entry = self._by_uid.pop(uid)
                self._by_base.pop(entry.base, None)
            # order new arrivals by delivery time (the name starts with seconds)
            added.sort(key=lambda e: _arrival_key(e.base))
            records = []
            for entry in added:
                entry.uid = self.uidnext
                self.uidnext += 1
                self._by_uid[entry.uid] = entry
                self._by_base[entry.base] = entry
                records.append(_record(entry))
            if removed:
                self._rewrite()
            elif records:
                self._append(records)
            # directory mtimes are coarse: a file linked in the same tick as this scan
            # leaves the stamp unchanged, so after a scan of a freshly changed folder
            # one more scan follows a second later (at most one a second, not every call)
            self._dir_stamp = stamp
            fresh = now - max(stamp) < 2_000_000_000
            self._recheck_at = now + 1_000_000_000 if fresh else float("inf")
            changes = FolderChanges(tuple(e.uid for e in added), tuple(removed),
                                    tuple(changed))
        if changes:
            self._notify(changes, origin)
        return changes

    # --- changing ---------------------------------------------------------------------

    def set_flags(self, uid: int, flags: Iterable[str], keywords: Iterable[str] | None = None,
                  origin: object = None) -> MessageEntry | None:
        """Set Maildir flag letters (moving the file to cur/) and optionally keywords."""
        with self._lock:
            entry = self._by_uid.get(uid)
            if entry is None:
                return None
            letters = "".join(sorted(set(flags)))
            if entry.subdir != "cur" or entry.flags != letters:
                old = entry.path
                new = self.folder / "cur" / f"{entry.base}:2,{letters}"
                before = self._stamp()
                try:
                    os.rename(old, new)
                except FileNotFoundError:  # removed by another program meanwhile
                    self.sync(force=True)
                    return None
                entry.subdir, entry.flags = "cur", letters
                self._own_change(before)
            if keywords is not None:
                kw = frozenset(k for k in keywords if _valid_keyword(k))
                if kw != entry.keywords:
                    entry.keywords = kw
                    self._append([_record(entry)])
        self._notify(FolderChanges(flags_changed=(uid,)), origin)
        return entry

    def add(self, source: Path, flags: str = "", keywords: Iterable[str] = (),
            internaldate: float | None = None, origin: object = None,
            fsync: bool = True) -> MessageEntry:
        """Make a fully written file in tmp/ durable, move it into cur/, give it a UID now.

        Used by IMAP APPEND, COPY and MOVE so APPENDUID/COPYUID can report the UID.
        Runs in a worker thread (fsync, renames).
        """
        if fsync:
            fsync_file(source)
        with self._lock:
            size = source.stat().st_size
            wire = _count_wire_size(source)
            base = f"{unique_name()},S={size},W={wire}"
            if internaldate is not None:
                sec = int(internaldate)
                base = f"{sec}.{base.split('.', 1)[1]}"
                os.utime(source, (internaldate, internaldate))
            letters = "".join(sorted(set(flags)))
            target = self.folder / "cur" / f"{base}:2,{letters}"
            before = self._stamp()
            os.rename(source, target)
            fsync_dir(self.folder / "cur")
            entry = MessageEntry(self.uidnext, base, "cur", letters,
                                 frozenset(k for k in keywords if _valid_keyword(k)),
                                 self.folder)
            self.uidnext += 1
            self._by_uid[entry.uid] = entry
            self._by_base[base] = entry
            self._append([_record(entry)])
            self._own_change(before)
        self._notify(FolderChanges(added=(entry.uid,)), origin)
        return entry

    def expunge(self, uids: Iterable[int], origin: object = None) -> list[int]:
        """Delete messages' files and forget their UIDs; returns the UIDs removed."""
        removed = []
        with self._lock:
            before = self._stamp()
            for uid in sorted(set(uids)):
                entry = self._by_uid.pop(uid, None)
                if entry is None:
                    continue
                self._by_base.pop(entry.base, None)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(uid)
            if removed:
                self._rewrite()
                self._own_change(before)
        if removed:
            self._notify(FolderChanges(removed=tuple(removed)), origin)
        return removed

    def claim_new(self, uids: Iterable[int]) -> list[int]:
        """Move messages from new/ to cur/ (flags unchanged, no notification).

        IMAP uses this to give \\Recent to exactly one session (RFC 3501 §2.3.2): the
        session that moves a message out of new/ is the one that sees it as recent.
        Returns the UIDs this call moved.
        """
        moved = []
        with self._lock:
            before = self._stamp()
            for uid in uids:
                entry = self._by_uid.get(uid)
                if entry is None or entry.subdir != "new":
                    continue
                old = entry.path
                try:
                    os.rename(old, self.folder / "cur" / f"{entry.base}:2,{entry.flags}")
                except FileNotFoundError:
                    continue
                entry.subdir = "cur"
                moved.append(uid)
            if moved:
                self._own_change(before)
        return moved

    def _unknown_in_new(self) -> bool:
        """Is a file in new/ that the index does not know? (the cheap recheck: deliveries
        land in new/, which IMAP and POP3 keep small by moving mail on to cur/)"""
        by_base = self._by_base
        with os.scandir(self.folder / "new") as it:
            return any(de.name[0] != "." and de.name.partition(":")[0] not in by_base
                       for de in it)

    def _own_change(self, before: tuple[int, int]) -> None:
        """After renames/unlinks we made (and applied in memory): if nothing else had
        changed the folder since the last scan, the new directory stamp is ours and
        stays trusted; otherwise the next sync scans."""
        self._dir_stamp = self._stamp() if before == self._dir_stamp else None

    def add_copy(self, source: Path, flags: str = "", keywords: Iterable[str] = (),
                 internaldate: float | None = None, origin: object = None) -> MessageEntry:
        """COPY/MOVE: hard-link `source` into this folder (or copy it durably across file
        systems) and add it. FileNotFoundError if the source vanished meanwhile."""
        tmp = self.tmp_path()
        try:
            os.link(source, tmp)
            linked = True
        except FileNotFoundError:
            raise
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(source, tmp)
            linked = False
        return self.add(tmp, flags, keywords, internaldate=internaldate, origin=origin,
                        fsync=not linked)

    def tmp_path(self) -> Path:
        """A fresh path in this folder's tmp/ for writing a message before `add`."""
        return self.folder / "tmp" / unique_name()

    # --- listeners ----------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self, changes: FolderChanges, origin: object) -> None:
        for listener in list(self._listeners):
            listener(self, changes, origin)


_last_uidvalidity = 0
_uidvalidity_lock = threading.Lock()


def _new_uidvalidity() -> int:
    """A UIDVALIDITY never handed out before in this process (a folder deleted and
    re-created within one second must not get its old value back, RFC 3501 §2.3.1.1)."""
    global _last_uidvalidity
    with _uidvalidity_lock:
        _last_uidvalidity = max(int(time.time()), _last_uidvalidity + 1)
        return _last_uidvalidity


def _record(entry: MessageEntry) -> str:
    kw = " " + " ".join(sorted(entry.keywords)) if entry.keywords else ""
    return f"{entry.uid} {entry.base}{kw}\n"


def _arrival_key(base: str) -> tuple[int, str]:
    head = base.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, base)


def _valid_keyword(k: str) -> bool:
    return bool(k) and k.isascii() and all(c > " " and c not in '(){%*"\\]' for c in k) \
        and not k.startswith("\\")
