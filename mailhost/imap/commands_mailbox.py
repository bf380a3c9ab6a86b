"""Authenticated-state commands (RFC 3501 §6.3): SELECT/EXAMINE, folder management,
LIST/LSUB (with CHILDREN and SPECIAL-USE attributes), STATUS and APPEND (UIDPLUS)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mailhost.imap.account import FolderInfo, list_pattern, validate_name
from mailhost.imap.mailbox import (
    SYSTEM_FLAGS,
    SelectedFolder,
    format_flags,
    split_flags,
)
from mailhost.imap.wire import (
    Args,
    BadCommand,
    CommandFailed,
    istring,
    parse_datetime,
)

_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


class MailboxCommands:
    """Mixin of `IMAPServer`: commands on mailboxes as a whole."""

    # --- SELECT / EXAMINE (RFC 3501 §6.3.1-2) ----------------------------------------------

    def deselect(self) -> None:
        if self.selected is not None:
            self._stop_idle()
            self.selected.close()
            self.selected = None
            if self.state == "selected":
                self.state = "auth"

    @defer.inlineCallbacks
    def cmd_SELECT(self, tag: bytes, args: Args, uid: bool, readonly: bool = False):
        args.sp()
        name = args.mailbox()
        if args.accept(b" "):  # select parameters (RFC 4466): none supported
            args.paren_atoms()
        args.end()
        self.deselect()
        name = validate_name(name)
        index = yield self.open_index(name)
        folder = SelectedFolder(name, index, readonly, owner=self)
        if len(index) > 2000 or index.uidnext == 1:
            yield self.blocking(folder.open)  # may scan a big directory
        else:
            folder.open()
        if self._closed:
            folder.close()
            return ""
        self.selected = folder
        self.state = "selected"
        unseen = None
        for i, u in enumerate(folder.uids):
            entry = index.get(u)
            if entry is not None and "S" not in entry.flags:
                unseen = i + 1
                break
        flags = folder.flag_names()
        self.send(b"* FLAGS " + format_flags(flags))
        if readonly:
            self.send(b"* OK [PERMANENTFLAGS ()] read-only mailbox")
        else:
            self.send(b"* OK [PERMANENTFLAGS " + format_flags(flags + ["\\*"]) + b"] ok")
        self.send(b"* %d EXISTS" % folder.exists)
        self.send(b"* %d RECENT" % len(folder.recent))
        if unseen:
            self.send(b"* OK [UNSEEN %d] first unseen" % unseen)
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % index.uidvalidity)
        self.send(b"* OK [UIDNEXT %d] predicted next UID" % index.uidnext)
        return ("[READ-ONLY] EXAMINE completed" if readonly else
                "[READ-WRITE] SELECT completed")

    def cmd_EXAMINE(self, tag: bytes, args: Args, uid: bool):
        return self.cmd_SELECT(tag, args, uid, readonly=True)

    # --- CREATE / DELETE / RENAME / SUBSCRIBE (RFC 3501 §6.3.3-7) ----------------------------

    def cmd_CREATE(self, tag: bytes, args: Args, uid: bool) -> str:
        args.sp()
        name = args.mailbox()
        args.end()
        self.account.create(name)
        return ""

    @defer.inlineCallbacks
    def cmd_DELETE(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        name = validate_name(args.mailbox())
        args.end()
        if self.selected is not None and self.selected.name == name:
            self.deselect()
        yield self.blocking(self.account.delete, name)
        return ""

    @defer.inlineCallbacks
    def cmd_RENAME(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        old = validate_name(args.mailbox())
        args.sp()
        new = args.mailbox()
        args.end()
        if self.selected is not None and old != "INBOX" and (
                self.selected.name == old or self.selected.name.startswith(old + ".")):
            self.deselect()
        yield self.blocking(self.account.rename, old, new)
        return ""

    def cmd_SUBSCRIBE(self, tag: bytes, args: Args, uid: bool) -> str:
        args.sp()
        name = args.mailbox()
        args.end()
        self.account.subscribe(name)
        return ""

    def cmd_UNSUBSCRIBE(self, tag: bytes, args: Args, uid: bool) -> str:
        args.sp()
        name = args.mailbox()
        args.end()
        self.account.unsubscribe(name)
        return ""

    # --- LIST / LSUB (RFC 3501 §6.3.8-9, RFC 5258 basics, RFC 3348, RFC 6154) ------------

    def _list_args(self, args: Args) -> tuple[set[str], str, list[str]]:
        args.sp()
        options: set[str] = set()
        if args.peek() == ord("("):
            options = {o.upper() for o in args.paren_atoms()}
            args.sp()
        reference = args.astring().decode("utf-8", "replace")
        args.sp()
        if args.accept(b"("):
            patterns = []
            while not args.accept(b")"):
                args.accept(b" ")
                patterns.append(args.list_mailbox())
        else:
            patterns = [args.list_mailbox()]
        if args.accept(b" "):
            word = args.atom().upper()
            if word != "RETURN":
                raise BadCommand("RETURN expected")
            args.sp()
            options |= {"RETURN-" + o.upper() for o in args.paren_atoms()}
        args.end()
        return options, reference, patterns

    def cmd_LIST(self, tag: bytes, args: Args, uid: bool, lsub: bool = False) -> str:
        options, reference, patterns = self._list_args(args)
        verb = b"LSUB" if lsub else b"LIST"
        if patterns == [""]:
            self.send(b'* %s (\\Noselect) "." ""' % verb)
            return ""
        subscribed = set(self.account.subscriptions())
        only_subscribed = lsub or "SUBSCRIBED" in options
        folders = {f.name: f for f in self.account.folders()}
        names: list[FolderInfo] = []
        if only_subscribed:
            for name in sorted(subscribed):
                info = folders.get(name) or FolderInfo(name, False, False, None)
                names.append(info)
        else:
            names = list(folders.values())
        regexes = [list_pattern(reference, p) for p in patterns]
        # RFC 6154 §3: the SPECIAL-USE selection option lists only special-use mailboxes
        only_special = not lsub and "SPECIAL-USE" in options
        for info in names:
            if not any(r.match(info.name) for r in regexes):
                continue
            if only_special and not info.special_use:
                continue
            attrs = []
            if not info.selectable:
                attrs.append("\\Noselect" if info.has_children or lsub
                             else "\\NonExistent")
            if not lsub:
                attrs.append("\\HasChildren" if info.has_children else "\\HasNoChildren")
                if info.special_use:
                    attrs.append(info.special_use)
                if info.name in subscribed and ("SUBSCRIBED" in options or
                                                "RETURN-SUBSCRIBED" in options):
                    attrs.append("\\Subscribed")
            self.send(b"* " + verb + b" (" + " ".join(attrs).encode() + b') "." ' +
                      istring(info.name))
        return ""

    def cmd_LSUB(self, tag: bytes, args: Args, uid: bool) -> str:
        return self.cmd_LIST(tag, args, uid, lsub=True)

    # --- STATUS (RFC 3501 §6.3.10) -------------------------------------------------------

    @defer.inlineCallbacks
    def cmd_STATUS(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        name = validate_name(args.mailbox())
        args.sp()
        items = [i.upper() for i in args.paren_atoms()]
        args.end()
        if not items or any(i not in _STATUS_ITEMS for i in items):
            raise BadCommand("unknown STATUS item")
        index = yield self.open_index(name)
        yield self.blocking(index.sync)
        entries = index.messages()
        selected = self.selected if self.selected and self.selected.name == name else None
        values = {
            "MESSAGES": len(entries),
            "RECENT": len(selected.recent) if selected else
            sum(1 for e in entries if e.subdir == "new"),
            "UIDNEXT": index.uidnext,
            "UIDVALIDITY": index.uidvalidity,
            "UNSEEN": sum(1 for e in entries if "S" not in e.flags),
        }
        body = " ".join(f"{i} {values[i]}" for i in items).encode()
        self.send(b"* STATUS " + istring(name) + b" (" + body + b")")
        return ""

    # --- APPEND (RFC 3501 §6.3.11, RFC 4315 APPENDUID) ---------------------------------------

    @defer.inlineCallbacks
    def cmd_APPEND(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        name = validate_name(args.mailbox())
        args.sp()
        flags: list[str] = []
        date = None
        if args.peek() == ord("("):
            flags = args.paren_atoms()
            args.sp()
        if args.peek() == ord('"'):
            date = parse_datetime(args.quoted().decode("ascii", "replace"))
            args.sp()
        if not args.at_literal():
            raise BadCommand("message literal expected")
        lit = args.take_literal()
        args.end()
        if lit.path is None:
            raise BadCommand("message literal expected")
        if lit.size == 0:
            raise CommandFailed("empty message", "CANNOT")
        bad = [f for f in flags if f.startswith("\\") and f.capitalize() not in
               {s.capitalize() for s in SYSTEM_FLAGS}]
        if bad:
            raise BadCommand("invalid flag " + bad[0][:40])
        if not self.account.exists(name):
            raise CommandFailed("no such mailbox", "TRYCREATE")
        index = yield self.open_index(name)
        letters, keywords = split_flags(flags)
        entry = yield self.blocking(_store_appended, index, lit.path, letters, keywords,
                                    date, self)
        return f"[APPENDUID {index.uidvalidity} {entry.uid}] APPEND completed"

    def cmd_IDLE(self, tag: bytes, args: Args, uid: bool):
        args.end()
        return self.start_idle()


def _store_appended(index: Any, path: Any, letters: str, keywords: Any, date: Any,
                    origin: Any) -> Any:
    """Worker thread: the index makes the streamed literal durable and gives it a UID."""
    return index.add(path, letters, keywords, internaldate=date, origin=origin)

