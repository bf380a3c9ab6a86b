"""POP3 / POP3S end to end: the real server on 127.0.0.1, stdlib poplib and raw sockets."""

from __future__ import annotations

import hashlib
import poplib
import socket
import time

import pytest
import pytest_twisted

from tests.functional.conftest import in_thread, start_server
from tests.functional.test_pop3_helpers import (
    RawSession,
    drop_message,
    files,
    sample,
    stop_when_idle,
)

USER, PASSWORD = "alice@example.org", "secret"
ROLES = ("pop3", "pop3s")
#: keeps the outbound queue from reading the system's resolver configuration
QUEUE = '[queue]\ndns_servers = ["127.0.0.1:53"]\n'


def start_pop(tmp_path, extra: str = ""):
    return start_server(tmp_path, roles=ROLES, extra=QUEUE + extra)


@pytest_twisted.async_yield_fixture
async def pop(tmp_path):
    srv = await start_pop(tmp_path)
    srv.add_user(USER, PASSWORD)
    yield srv
    await stop_when_idle(srv)


def login_stls(srv, user=USER, password=PASSWORD) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=20)
    p.stls(srv.client_tls())
    p.user(user)
    p.pass_(password)
    return p


def login_ssl(srv, user=USER, password=PASSWORD) -> poplib.POP3_SSL:
    p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=srv.client_tls(), timeout=20)
    p.user(user)
    p.pass_(password)
    return p


@pytest_twisted.inlineCallbacks
def test_list_uidl_top_retr_over_stls(pop):
    box = pop.maildir(USER)
    bodies = [sample(1), sample(2, b"more\n"), sample(3)]
    for i, body in enumerate(bodies):
        drop_message(box, body, when=1_700_000_000 + i)

    def session():
        p = poplib.POP3("127.0.0.1", pop.ports["pop3"], timeout=20)
        welcome = p.getwelcome()
        before = p.capa()
        p.stls(pop.client_tls())
        after = p.capa()
        p.user(USER)
        p.pass_(PASSWORD)
        stat = p.stat()
        listing = p.list()
        uidl = p.uidl()
        top = p.top(2, 1)
        retr = p.retr(2)
        one = p.uidl(3)
        p.quit()
        return welcome, before, after, stat, listing, uidl, top, retr, one

    welcome, before, after, stat, listing, uidl, top, retr, one = yield in_thread(session)
    assert welcome.startswith(b"+OK") and b"<" not in welcome  # no APOP timestamp
    assert "STLS" in before and "USER" not in before and "SASL" not in before
    assert "STLS" not in after and "USER" in after and after["SASL"] == ["PLAIN"]
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "IMPLEMENTATION"):
        assert cap in after
    wire = [len(b) + b.count(b"\n") for b in bodies]
    assert stat == (3, sum(wire))
    assert listing[1] == [b"%d %d" % (i + 1, w) for i, w in enumerate(wire)]
    uids = [line.split()[1] for line in uidl[1]]
    assert len(set(uids)) == 3 and all(u.count(b".") == 1 for u in uids)
    assert one.split()[2] == uids[2]
    assert top[1] == [b"From: sender@example.net", b"To: alice@example.org",
                      b"Subject: message 2", b"", b"line one of 2"]
    # poplib undoes dot-stuffing; the message comes back byte for byte (LF -> lines)
    assert b"\n".join(retr[1]) + b"\n" == bodies[1]
    assert retr[2] == wire[1]  # poplib counts octets without the stuffed dots


@pytest_twisted.inlineCallbacks
def test_retr_large_message_over_pop3s(pop):
    box = pop.maildir(USER)
    line = b"x" * 75 + b"\n"
    body = b"Subject: big\n\n" + b"".join(
        (b"." + line) if i % 1000 == 0 else line for i in range(200_000))  # ~15 MB
    drop_message(box, body)

    def session():
        p = login_ssl(pop)
        size = p.list(1).split()[2]
        resp, lines, octets = p.retr(1)
        p.quit()
        return size, lines

    size, lines = yield in_thread(session)
    assert int(size) == len(body) + body.count(b"\n")
    got = b"\n".join(lines) + b"\n"
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


