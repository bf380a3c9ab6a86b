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


@pytest_twisted.inlineCallbacks
def test_imap_list_special_use_selection_lists_only_special_folders(tmp_path):
    """curl -X 'LIST (SPECIAL-USE) "" "*"' (the RFC 6154 §3 form Thunderbird-style clients
    use) returned every folder; the selection option must keep only special-use ones,
    while RETURN (SPECIAL-USE) keeps all folders with their attributes."""
    srv = yield start_server(tmp_path, roles=("imaps",))
    try:
        srv.add_user(USER, PASSWORD)

        def session() -> tuple[list[bytes], list[bytes]]:
            c = LineClient(srv.ports["imaps"], srv.client_tls())
            try:
                c.line()
                c.send(b"A1 LOGIN " + USER.encode() + b" " + PASSWORD.encode())
                c.until(b"A1 OK")
                c.send(b"A2 CREATE Projects")
                c.until(b"A2 OK")
                c.send(b'A3 LIST (SPECIAL-USE) "" "*"')
                selected = c.until(b"A3 ")
                c.send(b'A4 LIST "" "*" RETURN (SPECIAL-USE)')
                returned = c.until(b"A4 ")
                return selected, returned
            finally:
                c.close()

        selected, returned = yield in_thread(session)
        assert selected[-1].startswith(b"A3 OK")
        names = [line.rsplit(b" ", 1)[1] for line in selected[:-1]]
        assert sorted(names) == [b'"Archive"', b'"Drafts"', b'"Junk"', b'"Sent"', b'"Trash"']
        assert all(b"\\HasNoChildren \\" in line for line in selected[:-1])
        assert any(line.endswith(b'"Projects"') for line in returned)
        assert any(line.endswith(b'"INBOX"') for line in returned)
    finally:
        yield srv.stop()
