"""Building the queue service: resolver configuration, postmaster address."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from mailhost import config as config_mod
from mailhost.queue.service import (
    OutboundQueue,
    _server_address,
    postmaster_address,
    system_nameservers,
)


def _config(tmp_path, extra: str = "", hostname: str = "mx.example.org"):
    return config_mod.loads(f'hostname = "{hostname}"\ndata_dir = "{tmp_path}"\n'
                            f'[domains."example.org"]\n{extra}')


def test_dns_server_entries():
    assert [_server_address(x) for x in ("127.0.0.1:5353", "::1", "[::1]:54", "ns.test")] \
        == [("127.0.0.1", 5353), ("::1", 53), ("::1", 54), ("ns.test", 53)]


def test_system_nameservers(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch x\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\n")
    assert system_nameservers(str(conf)) == [("192.0.2.1", 53), ("fe80::1", 53)]
    assert system_nameservers(str(tmp_path / "missing")) == [("127.0.0.1", 53)]


def test_default_resolver_leaves_no_timers(tmp_path):
    reactor = MemoryReactorClock()
    queue = OutboundQueue(_config(tmp_path, '[queue]\ndns_servers = ["127.0.0.1:5300"]'),
                          reactor, None, lambda a: None)
    assert queue.resolver.servers == [("127.0.0.1", 5300)]
    OutboundQueue(_config(tmp_path), reactor, None, lambda a: None)
    assert reactor.getDelayedCalls() == []


def test_postmaster_address(tmp_path):
    assert postmaster_address(_config(tmp_path)) == "postmaster@example.org"
    assert postmaster_address(_config(tmp_path, hostname="example.org")) == \
        "postmaster@example.org"