@pytest_twisted.inlineCallbacks
def test_dele_then_quit_removes_and_retr_marks_seen(pop):
    box = pop.maildir(USER)
    paths = [drop_message(box, sample(i), when=1_700_000_000 + i) for i in range(3)]

    def session():
        p = login_ssl(pop)
        p.top(1, 0)
        p.retr(3)
        p.dele(2)
        err = None
        try:
            p.retr(2)
        except poplib.error_proto as e:
            err = e.args[0]
        stat = p.stat()
        p.quit()
        return err, stat

    err, stat = yield in_thread(session)
    assert err.startswith(b"-ERR") and b"deleted" in err
    assert stat[0] == 2
    remaining = files(box)
    assert len(remaining) == 2
    assert not any(paths[1].name in n for n in remaining)
    seen = [n for n in remaining if n.startswith(paths[2].name)]
    assert seen == [paths[2].name + ":2,S"]  # RETR: moved to cur/ with S
    assert (box / "cur" / seen[0]).exists()
    assert (box / "new" / paths[0].name).exists()  # TOP alone does not mark seen


@pytest_twisted.inlineCallbacks
def test_dele_then_dropped_connection_keeps_everything(pop):
    box = pop.maildir(USER)
    for i in range(2):
        drop_message(box, sample(i))
    before = files(box)

    def session():
        p = login_ssl(pop)
        p.dele(1)
        p.dele(2)
        p.sock.shutdown(socket.SHUT_RDWR)  # no QUIT: no UPDATE state
        p.sock.close()

        # the lock is released once the server notices; a new session sees both
        for _ in range(100):
            try:
                q = login_ssl(pop)
            except poplib.error_proto as e:
                assert b"[IN-USE]" in e.args[0]
                time.sleep(0.05)
                continue
            stat = q.stat()
            q.quit()
            return stat
        raise AssertionError("maildrop stayed locked")

    stat = yield in_thread(session)
    assert stat[0] == 2
    assert files(box) == before


@pytest_twisted.inlineCallbacks
def test_rset_undeletes(pop):
    box = pop.maildir(USER)
    drop_message(box, sample(1))

    def session():
        p = login_ssl(pop)
        p.dele(1)
        r = p.rset()
        p.quit()
        return r

    r = yield in_thread(session)
    assert r.startswith(b"+OK")
    assert len(files(box)) == 1


@pytest_twisted.inlineCallbacks
def test_uidl_stable_across_sessions_flags_and_restart(tmp_path):
    srv = yield start_pop(tmp_path)
    srv.add_user(USER, PASSWORD)
    box = srv.maildir(USER)
    for i in range(3):
        drop_message(box, sample(i), when=1_700_000_000 + i)

    def uidls(s, retr=False):
        p = login_ssl(s)
        got = p.uidl()[1]
        if retr:
            p.retr(1)  # moves message 1 to cur/ with the S flag
        p.quit()
        return got

    first = yield in_thread(uidls, srv, True)
    second = yield in_thread(uidls, srv)
    yield stop_when_idle(srv)
    srv2 = yield start_pop(tmp_path)
    try:
        drop_message(box, sample(9), when=1_700_000_100)
        third = yield in_thread(uidls, srv2)
    finally:
        yield stop_when_idle(srv2)
    assert first == second
    assert third[:3] == first
    assert len(third) == 4 and third[3] not in first


@pytest_twisted.inlineCallbacks
def test_second_session_gets_in_use(pop):
    drop_message(pop.maildir(USER), sample(1))

    def session():
        p = login_stls(pop)
        try:
            login_ssl(pop)
        except poplib.error_proto as e:
            err = e.args[0]
        else:
            err = b"no error"
        stat = p.stat()
        p.quit()
        q = login_ssl(pop)  # free again after QUIT
        q.quit()
        return err, stat

    err, stat = yield in_thread(session)
    assert err.startswith(b"-ERR [IN-USE]")
    assert stat[0] == 1


