"""The queue scheduler: picks due recipients, groups them by destination, relays them
under concurrency limits, records per-recipient results, and triggers reports.

Time comes from an injected clock (IReactorTime), so tests drive the retry schedule and
the lifetime with `task.Clock`. Every state change is saved (atomically) before the
next step that depends on it: a delivered recipient is marked done on disk before the
entry is removed, a report is queued or stored before its recipients are marked
reported. A crash can therefore repeat at most the one transaction that was in flight.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailhost.config import QueueConfig
from mailhost.queue import dsn
from mailhost.queue.relay import RecipientOutcome, Relay
from mailhost.queue.spool import DELIVERED, FAILED, PENDING, Envelope, Recipient, Spool
from mailhost.smtp.client import Transaction, local_reply

log = Logger(namespace="mailhost.queue")

#: seconds before a report that could not be handed on is tried again
REPORT_RETRY = 60.0

#: (to, message bytes, kind) -> fires once the report is durably stored or queued
NoticeSender = Callable[[str, bytes, str], Awaitable[Any]]


def retry_delay(schedule: tuple[int, ...], attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failure; the last value repeats."""
    return float(schedule[min(max(attempts, 1), len(schedule)) - 1])


class Scheduler:
    """Drives the queue entries held in memory (the spool on disk is the truth)."""

    def __init__(self, spool: Spool, relay: Relay, clock: IReactorTime, config: QueueConfig,
                 hostname: str, postmaster: str, send_notice: NoticeSender) -> None:
        self.spool = spool
        self.relay = relay
        self.clock = clock
        self.config = config
        self.hostname = hostname
        self.postmaster = postmaster
        self.send_notice = send_notice
        self.entries: dict[str, Envelope] = {}
        self._busy: dict[str, set[str]] = {}  # queue id -> recipients in flight
        self._reporting: set[str] = set()
        self._report_after: dict[str, float] = {}
        self._bounce_requested: set[str] = set()
        self._locks: dict[str, defer.DeferredLock] = {}
        self._global = defer.DeferredSemaphore(config.concurrency)
        self._per_dest: dict[str, defer.DeferredSemaphore] = {}
        self._timer: IDelayedCall | None = None
        self._wakeups: list[tuple[float, str]] = []
        self._scan: task.LoopingCall | None = None
        self._active = 0
        self._scanning = False
        self._idle: list[defer.Deferred[None]] = []
        self.running = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self, envelopes: list[Envelope]) -> None:
        self.running = True
        for env in envelopes:
            self.entries[env.id] = env
            self._wake(env)
        self._scan = task.LoopingCall(self._scan_tick)
        self._scan.clock = self.clock
        self._scan.start(self.config.scan_interval, now=True).addErrback(
            lambda f: log.failure("queue scan stopped", f))
        self.schedule()

    def stop(self) -> defer.Deferred[None]:
        """Take no new attempts; fires when the attempts in flight are finished."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._scan is not None and self._scan.running:
            self._scan.stop()
        return self.wait_idle()

    def wait_idle(self) -> defer.Deferred[None]:
        if self._active == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def add(self, env: Envelope) -> None:
        """A newly committed entry: try it as soon as possible."""
        self.entries[env.id] = env
        log.info("queued {queue_id} from=<{sender}> to={recipients} size={size}",
                 event="queue.enqueued", queue_id=env.id, sender=env.sender,
                 recipients=[r.address for r in env.recipients], size=env.size)
        self._wake(env)
        self.schedule()

    # -- timing ----------------------------------------------------------------------

    def _entry_due(self, env: Envelope) -> float | None:
        """When this entry next needs attention (an attempt, a report, a notice)."""
        busy = self._busy.get(env.id, set())
        times = [r.next_attempt for r in env.pending() if r.address not in busy]
        if self._needs_report(env):
            times.append(self._report_after.get(env.id, 0.0))
        if self._wants_delay_notice(env):
            times.append(env.created + self.config.delay_warning)
        if not times and env.finished() and not busy:
            times.append(0.0)
        return min(times) if times else None

    def _wake(self, env: Envelope) -> None:
        """Remember when to look at `env` again (a heap: no scan of every entry)."""
        due = self._entry_due(env)
        if due is not None:
            heapq.heappush(self._wakeups, (due, env.id))

    def schedule(self) -> None:
        """(Re)arm the timer for the earliest thing to do."""
        if not self.running:
            return
        while self._wakeups and self._wakeups[0][1] not in self.entries:
            heapq.heappop(self._wakeups)
        due = self._wakeups[0][0] if self._wakeups else None
        if self._timer is not None and self._timer.active():
            if due is not None and self._timer.getTime() <= due:
                return
            self._timer.cancel()
        self._timer = None
        if due is not None:
            delay = max(0.0, due - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        due: dict[str, None] = {}
        while self._wakeups and self._wakeups[0][0] <= now:
            due[heapq.heappop(self._wakeups)[1]] = None
        for qid in due:
            env = self.entries.get(qid)
            if env is not None and self.running:
                self._start_due(env, now)
                self._wake(env)
        self.schedule()

    def run_due(self) -> defer.Deferred[None]:
        """Start everything that is due now; fires when all work in flight is done."""
        if self.running:
            now = self.clock.seconds()
            for env in list(self.entries.values()):
                self._start_due(env, now)
                self._wake(env)
            self.schedule()
        return self.wait_idle()

    def _start_due(self, env: Envelope, now: float) -> None:
        busy = self._busy.setdefault(env.id, set())
        groups: dict[str, list[Recipient]] = {}
        for r in env.pending():
            if r.address not in busy and r.next_attempt <= now:
                groups.setdefault(self.relay.destination(r.address), []).append(r)
        for dest, rcpts in groups.items():
            busy.update(r.address for r in rcpts)
            self._spawn(self._attempt(env, dest, rcpts), env)
        if self._wants_delay_notice(env) and now >= env.created + self.config.delay_warning:
            env.delay_warned = True  # at most one notice, even if sending it fails
            self._spawn(self._delay_notice(env), env)
        if self._needs_report(env) and now >= self._report_after.get(env.id, 0.0):
            self._spawn(self._report(env), env)
        elif env.finished() and not busy:
            self._spawn(self._maybe_remove(env), env)  # e.g. a crash before removal

    def _spawn(self, coro: Awaitable[Any], env: Envelope | None = None) -> None:
        self._active += 1
        d = defer.ensureDeferred(coro)  # type: ignore[arg-type]
        d.addErrback(lambda f: log.failure("queue job failed", f))

        def done(_: Any) -> None:
            self._active -= 1
            if env is not None and env.id in self.entries:
                self._wake(env)
            self.schedule()
            if self._active == 0:
                waiters, self._idle = self._idle, []
                for w in waiters:
                    w.callback(None)

        d.addCallback(done)

    # -- one delivery attempt --------------------------------------------------------

    def _limit(self, dest: str) -> defer.DeferredSemaphore:
        if dest not in self._per_dest:
            self._per_dest[dest] = defer.DeferredSemaphore(self.config.per_destination)
        return self._per_dest[dest]

    async def _attempt(self, env: Envelope, dest: str, rcpts: list[Recipient]) -> None:
        per_dest = self._limit(dest)
        await per_dest.acquire()
        try:
            await self._global.acquire()
            try:
                outcomes = await self._deliver(env, dest, rcpts)
            except _Deleted:
                self._busy.get(env.id, set()).difference_update(r.address for r in rcpts)
                return
            except Exception as e:  # noqa: BLE001 - a bug must not wedge the entry
                log.failure("delivery of {queue_id} raised", queue_id=env.id)
                reply = local_reply(451, "4.3.0", f"internal error: {type(e).__name__}")
                outcomes = {r.address: RecipientOutcome(reply) for r in rcpts}
            finally:
                self._global.release()
        finally:
            per_dest.release()
            if not per_dest.waiting and per_dest.tokens == per_dest.limit:
                self._per_dest.pop(dest, None)
        now = self.clock.seconds()
        for r in rcpts:
            self._record(env, r, outcomes[r.address], now)
        self._busy.get(env.id, set()).difference_update(r.address for r in rcpts)
        if env.id in self._bounce_requested:
            self._fail_pending(env, "bounced by the administrator")
        if not (env.finished() and not self._busy.get(env.id)):
            await self._save(env)  # a finished entry is removed instead (one fsync less)
        await self._after_change(env)

    async def _deliver(self, env: Envelope, dest: str,
                       rcpts: list[Recipient]) -> dict[str, RecipientOutcome]:
        if env.id not in self.entries:
            raise _Deleted()
        try:
            data = await self.spool.read_data(env.id)
        except FileNotFoundError:
            self._forget(env.id)
            raise _Deleted() from None
        txn = Transaction(
            helo=self.hostname, sender=env.sender, recipients=[r.address for r in rcpts],
            data=data, smtputf8=env.smtputf8, eightbit=env.body == "8BITMIME",
            ret=env.ret, envid=env.envid,
            dsn={r.address: (r.notify, r.orcpt) for r in rcpts if r.notify or r.orcpt})
        domain = dest if dest != "smarthost" else rcpts[0].address.rpartition("@")[2]
        return await self.relay.deliver(domain, txn)

    def _record(self, env: Envelope, r: Recipient, outcome: RecipientOutcome,
                now: float) -> None:
        reply = outcome.reply
        r.attempts += 1
        r.last_attempt = now
        r.last_reply = str(reply)
        r.status_code = reply.status
        r.remote_mta = outcome.mx
        expires = env.created + self.config.lifetime
        if reply.positive:
            r.status, result = DELIVERED, "delivered"
        elif reply.permanent:
            r.status, result = FAILED, "failed"
        elif now >= expires:
            r.status, result = FAILED, "expired"
            r.status_code = "4.4.7"  # RFC 3463: delivery time expired
        else:
            r.next_attempt = min(now + retry_delay(self.config.retry, r.attempts), expires)
            result = "deferred"
        log.info("delivery {result} {queue_id} to=<{recipient}> mx={mx} ip={ip} tls={tls} "
                 "reply={reply!r} delay={delay:.0f} attempts={attempts}",
                 event="queue.attempt", result=result, queue_id=env.id,
                 recipient=r.address, mx=outcome.mx, ip=outcome.ip, tls=outcome.tls,
                 reply=str(reply), code=reply.code, status=r.status_code,
                 delay=now - env.created, attempts=r.attempts,
                 next_attempt=r.next_attempt if r.status == PENDING else None)

    def _fail_pending(self, env: Envelope, reason: str) -> None:
        busy = self._busy.get(env.id, set())
        for r in env.pending():
            if r.address not in busy:
                r.status, r.status_code = FAILED, "5.0.0"
                r.last_reply = f"554 5.0.0 {reason}"
                r.remote_mta = ""
        if not busy:
            self._bounce_requested.discard(env.id)

    # -- saving, reporting, removal --------------------------------------------------

    async def _save(self, env: Envelope) -> None:
        lock = self._locks.setdefault(env.id, defer.DeferredLock())
        await lock.acquire()
        try:
            if env.id in self.entries and not await self.spool.save(env):
                self._forget(env.id)  # deleted from the spool by the CLI
        finally:
            lock.release()

    def _needs_report(self, env: Envelope) -> bool:
        return (env.id not in self._reporting and not self._busy.get(env.id)
                and any(r.status == FAILED and not r.reported for r in env.recipients))

    def _wants_delay_notice(self, env: Envelope) -> bool:
        return (not env.delay_warned and env.sender != "" and env.kind == "normal"
                and any(dsn.wants(r, "DELAY") for r in env.pending()))

    async def _after_change(self, env: Envelope) -> None:
        if env.id not in self.entries:
            return
        if self._needs_report(env):
            await self._report(env)
        await self._maybe_remove(env)

    async def _report(self, env: Envelope) -> None:
        """Send one failure report for every failed, unreported recipient."""
        if env.id in self._reporting or env.id not in self.entries:
            return
        self._reporting.add(env.id)
        try:
            failed = [r for r in env.recipients if r.status == FAILED and not r.reported]
            try:
                await self._send_failure_report(env, failed)
            except Exception:  # noqa: BLE001 - store or queue refused: retry later
                log.failure("report for {queue_id} not sent; will retry", queue_id=env.id)
                self._report_after[env.id] = self.clock.seconds() + REPORT_RETRY
                return
            for r in failed:
                r.reported = True
            self._report_after.pop(env.id, None)
            await self._save(env)
        finally:
            self._reporting.discard(env.id)
        await self._maybe_remove(env)

    async def _send_failure_report(self, env: Envelope, failed: list[Recipient]) -> None:
        now = self.clock.seconds()
        if env.sender == "":
            # RFC 5321 §4.5.5 / RFC 3464 §2: never report to the null sender. A failed
            # report goes to postmaster once; a failed postmaster copy is the end.
            if env.kind == "postmaster":
                log.warn("postmaster notice {queue_id} undeliverable; dropped",
                         event="queue.dsn_dropped", queue_id=env.id)
                return
            to, kind = self.postmaster, "postmaster"
            report_env = attrs.evolve(env, sender=to, ret="FULL")
        else:
            wanted = [r for r in failed if dsn.wants(r, "FAILURE")]
            if not wanted:
                return
            failed, to, kind, report_env = wanted, env.sender, "dsn", env
        data = await self.spool.read_data(env.id)
        message = dsn.build_report(self.hostname, report_env, failed, dsn.FAILED, data, now)
        await self.send_notice(to, message, kind)
        log.info("report {action} for {queue_id} sent to=<{to}> recipients={recipients}",
                 event="queue.dsn", action=dsn.FAILED, queue_id=env.id, to=to, kind=kind,
                 recipients=[r.address for r in failed])

    async def _delay_notice(self, env: Envelope) -> None:
        now = self.clock.seconds()
        pending = [r for r in env.pending() if dsn.wants(r, "DELAY")]
        try:
            data = await self.spool.read_data(env.id)
            message = dsn.build_report(self.hostname, env, pending, dsn.DELAYED, data, now,
                                       will_retry_until=env.created + self.config.lifetime)
            await self.send_notice(env.sender, message, "dsn")
        except Exception:  # noqa: BLE001 - a delay notice is a courtesy; do not retry
            log.failure("delay notice for {queue_id} not sent", queue_id=env.id)
        else:
            log.info("report {action} for {queue_id} sent to=<{to}> recipients={recipients}",
                     event="queue.dsn", action=dsn.DELAYED, queue_id=env.id, to=env.sender,
                     kind="dsn", recipients=[r.address for r in pending])
        await self._save(env)

    async def _maybe_remove(self, env: Envelope) -> None:
        if env.id not in self.entries or not env.finished() or self._busy.get(env.id):
            return
        lock = self._locks.setdefault(env.id, defer.DeferredLock())
        await lock.acquire()  # no envelope save may land after the removal
        try:
            if self.entries.pop(env.id, None) is None:
                return
            await self.spool.remove(env.id)
            self._forget(env.id)
        finally:
            lock.release()
        log.info("removed {queue_id}", event="queue.removed", queue_id=env.id)

    def _forget(self, qid: str) -> None:
        self.entries.pop(qid, None)
        self._busy.pop(qid, None)
        self._report_after.pop(qid, None)
        self._bounce_requested.discard(qid)
        self._locks.pop(qid, None)

    # -- operator requests (from the CLI through the control directory) --------------

    def _scan_tick(self) -> None:
        if not self._scanning:
            self._scanning = True
            self._spawn(self.scan())  # counted as work in flight: wait_idle covers it

    async def scan(self) -> None:
        """Notice CLI changes: deleted entries and flush/bounce requests."""
        try:
            await self._scan_once()
        finally:
            self._scanning = False

    async def _scan_once(self) -> None:
        known = set(self.entries)  # entries committed during the scan are not judged
        on_disk, requests = await self.spool.scan()
        present = set(on_disk)
        for qid in known & set(self.entries):
            if qid not in present and not self._busy.get(qid):
                log.info("{queue_id} deleted by the operator", event="queue.deleted",
                         queue_id=qid)
                self._forget(qid)
        for action, qid in requests:
            targets = list(self.entries.values()) if qid == "ALL" else (
                [self.entries[qid]] if qid in self.entries else [])
            for env in targets:
                if action == "flush":
                    self.flush(env)
                else:
                    self._bounce_requested.add(env.id)
                    self._fail_pending(env, "bounced by the administrator")
                    await self._save(env)
                    await self._after_change(env)
        if requests:
            self.run_due()

    def flush(self, env: Envelope) -> None:
        now = self.clock.seconds()
        for r in env.pending():
            r.next_attempt = min(r.next_attempt, now)
        self._report_after.pop(env.id, None)
        self._wake(env)


class _Deleted(Exception):
    """The entry vanished (deleted by the operator) before it could be tried."""

