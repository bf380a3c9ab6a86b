"""makeService: one MultiService holding a listener per configured endpoint, the store,
the accounts portal, TLS and (when present) the outbound queue.

Everything a protocol needs travels in one `ServerContext`, built here and passed to
each protocol factory; nothing is imported globally (DESIGN.md: pass the world in).
"""

from __future__ import annotations

import contextlib
import signal
import weakref
from collections import Counter
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailhost.accounts import (
    AccountDirectory,
    Authenticator,
    LoginThrottle,
    MailRealm,
    PasswdChecker,
)
from mailhost.config import Config
from mailhost.store.maildir import MaildirStore
from mailhost.tls import ServerTLS, certificate_paths

log = Logger(namespace="mailhost.service")

#: roles served with TLS from the first byte
IMPLICIT_TLS_ROLES = ("submissions", "pop3s", "imaps")


class ConnectionLimiter:
    """Counts open connections per client IP (the `[limits] connections_per_ip` cap)."""

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self._open: Counter[str] = Counter()

    def acquire(self, ip: str) -> bool:
        if self._open[ip] >= self.per_ip:
            return False
        self._open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]


class InFlight:
    """Work that shutdown should wait for (an SMTP transaction being committed)."""

    def __init__(self) -> None:
        self._pending: set[defer.Deferred] = set()

    def track(self, d: defer.Deferred) -> defer.Deferred:
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def __len__(self) -> int:
        return len(self._pending)

    def drain(self, clock: Any, timeout: float) -> defer.Deferred:
        """Fires when nothing is in flight, or after `timeout` seconds."""
        waiter: defer.Deferred = defer.Deferred()

        def poll(left: float) -> None:
            if not self._pending or left <= 0:
                waiter.callback(len(self._pending))
            else:
                clock.callLater(0.1, poll, left - 0.1)

        poll(timeout)
        return waiter


@attrs.define
class ServerContext:
    """What every protocol factory gets: config and the services behind the seams."""

    config: Config
    reactor: Any
    clock: Any
    store: MaildirStore
    accounts: AccountDirectory
    realm: MailRealm
    authenticator: Authenticator
    tls: ServerTLS
    connections: ConnectionLimiter
    inflight: InFlight
    #: the IOutboundQueue, or None while no queue is configured
    queue: Any = None
    #: the IRecipientPolicy for SMTP
    policy: Any = None
    #: set while the server is shutting down: protocols refuse new transactions
    stopping: bool = False
    #: every live connection's outermost protocol, closed at the end of shutdown
    sessions: Any = attrs.field(factory=weakref.WeakSet)
    #: open IMAP sessions per account, shared by the imap and imaps listeners
    imap_sessions: Counter[str] = attrs.field(factory=Counter)


def build_context(config: Config, reactor: Any, clock: Any = None) -> ServerContext:
    """Create the data directory and the shared objects (blocking I/O: at startup only)."""
    from twisted.cred.portal import Portal

    clock = clock or reactor
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    config.mail_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    store = MaildirStore(config.mail_dir, config.hostname, reactor)
    from twisted.python.threadpool import ThreadPool

    hash_pool = ThreadPool(minthreads=0, maxthreads=2, name="mailhost-password-hashing")
    accounts = AccountDirectory(config.passwd_path, reactor, pool=hash_pool)
    realm = MailRealm()
    portal = Portal(realm, [PasswdChecker(accounts)])
    throttle = LoginThrottle(clock, config.auth)
    cert, key = certificate_paths(config.tls, config.tls_dir, config.hostname)
    ctx = ServerContext(
        config=config, reactor=reactor, clock=clock, store=store, accounts=accounts,
        realm=realm, authenticator=Authenticator(portal, throttle, clock),
        tls=ServerTLS(cert, key), connections=ConnectionLimiter(config.limits.connections_per_ip),
        inflight=InFlight())
    return ctx


def _role_factory(ctx: ServerContext, role: str) -> Any:
    """The protocol factory for one listener role."""
    if role in ("smtp", "submission", "submissions"):
        from mailhost.smtp.server import SMTPFactory

        return SMTPFactory(ctx, role)
    if role in ("pop3", "pop3s"):
        from mailhost.pop3 import POP3Factory

        return POP3Factory(ctx, role)
    if role in ("imap", "imaps"):
        from mailhost.imap.server import IMAPFactory

        return IMAPFactory(ctx, role)
    raise ValueError(role)  # pragma: no cover - roles come from the validated config


