"""Helpers for the POP3 functional tests (no tests here): Maildir files, raw sessions."""

from __future__ import annotations

import itertools
import socket
import ssl
import time
from pathlib import Path

from twisted.internet import defer, reactor, task

_seq = itertools.count(1)


def drop_message(maildir: Path, body: bytes, when: int | None = None) -> Path:
    """Write one message into new/ the way delivery names it: `<sec>.<unique>,S=,W=`."""
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    sec = int(time.time()) if when is None else when
    wire = len(body) + body.count(b"\n") - body.count(b"\r\n")
    name = f"{sec}.M{next(_seq)}P1Q1.test,S={len(body)},W={wire}"
    path = maildir / "new" / name
    path.write_bytes(body)
    return path


def sample(n: int, extra: bytes = b"") -> bytes:
    return (b"From: sender@example.net\nTo: alice@example.org\n"
            b"Subject: message %d\n\nline one of %d\n.starts with a dot\nlast line\n"
            % (n, n)) + extra


def files(maildir: Path) -> list[str]:
    return sorted(p.name for sub in ("new", "cur") for p in (maildir / sub).iterdir())


class RawSession:
    """A line-level POP3 client over a socket (plain, or upgraded to TLS)."""

    def __init__(self, port: int, tls_context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock)
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def cmd(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        return self.line()

    def multi(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def closed(self) -> bool:
        """True if the server closed the connection (after any buffered lines)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buf, self.buf
        self.sock = context.wrap_socket(self.sock)

    def close(self) -> None:
        self.sock.close()


def pop3_factories(srv) -> list:
    factories = []
    for role in ("pop3", "pop3s"):
        for svc in srv.service.listeners.get(role, []):
            factories.append(getattr(svc.factory, "wrappedFactory", svc.factory))
    return factories


@defer.inlineCallbacks
def stop_when_idle(srv):
    """Wait (at most 5 s) for POP3 sessions the clients closed to end, then stop."""
    for _ in range(250):
        if not any(f.sessions for f in pop3_factories(srv)):
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    yield srv.stop()
