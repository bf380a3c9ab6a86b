"""Relay one message to one destination: MX routing via twisted.names, or a smarthost.

RFC 5321 §5.1: MX records in preference order (random among equal preferences), the
domain's own A/AAAA when it has no MX, each host tried in turn on connection failure or
a bad greeting. RFC 7505: a null MX (one record, exchange ".") fails at once.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet import defer, endpoints, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Factory
from twisted.names import dns
from twisted.names import error as dns_error

from mailhost.config import QueueConfig
from mailhost.smtp.client import (
    HostFailure,
    Reply,
    SMTPReplyProtocol,
    Transaction,
    local_reply,
    run_transaction,
)

MAX_CNAME_CHAIN = 8


class DestinationFailure(Exception):
    """No host for the destination could be tried; `reply` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@attrs.frozen
class RecipientOutcome:
    """The result of one delivery attempt for one recipient."""

    reply: Reply
    mx: str = ""
    ip: str = ""
    tls: bool = False


@attrs.frozen
class Target:
    """A host to connect to and how."""

    host: str
    port: int
    tls: str  # "none", "opportunistic", "required", "verified", "implicit"
    auth: tuple[str, str] | None = None


def _temporary_dns(name: str, failure: Exception) -> DestinationFailure:
    return DestinationFailure(local_reply(451, "4.4.3", f"DNS lookup for {name} failed: "
                                          f"{type(failure).__name__}"))