class MailhostService(service.MultiService):
    """The whole server; stops listeners first, then waits for in-flight work."""

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.listeners: dict[str, list[StreamServerEndpointService]] = {}

    def startService(self) -> None:
        log.info("mailhost starting: hostname={hostname} data_dir={data_dir}",
                 hostname=self.ctx.config.hostname, data_dir=str(self.ctx.config.data_dir))
        if self.ctx.accounts.pool is not None:
            self.ctx.accounts.pool.start()
        super().startService()
        self._install_sighup()

    def _install_sighup(self) -> None:
        reactor = self.ctx.reactor
        if not hasattr(reactor, "callFromThread"):
            return
        try:
            previous = signal.getsignal(signal.SIGHUP)
        except (ValueError, AttributeError):  # pragma: no cover
            return

        def on_hup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.ctx.tls.reload)
            if callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
                previous(signum, frame)

        # outside the main thread (tests) this is refused; reload is still callable
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGHUP, on_hup)

    @defer.inlineCallbacks
    def stopService(self):
        self.ctx.stopping = True
        log.info("mailhost stopping: no new connections; waiting for {n} transaction(s)",
                 n=len(self.ctx.inflight))
        listeners = [s for group in self.listeners.values() for s in group]
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in listeners
                                  if s.running])
        left = yield self.ctx.inflight.drain(self.ctx.clock,
                                             self.ctx.config.limits.shutdown_grace)
        if left:
            log.warn("stopping with {n} transaction(s) unfinished", n=left)
        for protocol in list(self.ctx.sessions):
            transport = getattr(protocol, "transport", None)
            if transport is not None and getattr(transport, "connected", True):
                transport.loseConnection()
        yield super().stopService()
        if self.ctx.accounts.pool is not None:
            self.ctx.accounts.pool.stop()  # idle by now: logins end with their sessions
        # twistd re-raises the signal that stopped the reactor so the exit status shows it;
        # a SIGTERM that ended in a clean drain is a normal stop: exit 0 (issue #2 §4).
        if getattr(self.ctx.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.ctx.reactor._exitSignal = None
        log.info("mailhost stopped")


def makeService(config: Config, reactor: Any = None, clock: Any = None,
                ctx: ServerContext | None = None) -> MailhostService:
    """Build the server for `config` on `reactor` (the global one when None)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    ctx = ctx or build_context(config, reactor, clock)
    top = MailhostService(ctx)
    from mailhost.smtp.policy import RecipientPolicy

    ctx.policy = RecipientPolicy(config, ctx.accounts)
    queue_service = _make_queue(ctx)
    if queue_service is not None:
        queue_service.setServiceParent(top)
        ctx.queue = queue_service
    for role in attrs.fields_dict(type(config.listen)):
        for description in getattr(config.listen, role):
            factory = _role_factory(ctx, role)
            if role in IMPLICIT_TLS_ROLES:
                factory = TLSMemoryBIOFactory(ctx.tls, False, factory)
            _track_sessions(factory, ctx.sessions)
            endpoint = endpoints.serverFromString(reactor, description)
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True
            svc.setName(f"{role}:{description}")
            svc.setServiceParent(top)
            top.listeners.setdefault(role, []).append(svc)
    return top


def _track_sessions(factory: Any, sessions: Any) -> None:
    """Record each protocol the factory builds, so shutdown can close what is left."""
    build = factory.buildProtocol

    def build_and_track(addr: Any) -> Any:
        protocol = build(addr)
        if protocol is not None:
            sessions.add(protocol)
        return protocol

    factory.buildProtocol = build_and_track


def _make_queue(ctx: ServerContext) -> Any:
    """The outbound queue: remote recipients, forwarding aliases and our own DSNs."""
    from mailhost.queue.service import OutboundQueue

    return OutboundQueue(ctx.config, ctx.reactor, ctx.store, ctx.policy.route_local,
                         clock=ctx.clock)
