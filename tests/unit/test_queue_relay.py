"""MX ordering (RFC 5321 §5.1, RFC 7505) over a fake twisted.names resolver."""

from __future__ import annotations

import random

import pytest
from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error

from mailhost.queue.relay import DestinationFailure, MXResolver


class FakeResolver:
    def __init__(self, answers: dict[tuple[int, str], list]) -> None:
        self.answers = answers

    def _lookup(self, qtype: int, name: str):
        if (qtype, name) not in self.answers:
            return defer.fail(dns_error.DNSNameError(name))
        rrs = [dns.RRHeader(name=n, type=p.TYPE, payload=p)
               for n, p in self.answers[(qtype, name)]]
        return defer.succeed((rrs, [], []))

    def lookupMailExchange(self, name):
        return self._lookup(dns.MX, name)

    def lookupAddress(self, name):  # noqa: N802
        return self._lookup(dns.A, name)

    def lookupIPV6Address(self, name):  # noqa: N802
        return self._lookup(dns.AAAA, name)


def _mx(*records):
    return FakeResolver({(dns.MX, "d.test"): [("d.test", dns.Record_MX(p, n))
                                               for p, n in records]})


def _hosts(resolver, seed=0, own=""):
    d = defer.ensureDeferred(MXResolver(resolver, random.Random(seed), own).mx_hosts("d.test"))
    return d.result if not isinstance(d.result, Exception) else d


def test_preference_order_with_random_order_among_equals():
    resolver = _mx((20, "c.test"), (10, "a.test"), (10, "b.test"), (30, "d.test"))
    orders = {tuple(_hosts(resolver, seed)) for seed in range(40)}
    assert orders == {("a.test", "b.test", "c.test", "d.test"),
                      ("b.test", "a.test", "c.test", "d.test")}


def test_no_mx_means_the_domain_itself():
    resolver = FakeResolver({(dns.MX, "d.test"): []})
    assert _hosts(resolver) == ["d.test"]


def test_null_mx_and_nxdomain_are_permanent():
    for resolver, status in ((_mx((0, "")), "5.1.10"), (FakeResolver({}), "5.1.2")):
        d = defer.ensureDeferred(MXResolver(resolver).mx_hosts("d.test"))
        failure = []
        d.addErrback(failure.append)
        assert failure[0].check(DestinationFailure)
        assert failure[0].value.reply.status == status


def test_cname_chain_is_followed_across_queries():
    resolver = FakeResolver({
        (dns.MX, "d.test"): [("d.test", dns.Record_CNAME("e.test"))],
        (dns.MX, "e.test"): [("e.test", dns.Record_MX(5, "mx.e.test"))]})
    assert _hosts(resolver) == ["mx.e.test"]


def test_addresses_v6_first_then_v4():
    resolver = FakeResolver({
        (dns.AAAA, "h.test"): [("h.test", dns.Record_AAAA("::1"))],
        (dns.A, "h.test"): [("h.test", dns.Record_A("127.0.0.1"))]})
    d = defer.ensureDeferred(MXResolver(resolver).addresses("h.test"))
    assert d.result == ["::1", "127.0.0.1"]


@pytest.mark.parametrize("own", ["A.test", "a.test."])
def test_own_name_and_less_preferred_are_dropped(own):
    resolver = _mx((10, "b.test"), (20, "a.test"), (30, "c.test"))
    assert _hosts(resolver, own=own.lower().rstrip(".")) == ["b.test"]
