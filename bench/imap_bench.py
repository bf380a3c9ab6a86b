#!/usr/bin/env python3
"""IMAP load: mailhost vs Dovecot, side by side, plus a 100,000-message folder timing.

    python3 bench/imap_bench.py                     # 10 clients x 20 sessions each
    python3 bench/imap_bench.py --clients 20 --sessions 50 --big 100000
    python3 bench/imap_bench.py --targets dovecot --big 0

One run:
1. starts a throw-away mailhost (`twistd -n --pidfile= mailhost --config <tmp toml>`,
   `[auth] allow_cleartext = true`, imap on a free loopback port; `--no-twistd` runs
   `makeService` in a child process instead) and creates one account per client;
2. for each target (mailhost, then Dovecot on 127.0.0.1:1143, any user, password
   `benchpass`) seeds every client's INBOX with the same messages from the sample mbox
   by APPEND, then runs N client threads; each session does LOGIN, SELECT, FETCH of
   the flags/sizes of all messages, FETCH of 10 header sets, FETCH of 2 bodies, STORE
   \\Seen, APPEND, STORE \\Deleted + EXPUNGE, LOGOUT;
3. prints operations per second and latency percentiles per operation for both
   (`--reuse` adds a second round where each client logs in once and repeats the
   visit on one connection, so password hashing does not dominate the figures);
4. with `--big N` (default 100000) writes N small messages straight into a folder of
   each server's Maildir and times the first SELECT (index build), a second SELECT,
   `FETCH 1:* (UID FLAGS RFC822.SIZE)` and `UID FETCH 1:4294967295 (UID)`.

Loopback only; bounded by --sessions and --big. Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import imaplib
import mailbox
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from benchproc import stop_server

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "localhost"
PASSWORD = "benchpass"
PEER_HOMES = Path(os.environ.get("PEERS_HOMES", "/tmp/mailhost-peers/home"))
PEER_MBOX = Path(os.environ.get("PEERS_DATA", "/tmp/mailhost-peers/data")) / "bench.mbox"
PEER_SYSTEM_USER = "mailbench"


def log(msg: str) -> None:
    print(f"[imap-bench] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mailhost exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(100).startswith(b"* OK"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"mailhost did not listen on {port} within {timeout}s")


class Mailhost:
    """A throw-away mailhost in its own temp dir."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="mailhost-imapbench-"))
        self.data = self.tmp / "data"
        self.config = self.tmp / "mailhost.toml"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.proc: subprocess.Popen | None = None

    def maildir(self, user: str) -> Path:
        return self.data / "mail" / DOMAIN / user

    def start(self, users: list[str]) -> None:
        self.data.mkdir(parents=True)
        self.config.write_text(
            f'hostname = "localhost"\ndata_dir = "{self.data}"\n[listen]\n'
            f'imap = ["tcp:{self.port}:interface=127.0.0.1"]\n[domains."{DOMAIN}"]\n'
            "[auth]\nallow_cleartext = true\n[limits]\nconnections_per_ip = 1000\n"
            "sessions_per_account = 1000\nmessage_size = 52428800\n")
        for user in users:
            subprocess.run([sys.executable, "-c",
                            "import sys; from mailhost.cli import main; sys.exit(main())",
                            "--config", str(self.config), "user", "add", f"{user}@{DOMAIN}",
                            "--password-stdin"], input=PASSWORD + "\n", text=True,
                           env=self.env, check=True, capture_output=True, timeout=120)
        if self.args.no_twistd:
            code = ("import sys; from twisted.internet import reactor; "
                    "from mailhost.config import load; from mailhost.service import "
                    "makeService; s = makeService(load(sys.argv[1]), reactor); "
                    "reactor.callWhenRunning(s.startService); reactor.run()")
            cmd = [sys.executable, "-c", code, str(self.config)]
        else:
            cmd = [sys.executable, "-c",
                   "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
                   "-n", "--pidfile=", "mailhost", "--config", str(self.config)]
        logf = open(self.tmp / "server.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.tmp,
                                     start_new_session=True)
        try:
            wait_port(self.port, self.proc, 60)
        except SystemExit:
            sys.stderr.write((self.tmp / "server.log").read_text(errors="replace")[-3000:])
            raise
        log(f"mailhost up on 127.0.0.1:{self.port} (pid {self.proc.pid})")

    def stop(self) -> None:
        stop_server(self.proc, self.tmp, self.args.keep_tmp)


# --------------------------------------------------------------------------- load


