"""Selected-state commands (RFC 3501 §6.4) and their UID forms, plus IDLE (RFC 2177),
UIDPLUS (RFC 4315: COPYUID, UID EXPUNGE), MOVE (RFC 6851) and UNSELECT (RFC 3691)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mailhost.imap.account import validate_name
from mailhost.imap.fetch import (
    NEED_FULL,
    NEED_HEADER,
    NEED_NONE,
    FetchItem,
    parse_fetch_atts,
    render,
)
from mailhost.imap.mailbox import entry_flags, format_flags, split_flags
from mailhost.imap.message import Part, read_header, read_wire
from mailhost.imap.search import Matcher, needs_content, parse_search
from mailhost.imap.wire import (
    ATOM_CHARS,
    Args,
    BadCommand,
    CommandFailed,
    format_sequence_set,
    parse_sequence_set,
    select_positions,
)

FETCH_BATCH = 250
#: bytes of message files read on the reactor thread at most (larger: worker thread)
SMALL_READ = 262144
#: message bytes read per FETCH slice (one large message may exceed it alone)
BATCH_BYTES = 8 << 20
IDLE_POLL = 0.5
_SEQ_CHARS = frozenset(b"0123456789:*,")


def _load(entry: Any, need: int) -> Part | None:
    """Worker thread: the parsed message (or its header), None if it vanished."""
    try:
        data = read_wire(entry.path) if need == NEED_FULL else read_header(entry.path)
    except FileNotFoundError:
        return None
    return Part(data)


def _batches(folder: Any, positions: list[int], bodies: bool) -> list[list[tuple[int, Any]]]:
    """FETCH work in slices of at most FETCH_BATCH messages and, when message content
    is read, about BATCH_BYTES bytes, so memory stays bounded for any folder."""
    out: list[list[tuple[int, Any]]] = [[]]
    size = 0
    for pos in positions:
        entry = folder.index.get(folder.uids[pos])
        if entry is None:
            continue
        cost = _size(entry) if bodies else 0
        if out[-1] and (len(out[-1]) >= FETCH_BATCH or size + cost > BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append((pos, entry))
        size += cost
    return out if out[-1] else []


def _size(entry: Any) -> int:
    try:
        return entry.size
    except OSError:
        return 0


class SelectedCommands:
    """Mixin of `IMAPServer`: commands on the selected mailbox."""

    def _positions(self, args: Args, uid: bool) -> list[int]:
        raw = args.read_chars(_SEQ_CHARS).decode()
        return select_positions(parse_sequence_set(raw), self.selected.uids, uid)

    def _require_writable(self) -> None:
        if self.selected.readonly:
            raise CommandFailed("mailbox is read-only", "READ-ONLY")

    # --- CHECK / CLOSE / UNSELECT / EXPUNGE ----------------------------------------------

    def cmd_CHECK(self, tag: bytes, args: Args, uid: bool) -> str:
        args.end()
        return ""

    @defer.inlineCallbacks
    def cmd_CLOSE(self, tag: bytes, args: Args, uid: bool):
        """RFC 3501 §6.4.2: expunge silently, then deselect."""
        args.end()
        folder = self.selected
        if not folder.readonly:
            doomed = [e.uid for e in folder.index.messages() if "T" in e.flags]
            if doomed:
                yield self.blocking(folder.index.expunge, doomed, self)
        self.deselect()
        return ""

    def cmd_UNSELECT(self, tag: bytes, args: Args, uid: bool) -> str:
        args.end()
        self.deselect()
        return ""

    @defer.inlineCallbacks
    def cmd_EXPUNGE(self, tag: bytes, args: Args, uid: bool):
        wanted = None
        if uid:  # RFC 4315 §2.1 UID EXPUNGE
            args.sp()
            wanted = {self.selected.uids[p] for p in self._positions(args, True)}
        args.end()
        self._require_writable()
        folder = self.selected
        doomed = [e.uid for e in folder.index.messages() if "T" in e.flags
                  and (wanted is None or e.uid in wanted)]
        if doomed:
            yield self.blocking(folder.index.expunge, doomed, self)
        return ""

    # --- SEARCH (RFC 3501 §6.4.4) ----------------------------------------------------------

    @defer.inlineCallbacks
    def cmd_SEARCH(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        tree = parse_search(args)
        folder = self.selected
        uids = list(folder.uids)
        matcher = Matcher(tree, uids, set(folder.recent))
        need = needs_content(tree)
        index = folder.index

        def run() -> list[int]:
            hits = []
            for pos, u in enumerate(uids):
                entry = index.get(u)
                if entry is None:
                    continue
                if matcher.match(entry, lambda e=entry: _load(e, NEED_FULL if need == 2
                                                              else NEED_HEADER)):
                    hits.append(u if uid else pos + 1)
            return hits

        hits = (yield self.blocking(run)) if need or len(uids) > 5000 else run()
        self.send(b"* SEARCH" + b"".join(b" %d" % h for h in hits))
        return ""

    # --- FETCH (RFC 3501 §6.4.5) -----------------------------------------------------------

    @defer.inlineCallbacks
    def cmd_FETCH(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        positions = self._positions(args, uid)
        args.sp()
        items = parse_fetch_atts(args)
        args.end()
        if uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
        folder = self.selected
        need = max(i.need for i in items)
        mark_seen = not folder.readonly and any(i.sets_seen for i in items)
        if mark_seen and not any(i.name == "FLAGS" for i in items):
            items.append(FetchItem("FLAGS"))
        producer = _Throttle(self.transport)
        flag_cache: dict[tuple, bytes] = {}
        try:
            batches = _batches(folder, positions, need != NEED_NONE)
            for n, entries in enumerate(batches):
                parts: list[Any] = [None] * len(entries)
                if need != NEED_NONE and len(entries) <= 4 and \
                        sum(_size(e) for _, e in entries) < SMALL_READ:
                    parts = [_load(e, need) for _, e in entries]  # a few small files
                elif need != NEED_NONE:
                    parts = yield self.blocking(
                        lambda es=entries: [_load(e, need) for _, e in es])
                if mark_seen:
                    unseen = [e.uid for _, e in entries if "S" not in e.flags]
                    if len(unseen) > 50:
                        yield self.blocking(_add_seen, folder.index, unseen, self)
                    elif unseen:
                        _add_seen(folder.index, unseen, self)
                if self._closed or self.selected is not folder:
                    return ""
                out = []
                for (pos, entry), part in zip(entries, parts, strict=True):
                    if need != NEED_NONE and part is None:
                        continue
                    recent = entry.uid in folder.recent
                    key = (entry.flags, entry.keywords, recent)
                    flags = flag_cache.get(key)
                    if flags is None:
                        flags = flag_cache[key] = format_flags(entry_flags(entry, recent))
                    body = b" ".join(render(i, entry, part, flags) for i in items)
                    out.append(b"* %d FETCH (" % (pos + 1) + body + b")\r\n")
                self.transport.write(b"".join(out))
                if n + 1 < len(batches):
                    yield producer.wait(self.ctx.clock)
        finally:
            producer.close()
        return ""

    # --- STORE (RFC 3501 §6.4.6) -----------------------------------------------------------

    @defer.inlineCallbacks
    def cmd_STORE(self, tag: bytes, args: Args, uid: bool):
        args.sp()
        positions = self._positions(args, uid)
        args.sp()
        word = args.read_chars(ATOM_CHARS | {ord("+"), ord("-")}).decode().upper()
        mode, _, rest = word.partition("FLAGS")
        if mode not in ("", "+", "-") or rest not in ("", ".SILENT"):
            raise BadCommand("expected [+|-]FLAGS[.SILENT]")
        args.sp()
        flags = args.flag_list()
        args.end()
        self._require_writable()
        letters, keywords = split_flags(flags)
        folder = self.selected
        targets = [folder.uids[p] for p in positions]
        if keywords or len(targets) > 50:  # keyword records are fsynced: off the reactor
            changed = yield self.blocking(_store_flags, folder.index, targets, mode, letters,
                                          keywords, self)
        else:  # renames only: cheap metadata work
            changed = _store_flags(folder.index, targets, mode, letters, keywords, self)
        if keywords - folder.keywords:
            folder.keywords |= keywords
            self.send(b"* FLAGS " + format_flags(folder.flag_names()))
        if not rest:
            for u in targets:
                entry = folder.index.get(u)
                msn = folder.msn(u)
                if entry is None or msn is None:
                    continue
                flags_b = format_flags(entry_flags(entry, u in folder.recent))
                uid_part = b"UID %d " % u if uid else b""
                self.send(b"* %d FETCH (%sFLAGS %s)" % (msn, uid_part, flags_b))
        del changed
        return ""

    # --- COPY / MOVE (RFC 3501 §6.4.7, RFC 4315, RFC 6851) -----------------------------------

    @defer.inlineCallbacks
    def cmd_COPY(self, tag: bytes, args: Args, uid: bool, move: bool = False):
        args.sp()
        positions = self._positions(args, uid)
        args.sp()
        name = validate_name(args.mailbox())
        args.end()
        if move:
            self._require_writable()
        if not self.account.exists(name):
            raise CommandFailed("no such mailbox", "TRYCREATE")
        folder = self.selected
        target = yield self.open_index(name)
        sources = [folder.uids[p] for p in positions]
        pairs = yield self.blocking(_copy_messages, folder.index, target, sources, self)
        if not pairs:
            return "no messages copied" if not move else "no messages moved"
        code = (f"COPYUID {target.uidvalidity} {format_sequence_set([a for a, _ in pairs])} "
                f"{format_sequence_set([b for _, b in pairs])}")
        if not move:
            return f"[{code}] COPY completed"
        self.send(f"* OK [{code}] moved".encode())
        yield self.blocking(folder.index.expunge, [a for a, _ in pairs], self)
        return "MOVE completed"

    def cmd_MOVE(self, tag: bytes, args: Args, uid: bool):
        return self.cmd_COPY(tag, args, uid, move=True)

    # --- IDLE (RFC 2177) ---------------------------------------------------------------------

    def start_idle(self) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        self._idle_done = done
        self.send(b"+ idling")

        def line(data: bytes) -> None:
            self._stop_idle()
            if data.strip().upper() == b"DONE":
                done.callback("IDLE terminated")
            else:
                done.errback(BadCommand("expected DONE"))

        self._line_handler = line
        if self.selected is not None:
            self.selected.wakeup = lambda: self.in_reactor(self._idle_push)
        self._idle_poll()
        return done

    def _idle_poll(self) -> None:
        """Every IDLE_POLL seconds: look for deliveries (a scan runs in a worker thread).

        Each poll carries a token, so a scan that ends after DONE (or after a new IDLE has
        started its own polling) schedules nothing."""
        self._idle_call = None
        token = self._idle_token = object()
        folder = self.selected
        if folder is not None and not self._closed and folder.index.needs_scan():
            self.blocking(folder.sync).addBoth(lambda _: self._idle_polled(token))
        else:
            self._idle_polled(token)

    def _idle_polled(self, token: object) -> None:
        if token is not getattr(self, "_idle_token", None):
            return
        self._idle_push()
        if getattr(self, "_idle_done", None) is not None and not self._closed:
            self._idle_call = self.ctx.clock.callLater(IDLE_POLL, self._idle_poll)

    def _idle_push(self) -> None:
        if getattr(self, "_idle_done", None) is None or self.selected is None or self._closed:
            return
        for line in self.selected.updates(True):
            self.send(line)

    def _stop_idle(self) -> None:
        call = getattr(self, "_idle_call", None)
        if call is not None and call.active():
            call.cancel()
        self._idle_call = None
        self._idle_token = None
        self._idle_done = None
        if self.selected is not None:
            self.selected.wakeup = None


class _Throttle:
    """Waits between FETCH batches while the transport's buffer is full."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.paused = False
        self._waiter: defer.Deferred | None = None
        self.registered = False
        try:
            transport.registerProducer(self, True)
            self.registered = True
        except RuntimeError:  # another producer is registered: no flow control
            pass

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def wait(self, clock: Any) -> defer.Deferred:
        if self.paused:
            self._waiter = defer.Deferred()
            return self._waiter
        d: defer.Deferred = defer.Deferred()
        clock.callLater(0, d.callback, None)
        return d

    def close(self) -> None:
        if self.registered:
            self.registered = False
            self.transport.unregisterProducer()


