"""Interoperability regressions: exchanges that real mail clients (curl, mbsync, fetchmail,
mutt, swaks) sent, replayed byte for byte over raw sockets so that no client binary is
needed. Each test names the client and the command line that showed the problem."""

from __future__ import annotations

import base64
import socket
import ssl

import pytest_twisted

from mailhost.store.maildir import IncomingMessage
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


@pytest_twisted.inlineCallbacks
def test_imap_append_is_stored_with_lf_line_ends(tmp_path):
    """mbsync (`APPEND "INBOX" {N}`) and mutt's Sent copy send CRLF messages; they were
    stored with CRLF while SMTP delivery stores LF, so one Maildir mixed both. Stored as
    LF now; FETCH and RFC822.SIZE still give the CRLF wire form."""
    srv = yield start_server(tmp_path, roles=("imaps",))
    try:
        srv.add_user(USER, PASSWORD)
        message = (b"From: alice@example.org\r\nSubject: local draft\r\n"
                   b"X-TUID: abcdefgh\r\n\r\nwritten locally\r\nlone\rCR\r\n")

        def session() -> list[bytes]:
            c = LineClient(srv.ports["imaps"], srv.client_tls())
            try:
                c.line()
                c.send(b"1 LOGIN " + USER.encode() + b" " + PASSWORD.encode())
                c.until(b"1 OK")
                c.send(b'6 APPEND "INBOX" {%d}' % len(message))
                assert c.line().startswith(b"+ ")
                # the literal in two writes split between CR and LF, as TCP may deliver it
                cut = message.index(b"\r\n\r\n") + 1
                c.sock.sendall(message[:cut])
                c.sock.sendall(message[cut:] + b"\r\n")
                appended = c.until(b"6 ")
                c.send(b"7 SELECT INBOX")
                c.until(b"7 OK")
                c.send(b"8 UID FETCH 1 (RFC822.SIZE BODY.PEEK[])")
                head = c.line()
                body = c.file.read(len(message))
                c.until(b"8 OK")
                return appended + [head, body]
            finally:
                c.close()

        appended_ok, head, body = (yield in_thread(session))[-3:]
        assert appended_ok.startswith(b"6 OK [APPENDUID")
        assert head == b"* 1 FETCH (UID 1 RFC822.SIZE %d BODY[] {%d}" % (
            len(message), len(message))
        assert body == message
        stored = list((srv.maildir(USER) / "cur").iterdir())
        assert len(stored) == 1
        assert stored[0].read_bytes() == message.replace(b"\r\n", b"\n")
    finally:
        yield srv.stop()


def test_incoming_message_holds_a_cr_across_chunk_boundaries(tmp_path):
    """The APPEND literal arrives in arbitrary TCP chunks: a CRLF split between two of them
    is still one line end, and lone CRs (also at the very end) are kept."""
    (tmp_path / "tmp").mkdir()
    w = IncomingMessage(tmp_path)
    for chunk in (b"a\r", b"\nb\r", b"\r", b"\r\n", b"c\rd\r\n\r"):
        w.write(chunk)
    w.close()
    assert w.path.read_bytes() == b"a\nb\r\r\nc\rd\n\r"
    w.discard()
    assert not w.path.exists()


@pytest_twisted.inlineCallbacks
def test_imap_inbox_prefix_is_case_insensitive_for_children(tmp_path):
    """curl -X 'CREATE inbox.lower' made a folder "inbox.lower" that LIST "" "INBOX.*"
    showed (LIST matches INBOX case-insensitively) but `DELETE INBOX.lower` could not
    find. The INBOX prefix of a child name is canonical now, in every command."""
    srv = yield start_server(tmp_path, roles=("imaps",))
    try:
        srv.add_user(USER, PASSWORD)

        def session() -> dict[bytes, list[bytes]]:
            c = LineClient(srv.ports["imaps"], srv.client_tls())
            out = {}
            try:
                c.line()
                for tag, command in ((b"1", b"LOGIN %s %s" % (USER.encode(),
                                                             PASSWORD.encode())),
                                     (b"2", b"CREATE inbox.lower"),
                                     (b"3", b'LIST "" "INBOX.*"'),
                                     (b"4", b"CREATE INBOX.Lower"),
                                     (b"5", b"CREATE INBOX.lower"),
                                     (b"6", b"SUBSCRIBE Inbox.lower"),
                                     (b"7", b'LSUB "" "*"'),
                                     (b"8", b"SELECT iNbOx.lower"),
                                     (b"9", b"UNSUBSCRIBE INBOX.lower"),
                                     (b"10", b"DELETE INBOX.lower"),
                                     (b"11", b'LIST "" "INBOX.*"')):
                    c.send(tag + b" " + command)
                    out[tag] = c.until(tag + b" ")
                return out
            finally:
                c.close()

        out = yield in_thread(session)
        assert out[b"2"][-1].startswith(b"2 OK")
        assert out[b"3"] == [b'* LIST (\\HasNoChildren) "." "INBOX.lower"', b"3 OK LIST completed"]
        assert out[b"4"][-1].startswith(b"4 OK")  # a different name below INBOX: case kept
        assert out[b"5"][-1].startswith(b"5 NO [ALREADYEXISTS]")
        assert b'* LSUB () "." "INBOX.lower"' in out[b"7"]
        assert out[b"8"][-1].startswith(b"8 OK [READ-WRITE]")
        assert out[b"10"][-1].startswith(b"10 OK")
        assert out[b"11"] == [b'* LIST (\\HasNoChildren) "." "INBOX.Lower"',
                              b"11 OK LIST completed"]
        assert (srv.maildir(USER) / ".INBOX.Lower").is_dir()
        assert not (srv.maildir(USER) / ".inbox.lower").exists()
    finally:
        yield srv.stop()