@pytest_twisted.inlineCallbacks
def test_error_replies_keep_the_session(pop):
    box = pop.maildir(USER)
    for i in range(2):
        drop_message(box, sample(i))

    def session():
        s = RawSession(pop.ports["pop3s"], pop.client_tls())
        s.line()
        replies = {}
        replies["stat-before-login"] = s.cmd(b"STAT")
        replies["pass-before-user"] = s.cmd(b"PASS x")
        s.cmd(b"USER " + USER.encode())
        s.cmd(b"PASS " + PASSWORD.encode())
        for cmd in (b"RETR", b"DELE 0", b"RETR 0", b"RETR 3", b"RETR x", b"RETR -1",
                    b"TOP 1", b"TOP 1 x", b"LIST 99", b"UIDL 0", b"DELE", b"FOO",
                    b"\xff\xfe", b"USER bob", b"APOP a b", b"LAST", b"RETR 99999999999"):
            replies[cmd.decode("latin-1")] = s.cmd(cmd)
        replies["dele1"] = s.cmd(b"DELE 1")
        for cmd in (b"DELE 1", b"RETR 1", b"LIST 1", b"UIDL 1", b"TOP 1 0"):
            replies[cmd.decode() + " (deleted)"] = s.cmd(cmd)
        replies["noop"] = s.cmd(b"NOOP")
        replies["stat"] = s.cmd(b"STAT")
        replies["rset"] = s.cmd(b"RSET")
        replies["quit"] = s.cmd(b"QUIT")
        s.close()
        return replies

    replies = yield in_thread(session)
    ok = {"dele1", "noop", "stat", "rset", "quit"}
    for cmd, reply in replies.items():
        if cmd in ok:
            assert reply.startswith(b"+OK"), (cmd, reply)
        else:
            assert reply.startswith(b"-ERR ") and len(reply) > 6, (cmd, reply)
    assert replies["stat"].startswith(b"+OK 1 ")
    assert len(files(box)) == 2  # DELE then RSET: nothing removed


@pytest_twisted.inlineCallbacks
def test_cleartext_login_refused_without_tls(pop):
    def session():
        s = RawSession(pop.ports["pop3"])
        s.line()
        user = s.cmd(b"USER " + USER.encode())
        auth = s.cmd(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==")
        s.cmd(b"QUIT")
        s.close()
        return user, auth

    user, auth = yield in_thread(session)
    assert user.startswith(b"-ERR [AUTH]") and b"STLS" in user
    assert auth.startswith(b"-ERR [AUTH]")


@pytest_twisted.inlineCallbacks
def test_auth_plain_and_allow_cleartext(tmp_path):
    srv = yield start_pop(tmp_path, "[auth]\nallow_cleartext = true\n")
    try:
        srv.add_user(USER, PASSWORD)

        def session():
            p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=20)
            caps = p.capa()
            r1 = p._shortcmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==")
            p.quit()
            p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=20)
            p._putcmd("AUTH PLAIN")
            cont = p._getline()[0]
            r2 = p._shortcmd("AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==")
            p.quit()
            p = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=20)
            p.user(USER)
            r3 = p.pass_(PASSWORD)
            p.quit()
            return caps, r1, cont, r2, r3

        caps, r1, cont, r2, r3 = yield in_thread(session)
    finally:
        yield stop_when_idle(srv)
    assert "USER" in caps and "STLS" in caps and caps["SASL"] == ["PLAIN"]
    assert r1.startswith(b"+OK") and cont == b"+ " and r2.startswith(b"+OK")
    assert r3.startswith(b"+OK")


@pytest_twisted.inlineCallbacks
def test_bad_password_then_lockout(tmp_path):
    srv = yield start_pop(
        tmp_path, "[auth]\nfree_failures = 10\nlockout_failures = 2\n")
    try:
        srv.add_user(USER, PASSWORD)

        def attempt(password):
            p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=srv.client_tls(),
                                timeout=20)
            p.user(USER)
            try:
                return p.pass_(password)
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                p.quit()

        first = yield in_thread(attempt, "wrong")
        second = yield in_thread(attempt, "wrong")
        locked = yield in_thread(attempt, PASSWORD)
    finally:
        yield stop_when_idle(srv)
    assert first.startswith(b"-ERR [AUTH]") and second.startswith(b"-ERR [AUTH]")
    assert locked.startswith(b"-ERR [SYS/TEMP]")


