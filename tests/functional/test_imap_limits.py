"""Hostile and malformed input against a real server: every case gets a protocol answer,
the session survives, the limits hold. Plus Twisted's own IMAP4Client as a client."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import endpoints, protocol, reactor
from twisted.mail import imap4

from tests.functional.conftest import in_thread, start_server
from tests.functional.test_imap_helpers import PASSWORD, USER, deliver, plain, stop

LIMITS = """
[auth]
allow_cleartext = true
[limits]
imap_literal = 1024
imap_command_length = 2048
message_size = 10000
sessions_per_account = 2
connections_per_ip = 4
"""


async def _server(tmp_path):
    srv = await start_server(tmp_path, extra=LIMITS, roles=("imap",))
    srv.add_user(USER, PASSWORD)
    return srv


class Raw:
    """A line-level client on a plain socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def cmd(self, text: bytes, tag: bytes) -> list[bytes]:
        self.sock.sendall(text + b"\r\n")
        return self.until(tag)

    def close(self) -> None:
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_answers(tmp_path):
    srv = await _server(tmp_path)
    await deliver(srv, plain("hello"))
    try:
        def talk():
            c = Raw(srv.ports["imap"])
            assert c.greeting.startswith(b"* OK")
            assert c.cmd(b"a1 FROB", b"a1")[-1].startswith(b"a1 BAD")
            assert c.cmd(b"a2 SELECT INBOX", b"a2")[-1].startswith(b"a2 BAD")  # not logged in
            assert c.cmd(b"\xff\xfe junk", b"*")[-1].startswith(b"* BAD")
            assert c.cmd(b"a3 LOGIN", b"a3")[-1].startswith(b"a3 BAD")
            assert c.cmd(b'a4 LOGIN "unterminated', b"a4")[-1].startswith(b"a4 BAD")
            assert c.cmd(b"a5 LOGIN alice@example.org secret", b"a5")[-1].startswith(b"a5 OK")
            assert c.cmd(b"a6 SELECT INBOX extra junk", b"a6")[-1].startswith(b"a6 BAD")
            assert c.cmd(b"a7 SELECT INBOX", b"a7")[-1].startswith(b"a7 OK [READ-WRITE]")
            for bad in (b"FETCH 0 FLAGS", b"FETCH 1 (FLAGS", b"FETCH x FLAGS",
                        b"FETCH 1 BODY[9.FOO]", b"FETCH 1 BODY[]<5.0>", b"STORE 1 FLAGZ x",
                        b"SEARCH OR SEEN", b"SEARCH BEFORE 32-Foo-2020",
                        b"UID LOGIN a b", b"COPY 1", b"STATUS INBOX (BOGUS)"):
                reply = c.cmd(b"b1 " + bad, b"b1")[-1]
                assert reply.startswith(b"b1 BAD"), (bad, reply)
            reply = c.cmd(b"b2 FETCH 5 FLAGS", b"b2")[-1]  # beyond the end: nothing, OK
            assert reply.startswith(b"b2 OK")
            assert c.cmd(b"b3 SELECT Missing", b"b3")[-1].startswith(b"b3 NO")
            assert c.cmd(b"b4 CREATE INBOX", b"b4")[-1].startswith(b"b4 NO")
            # a non-synchronizing literal that is too big is swallowed, not executed
            c.sock.sendall(b"c1 LOGIN {2000+}\r\n" + b"x" * 2000 + b" y\r\n")
            assert c.until(b"c1")[-1].startswith(b"c1 BAD")
            assert c.cmd(b"c2 NOOP", b"c2")[-1].startswith(b"c2 OK")
            # a synchronizing one is refused before the client sends it
            assert c.cmd(b"c3 LOGIN {5000}", b"c3")[-1].startswith(b"c3 BAD")
            # APPEND beyond message_size
            reply = c.cmd(b"c4 APPEND INBOX {20000}", b"c4")[-1]
            assert reply.startswith(b"c4 NO [TOOBIG]")
            # an over-long line
            c.sock.sendall(b"c5 NOOP " + b"x" * 5000 + b"\r\n")
            assert c.line().startswith(b"* BAD")
            assert c.cmd(b"c6 NOOP", b"c6")[-1].startswith(b"c6 OK")
            # pipelined commands, one of them asynchronous, answered in order
            c.sock.sendall(b"p1 STATUS INBOX (MESSAGES)\r\np2 NOOP\r\np3 SELECT INBOX\r\n"
                           b"p4 FETCH 1 (UID)\r\n")
            lines = c.until(b"p4")
            tags = [line.split()[0] for line in lines if not line.startswith(b"*")]
            assert tags == [b"p1", b"p2", b"p3", b"p4"]
            assert c.cmd(b"z LOGOUT", b"z")[-1].startswith(b"z OK")
            c.close()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_append_literal_plus_and_limits_per_account_and_ip(tmp_path):
    srv = await _server(tmp_path)
    try:
        def talk():
            a, b, c = (Raw(srv.ports["imap"]) for _ in range(3))
            for n, conn in enumerate((a, b, c)):
                conn.sock.sendall(b"l LOGIN alice@example.org secret\r\n")
                reply = conn.until(b"l")[-1]
                assert reply.startswith(b"l OK") if n < 2 else reply.startswith(b"l NO [LIMIT]")
            msg = b"Subject: plus\r\n\r\nliteral plus\r\n"
            a.sock.sendall(b"ap APPEND INBOX (\\Flagged) {%d+}\r\n" % len(msg) + msg + b"\r\n")
            assert b"APPENDUID" in a.until(b"ap")[-1]
            d = Raw(srv.ports["imap"])
            e = Raw(srv.ports["imap"])
            assert e.greeting.startswith(b"* BYE")
            for conn in (a, b, c, d, e):
                conn.close()

        await in_thread(talk)
        assert len(list((srv.maildir(USER) / "cur").iterdir())) == 1
        assert not list((srv.maildir(USER) / "tmp").iterdir())
    finally:
        await stop(srv)