class MXResolver:
    """MX and address lookups with CNAME chasing over any twisted.names resolver."""

    def __init__(self, resolver: Any, rng: random.Random | None = None,
                 own_name: str = "") -> None:
        self.resolver = resolver
        self.rng = rng or random.Random()
        self.own_name = own_name.lower()

    async def _query(self, qtype: int, name: str) -> list[Any]:
        """Records of `qtype` for `name`, following CNAMEs (RFC 1034 §3.6.2)."""
        lookup = {dns.MX: self.resolver.lookupMailExchange,
                  dns.A: self.resolver.lookupAddress,
                  dns.AAAA: self.resolver.lookupIPV6Address}[qtype]
        for _ in range(MAX_CNAME_CHAIN):
            answers, _auth, _add = await lookup(name)
            cnames = {str(rr.name).lower(): str(rr.payload.name)
                      for rr in answers if rr.type == dns.CNAME}
            target, seen = name.lower(), set()
            while target in cnames and target not in seen:
                seen.add(target)
                target = cnames[target].lower()
            records = [rr.payload for rr in answers
                       if rr.type == qtype and str(rr.name).lower() == target]
            if records or target == name.lower():
                return records
            name = target  # the server did not chase the CNAME for us
        raise DestinationFailure(local_reply(451, "4.4.3", f"CNAME chain too long at {name}"))

    async def mx_hosts(self, domain: str) -> list[str]:
        """Exchange names in the order to try them; raise DestinationFailure."""
        try:
            records = await self._query(dns.MX, domain)
        except dns_error.DNSNameError:
            raise DestinationFailure(local_reply(
                550, "5.1.2", f"domain {domain} does not exist")) from None
        except DestinationFailure:
            raise
        except Exception as e:  # noqa: BLE001 - timeouts, SERVFAIL, refused
            raise _temporary_dns(domain, e) from None
        if not records:
            return [domain]  # RFC 5321 §5.1 implicit MX
        if any(str(r.name) in ("", ".") for r in records):
            # RFC 7505 §3: a null MX means the domain accepts no mail
            raise DestinationFailure(local_reply(
                556, "5.1.10", f"domain {domain} accepts no mail (null MX)"))
        by_pref: dict[int, list[str]] = {}
        for r in records:
            by_pref.setdefault(r.preference, []).append(str(r.name))
        ordered = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self.rng.shuffle(group)
            ordered.extend(group)
        if self.own_name and self.own_name in (h.lower().rstrip(".") for h in ordered):
            # RFC 5321 §5.1: drop our own name and every less preferred host
            own_pref = min(p for p, hs in by_pref.items()
                           if self.own_name in (h.lower().rstrip(".") for h in hs))
            ordered = [h for p in sorted(by_pref) if p < own_pref for h in by_pref[p]]
            if not ordered:
                raise DestinationFailure(local_reply(
                    554, "5.4.6", f"mail for {domain} loops back to myself"))
        return ordered

    async def addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of a host; raise DestinationFailure if none."""
        if isIPAddress(host) or isIPv6Address(host):
            return [host]
        results = await defer.DeferredList(
            [defer.ensureDeferred(self._query(dns.AAAA, host)),
             defer.ensureDeferred(self._query(dns.A, host))], consumeErrors=True)
        out: list[str] = []
        errors = []
        for ok, value in results:
            if ok:
                out.extend(r.dottedQuad() if hasattr(r, "dottedQuad") else
                           _ipv6(r) for r in value)
            else:
                errors.append(value.value)
        if out:
            return out
        if errors and not all(isinstance(e, dns_error.DNSNameError) for e in errors):
            raise _temporary_dns(host, errors[0])
        raise DestinationFailure(local_reply(451, "4.4.4", f"host {host} has no address"))


def _ipv6(record: Any) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET6, record.address)


class Relay:
    """Delivers a message to the recipients of one destination over one connection."""

    def __init__(self, reactor: Any, config: QueueConfig, hostname: str, resolver: Any,
                 trust_root: Any = None, rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.hostname = hostname
        self.mx = MXResolver(resolver, rng, own_name=hostname)
        self.trust_root = trust_root
        self.require_tls = {d.lower() for d in config.require_tls}
        self._contexts: dict[tuple[str, bool], Any] = {}

    def destination(self, recipient: str) -> str:
        """The key recipients are grouped and limited by: the domain or the smarthost."""
        if self.config.smarthost:
            return "smarthost"
        return recipient.rpartition("@")[2].lower()

    async def targets(self, domain: str) -> list[Target]:
        cfg = self.config
        if cfg.smarthost:
            host, _, port = cfg.smarthost.rpartition(":")
            host = host.strip("[]")
            auth = None
            if cfg.smarthost_username is not None:
                auth = (cfg.smarthost_username, cfg.smarthost_password or "")
            mode = {"starttls": "required", "implicit": "implicit",
                    "none": "none"}[cfg.smarthost_tls]
            return [Target(host, int(port), mode, auth)]
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            return [Target(literal, cfg.remote_port, "opportunistic")]
        mode = "verified" if domain in self.require_tls else "opportunistic"
        hosts = await self.mx.mx_hosts(domain)
        return [Target(h, cfg.remote_port, mode) for h in hosts]

    def _context(self, target: Target) -> Any:
        """Client TLS options, built once per (host, mode) and reused."""
        if target.tls == "none":
            return None
        verify = target.tls in ("verified", "implicit") or (
            target.tls == "required" and bool(self.config.smarthost))
        key = (target.host if verify else "", verify)
        if key not in self._contexts:
            if len(self._contexts) > 1000:
                self._contexts.clear()
            self._contexts[key] = (
                ssl.optionsForClientTLS(target.host, trustRoot=self.trust_root) if verify
                else ssl.CertificateOptions())  # opportunistic: encrypt, do not verify
        return self._contexts[key]

    async def _connect(self, target: Target, ip: str) -> SMTPReplyProtocol:
        cls = endpoints.TCP6ClientEndpoint if ":" in ip else endpoints.TCP4ClientEndpoint
        ep: Any = cls(self.reactor, ip, target.port, timeout=self.config.connect_timeout)
        if target.tls == "implicit":
            ep = endpoints.wrapClientTLS(self._context(target), ep)
        factory = Factory.forProtocol(
            lambda: SMTPReplyProtocol(self.reactor, float(self.config.command_timeout)))
        proto = await ep.connect(factory)
        if target.tls == "implicit":
            proto.tls = True
        return proto

    async def deliver(self, domain: str, txn: Transaction) -> dict[str, RecipientOutcome]:
        """Try each target in turn; every recipient of `txn` gets an outcome."""
        try:
            targets = await self.targets(domain)
        except DestinationFailure as e:
            return {r: RecipientOutcome(e.reply) for r in txn.recipients}
        last = local_reply(451, "4.4.1", f"no host for {domain} could be reached")
        where = ("", "")
        for target in targets:
            try:
                ips = await self.mx.addresses(target.host)
            except DestinationFailure as e:
                last, where = e.reply, (target.host, "")
                continue
            for ip in ips:
                where = (target.host, ip)
                try:
                    proto = await self._connect(target, ip)
                except Exception as e:  # noqa: BLE001 - refused, timeout, unreachable
                    last = local_reply(451, "4.4.1", f"connection to {target.host}[{ip}] "
                                       f"failed: {type(e).__name__}")
                    continue
                mode = "none" if target.tls == "implicit" else target.tls
                attempt = attrs.evolve(txn, tls=mode, auth=target.auth,
                                       tls_context=self._context(target))
                try:
                    result = await run_transaction(proto, attempt)
                except HostFailure as e:
                    last = e.reply
                    continue
                return {r: RecipientOutcome(reply, target.host, ip, result.tls)
                        for r, reply in result.replies.items()}
        return {r: RecipientOutcome(last, *where) for r in txn.recipients}