@pytest_twisted.inlineCallbacks
def test_stls_discards_pipelined_commands(pop):
    def session():
        s = RawSession(pop.ports["pop3"])
        s.line()
        # injected after STLS in the same packet: must not run inside TLS
        s.send(b"STLS\r\nUSER " + USER.encode() + b"\r\nCAPA\r\n")
        reply = s.line()
        s.starttls(pop.client_tls())
        after = s.cmd(b"PASS " + PASSWORD.encode())
        noop = s.cmd(b"STAT")
        s.cmd(b"QUIT")
        s.close()
        return reply, after, noop

    reply, after, stat = yield in_thread(session)
    assert reply.startswith(b"+OK")
    assert after.startswith(b"-ERR")  # the injected USER was discarded
    assert stat.startswith(b"-ERR")   # still in the AUTHORIZATION state


@pytest_twisted.inlineCallbacks
def test_pipelined_commands_after_pass_wait_for_login(pop):
    drop_message(pop.maildir(USER), sample(1))

    def session():
        s = RawSession(pop.ports["pop3s"], pop.client_tls())
        s.line()
        s.send(b"USER %s\r\nPASS %s\r\nSTAT\r\nLIST\r\nQUIT\r\n"
               % (USER.encode(), PASSWORD.encode()))
        replies = [s.line(), s.line(), s.line(), s.line()]
        listing = s.multi()
        replies.append(s.line())
        s.close()
        return replies, listing

    replies, listing = yield in_thread(session)
    assert [r[:3] for r in replies] == [b"+OK"] * 5, replies
    assert replies[2].startswith(b"+OK 1 ")
    assert len(listing) == 1


@pytest_twisted.inlineCallbacks
def test_connections_per_ip_and_long_line_and_bad_commands(tmp_path):
    srv = yield start_pop(
        tmp_path, "[limits]\nconnections_per_ip = 2\nbad_commands = 3\n")
    try:
        def session():
            a = RawSession(srv.ports["pop3"])
            b = RawSession(srv.ports["pop3"])
            greet = [a.line(), b.line()]
            c = RawSession(srv.ports["pop3"])
            refused = c.line()
            c_closed = c.closed()
            # a line longer than the limit: an error, then the connection closes
            a.send(b"X" * 10000)
            too_long = a.line()
            a_closed = a.closed()
            bad = [b.cmd(b"BOGUS") for _ in range(4)]
            b_closed = b.closed()
            return greet, refused, c_closed, too_long, a_closed, bad, b_closed

        greet, refused, c_closed, too_long, a_closed, bad, b_closed = \
            yield in_thread(session)
    finally:
        yield stop_when_idle(srv)
    assert all(g.startswith(b"+OK") for g in greet)
    assert refused.startswith(b"-ERR [SYS/TEMP]") and c_closed
    assert too_long.startswith(b"-ERR") and a_closed
    assert all(r.startswith(b"-ERR") for r in bad) and b"closing" in bad[3]
    assert b_closed


@pytest_twisted.inlineCallbacks
def test_new_account_without_maildir(pop):
    def session():
        p = login_ssl(pop)
        stat = p.stat()
        listing = p.list()
        p.quit()
        return stat, listing

    stat, listing = yield in_thread(session)
    assert stat == (0, 0) and listing[1] == []


@pytest.mark.parametrize("role", ["pop3", "pop3s"])
def test_factory_roles(role, tmp_path):
    from mailhost import config as config_mod
    from mailhost.pop3 import POP3Factory
    from mailhost.service import build_context
    from tests.functional.conftest import write_config

    ctx = build_context(config_mod.load(write_config(tmp_path, roles=ROLES)), None)
    proto = POP3Factory(ctx, role).buildProtocol(None)
    assert proto.secure is (role == "pop3s")
    with pytest.raises(ValueError):
        POP3Factory(ctx, "imap")
