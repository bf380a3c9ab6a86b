"""Graceful shutdown: listeners close at once, a transaction in flight still completes."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor, task

from tests.functional.conftest import in_thread, start_server


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _open_transaction(port: int) -> socket.socket:
    """EHLO, MAIL, RCPT, DATA and half a message; return the socket mid-DATA."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert _recv_line(sock).startswith(b"220")
    sock.sendall(b"HELO client.example\r\n")
    assert _recv_line(sock).startswith(b"250")
    for line in (b"MAIL FROM:<bob@elsewhere.test>", b"RCPT TO:<alice@example.org>"):
        sock.sendall(line + b"\r\n")
        assert _recv_line(sock).startswith(b"250")
    sock.sendall(b"DATA\r\n")
    assert _recv_line(sock).startswith(b"354")
    sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    return sock


def _finish_transaction(sock: socket.socket) -> tuple[bytes, bytes]:
    sock.sendall(b"second half\r\n.\r\n")
    reply = _recv_line(sock)
    sock.sendall(b"MAIL FROM:<bob@elsewhere.test>\r\n")
    after = _recv_line(sock)
    sock.close()
    return reply, after


def _connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return True
    return False


@pytest_twisted.inlineCallbacks
def test_stop_waits_for_the_message_in_flight_then_closes(tmp_path):
    srv = yield start_server(tmp_path, roles=("smtp",))
    srv.add_user("alice@example.org")
    port = srv.ports["smtp"]
    sock = yield in_thread(_open_transaction, port)
    stopped = srv.stop()
    yield task.deferLater(reactor, 0.2, lambda: None)
    assert not stopped.called  # waiting for the transaction
    assert (yield in_thread(_connect_refused, port))
    reply, after = yield in_thread(_finish_transaction, sock)
    assert reply.startswith(b"250 2.0.0")
    assert after.startswith(b"421 ") and b" 4.3.2 " in after
    yield stopped
    (path,) = (srv.maildir("alice@example.org") / "new").iterdir()
    assert path.read_bytes().endswith(b"first half\nsecond half\n")


@pytest_twisted.inlineCallbacks
def test_stop_closes_idle_sessions(tmp_path):
    srv = yield start_server(tmp_path, roles=("smtp",))
    sock = yield in_thread(socket.create_connection, ("127.0.0.1", srv.ports["smtp"]), 10)
    assert (yield in_thread(_recv_line, sock)).startswith(b"220")
    yield srv.stop()

    def rest() -> bytes:
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
        sock.close()
        return data

    assert (yield in_thread(rest)) == b""