def sample_messages(count: int) -> list[bytes]:
    out = []
    if PEER_MBOX.exists():
        for msg in mailbox.mbox(str(PEER_MBOX)):
            out.append(msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            if len(out) >= count:
                break
    while len(out) < count:
        n = len(out)
        out.append((f"From: sender{n}@example.net\r\nTo: bench@localhost\r\nSubject: "
                    f"message {n}\r\n\r\n" + "body line\r\n" * 40).encode())
    return out


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors = 0

    def timed(self, name: str, fn, *args):
        start = time.perf_counter()
        typ, data = fn(*args)
        elapsed = time.perf_counter() - start
        with self.lock:
            self.times[name].append(elapsed)
            if typ not in ("OK", "BYE"):
                self.errors += 1
        return typ, data


def seed(host: str, port: int, user: str, messages: list[bytes]) -> None:
    m = imaplib.IMAP4(host, port, timeout=60)
    m.login(user, PASSWORD)
    m.select("INBOX")
    m.store("1:*", "+FLAGS.SILENT", "(\\Deleted)") if m.select("INBOX")[1][0] != b"0" else None
    m.expunge()
    for msg in messages:
        m.append("INBOX", None, None, msg)
    m.logout()


def session(host: str, port: int, user: str, stats: Stats, rng: random.Random,
            message: bytes, conn: imaplib.IMAP4 | None = None) -> None:
    """One mail-client visit; with `conn` (reuse mode) no LOGIN/LOGOUT."""
    m = conn or imaplib.IMAP4(host, port, timeout=60)
    if conn is None:
        stats.timed("LOGIN", m.login, user, PASSWORD)
    typ, data = stats.timed("SELECT", m.select, "INBOX")
    exists = int(data[0])
    stats.timed("FETCH flags/sizes", m.fetch, "1:*", "(UID FLAGS RFC822.SIZE)")
    for _ in range(10):
        n = rng.randint(1, exists)
        stats.timed("FETCH headers", m.fetch, str(n),
                    "(BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)])")
    for _ in range(2):
        stats.timed("FETCH body", m.fetch, str(rng.randint(1, exists)), "(BODY.PEEK[])")
    stats.timed("STORE", m.store, str(rng.randint(1, exists)), "+FLAGS", "(\\Seen)")
    stats.timed("APPEND", m.append, "INBOX", None, None, message)
    stats.timed("STORE", m.store, str(exists + 1), "+FLAGS.SILENT", "(\\Deleted)")
    stats.timed("EXPUNGE", m.expunge)
    if conn is None:
        stats.timed("LOGOUT", m.logout)


def run_load(name: str, host: str, port: int, users: list[str], args,
             reuse: bool = False) -> dict:
    messages = sample_messages(args.messages)
    if reuse:
        name += "/reuse"
    log(f"{name}: seeding {len(users)} mailboxes with {len(messages)} messages each")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=seed, args=(host, port, u, messages)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seed_time = time.perf_counter() - t0
    stats = Stats()
    failures: list[BaseException] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        conn = None
        if reuse:
            conn = imaplib.IMAP4(host, port, timeout=60)
            conn.login(users[i], PASSWORD)
        for _ in range(args.sessions):
            try:
                session(host, port, users[i], stats, rng, messages[i % len(messages)], conn)
            except Exception as e:  # noqa: BLE001 - count and go on
                failures.append(e)
        if conn is not None:
            conn.logout()

    log(f"{name}: {len(users)} clients x {args.sessions} sessions")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ops = sum(len(v) for v in stats.times.values())
    return {"name": name, "elapsed": elapsed, "ops": ops, "stats": stats,
            "failures": failures, "seed": seed_time,
            "appends": len(users) * len(messages)}


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


def report(results: list[dict]) -> None:
    print()
    print(f"{'target':<10} {'ops':>7} {'secs':>7} {'ops/s':>8} {'errors':>7} "
          f"{'seed APPEND/s':>14}")
    for r in results:
        print(f"{r['name']:<10} {r['ops']:>7} {r['elapsed']:>7.2f} "
              f"{r['ops'] / r['elapsed']:>8.1f} {r['stats'].errors + len(r['failures']):>7} "
              f"{r['appends'] / r['seed']:>14.1f}")
    print()
    print(f"{'operation':<18} " + " ".join(f"{r['name'] + ' p50/p95/p99 ms':>32}"
                                           for r in results))
    names = sorted({n for r in results for n in r["stats"].times})
    for op in names:
        cells = []
        for r in results:
            v = r["stats"].times.get(op, [])
            cells.append(f"{pct(v, 50):>9.2f} /{pct(v, 95):>8.2f} /{pct(v, 99):>8.2f}")
        print(f"{op:<18} " + " ".join(f"{c:>32}" for c in cells))
    for r in results:
        if r["failures"]:
            print(f"{r['name']}: {len(r['failures'])} failed sessions, first: "
                  f"{r['failures'][0]!r}")


# --------------------------------------------------------------------------- big folder


def fill_folder(folder: Path, count: int, owner: tuple[int, int] | None) -> None:
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "maildirfolder").touch()
    now = int(time.time()) - count
    for i in range(count):
        body = (f"From: s{i}@example.net\nTo: big@localhost\nSubject: big {i}\n"
                f"Message-ID: <{i}@big>\n\nmessage number {i}\n").encode()
        lines = body.count(b"\n")
        name = f"{now + i}.M{i}P1Q1.bench,S={len(body)},W={len(body) + lines}:2,S"
        (folder / "cur" / name).write_bytes(body)
    if owner:
        for dirpath, _dirs, files in os.walk(folder.parent):
            os.chown(dirpath, *owner)
            for f in files:
                os.chown(os.path.join(dirpath, f), *owner)


