"""Outbound relay benchmark: how fast mailhost's queue empties into a local SMTP sink.

    python bench/outbound.py [--sink 127.0.0.1:2527] [--count 2000] [--size 2000]
                             [--rcpts 1] [--mode smarthost|mx] [--concurrency 20]
                             [--start-sink]

Phase 1 (enqueue): COUNT messages are committed into the spool (data + envelope fsynced
and renamed, in the reactor's thread pool) with the scheduler stopped. Phase 2 (relay):
the queue service starts, loads the spool and relays everything to the sink; the rate is
COUNT / time until the spool is empty (each message removed only after its 250).

--mode mx routes through a twisted.names DNS server on loopback (MX -> A 127.0.0.1,
remote_port = the sink's port); smarthost mode uses `[queue] smarthost`. The sink is
Postfix's smtp-sink (the peers' one on :2527, or --start-sink runs a private one on an
ephemeral loopback port). Prints one key=value line. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task
from twisted.names import authority, client, common, dns, server

from mailhost import config as config_mod
from mailhost.queue.service import OutboundQueue


class _Zone(authority.FileAuthority):
    def __init__(self, sink_ip: str) -> None:
        common.ResolverBase.__init__(self)
        soa = dns.Record_SOA(mname="ns.bench.test", rname="root.bench.test", serial=1,
                             refresh=60, retry=60, expire=60, minimum=60, ttl=60)
        self.soa = (b"bench.test", soa)
        self.records = {b"bench.test": [soa, dns.Record_MX(10, "mx.bench.test")],
                        b"mx.bench.test": [dns.Record_A(sink_ip)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _message(i: int, size: int) -> bytes:
    head = (f"From: bench@example.org\nTo: sink@bench.test\nSubject: bench {i}\n"
            f"Message-ID: <bench{i}@example.org>\n\n").encode()
    line = b"x" * 76 + b"\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def run(args: argparse.Namespace) -> dict[str, object]:
    host, _, port_s = args.sink.rpartition(":")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("refusing a non-loopback sink")
    port = int(port_s)
    tmp = Path(tempfile.mkdtemp(prefix="mailhost-outbound-bench-"))
    dns_port = None
    resolver = None
    try:
        queue_toml = (f"concurrency = {args.concurrency}\n"
                      f"per_destination = {args.concurrency}\n")
        if args.mode == "smarthost":
            queue_toml += f'smarthost = "{host}:{port}"\nsmarthost_tls = "none"\n'
        else:
            factory = server.DNSServerFactory(authorities=[_Zone("127.0.0.1")])
            dns_port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory),
                                         interface="127.0.0.1")
            addr = ("127.0.0.1", dns_port.getHost().port)
            resolver = client.Resolver(servers=[addr], reactor=reactor)
            queue_toml += f"remote_port = {port}\n"
        cfg = config_mod.loads(
            f'hostname = "bench.example.org"\ndata_dir = "{tmp / "data"}"\n'
            f'[domains."example.org"]\n[queue]\n{queue_toml}')
        queue = OutboundQueue(cfg, reactor, None, lambda a: None, resolver=resolver)
        rcpts = [f"sink{j}@bench.test" for j in range(args.rcpts)]
        t0 = time.perf_counter()
        pending = []
        for i in range(args.count):
            w = queue.open_entry("bench@example.org", rcpts, {})
            w.write(_message(i, args.size))
            pending.append(w.commit())
            if len(pending) >= 200:
                await defer.gatherResults(pending)
                pending = []
        await defer.gatherResults(pending)
        enqueue_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        queue.startService()
        await queue.ready
        while queue.scheduler.entries:
            await task.deferLater(reactor, 0.05, lambda: None)
        relay_s = time.perf_counter() - t1
        left = len(list(queue.spool.files.ids()))
        await queue.stopService()
        return {"mode": args.mode, "count": args.count, "size": args.size,
                "rcpts": args.rcpts, "concurrency": args.concurrency,
                "enqueue_rate": round(args.count / enqueue_s, 1),
                "relay_rate": round(args.count / relay_s, 1),
                "relay_seconds": round(relay_s, 2), "left_in_queue": left}
    finally:
        if dns_port is not None:
            await dns_port.stopListening()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sink", default="127.0.0.1:2527")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=2000)
    p.add_argument("--rcpts", type=int, default=1)
    p.add_argument("--mode", choices=("smarthost", "mx"), default="smarthost")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--start-sink", action="store_true",
                   help="run a private smtp-sink on an ephemeral loopback port")
    args = p.parse_args()
    sink_proc = None
    if args.start_sink:
        port = _free_port()
        sink_proc = subprocess.Popen(["smtp-sink", "-4", "-u", "nobody",
                                      f"127.0.0.1:{port}", "1024"])
        args.sink = f"127.0.0.1:{port}"
        for _ in range(50):
            if _reachable("127.0.0.1", port):
                break
            time.sleep(0.1)
    host, _, port_s = args.sink.rpartition(":")
    if not _reachable(host, int(port_s)):
        raise SystemExit(f"no SMTP sink at {args.sink} (start the peers, or --start-sink)")
    result: dict[str, object] = {}

    async def go() -> None:
        try:
            result.update(await run(args))
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()))
    try:
        reactor.run()
    finally:
        if sink_proc is not None:
            sink_proc.terminate()
            sink_proc.wait()
    print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    os._exit(0 if result else 1)


if __name__ == "__main__":
    main()
