"""IMAP over STARTTLS and imaps with stdlib imaplib: login rules, folders, flags, search,
fetch, copy/move, append, expunge across sessions, IDLE, restarts."""

from __future__ import annotations

import imaplib
import os
import re
import socket
import time

import pytest
import pytest_twisted

from tests.functional.conftest import in_thread, start_server
from tests.functional.test_imap_helpers import (
    MULTIPART,
    PASSWORD,
    USER,
    check,
    connect_ssl,
    deliver,
    fetch_map,
    plain,
    stop,
)

ROLES = ("imap", "imaps")


async def _server(tmp_path, extra=""):
    srv = await start_server(tmp_path, extra=extra, roles=ROLES)
    srv.add_user(USER, PASSWORD)
    return srv


@pytest_twisted.ensureDeferred
async def test_starttls_required_before_login(tmp_path):
    srv = await _server(tmp_path)
    try:
        def talk():
            m = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=20)
            caps = m.capabilities
            assert "LOGINDISABLED" in caps and "STARTTLS" in caps
            assert "AUTH=PLAIN" not in caps
            try:
                m.login(USER, PASSWORD)
                raise AssertionError("login before TLS accepted")
            except imaplib.IMAP4.error as e:
                assert "PRIVACYREQUIRED" in str(e)
            m.starttls(ssl_context=srv.client_tls())
            caps = check(m.capability())[0].split()
            assert b"AUTH=PLAIN" in caps and b"LOGINDISABLED" not in caps
            check(m.login(USER, PASSWORD))
            check(m.select("INBOX"))
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_starttls_discards_pipelined_commands(tmp_path):
    srv = await _server(tmp_path)
    try:
        def talk():
            s = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=20)
            s.recv(4096)
            s.sendall(b"a STARTTLS\r\nb LOGIN alice@example.org secret\r\n")
            buf = b""
            while b"a OK" not in buf:
                buf += s.recv(4096)
            assert b"b " not in buf
            tls = srv.client_tls().wrap_socket(s, server_hostname="mx.example.org")
            tls.sendall(b"c NOOP\r\n")
            got = b""
            while b"c OK" not in got:
                got += tls.recv(4096)
            assert b"b OK" not in got and b"b NO" not in got and b"b BAD" not in got
            tls.close()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_imaps_login_failure_and_authenticate_plain(tmp_path):
    srv = await _server(tmp_path)
    try:
        def talk():
            m = connect_ssl(srv, login=False)
            try:
                m.login(USER, "wrong")
                raise AssertionError("bad password accepted")
            except imaplib.IMAP4.error as e:
                assert "AUTHENTICATIONFAILED" in str(e)
            m.logout()
            m = connect_ssl(srv, login=False)
            check(m.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode()))
            assert m.state == "AUTH"
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_folders_with_odd_names(tmp_path):
    srv = await _server(tmp_path)
    root = srv.maildir(USER)
    try:
        def talk():
            m = connect_ssl(srv)
            check(m.create('"Work Projects"'))
            check(m.create('"Work Projects.2024"'))
            check(m.create("&AOk-t&AOk-"))  # "été"
            names = [line.decode() for line in check(m.list('""', "*"))]
            assert any(n.endswith('"Work Projects.2024"') for n in names)
            assert any("\\HasChildren" in n and n.endswith('"Work Projects"') for n in names)
            assert any("\\Sent" in n for n in names)
            assert (root / ".Work Projects.2024" / "cur").is_dir()
            assert (root / ".&AOk-t&AOk-" / "cur").is_dir()
            for bad in ('".."', '"a..b"', '"a/b"', '".hidden"', '"&AGE-"', '"a.&AGE-"'):
                typ, _ = m.create(bad)
                assert typ == "NO", bad
            check(m.rename('"Work Projects"', '"Old Work"'))
            assert (root / ".Old Work.2024").is_dir()
            assert not (root / ".Work Projects").exists()
            check(m.delete('"Old Work.2024"'))
            assert not (root / ".Old Work.2024").exists()
            typ, _ = m.delete("INBOX")
            assert typ == "NO"
            check(m.subscribe('"Old Work"'))
            lsub = check(m.lsub('""', "*"))
            assert any(line.endswith(b'"Old Work"') for line in lsub)
            check(m.unsubscribe('"Old Work"'))
            check(m.select("&AOk-t&AOk-"))
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_flags_are_maildir_file_names(tmp_path):
    srv = await _server(tmp_path)
    await deliver(srv, plain("one"))
    try:
        def talk():
            m = connect_ssl(srv)
            exists = check(m.select("INBOX"))
            assert exists == [b"1"]
            check(m.store("1", "+FLAGS", "(\\Seen \\Flagged $Label1)"))
            names = os.listdir(srv.maildir(USER) / "cur")
            assert len(names) == 1 and names[0].endswith(":2,FS"), names
            check(m.store("1", "-FLAGS", "(\\Flagged)"))
            assert os.listdir(srv.maildir(USER) / "cur")[0].endswith(":2,S")
            data = check(m.fetch("1", "(FLAGS)"))
            assert b"$Label1" in data[0] and b"\\Seen" in data[0]
            m.logout()
            # keywords survive a new session
            m = connect_ssl(srv)
            check(m.select("INBOX"))
            assert b"$Label1" in check(m.fetch("1", "(FLAGS)"))[0]
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_search_keys(tmp_path):
    srv = await _server(tmp_path)
    await deliver(srv, plain("apples", "red fruit\n", "ann@example.net",
                             "Tue, 3 Mar 2020 10:00:00 +0000"))
    await deliver(srv, plain("bananas", "yellow fruit and more text\n" * 20, "ben@example.net",
                             "Wed, 4 Mar 2020 10:00:00 +0000"))
    await deliver(srv, MULTIPART)
    try:
        def talk():
            m = connect_ssl(srv)
            check(m.select("INBOX"))
            check(m.store("1", "+FLAGS", "(\\Seen)"))

            def s(*keys):
                return check(m.search(None, *keys))[0].split()

            assert s("ALL") == [b"1", b"2", b"3"]
            assert s("SEEN") == [b"1"]
            assert s("UNSEEN") == [b"2", b"3"]
            assert s("FROM", "ben") == [b"2"]
            assert s("SUBJECT", "APPLES") == [b"1"]
            assert s("BODY", "yellow") == [b"2"]
            assert s("TEXT", "quarterly") == [b"3"]
            assert s("HEADER", "Message-ID", "m1@example.net") == [b"3"]
            assert s("LARGER", "500") == [b"2", b"3"]
            assert s("SMALLER", "500") == [b"1"]
            assert s("OR", "FROM", "ann", "FROM", "ben") == [b"1", b"2"]
            assert s("NOT", "FROM", "ann") == [b"2", b"3"]
            assert s("SENTON", "4-Mar-2020") == [b"2"]
            assert s("SENTBEFORE", "4-Mar-2020") == [b"1", b"3"]
            assert s("SENTSINCE", "4-Mar-2020") == [b"2"]
            assert s("SINCE", "1-Jan-2020") == [b"1", b"2", b"3"]
            assert s("BEFORE", "1-Jan-2020") == []
            assert s("2:*") == [b"2", b"3"]
            assert s("UID", "1,3") == [b"1", b"3"]
            assert s("(FROM ben SUBJECT bananas)") == [b"2"]
            assert s("RECENT") == [b"1", b"2", b"3"]
            assert s("NEW") == [b"2", b"3"]
            assert s("KEYWORD", "$Nothing") == []
            assert s("UNKEYWORD", "$Nothing") == [b"1", b"2", b"3"]
            uids = check(m.uid("SEARCH", "FROM", "ann"))[0].split()
            assert uids == [b"1"]
            # RFC 2047 subject, searched with CHARSET UTF-8 and a literal
            m.literal = "Grüße".encode()
            assert check(m.search("UTF-8", "SUBJECT"))[0].split() == [b"3"]
            typ, data = m.search("KOI8-R", "ALL")
            assert typ == "NO" and b"BADCHARSET" in data[0]
            with pytest.raises(imaplib.IMAP4.error, match="unknown search key"):
                m.search(None, "FROBNICATE")
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_fetch_partials_and_bodystructure(tmp_path):
    srv = await _server(tmp_path)
    await deliver(srv, MULTIPART)
    try:
        def talk():
            m = connect_ssl(srv)
            check(m.select("INBOX"))
            wire = MULTIPART.replace(b"\n", b"\r\n")
            data = fetch_map(check(m.fetch("1", "(RFC822.SIZE BODY.PEEK[]<10.20>)")))[1]
            assert b"RFC822.SIZE %d" % len(wire) in data
            assert b"BODY[]<10> {20}\r\n" + wire[10:30] in data
            data = fetch_map(check(m.fetch("1", "(BODY.PEEK[1])")))[1]
            assert data.endswith(b"BODY[1] {48}\r\nHello Alice, the quarterly numbers are "
                                 b"attached.")
            data = fetch_map(check(m.fetch("1", "(BODY.PEEK[2.MIME])")))[1]
            assert b"Content-Disposition: attachment" in data
            data = fetch_map(check(m.fetch("1", "(BODY.PEEK[2]<0.4>)")))[1]
            assert b"BODY[2]<0> {4}\r\nAAEC" in data
            data = fetch_map(check(m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")))[1]
            assert b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= report\r\n" in data
            assert b"To:" not in data
            data = fetch_map(check(m.fetch("1", "(BODYSTRUCTURE)")))[1]
            assert data.startswith(b'1 (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") '
                                   b'NIL NIL "7BIT" 48 1 NIL NIL NIL NIL)("APPLICATION" '
                                   b'"OCTET-STREAM" ("NAME" "data.bin") NIL NIL "BASE64" 8 '
                                   b'NIL ("ATTACHMENT" ("FILENAME" "data.bin")) NIL NIL) '
                                   b'"MIXED" ("BOUNDARY" "XYZ") NIL NIL NIL))'), data
            data = fetch_map(check(m.fetch("1", "(ENVELOPE)")))[1]
            assert b'"=?utf-8?q?Gr=C3=BC=C3=9Fe?= report"' in data
            assert b'(("Bob Example" NIL "bob" "example.net"))' in data
            assert b'((NIL NIL "alice" "example.org")("Carol" NIL "carol" "example.com"))' \
                in data
            # PEEK left it unseen; BODY[TEXT] sets \Seen and reports FLAGS
            assert b"\\Seen" not in check(m.fetch("1", "(FLAGS)"))[0]
            data = fetch_map(check(m.fetch("1", "(BODY[TEXT]<0.8>)")))[1]
            assert b"\\Seen" in data and b"preamble" in data
            with pytest.raises(imaplib.IMAP4.error):
                m.fetch("1", "(BODY[NOPE])")
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_append_copy_move_uidplus(tmp_path):
    srv = await _server(tmp_path)
    try:
        def talk():
            m = connect_ssl(srv)
            typ, data = m.append("Nowhere", None, None, b"Subject: x\r\n\r\nbody\r\n")
            assert typ == "NO" and b"TRYCREATE" in data[0]
            when = imaplib.Time2Internaldate(1583150000)
            typ, data = m.append("INBOX", "(\\Seen $Work)", when, plain("appended"))
            assert typ == "OK"
            code = re.search(rb"APPENDUID (\d+) (\d+)", data[0])
            assert code and code.group(2) == b"1"
            check(m.append("INBOX", None, None, plain("second")))
            check(m.select("INBOX"))
            data = fetch_map(check(m.fetch("1", "(INTERNALDATE FLAGS)")))[1]
            assert b"\\Seen" in data and b"$Work" in data
            assert b'"02-Mar-2020 11:53:20 +0000"' in data
            typ, data = m.copy("1:2", "Archive")
            assert typ == "OK"
            copyuid = re.search(rb"COPYUID (\d+) ([\d:,]+) ([\d:,]+)", data[-1])
            assert copyuid and copyuid.group(2) == b"1:2" and copyuid.group(3) == b"1:2"
            typ, data = m.copy("1", "Missing")
            assert typ == "NO" and b"TRYCREATE" in data[0]
            typ, data = m._simple_command("UID", "MOVE", "2", "Trash")
            assert typ == "OK"
            untagged = m.untagged_responses
            assert any(b"COPYUID" in x for x in untagged.get("OK", []))
            assert untagged.get("EXPUNGE") == [b"2"]
            check(m.select("Archive"))
            assert len(check(m.search(None, "ALL"))[0].split()) == 2
            check(m.select("Trash"))
            assert check(m.search(None, "ALL"))[0].split() == [b"1"]
            assert len(os.listdir(srv.maildir(USER) / "cur")) == 1
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_expunge_seen_by_second_session(tmp_path):
    srv = await _server(tmp_path)
    for i in range(3):
        await deliver(srv, plain(f"m{i}"))
    try:
        def talk():
            a, b = connect_ssl(srv), connect_ssl(srv)
            check(a.select("INBOX"))
            check(b.select("INBOX"))
            check(a.store("2", "+FLAGS", "(\\Deleted)"))
            # b is told about the flag change, but not an EXPUNGE during FETCH
            check(a.expunge())
            b.untagged_responses.clear()
            check(b.fetch("1:*", "(UID)"))
            assert "EXPUNGE" not in b.untagged_responses
            check(b.noop())
            assert b.untagged_responses.get("EXPUNGE") == [b"2"]
            data = fetch_map(check(b.fetch("1:*", "(UID)")))
            assert data == {1: b"1 (UID 1)", 2: b"2 (UID 3)"}
            # a UID EXPUNGE only removes the named deleted messages
            check(a.store("1:2", "+FLAGS", "(\\Deleted)"))
            check(a.uid("EXPUNGE", "3"))
            assert check(a.uid("SEARCH", "ALL"))[0].split() == [b"1"]
            a.logout()
            b.logout()

        await in_thread(talk)
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_idle_woken_by_delivery(tmp_path):
    srv = await _server(tmp_path)
    try:
        def idle_until_exists():
            m = connect_ssl(srv)
            check(m.select("INBOX"))
            tag = m._new_tag()
            m.send(tag + b" IDLE\r\n")
            assert m.readline().startswith(b"+")
            m.sock.settimeout(20)
            ready.append(True)
            line = m.readline()
            m.send(b"DONE\r\n")
            rest = m.readline()
            m.logout()
            return line, rest, tag

        ready: list = []
        result = in_thread(idle_until_exists)
        while not ready:
            await _sleep(0.05)
        await deliver(srv, plain("while idling"))
        line, rest, tag = await result
        assert line.strip() == b"* 1 EXISTS"
        assert rest.startswith(b"* 1 RECENT") or rest.startswith(tag + b" OK")
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_uids_stable_across_restart_and_dropped_file(tmp_path):
    srv = await _server(tmp_path)
    for i in range(3):
        await deliver(srv, plain(f"m{i}"))

    def uids():
        m = connect_ssl(srv)
        data = check(m.select("INBOX"))
        validity = m.untagged_responses["UIDVALIDITY"][0]
        got = check(m.uid("SEARCH", "ALL"))[0].split()
        m.logout()
        return validity, got, data

    try:
        before = await in_thread(uids)
        assert before[1] == [b"1", b"2", b"3"]
    finally:
        await stop(srv)
    srv = await start_server(tmp_path, roles=ROLES)
    try:
        after = await in_thread(uids)
        assert after[:2] == before[:2]
        # another program drops a file into new/ by hand
        new = srv.maildir(USER) / "new" / f"{int(time.time())}.handmade.host"
        new.write_bytes(plain("by hand"))

        def sees_it():
            m = connect_ssl(srv)
            check(m.select("INBOX"))
            check(m.noop())
            got = check(m.uid("SEARCH", "SUBJECT", '"by hand"'))[0].split()
            m.logout()
            return got

        assert await in_thread(sees_it) == [b"4"]
    finally:
        await stop(srv)


def _sleep(seconds):
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_idle_woken_by_smtp_delivery(tmp_path):
    import smtplib

    srv = await start_server(tmp_path, roles=("smtp", "imaps"))
    srv.add_user(USER, PASSWORD)
    try:
        def idle():
            m = connect_ssl(srv)
            check(m.select("INBOX"))
            tag = m._new_tag()
            m.send(tag + b" IDLE\r\n")
            assert m.readline().startswith(b"+")
            m.sock.settimeout(30)
            ready.append(True)
            line = m.readline()
            m.send(b"DONE\r\n")
            m.logout()
            return line

        def send():
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
                s.sendmail("bob@example.net", [USER], plain("via smtp"))

        ready: list = []
        result = in_thread(idle)
        while not ready:
            await _sleep(0.05)
        await in_thread(send)
        assert (await result).strip() == b"* 1 EXISTS"
    finally:
        await stop(srv)


@pytest_twisted.ensureDeferred
async def test_misc_commands_inbox_rename_and_external_rename(tmp_path):
    srv = await _server(tmp_path)
    await deliver(srv, plain("keep my uid"))
    await deliver(srv, plain("second"))
    root = srv.maildir(USER)
    try:
        def talk():
            m = connect_ssl(srv)
            assert check(m._simple_command("NAMESPACE")) is not None
            assert m.untagged_responses.pop("NAMESPACE") == [b'(("" ".")) NIL NIL']
            check(m.xatom("ID", "NIL"))
            check(m._simple_command("ENABLE", "CONDSTORE"))
            check(m.select("INBOX", readonly=True))
            typ, data = m.store("1", "+FLAGS", "(\\Seen)")
            assert typ == "NO" and b"READ-ONLY" in data[0]
            check(m._simple_command("UNSELECT"))
            status = check(m.status("INBOX", "(MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT)"))
            assert b"MESSAGES 2" in status[0] and b"UNSEEN 2" in status[0]
            typ, data = m._simple_command("LIST", "(SPECIAL-USE)", '""', "*")
            lines = m.untagged_responses.pop("LIST")
            assert any(b"\\Trash" in line for line in lines)
            # another Maildir tool marks message 1 seen by renaming it: same UID
            check(m.select("INBOX"))
            before = check(m.uid("SEARCH", "SUBJECT", '"keep my uid"'))[0]
            # (SELECT moved both from new/ to cur/: they were \Recent for this session)
            path = next(p for p in (root / "cur").iterdir() if b"keep my uid" in p.read_bytes())
            base = path.name.split(":")[0]
            path.rename(root / "cur" / f"{base}:2,S")
            check(m.noop())
            assert b"\\Seen" in b" ".join(m.untagged_responses.get("FETCH", []))
            assert check(m.uid("SEARCH", "SEEN"))[0] == before
            # RENAME INBOX moves its messages into a new folder, INBOX stays
            check(m._simple_command("UNSELECT"))
            check(m.rename("INBOX", "Old-Inbox"))
            assert check(m.select("Old-Inbox")) == [b"2"]
            assert check(m.select("INBOX")) == [b"0"]
            # deleting the selected folder deselects it
            check(m.select("Old-Inbox"))
            check(m.delete("Old-Inbox"))
            with pytest.raises(imaplib.IMAP4.error, match="no mailbox selected"):
                m.fetch("1", "(FLAGS)")
            m.logout()

        await in_thread(talk)
    finally:
        await stop(srv)
