"""A real mailhost on 127.0.0.1 ephemeral ports in a temp dir, for real clients.

Blocking stdlib clients (smtplib, poplib, imaplib) must run off the reactor thread:
use `in_thread(fn, *args)` (a Deferred) inside `@pytest_twisted.inlineCallbacks` tests.
"""

from __future__ import annotations

import io
import ssl
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor, threads

from mailhost import config as config_mod
from mailhost.cli import main as cli_main
from mailhost.service import makeService

ALL_ROLES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")


def write_config(tmp_path: Path, extra: str = "", roles=ALL_ROLES,
                 domains: str = '[domains."example.org"]\n') -> Path:
    """Write a test config. Unless `extra` sets [queue], outbound mail goes to a smarthost
    on a dead loopback port: it stays queued, and no test touches DNS or the network."""
    if "[queue]" not in extra:
        extra += ('\n[queue]\nsmarthost = "127.0.0.1:1"\nsmarthost_tls = "none"\n'
                  'dns_servers = ["127.0.0.1:1"]\n')
    listen = "\n".join(f'{r} = ["tcp:0:interface=127.0.0.1"]' for r in roles)
    text = (f'hostname = "mx.example.org"\ndata_dir = "{tmp_path / "data"}"\n'
            f"[listen]\n{listen}\n{domains}\n{extra}\n")
    path = tmp_path / "mailhost.toml"
    path.write_text(text)
    return path


class RunningServer:
    """A started MailhostService plus what tests need to reach it."""

    def __init__(self, config_path: Path, service) -> None:
        self.config_path = config_path
        self.service = service
        self.ctx = service.ctx
        self.config = service.ctx.config
        self.ports: dict[str, int] = {}

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.config.mail_dir / domain / local

    def add_user(self, address: str, password: str = "secret") -> None:
        out, err = io.StringIO(), io.StringIO()
        rc = cli_main(["--config", str(self.config_path), "user", "add", address,
                       "--password-stdin"], out=out, err=err, stdin=io.StringIO(password + "\n"))
        assert rc == 0, err.getvalue()

    def del_user(self, address: str) -> None:
        rc = cli_main(["--config", str(self.config_path), "user", "del", address],
                      out=io.StringIO(), err=io.StringIO())
        assert rc == 0

    def client_tls(self) -> ssl.SSLContext:
        """A client context trusting the server's self-signed certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ctx.tls.cert_path))
        ctx.check_hostname = False
        return ctx

    def port_of(self, role: str, index: int = 0) -> defer.Deferred:
        """A Deferred of the port number of one listener (the first of a role)."""
        listening: defer.Deferred = defer.Deferred()

        def got(port):
            listening.callback(port.getHost().port)
            return port  # the service needs the port back to stop listening at the end

        self.service.listeners[role][index]._waitingForPort.addCallback(got)
        return listening

    @defer.inlineCallbacks
    def start(self):
        self.service.startService()
        for role in self.service.listeners:
            self.ports[role] = yield self.port_of(role)

    def stop(self):
        return defer.maybeDeferred(self.service.stopService)


@defer.inlineCallbacks
def start_server(tmp_path: Path, extra: str = "", roles=ALL_ROLES,
                 domains: str = '[domains."example.org"]\n', clock=None):
    path = write_config(tmp_path, extra, roles, domains)
    cfg = config_mod.load(path)
    server = RunningServer(path, makeService(cfg, reactor, clock=clock))
    yield server.start()
    return server


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    """The default server: all roles, domain example.org, no users."""
    srv = await start_server(tmp_path)
    yield srv
    await srv.stop()


def in_thread(fn, *args, **kwargs):
    """Run a blocking client function in a thread; a Deferred of its result."""
    return threads.deferToThread(fn, *args, **kwargs)