def _add_seen(index: Any, uids: list[int], origin: Any) -> None:
    for u in uids:
        entry = index.get(u)
        if entry is not None and "S" not in entry.flags:
            index.set_flags(u, entry.flags + "S", origin=origin)


def _store_flags(index: Any, uids: list[int], mode: str, letters: str,
                 keywords: frozenset[str], origin: Any) -> int:
    """Worker thread: apply +FLAGS / -FLAGS / FLAGS to each message."""
    changed = 0
    for u in uids:
        entry = index.get(u)
        if entry is None:
            continue
        old_letters, old_kw = set(entry.flags), set(entry.keywords)
        if mode == "+":
            new_letters, new_kw = old_letters | set(letters), old_kw | keywords
        elif mode == "-":
            new_letters, new_kw = old_letters - set(letters), old_kw - keywords
        else:
            new_letters, new_kw = set(letters), set(keywords)
        if new_letters == old_letters and new_kw == old_kw:
            continue
        index.set_flags(u, new_letters, new_kw if new_kw != old_kw else None, origin=origin)
        changed += 1
    return changed


def _copy_messages(source: Any, target: Any, uids: list[int],
                   origin: Any) -> list[tuple[int, int]]:
    """Worker thread: link (or copy) each message into the target; (old, new) UIDs."""
    pairs = []
    for u in uids:
        entry = source.get(u)
        if entry is None:
            continue
        try:
            new = target.add_copy(entry.path, entry.flags, entry.keywords,
                                  internaldate=entry.internaldate, origin=origin)
        except FileNotFoundError:  # expunged by another session meanwhile
            continue
        pairs.append((u, new.uid))
    return pairs
