"""Interoperability regressions: exchanges that real mail clients (curl, mbsync, fetchmail,
mutt, swaks) sent, replayed byte for byte over raw sockets so that no client binary is
needed. Each test names the client and the command line that showed the problem."""

from __future__ import annotations

import base64
import socket
import ssl

import pytest_twisted

from tests.functional.conftest import in_thread, start_server

USER = "alice@example.org"
PASSWORD = "secret"


class LineClient:
    """A blocking CRLF line client over TLS (what the clients above do underneath)."""

    def __init__(self, port: int, tls: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock = tls.wrap_socket(raw)
        self.file = self.sock.makefile("rb")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def line(self) -> bytes:
        data = self.file.readline(65536)
        assert data.endswith(b"\r\n"), data
        return data[:-2]

    def until(self, prefix: bytes) -> list[bytes]:
        """Lines up to and including the first that starts with `prefix`."""
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(prefix):
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest_twisted.inlineCallbacks
def test_imap_authenticate_login_with_initial_response(tmp_path):
    """curl --login-options AUTH=LOGIN imaps://... sends the user name as a SASL-IR initial
    response (RFC 4959); the server must then ask only for the password."""
    srv = yield start_server(tmp_path, roles=("imaps",))
    try:
        srv.add_user(USER, PASSWORD)

        def session() -> list[bytes]:
            c = LineClient(srv.ports["imaps"], srv.client_tls())
            try:
                assert c.line().startswith(b"* OK")
                c.send(b"A002 AUTHENTICATE LOGIN " + b64(USER.encode()))
                prompt = c.line()
                c.send(b64(PASSWORD.encode()))
                done = c.until(b"A002 ")
                c.send(b"A003 LOGOUT")
                c.until(b"A003 ")
                return [prompt] + done
            finally:
                c.close()

        lines = yield in_thread(session)
        assert lines[0] == b"+ " + b64(b"Password:")
        assert lines[-1].startswith(b"A002 OK")
    finally:
        yield srv.stop()
