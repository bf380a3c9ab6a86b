"""One user's IMAP view of a Maildir++ tree: folder names, LIST, CREATE/DELETE/RENAME.

INBOX is the Maildir++ root; folder `a.b` is the directory `.a.b` (hierarchy delimiter
`.`, RFC 3501 §5.1.1). Names travel and are stored in modified UTF-7 (as Dovecot and
Courier store them); only canonical forms are accepted and no name can leave the tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import attrs
from zope.interface import Interface

from mailhost.imap import utf7
from mailhost.imap.wire import CommandFailed
from mailhost.store.folders import SPECIAL_USE, SUBSCRIPTIONS, create_default_folders
from mailhost.store.index import FolderIndex
from mailhost.store.maildir import IncomingMessage, make_maildir

DELIMITER = "."
MAX_NAME = 512


#: recently used indexes stay loaded between sessions (FolderIndex.open shares only
#: live ones); re-reading a 100,000-message uidlist and directory costs seconds
_RECENT: OrderedDict[str, FolderIndex] = OrderedDict()
_RECENT_MAX = 128
_recent_lock = threading.Lock()


def _keep(index: FolderIndex) -> FolderIndex:
    key = str(index.folder)
    with _recent_lock:
        _RECENT[key] = index
        _RECENT.move_to_end(key)
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)
    return index


def _forget(path: Path) -> None:
    FolderIndex.forget(path)
    with _recent_lock:
        _RECENT.pop(os.path.abspath(path), None)


class IIMAPAccount(Interface):
    """The avatar interface IMAP asks the realm for (an `IMAPAccount`)."""


@attrs.frozen
class FolderInfo:
    """A name LIST shows: `selectable` False for a missing parent (`\\Noselect`)."""

    name: str
    selectable: bool
    has_children: bool
    special_use: str | None


def validate_name(name: str) -> str:
    """The canonical wire name of a folder; CommandFailed if it is not acceptable."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX" + DELIMITER:
        # RFC 3501 §5.1: INBOX is case-insensitive, so are its children's prefix (as in
        # Dovecot and Cyrus); LIST already matched it so, and "inbox.x" must not become a
        # second folder beside "INBOX.x"
        name = "INBOX" + name[5:]
    if not name or len(name) > MAX_NAME:
        raise CommandFailed("invalid mailbox name length", "CANNOT")
    try:
        decoded = utf7.decode(name)
    except utf7.MailboxNameError as e:
        raise CommandFailed(f"invalid mailbox name: {e}", "CANNOT") from None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in decoded) or "/" in decoded \
            or "\\" in decoded:
        raise CommandFailed("mailbox names may not contain '/', '\\' or control characters",
                            "CANNOT")
    parts = name.split(DELIMITER)
    if any(not p or p.strip() != p or p == "~" for p in parts):
        raise CommandFailed("empty or blank hierarchy level in mailbox name", "CANNOT")
    return name


#: longest LIST reference + pattern accepted (the matcher is O(pattern x name))
MAX_LIST_PATTERN = 512


