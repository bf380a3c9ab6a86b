"""kill -9 after the queue acknowledged (commit fired): nothing is lost on restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted

from tests.functional.queue_helpers import MESSAGE, Harness, a

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
from twisted.internet import defer, reactor
from mailhost import config as config_mod
from mailhost.queue.service import OutboundQueue

queue = OutboundQueue(config_mod.loads(sys.argv[1]), reactor, None, lambda a: None)
message = sys.stdin.buffer.read()

async def enqueue():
    ids = []
    for _ in range(5):
        writer = queue.open_entry("alice@example.org", ["bob@dest.test"], {})
        writer.write(message)
        ids.append(await writer.commit())
    print("committed", *ids, flush=True)  # where an SMTP server would answer 250

reactor.callWhenRunning(lambda: defer.ensureDeferred(enqueue()))
reactor.run()
"""


@pytest_twisted.ensureDeferred
async def test_committed_entries_survive_kill_9(tmp_path):
    h = Harness(tmp_path)
    try:
        srv = h.server()
        config_text = (f'hostname = "mx.example.org"\ndata_dir = "{tmp_path / "data"}"\n'
                       f'[domains."example.org"]\n[queue]\nremote_port = {srv.port}\n'
                       'dns_servers = ["127.0.0.1:1"]\n')
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, config_text], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        child.stdin.write(MESSAGE)
        child.stdin.close()
        line = child.stdout.readline().decode().split()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert line[0] == "committed" and len(line) == 6
        h.clock.advance(time.time())  # the child stamped entries with the wall clock
        await h.start({"dest.test": [a("127.0.0.1")]})
        assert sorted(h.on_disk()) == sorted(line[1:])
        await h.run()
        assert [r.data for r in srv.received] == [MESSAGE] * 5
        assert h.on_disk() == []
    finally:
        await h.stop()
