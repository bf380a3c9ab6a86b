"""The outbound queue as a Twisted service: spool + scheduler + relay, wired together.

`OutboundQueue` provides `IOutboundQueue` for the SMTP server (authenticated submission
to remote recipients, forwarding aliases) and for its own reports (DSNs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client
from zope.interface import implementer

from mailhost.config import Config
from mailhost.interfaces import IOutboundQueue
from mailhost.queue.relay import Relay
from mailhost.queue.scheduler import Scheduler
from mailhost.queue.spool import Envelope, Recipient, Spool, SpoolWriter, new_queue_id

log = Logger(namespace="mailhost.queue")

RouteLocal = Callable[[str], Any]  # address -> list of mailbox keys, None if remote


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf (127.0.0.1 when there are none)."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


def _server_address(entry: str) -> tuple[str, int]:
    """ "host", "host:port", "[v6]:port" or a bare IPv6 address -> (host, port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest.lstrip(":") or 53)
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port or 53)
    return entry, 53


def make_resolver(config: Config, reactor: Any) -> Any:
    """A twisted.names resolver: `[queue] dns_servers`, or the system's name servers.

    resolv.conf is read once here (client.createResolver would use the global reactor
    and re-read the file on a timer that outlives the service).
    """
    servers = [_server_address(entry) for entry in config.queue.dns_servers]
    return client.Resolver(servers=servers or system_nameservers(), reactor=reactor)


def postmaster_address(config: Config) -> str:
    """Where failed reports go (RFC 5321 §4.5.1: every domain has a postmaster)."""
    domain = config.hostname if config.hostname in config.domains else (
        sorted(config.domains)[0] if config.domains else config.hostname)
    return f"postmaster@{domain}"


@implementer(IOutboundQueue)
class OutboundQueue(service.Service):
    """Durable outbound queue: enqueue with `open_entry`, delivered by the scheduler.

    `reactor` connects and runs threads; `clock` (default: the reactor) times retries,
    lifetimes and scans; `store` provides IMailStore for local reports; `route_local`
    says whether a report's recipient is local.
    """

    name = "outbound-queue"

    def __init__(self, config: Config, reactor: Any, store: Any, route_local: RouteLocal,
                 resolver: Any = None, clock: IReactorTime | None = None,
                 trust_root: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.store = store
        self.route_local = route_local
        self.resolver = resolver if resolver is not None else make_resolver(config, reactor)
        self.spool = Spool(config.queue_dir, reactor, on_commit=self._committed)
        self.relay = Relay(reactor, config.queue, config.hostname, self.resolver,
                           trust_root=trust_root)
        self.scheduler = Scheduler(self.spool, self.relay, self.clock, config.queue,
                                   config.hostname, postmaster_address(config),
                                   self.send_notice)
        self.ready: defer.Deferred[None] = defer.Deferred()

    # -- IOutboundQueue --------------------------------------------------------------

    def open_entry(self, sender: str, recipients: list[str],
                   dsn_params: dict[str, Any] | None = None) -> SpoolWriter:
        """Start a queue entry (RFC 5321 §3.3 envelope; DSN parameters per RFC 3461).

        `dsn_params` keys, all optional: "ret" ("FULL"/"HDRS"), "envid", "notify" and
        "orcpt" (dicts recipient -> value), "smtputf8" (bool), "body" ("8BITMIME"),
        "kind" (internal: "dsn"/"postmaster" for our own reports).
        """
        params = dsn_params or {}
        notify = params.get("notify") or {}
        orcpt = params.get("orcpt") or {}
        now = self.clock.seconds()
        recipients = list(dict.fromkeys(recipients))  # one delivery per recipient
        env = Envelope(
            id=new_queue_id(), sender=sender, created=now,
            recipients=[Recipient(address=r, next_attempt=now, notify=notify.get(r),
                                  orcpt=orcpt.get(r)) for r in recipients],
            ret=params.get("ret"), envid=params.get("envid"),
            smtputf8=bool(params.get("smtputf8")), body=params.get("body"),
            kind=params.get("kind", "normal"))
        return self.spool.open_entry(env)

    def _committed(self, env: Envelope) -> None:
        self.scheduler.add(env)

    # -- reports ---------------------------------------------------------------------

    async def send_notice(self, to: str, message: bytes, kind: str) -> None:
        """Store a report locally or queue it, with the null sender (RFC 3464 §2)."""
        mailboxes = await defer.maybeDeferred(self.route_local, to)
        if mailboxes is not None and not mailboxes and kind == "dsn":
            # a local domain without that mailbox: the report goes to postmaster instead
            to, kind = self.scheduler.postmaster, "postmaster"
            mailboxes = await defer.maybeDeferred(self.route_local, to)
        if mailboxes is not None and not mailboxes:
            log.warn("report to <{to}> dropped: no such local mailbox",
                     event="queue.dsn_dropped", to=to)
            return
        if mailboxes:
            writer = self.store.open_delivery(list(mailboxes))
        else:
            writer = self.open_entry("", [to], {"kind": kind})
        try:
            writer.write(message)
            await writer.commit()
        except BaseException:
            writer.abort()
            raise

    # -- service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = self.spool.load_all()

        def loaded(envelopes: list[Envelope]) -> None:
            log.info("queue loaded: {count} entries", event="queue.loaded",
                     count=len(envelopes))
            if self.running:  # a stop during the load must not start the scheduler after it
                self.scheduler.start(envelopes)
            self.ready.callback(None)

        d.addCallback(loaded)
        self._loading = d
        d.addErrback(lambda f: (log.failure("queue could not be loaded", f),
                                self.ready.errback(f)))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        loading = getattr(self, "_loading", None)
        if loading is not None and not loading.called:
            # wait for the load to finish (it will not start the scheduler), then stop
            return loading.addBoth(lambda _: self.scheduler.stop())
        d = self.scheduler.stop()
        grace = float(self.config.limits.shutdown_grace)
        d.addTimeout(grace, self.reactor)
        d.addErrback(lambda f: log.warn("queue stopped with attempts still in flight",
                                        event="queue.stop_timeout"))
        return d
