"""Shared helpers for the IMAP functional tests (real server, stdlib imaplib clients)."""

from __future__ import annotations

import imaplib
import re

from twisted.internet import defer

USER = "alice@example.org"
PASSWORD = "secret"

MULTIPART = (
    b"From: Bob Example <bob@example.net>\n"
    b"To: alice@example.org, Carol <carol@example.com>\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= report\n"
    b"Date: Mon, 2 Mar 2020 10:00:00 +0000\n"
    b"Message-ID: <m1@example.net>\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\n'
    b"\n"
    b"preamble\n"
    b"--XYZ\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"\n"
    b"Hello Alice, the quarterly numbers are attached.\n"
    b"--XYZ\n"
    b"Content-Type: application/octet-stream; name=data.bin\n"
    b"Content-Transfer-Encoding: base64\n"
    b'Content-Disposition: attachment; filename="data.bin"\n'
    b"\n"
    b"AAECAwQF\n"
    b"--XYZ--\n"
)


def plain(subject: str, body: str = "hello\n", sender: str = "bob@example.net",
          date: str = "Mon, 2 Mar 2020 10:00:00 +0000") -> bytes:
    return (f"From: {sender}\nTo: {USER}\nSubject: {subject}\nDate: {date}\n"
            f"Message-ID: <{abs(hash(subject))}@example.net>\n\n{body}").encode()


@defer.inlineCallbacks
def deliver(srv, data: bytes, key: str = USER):
    """Deliver like the SMTP server does: into new/, without touching the index."""
    writer = srv.ctx.store.open_delivery([key])
    writer.write(data)
    paths = yield writer.commit()
    return paths


def connect_ssl(srv, login: bool = True) -> imaplib.IMAP4_SSL:
    m = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.client_tls(),
                          timeout=20)
    if login:
        m.login(USER, PASSWORD)
    return m


def check(result) -> list:
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


def fetch_map(data: list) -> dict[int, bytes]:
    """imaplib FETCH data -> {msn: response text with literals inlined}."""
    out: dict[int, bytes] = {}
    for item in data:
        text = item[0] + b"\r\n" + item[1] if isinstance(item, tuple) else item
        if isinstance(item, bytes) and item == b")":
            continue
        m = re.match(rb"(\d+) \(", text)
        if m:
            out[int(m.group(1))] = out.get(int(m.group(1)), b"") + text
        elif out:
            last = max(out)
            out[last] += text
    return out


def imap_sessions(srv) -> set:
    out: set = set()
    for role in ("imap", "imaps"):
        for svc in srv.service.listeners.get(role, []):
            factory = getattr(svc.factory, "wrappedFactory", svc.factory)
            out |= factory.open
    return out


@defer.inlineCallbacks
def stop(srv):
    """Let sessions whose clients just left finish, drop the rest, stop the server."""
    from twisted.internet import reactor, task

    for _ in range(100):
        if not imap_sessions(srv):
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    for proto in list(imap_sessions(srv)):
        proto.transport.abortConnection()
    for _ in range(100):
        if not imap_sessions(srv):
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    yield srv.stop()
