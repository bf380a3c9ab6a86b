#!/usr/bin/env python3
"""POP3 benchmark: mailhost and Dovecot's POP3 side by side, on the same messages, in one run.

Starts a throw-away mailhost (``twistd -n --pidfile= mailhost --config <tmp toml>``) with a
plaintext `pop3` listener on a free 127.0.0.1 port and ``[auth] allow_cleartext = true``;
the Dovecot peer is the one started by ../shared/peers (127.0.0.1:1110, any user name,
password ``benchpass``, Maildir at $PEERS_HOMES/<user>/Maildir owned by ``mailbench``).

The same files (same Maildir names ``<sec>.<unique>,S=<size>,W=<wire>``) are written into
both servers' Maildirs for two accounts:

    list   --count small messages (default 10,000): time to log in (first = cold, the
           server builds its index; then warm), LIST and UIDL
    big    one message of --big-mb MB (default 50): RETR throughput in MB/s (wire bytes)

Measurements use a raw socket client that reads whole responses (no per-line parsing),
so the client costs the same for both servers. Prints one line per figure with both
values and the ratio mailhost/dovecot (for times lower is better, for MB/s higher).

Loopback only; bounded counts and sizes; the mailhost process is stopped with SIGTERM and
its temp dir removed. Run as root (the peer Maildir must be chowned to mailbench).
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchproc import stop_server

REPO = Path(__file__).resolve().parent.parent
PEERS_HOMES = Path(os.environ.get("PEERS_HOMES", "/tmp/mailhost-peers/home"))
PEER_OWNER = os.environ.get("PEER_USER", "mailbench")
PEER_PASS = os.environ.get("PEER_PASS", "benchpass")
DOVECOT = ("127.0.0.1", int(os.environ.get("POP3_PORT", "1110")))
LIST_USER, BIG_USER = "pop3bench-list", "pop3bench-big"
DOMAIN = "localhost"
PASSWORD = "benchpass"
MAX_COUNT, MAX_MB = 20_000, 100


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- messages


def small_message(i: int, rnd: random.Random) -> bytes:
    words = " ".join(rnd.choice(("alpha", "beta", "gamma", "delta", "mail", "pop"))
                     for _ in range(200))
    body = "\n".join(words[j:j + 72] for j in range(0, len(words), 72))
    return (f"From: sender{i}@example.net\nTo: {LIST_USER}@{DOMAIN}\n"
            f"Subject: benchmark message {i}\nMessage-ID: <{i}.bench@example.net>\n\n"
            f"{body}\n.a line with a leading dot\n").encode()


def big_message(mb: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!\n"
    dotted = b"." + line[1:]
    block = b"".join(dotted if i % 100 == 0 else line for i in range(1000))
    head = b"From: big@example.net\nTo: big@localhost\nSubject: big\n\n"
    n = (mb * 1_000_000) // len(block) + 1
    return head + block * n


def maildir_name(sec: int, i: int, body: bytes) -> str:
    wire = len(body) + body.count(b"\n") - body.count(b"\r\n")
    return f"{sec}.M{i}P1Q1.bench,S={len(body)},W={wire}"


def fill(maildirs: list[Path], messages: list[tuple[str, bytes]]) -> None:
    for md in maildirs:
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        for name, body in messages:
            (md / "new" / name).write_bytes(body)


def chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for root, _dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


# --------------------------------------------------------------------------- client


class Client:
    """Minimal POP3 client: whole-response reads, nothing parsed beyond status lines."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=120)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.buf = b""
        self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def cmd(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{command!r}: {reply!r}")
        return reply

    def multi(self, command: bytes) -> int:
        """Send a multi-line command; return the octets of the body received."""
        self.cmd(command)
        total, tail = 0, b""
        data, self.buf = self.buf, b""
        while True:
            if data:
                total += len(data)
                tail = (tail + data[-5:])[-5:]
                if tail == b"\r\n.\r\n" or (total == 3 and tail == b".\r\n"):
                    return total
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed mid-response")

    def login(self, user: str, password: str) -> None:
        self.cmd(b"USER " + user.encode())
        self.cmd(b"PASS " + password.encode())

    def quit(self) -> None:
        try:
            self.cmd(b"QUIT")
        finally:
            self.sock.close()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(addr, list_user, big_user, password, rounds) -> dict[str, float]:
    out: dict[str, float] = {}
    logins, lists, uidls = [], [], []
    for r in range(rounds + 1):
        c = Client(addr)
        t = timed(lambda c=c: c.login(list_user, password))
        if r == 0:
            out["login_cold_s"] = t
        else:
            logins.append(t)
        lists.append(timed(lambda c=c: c.multi(b"LIST")))
        uidls.append(timed(lambda c=c: c.multi(b"UIDL")))
        c.quit()
    out["login_warm_s"] = statistics.median(logins)
    out["list_s"] = statistics.median(lists)
    out["uidl_s"] = statistics.median(uidls)
    rates, small_logins = [], []
    for _ in range(rounds):
        c = Client(addr)
        small_logins.append(timed(lambda c=c: c.login(big_user, password)))
        t = time.perf_counter()
        octets = c.multi(b"RETR 1")
        rates.append(octets / (time.perf_counter() - t) / 1e6)
        c.quit()
    out["retr_MBps"] = statistics.median(rates)
    # a one-message maildrop: the cost of the password check alone (argon2 for mailhost)
    out["login_1msg_s"] = statistics.median(small_logins)
    return out


# --------------------------------------------------------------------------- mailhost


class Mailhost:
    def __init__(self, python: str) -> None:
        self.python = python
        self.tmp = Path(tempfile.mkdtemp(prefix="mailhost-pop3bench-"))
        self.data = self.tmp / "data"
        self.config = self.tmp / "mailhost.toml"
        self.logfile = self.tmp / "twistd.log"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        self.proc: subprocess.Popen | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def maildir(self, user: str) -> Path:
        return self.data / "mail" / DOMAIN / user

    def start(self) -> None:
        self.data.mkdir(parents=True)
        self.config.write_text(
            f'hostname = "localhost"\ndata_dir = "{self.data}"\n[listen]\n'
            f'pop3 = ["tcp:{self.port}:interface=127.0.0.1"]\n[domains."{DOMAIN}"]\n'
            "[auth]\nallow_cleartext = true\n[limits]\nconnections_per_ip = 1000\n"
            # no outbound mail here: keep the queue off the system resolver config
            '[queue]\ndns_servers = ["127.0.0.1:53"]\n')
        for user in (LIST_USER, BIG_USER):
            subprocess.run([self.python, "-c", "import sys; from mailhost.cli import main; "
                            "sys.exit(main())", "--config", str(self.config), "user", "add",
                            f"{user}@{DOMAIN}", "--password-stdin"], input=PASSWORD + "\n",
                           text=True, env=self.env, cwd=self.tmp, timeout=120, check=True,
                           capture_output=True)
        cmd = [self.python, "-c", "import sys; from twisted.scripts.twistd import run; "
               "sys.exit(run())", "-n", "--pidfile=", "mailhost", "--config", str(self.config)]
        with open(self.logfile, "wb") as lf:
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.tmp,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"twistd exited:\n{self.logfile.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                log(f"mailhost up on 127.0.0.1:{self.port} (pid {self.proc.pid})")
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("mailhost did not start within 60s")

    def stop(self, keep: bool) -> None:
        stop_server(self.proc, self.tmp, keep)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--big-mb", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args(argv)
    count = max(1, min(args.count, MAX_COUNT))
    mb = max(1, min(args.big_mb, MAX_MB))
    rounds = max(1, min(args.rounds, 10))

    rnd = random.Random(1939)
    base = int(time.time()) - count
    small = [(maildir_name(base + i, i, m), m)
             for i, m in enumerate(small_message(i, rnd) for i in range(count))]
    big = big_message(mb)
    bigs = [(maildir_name(base, 999_999, big), big)]
    log(f"{count} messages of ~{len(small[0][1])} bytes; one of {len(big) / 1e6:.1f} MB")

    peer_list = PEERS_HOMES / LIST_USER
    peer_big = PEERS_HOMES / BIG_USER
    for home in (peer_list, peer_big):
        shutil.rmtree(home, ignore_errors=True)  # our own bench users only
    fill([peer_list / "Maildir"], small)
    fill([peer_big / "Maildir"], bigs)
    for home in (peer_list, peer_big):
        chown_tree(home, PEER_OWNER)

    server = Mailhost(args.python)
    try:
        server.start()
        fill([server.maildir(LIST_USER)], small)
        fill([server.maildir(BIG_USER)], bigs)
        log("measuring dovecot")
        dove = measure(DOVECOT, LIST_USER, BIG_USER, PEER_PASS, rounds)
        log("measuring mailhost")
        mine = measure(("127.0.0.1", server.port), f"{LIST_USER}@{DOMAIN}",
                       f"{BIG_USER}@{DOMAIN}", PASSWORD, rounds)
    finally:
        server.stop(args.keep_tmp)
        for home in (peer_list, peer_big):
            shutil.rmtree(home, ignore_errors=True)

    print(f"pop3 benchmark: {count} messages in INBOX; RETR of {len(big) / 1e6:.1f} MB; "
          f"median of {rounds}")
    print(f"{'figure':<16}{'mailhost':>12}{'dovecot':>12}{'ratio':>9}")
    for key in ("login_cold_s", "login_warm_s", "login_1msg_s", "list_s", "uidl_s",
                "retr_MBps"):
        a, b = mine[key], dove[key]
        print(f"{key:<16}{a:>12.4f}{b:>12.4f}{a / b if b else float('nan'):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