def time_big(name: str, host: str, port: int, user: str) -> dict:
    m = imaplib.IMAP4(host, port, timeout=600)
    m.login(user, PASSWORD)
    out = {}
    t0 = time.perf_counter()
    typ, data = m.select("Big")
    out["first SELECT"] = time.perf_counter() - t0
    out["exists"] = int(data[0])
    m.close()
    t0 = time.perf_counter()
    m.select("Big")
    out["SELECT"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    typ, data = m.fetch("1:*", "(UID FLAGS RFC822.SIZE)")
    out["FETCH 1:* (UID FLAGS RFC822.SIZE)"] = time.perf_counter() - t0
    out["fetched"] = len(data)
    t0 = time.perf_counter()
    m.uid("FETCH", "1:4294967295", "(UID)")
    out["UID FETCH 1:4294967295 (UID)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.search(None, "UNSEEN")
    out["SEARCH UNSEEN"] = time.perf_counter() - t0
    m.logout()
    log(f"{name}: big folder {out['exists']} messages, {out['fetched']} FETCH responses")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--sessions", type=int, default=20, help="sessions per client")
    p.add_argument("--messages", type=int, default=100, help="messages per mailbox")
    p.add_argument("--big", type=int, default=100000, help="big folder size (0: skip)")
    p.add_argument("--targets", default="mailhost,dovecot")
    p.add_argument("--dovecot-port", type=int, default=1143)
    p.add_argument("--no-twistd", action="store_true")
    p.add_argument("--reuse", action="store_true",
                   help="also run with one login per client (no per-visit LOGIN cost)")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args()
    targets = args.targets.split(",")
    stamp = int(time.time()) % 100000
    users = [f"ib{stamp}u{i}" for i in range(args.clients)]
    results, big = [], {}
    mh = None
    try:
        if "mailhost" in targets:
            mh = Mailhost(args)
            mh.start(users + [f"ib{stamp}big"])
        for reuse in (False, True) if args.reuse else (False,):
            if "mailhost" in targets:
                results.append(run_load("mailhost", "127.0.0.1", mh.port,
                                        [f"{u}@{DOMAIN}" for u in users], args, reuse))
            if "dovecot" in targets:
                results.append(run_load("dovecot", "127.0.0.1", args.dovecot_port, users,
                                        args, reuse))
        report(results)
        if args.big:
            if mh is not None:
                log(f"mailhost: writing {args.big} messages")
                fill_folder(mh.maildir(f"ib{stamp}big") / ".Big", args.big, None)
                big["mailhost"] = time_big("mailhost", "127.0.0.1", mh.port,
                                           f"ib{stamp}big@{DOMAIN}")
            if "dovecot" in targets:
                import pwd

                pw = pwd.getpwnam(PEER_SYSTEM_USER)
                user = f"ib{stamp}big"
                home = PEER_HOMES / user
                log(f"dovecot: writing {args.big} messages")
                fill_folder(home / "Maildir" / ".Big", args.big, (pw.pw_uid, pw.pw_gid))
                big["dovecot"] = time_big("dovecot", "127.0.0.1", args.dovecot_port, user)
                if not args.keep_tmp:
                    shutil.rmtree(home, ignore_errors=True)
            print()
            keys = [k for k in next(iter(big.values())) if k not in ("exists", "fetched")]
            print(f"{'big folder (' + str(args.big) + ' msgs), seconds':<40} " +
                  " ".join(f"{n:>10}" for n in big))
            for k in keys:
                print(f"{k:<40} " + " ".join(f"{big[n][k]:>10.3f}" for n in big))
    finally:
        if mh is not None:
            mh.stop()
        if "dovecot" in targets and not args.keep_tmp:
            for user in users:
                shutil.rmtree(PEER_HOMES / user, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