class ListPattern:
    """A LIST pattern (RFC 3501 §6.3.8): `*` matches anything, `%` anything but the
    hierarchy delimiter; `INBOX` matches case-insensitively.

    Matched by walking the set of pattern positions over the name (an NFA), not by a
    backtracking regex: `LIST "" "*****x"` cannot stall the server.
    """

    def __init__(self, reference: str, pattern: str) -> None:
        full = reference + pattern
        if len(full) > MAX_LIST_PATTERN:
            raise CommandFailed("LIST pattern too long", "LIMIT")
        tokens: list[str] = []
        for ch in full:
            if ch in "*%" and tokens and tokens[-1] in ("*", "%"):
                # runs of wildcards collapse: "%%" is "%", any run with a "*" is "*"
                tokens[-1] = "%" if tokens[-1] == ch == "%" else "*"
                continue
            tokens.append(ch)
        self.inbox = full[:5].upper() == "INBOX"
        if self.inbox:
            tokens[:5] = list("INBOX")
        self.tokens = tokens

    def _closure(self, states: set[int]) -> set[int]:
        """A wildcard may also match nothing: step over it."""
        tokens, n = self.tokens, len(self.tokens)
        out, stack = set(states), list(states)
        while stack:
            i = stack.pop()
            if i < n and tokens[i] in ("*", "%") and i + 1 not in out:
                out.add(i + 1)
                stack.append(i + 1)
        return out

    def match(self, name: str) -> bool:
        if self.inbox and name[:5].upper() == "INBOX":
            name = "INBOX" + name[5:]
        tokens, n = self.tokens, len(self.tokens)
        states = self._closure({0})
        for ch in name:
            step: set[int] = set()
            for i in states:
                if i == n:
                    continue
                token = tokens[i]
                if token == "*" or (token == "%" and ch != DELIMITER):
                    step.add(i)
                elif token == ch:
                    step.add(i + 1)
            if not step:
                return False
            states = self._closure(step)
        return n in states


def list_pattern(reference: str, pattern: str) -> ListPattern:
    """The matcher for a LIST/LSUB reference and pattern."""
    return ListPattern(reference, pattern)


