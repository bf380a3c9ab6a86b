"""Loopback fixtures for queue tests: a twisted.names DNS server with in-memory records,
fake remote SMTP servers with scripted behaviour, and in-memory store / route fakes."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory
from twisted.names import authority, client, common, dns, server
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from mailhost import config as config_mod
from mailhost.interfaces import IMailStore, IMessageWriter
from mailhost.queue.service import OutboundQueue

# --- DNS ---------------------------------------------------------------------------

class MemoryAuthority(authority.FileAuthority):
    """An authority over records held in a dict: {b"name": [Record_*, ...]}."""

    def __init__(self, zone: str, records: dict[str, list[Any]]) -> None:
        common.ResolverBase.__init__(self)
        soa = dns.Record_SOA(mname=f"ns.{zone}", rname=f"root.{zone}", serial=1,
                             refresh=60, retry=60, expire=60, minimum=60, ttl=60)
        self.soa = (zone.encode(), soa)
        self.records = {zone.encode(): [soa]}
        for name, recs in records.items():
            self.records.setdefault(name.lower().encode(), []).extend(recs)
        #: names answered with SERVFAIL (a temporary DNS failure)
        self.servfail: set[bytes] = set()

    def _lookup(self, name, cls, type, timeout=None):
        if name.lower() in self.servfail:
            return defer.fail(RuntimeError("simulated server failure"))
        return super()._lookup(name, cls, type, timeout)


class DNSFixture:
    """A real DNS server on 127.0.0.1 (UDP, ephemeral port) and a client resolver."""

    def __init__(self, zone: str, records: dict[str, list[Any]]) -> None:
        self.authority = MemoryAuthority(zone, records)
        factory = server.DNSServerFactory(authorities=[self.authority])
        self.protocol = dns.DNSDatagramProtocol(factory)
        self.port = reactor.listenUDP(0, self.protocol, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)
        self.resolver = client.Resolver(servers=[self.address], reactor=reactor)

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening)


def mx(pref: int, name: str) -> Any:
    return dns.Record_MX(pref, name, ttl=60)


def a(ip: str) -> Any:
    return dns.Record_A(ip, ttl=60)


def aaaa(ip: str) -> Any:
    return dns.Record_AAAA(ip, ttl=60)


def cname(name: str) -> Any:
    return dns.Record_CNAME(name, ttl=60)


# --- fake remote SMTP servers ---------------------------------------------------------

@attrs.define
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool = False


@attrs.define
class Behaviour:
    greeting: str = "220 fake.test ESMTP"
    #: replies to RCPT for a given address (default 250)
    rcpt: dict[str, str] = attrs.field(factory=dict)
    #: temporary failures at MAIL for the first N transactions
    tempfail_first: int = 0
    #: close the connection after this many body bytes (mid-DATA)
    drop_after: int | None = None
    #: never answer the end of data
    slow: bool = False
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 100000000")
    #: a server TLS context: STARTTLS is offered (or, with `implicit`, TLS on connect)
    tls_context: Any = None
    implicit: bool = False
    #: (user, password) accepted by AUTH PLAIN; AUTH is offered when set
    auth: tuple[str, str] | None = None


class FakeSMTP(LineReceiver):
    """A scripted SMTP server recording what it receives (RFC 5321 subset)."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.b = fake.behaviour
        self.in_data = False
        self.sender = ""
        self.rcpts: list[str] = []
        self.lines: list[bytes] = []
        self.body_bytes = 0
        self.tls = False
        self.mail_ok = False

    def connectionMade(self) -> None:
        self.fake.connections += 1
        self.fake.active += 1
        self.fake.max_active = max(self.fake.max_active, self.fake.active)
        self.transport.write(self.b.greeting.encode() + b"\r\n")
        if not self.b.greeting.startswith("220"):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.fake.active -= 1

    def reply(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            return self.data_line(line)
        cmd = line.decode("utf-8", "replace")
        verb = cmd[:4].upper()
        self.fake.commands.append(cmd)
        if verb == "EHLO":
            ext = list(self.b.extensions)
            if self.b.tls_context is not None and not self.tls and not self.b.implicit:
                ext.append("STARTTLS")
            if self.b.auth is not None:
                ext.append("AUTH PLAIN")
            self.reply("\r\n".join(["250-fake.test"] + [f"250-{e}" for e in ext[:-1]]
                                   + [f"250 {ext[-1]}"]) if ext else "250 fake.test")
        elif verb == "HELO":
            self.reply("250 fake.test")
        elif verb == "STAR":
            self.reply("220 2.0.0 go ahead")
            self.transport.startTLS(self.b.tls_context)
            self.tls = True
        elif verb == "AUTH":
            user, password = self.b.auth or ("", "")
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            if cmd.split()[1:] == ["PLAIN", token]:
                self.fake.authenticated.append(user)
                return self.reply("235 2.7.0 authenticated")
            self.reply("535 5.7.8 bad credentials")
        elif verb == "MAIL":
            self.fake.mail_commands.append(cmd)
            self.fake.transactions += 1
            if self.fake.transactions <= self.b.tempfail_first:
                return self.reply("451 4.3.0 try again later")
            self.sender = cmd.split(":", 1)[1].split(">")[0].lstrip(" <")
            self.rcpts = []
            self.mail_ok = True
            self.reply("250 2.1.0 ok")
        elif verb == "RCPT":
            if not self.mail_ok:
                return self.reply("503 5.5.1 need MAIL first")
            addr = cmd.split(":", 1)[1].split(">")[0].lstrip(" <")
            answer = self.b.rcpt.get(addr, "250 2.1.5 ok")
            if answer.startswith("2"):
                self.rcpts.append(addr)
            self.reply(answer)
        elif verb == "DATA":
            if not self.rcpts:  # RFC 2920 §3.1
                return self.reply("554 5.5.1 no valid recipients")
            self.in_data, self.lines, self.body_bytes = True, [], 0
            self.reply("354 go ahead")
        elif verb == "RSET":
            self.reply("250 ok")
        elif verb == "QUIT":
            self.reply("221 bye")
            self.transport.loseConnection()
        else:
            self.reply("502 5.5.1 unknown command")

    def data_line(self, line: bytes) -> None:
        self.body_bytes += len(line) + 2
        if self.b.drop_after is not None and self.body_bytes > self.b.drop_after:
            self.transport.abortConnection()
            return
        if line == b".":
            self.in_data = self.mail_ok = False
            data = b"".join(ln + b"\n" for ln in self.lines)
            if self.b.slow:
                return
            tls = self.tls or self.b.implicit
            self.fake.received.append(Received(self.sender, self.rcpts, data, tls))
            self.reply("250 2.0.0 queued as FAKE")
            return
        self.lines.append(line[1:] if line.startswith(b".") else line)  # RFC 5321 §4.5.2


class FakeServer:
    """A listening fake SMTP server on a loopback address."""

    def __init__(self, behaviour: Behaviour | None = None, interface: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.behaviour = behaviour or Behaviour()
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.mail_commands: list[str] = []
        self.authenticated: list[str] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.transactions = 0
        factory = Factory.forProtocol(lambda: FakeSMTP(self))
        if self.behaviour.implicit:
            self.listener = reactor.listenSSL(port, factory, self.behaviour.tls_context,
                                              interface=interface)
        else:
            self.listener = reactor.listenTCP(port, factory, interface=interface)
        self.port = self.listener.getHost().port

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.listener.stopListening)


# --- store and routing fakes ----------------------------------------------------------

@implementer(IMessageWriter)
class MemoryWriter:
    def __init__(self, store: MemoryStore, mailboxes: list[str]) -> None:
        self.store, self.mailboxes, self.chunks, self.size = store, mailboxes, [], 0

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def commit(self) -> defer.Deferred:
        for m in self.mailboxes:
            self.store.delivered.setdefault(m, []).append(b"".join(self.chunks))
        return defer.succeed([])

    def abort(self) -> None:
        self.chunks = []


@implementer(IMailStore)
class MemoryStore:
    def __init__(self) -> None:
        self.delivered: dict[str, list[bytes]] = {}

    def open_delivery(self, mailboxes: list[str]) -> MemoryWriter:
        return MemoryWriter(self, mailboxes)


def route_local_for(domains: tuple[str, ...]):
    def route(address: str) -> list[str] | None:
        return [address.lower()] if address.rpartition("@")[2].lower() in domains else None
    return route


def make_config(tmp_path: Path, queue: str = "", hostname: str = "mx.example.org"):
    text = (f'hostname = "{hostname}"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[domains."example.org"]\n[queue]\n{queue}\n')
    return config_mod.loads(text)


MESSAGE = (b"From: alice@example.org\nTo: bob@dest.test\nSubject: hello\n"
           b"Message-ID: <m1@example.org>\n\nHello Bob.\n.A line with a dot.\n")


class Harness:
    """An OutboundQueue on a task.Clock with fake remote servers and DNS."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.clock = task.Clock()
        self.store = MemoryStore()
        self.servers: list[FakeServer] = []
        self.dns: DNSFixture | None = None
        self.queue: OutboundQueue | None = None
        self.port = 0
        self.trust_root: Any = None

    def server(self, behaviour: Behaviour | None = None,
               interface: str = "127.0.0.1") -> FakeServer:
        srv = FakeServer(behaviour, interface=interface, port=self.port)
        self.port = srv.port
        self.servers.append(srv)
        return srv

    async def start(self, records: dict, queue: str = "", route=None) -> OutboundQueue:
        if self.dns is None:
            self.dns = DNSFixture("test", records)
        self.config = make_config(
            self.tmp_path, f"remote_port = {self.port or 1}\n"
            f'dns_servers = ["127.0.0.1:{self.dns.address[1]}"]\n{queue}')
        self.queue = OutboundQueue(self.config, reactor, self.store,
                                   route or route_local_for(("example.org",)),
                                   resolver=self.dns.resolver, clock=self.clock,
                                   trust_root=self.trust_root)
        self.queue.startService()
        await self.queue.ready
        return self.queue

    async def restart(self, route=None) -> OutboundQueue:
        await self.queue.stopService()
        self.queue = OutboundQueue(self.config, reactor, self.store,
                                   route or route_local_for(("example.org",)),
                                   resolver=self.dns.resolver, clock=self.clock,
                                   trust_root=self.trust_root)
        self.queue.startService()
        await self.queue.ready
        return self.queue

    async def submit(self, sender: str, rcpts: list[str], data: bytes = MESSAGE,
                     params: dict | None = None) -> str:
        writer = self.queue.open_entry(sender, rcpts, params or {})
        writer.write(data)
        return await writer.commit()

    async def run(self) -> None:
        await self.queue.scheduler.run_due()

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.run()

    def envelope(self, qid: str):
        return self.queue.spool.files.read_envelope(qid)

    def on_disk(self) -> list[str]:
        return list(self.queue.spool.files.ids())

    async def stop(self) -> None:
        if self.queue is not None and self.queue.running:
            await self.queue.stopService()
        for srv in self.servers:
            await srv.stop()
        if self.dns is not None:
            await self.dns.stop()


def tls_material(tmp_path: Path, hostname: str) -> tuple[Any, Any]:
    """(server context, client trust root) for a self-signed certificate of `hostname`."""
    from twisted.internet import ssl

    from mailhost.tls import create_self_signed, load_options

    cert, key = tmp_path / f"{hostname}.crt", tmp_path / f"{hostname}.key"
    create_self_signed(cert, key, hostname)
    return load_options(cert, key), ssl.Certificate.loadPEM(cert.read_bytes())