class _Client(imap4.IMAP4Client):
    def serverGreeting(self, caps):
        self.factory.ready.callback(self)


@pytest_twisted.ensureDeferred
async def test_twisted_imap4client(tmp_path):
    srv = await _server(tmp_path)
    await deliver(srv, plain("for twisted"))
    try:
        from twisted.internet import defer

        factory = protocol.ClientFactory.forProtocol(_Client)
        factory.ready = defer.Deferred()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", srv.ports["imap"])
        client = await endpoint.connect(factory)
        await factory.ready
        await client.login(USER.encode(), PASSWORD.encode())
        info = await client.select("INBOX")
        assert info["EXISTS"] == 1 and "UIDVALIDITY" in info
        result = await client.fetchSpecific("1", headerType="HEADER.FIELDS",
                                            headerArgs=["SUBJECT"], peek=True)
        assert b"for twisted" in str(result).encode()
        flags = await client.setFlags("1", [r"\Seen"], silent=False)
        assert r"\Seen" in flags[1]["FLAGS"]
        await client.logout()
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_append_takes_one_message_literal(tmp_path):
    """A second message-sized literal in one APPEND gets the small literal cap (BAD),
    and nothing beyond the single APPEND is stored."""
    srv = await _server(tmp_path)
    try:
        def talk():
            r = Raw(srv.ports["imap"])
            r.cmd(b"a LOGIN " + USER.encode() + b" " + PASSWORD.encode(), b"a")
            msg = b"Subject: one\r\n\r\nbody\r\n"
            big = b"x" * 5000  # under message_size, over imap_literal
            r.sock.sendall(b"b APPEND INBOX {%d+}\r\n" % len(msg) + msg +
                           b" {%d+}\r\n" % len(big) + big + b"\r\n")
            answer = r.until(b"b")[-1]
            after = r.cmd(b"c NOOP", b"c")[-1]
            r.cmd(b"z LOGOUT", b"z")
            return answer, after

        answer, after = await in_thread(talk)
        assert answer.startswith(b"b BAD") or answer.startswith(b"b NO"), answer
        assert after.startswith(b"c OK")
        stored = list((srv.maildir(USER) / "cur").iterdir()) + \
            list((srv.maildir(USER) / "new").iterdir())
        assert len(stored) <= 1
        assert not list((srv.maildir(USER) / "tmp").iterdir())
    finally:
        await stop(srv)