class IMAPAccount:
    """Folders of one account under its Maildir++ root; metadata work only."""

    def __init__(self, key: str, root: Path) -> None:
        self.key = key
        self.root = Path(root)

    def open_incoming(self) -> IncomingMessage:
        """A file in the account's tmp/ for an APPEND literal (the store writes it)."""
        return IncomingMessage(self.root)

    def ensure_defaults(self) -> None:
        """Create the Maildir and the special-use folders if missing (first login)."""
        if not all((self.root / f".{n}" / "cur").is_dir() for n in SPECIAL_USE):
            create_default_folders(self.root)
        make_maildir(self.root)

    def path(self, name: str) -> Path:
        name = validate_name(name)
        if name == "INBOX":
            return self.root
        return self.root / f".{name}"

    def exists(self, name: str) -> bool:
        try:
            return (self.path(name) / "cur").is_dir()
        except CommandFailed:
            return False

    def index(self, name: str) -> FolderIndex:
        """The shared index of an existing folder (CommandFailed [NONEXISTENT] if not)."""
        if not self.exists(name):
            raise CommandFailed("no such mailbox", "NONEXISTENT")
        return _keep(FolderIndex.open(self.path(name)))

    def loaded_index(self, name: str) -> FolderIndex | None:
        """The index of an existing folder if it is already in memory, else None."""
        if not self.exists(name):
            raise CommandFailed("no such mailbox", "NONEXISTENT")
        with _recent_lock:
            index = _RECENT.get(os.path.abspath(self.path(name)))
        return _keep(index) if index is not None else None

    def special_use(self, name: str) -> str | None:
        return SPECIAL_USE.get(name)

    # --- listing ------------------------------------------------------------------------

    def _names_on_disk(self) -> set[str]:
        names = set()
        try:
            with os.scandir(self.root) as it:
                for de in it:
                    if not de.name.startswith(".") or de.name in (".", ".."):
                        continue
                    name = de.name[1:]
                    try:
                        if de.is_dir() and validate_name(name) != "INBOX":
                            names.add(name)
                    except CommandFailed:
                        continue
        except FileNotFoundError:
            pass
        return names

    def folders(self) -> list[FolderInfo]:
        """Every folder, plus missing parents as non-selectable, INBOX first."""
        real = self._names_on_disk()
        every = set(real)
        for name in real:
            parts = name.split(DELIMITER)
            for i in range(1, len(parts)):
                every.add(DELIMITER.join(parts[:i]))
        parents = {n.rsplit(DELIMITER, 1)[0] for n in every if DELIMITER in n}
        out = [FolderInfo("INBOX", True, "INBOX" in parents, None)]
        for name in sorted(every):
            if name == "INBOX":
                continue
            out.append(FolderInfo(name, name in real, name in parents,
                                  self.special_use(name)))
        return out

    # --- changing -----------------------------------------------------------------------

    def create(self, name: str) -> None:
        """RFC 3501 §6.3.3: a trailing delimiter only declares intent; parents are implied."""
        name = name[:-1] if name.endswith(DELIMITER) and len(name) > 1 else name
        name = validate_name(name)
        if name == "INBOX" or self.exists(name):
            raise CommandFailed("mailbox already exists", "ALREADYEXISTS")
        path = self.path(name)
        make_maildir(path)
        (path / "maildirfolder").touch()
        FolderIndex.open(path)

    def delete(self, name: str) -> None:
        """Remove a folder and its messages (blocking: run in a worker thread)."""
        name = validate_name(name)
        if name == "INBOX":
            raise CommandFailed("INBOX cannot be deleted", "CANNOT")
        if not self.exists(name):
            raise CommandFailed("no such mailbox", "NONEXISTENT")
        path = self.path(name)
        # move aside first so a half-finished delete never looks like a folder
        doomed = self.root / "tmp" / f"deleted{os.getpid()}{id(path)}{name[:40]}"
        os.rename(path, doomed)
        _forget(path)
        shutil.rmtree(doomed, ignore_errors=True)
        self.unsubscribe(name)

    def rename(self, old: str, new: str) -> None:
        """RFC 3501 §6.3.5, including the children; INBOX moves its messages out."""
        old, new = validate_name(old), validate_name(new)
        if new == "INBOX":
            raise CommandFailed("cannot rename to INBOX", "ALREADYEXISTS")
        if self.exists(new) or any(n.startswith(new + DELIMITER)
                                   for n in self._names_on_disk()):
            raise CommandFailed("target mailbox already exists", "ALREADYEXISTS")
        if old == "INBOX":
            self._rename_inbox(new)
            return
        real = self._names_on_disk()
        moving = [n for n in real if n == old or n.startswith(old + DELIMITER)]
        if old not in real:
            raise CommandFailed("no such mailbox", "NONEXISTENT")
        if new.startswith(old + DELIMITER):
            raise CommandFailed("cannot move a mailbox into itself", "CANNOT")
        for name in sorted(moving, key=len):
            target = new + name[len(old):]
            os.rename(self.root / f".{name}", self.root / f".{target}")
            _forget(self.root / f".{name}")
        subs = self.subscriptions()
        changed = [s for s in subs if s == old or s.startswith(old + DELIMITER)]
        if changed:
            keep = [s for s in subs if s not in changed]
            self._write_subscriptions(keep + [new + s[len(old):] for s in changed])

    def _rename_inbox(self, new: str) -> None:
        self.create(new)
        target = self.path(new)
        for sub in ("new", "cur"):
            with os.scandir(self.root / sub) as it:
                for de in it:
                    if not de.name.startswith("."):
                        os.rename(de.path, target / sub / de.name)
        FolderIndex.open(self.root).sync(force=True)
        FolderIndex.open(target).sync(force=True)

    # --- subscriptions (RFC 3501 §6.3.6) -----------------------------------------------

    def subscriptions(self) -> list[str]:
        try:
            text = (self.root / SUBSCRIPTIONS).read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.split("\n") if line]

    def _write_subscriptions(self, names: list[str]) -> None:
        tmp = self.root / f".{SUBSCRIPTIONS}.tmp"
        tmp.write_text("".join(f"{n}\n" for n in dict.fromkeys(names)), encoding="utf-8")
        os.replace(tmp, self.root / SUBSCRIPTIONS)

    def subscribe(self, name: str) -> None:
        name = validate_name(name)
        subs = self.subscriptions()
        if name not in subs:
            self._write_subscriptions(subs + [name])

    def unsubscribe(self, name: str) -> None:
        # the canonical form, as subscribe stored it; an invalid name can only match a raw
        # entry in the file
        with contextlib.suppress(CommandFailed):
            name = validate_name(name)
        subs = self.subscriptions()
        if name in subs:
            self._write_subscriptions([s for s in subs if s != name])
