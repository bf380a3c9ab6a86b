#!/usr/bin/env python3
"""SMTP AUTH throughput over TLS, and whether the reactor stays responsive meanwhile.

Starts a throw-away mailhost under twistd (``twistd -n --pidfile= mailhost``) on free
127.0.0.1 ports in a temporary directory, creates one account, then:

1. measures NOOP round-trip latency on an idle plaintext `smtp` session (baseline);
2. runs a login storm: N client threads (default 10), each repeatedly connecting to the
   implicit-TLS `submissions` port, EHLO, ``AUTH PLAIN`` (argon2id verify on the server),
   QUIT — while the same NOOP probe keeps running on its own connection;
3. prints logins/s, login latency, and NOOP latency before and during the storm.

If the argon2 verification ran on the reactor thread, NOOP latency during the storm
would grow to (clients x hash time); with verification in the thread pool it stays at a
few milliseconds.

Loopback only; bounded by --duration (max 120 s) and --clients (max 50). Stdlib only.
Exit status 0 on success, 1 if any login failed, 2 on setup errors.

    python3 bench/login_throughput.py [--clients 10] [--duration 10]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
USER = "bench@localhost"
PASSWORD = "bench-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """mailhost under twistd in a temp dir, listening on smtp and submissions."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.tmp = Path(tempfile.mkdtemp(prefix="mailhost-loginbench-"))
        self.smtp_port, self.subs_port = free_port(), free_port()
        self.config = self.tmp / "mailhost.toml"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.config.write_text(
            f'hostname = "localhost"\ndata_dir = "{self.tmp / "data"}"\n[listen]\n'
            f'smtp = ["tcp:{self.smtp_port}:interface=127.0.0.1"]\n'
            f'submissions = ["tcp:{self.subs_port}:interface=127.0.0.1"]\n'
            f'[domains."localhost"]\n[limits]\nconnections_per_ip = 1000\n'
            f"commands_per_session = 1000000\nbad_commands = 1000\n")
        r = subprocess.run(
            [self.python, "-c", "import sys; from mailhost.cli import main; sys.exit(main())",
             "--config", str(self.config), "user", "add", USER, "--password-stdin"],
            input=PASSWORD + "\n", capture_output=True, text=True, env=self.env,
            cwd=self.tmp, timeout=120)
        if r.returncode:
            raise SystemExit(f"user add failed: {r.stdout}{r.stderr}")
        log = open(self.tmp / "twistd.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [self.python, "-c", "import sys; from twisted.scripts.twistd import run; "
             "sys.exit(run())", "-n", "--pidfile=", "mailhost", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("twistd exited:\n" + (self.tmp / "twistd.log").read_text())
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), 0.5) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("mailhost did not start in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


class NoopProbe(threading.Thread):
    """One plaintext session sending NOOP every `interval` s, recording round trips."""

    def __init__(self, port: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (when, latency)
        self.stop_event = threading.Event()

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), 10) as s:
            f = s.makefile("rb")
            f.readline()
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                s.sendall(b"NOOP\r\n")
                if not f.readline().startswith(b"250"):
                    break
                self.samples.append((time.monotonic(), time.perf_counter() - t0))
                time.sleep(self.interval)

    def between(self, start: float, end: float) -> list[float]:
        return [lat for when, lat in self.samples if start <= when <= end]


def login_worker(port: int, context: ssl.SSLContext, until: float, out: list, errors: list):
    blob = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode()
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as s:
                s.ehlo("bench")
                code, text = s.docmd("AUTH", "PLAIN " + blob)
                if code != 235:
                    errors.append(f"{code} {text!r}")
                    continue
        except (OSError, smtplib.SMTPException) as e:
            errors.append(repr(e))
            continue
        out.append(time.perf_counter() - t0)


def fmt(lat: list[float]) -> str:
    if not lat:
        return "n=0"
    lat = sorted(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return (f"n={len(lat)} p50_ms={statistics.median(lat) * 1000:.2f} "
            f"p99_ms={p99 * 1000:.2f} max_ms={lat[-1] * 1000:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--baseline", type=float, default=2.0)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    clients = max(1, min(args.clients, 50))
    duration = max(1.0, min(args.duration, 120.0))

    server = Server(args.python)
    try:
        server.start()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the throw-away self-signed certificate
        probe = NoopProbe(server.smtp_port)
        probe.start()
        time.sleep(max(0.5, min(args.baseline, 10.0)))
        t_start = time.monotonic()
        until = t_start + duration
        latencies: list[float] = []
        errors: list[str] = []
        threads = [threading.Thread(target=login_worker,
                                    args=(server.subs_port, context, until, latencies, errors))
                   for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + 60)
        t_end = time.monotonic()
        probe.stop_event.set()
        probe.join(5)
        elapsed = t_end - t_start
        print(f"logins clients={clients} secs={elapsed:.2f} ok={len(latencies)} "
              f"failed={len(errors)} logins_per_sec={len(latencies) / elapsed:.1f} "
              f"login_latency {fmt(latencies)}")
        print(f"noop baseline {fmt(probe.between(0, t_start))}")
        print(f"noop during_storm {fmt(probe.between(t_start, t_end))}")
        for e in errors[:5]:
            print(f"# error: {e}", file=sys.stderr)
        return 1 if errors else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
