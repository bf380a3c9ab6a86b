#!/usr/bin/env python3
"""Inbound SMTP benchmark: mailhost and Postfix side by side, in one run.

Starts a throw-away mailhost (``twistd -n --pidfile= mailhost --config <tmp toml>``) on a
free 127.0.0.1 port in a temporary directory, creates the account mailbench@localhost,
then drives both it and the loopback Postfix peer (127.0.0.1:2525, see
../shared/peers) with the peers' ``bench_smtp.sh`` (Postfix's smtp-source), in two
modes:

    per-conn  one message per connection (smtp-source default)
    reuse     connections reused (SMTP_SOURCE_OPTS=-d)

Each run prints one line (target, mode, smtp_rate, deliver_rate, ...); the end prints
one ratio line per mode, mailhost/postfix.  smtp_rate counts messages accepted with 250,
deliver_rate counts messages present as files in the target's Maildir (new/ + cur/).

Prerequisite (as root):  bash ../shared/peers/install_peers.sh && bash ../shared/peers/start_peers.sh

Only loopback targets are accepted.  Everything is bounded: message count, sessions,
size, a per-run timeout and a total time budget; the mailhost server is stopped with
SIGTERM (then SIGKILL after a grace period) and its temp dir removed at the end.

Stdlib only.  Exit status: 0 if every run delivered everything, 1 otherwise, 2 on
usage / setup errors.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchproc import stop_server

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_DIR = REPO.parent / "shared" / "peers"

USER = "mailbench"
DOMAIN = "localhost"
PASSWORD = "benchpass"

MODES = {"per-conn": "", "reuse": "-d"}

# hard ceilings, whatever the command line says
MAX_COUNT = 50_000
MAX_SESSIONS = 200
MAX_SIZE = 10_000_000


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


# --------------------------------------------------------------------------- targets


def split_target(target: str) -> tuple[str, int]:
    """'127.0.0.1:2525' / '[::1]:2525' / 'localhost:2525' -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise SetupError(f"target must be HOST:PORT, got {target!r}")
    host = host.strip("[]")
    return host, int(port)


def require_loopback(target: str) -> tuple[str, int]:
    host, port = split_target(target)
    if host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise SetupError(f"refusing non-loopback target {target!r}")
    if not 0 < port < 65536:
        raise SetupError(f"bad port in {target!r}")
    return host, port


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_banner(host: str, port: int, timeout: float = 10.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 4096:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
    return data.decode("latin-1").strip()


def free_port(avoid: set[int]) -> int:
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise SetupError("could not find a free port")


# --------------------------------------------------------------------------- peers


def peer_setting(peers_dir: Path, name: str) -> str:
    out = subprocess.run(
        ["bash", "-c", f'. "$1/peers.conf.sh" && printf %s "${name}"', "-", str(peers_dir)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return out.stdout.strip()


def run_bench(peers_dir: Path, target: str, maildir: Path, mode: str, args) -> dict:
    """One bench_smtp.sh run; returns its key=value fields plus ok/err."""
    env = dict(os.environ)
    env.update(
        CLEAN_MAILDIR="1",
        SMTP_SOURCE_OPTS=MODES[mode],
        RCPT=f"{USER}@{DOMAIN}",
        SENDER=args.sender,
        DELIVERY_TIMEOUT=str(args.delivery_timeout),
    )
    cmd = ["bash", str(peers_dir / "bench_smtp.sh"), target, str(args.count),
           str(args.sessions), str(maildir), str(args.size)]
    # own process group, so a timeout can stop bash *and* its smtp-source child
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\nrun exceeded {args.run_timeout}s and was killed"
    fields: dict = {}
    for line in out.splitlines():
        if line.startswith("target="):
            for kv in line.split():
                k, _, v = kv.partition("=")
                fields[k] = v
    fields["ok"] = proc.returncode == 0 and "deliver_rate" in fields
    fields["err"] = err.strip()
    return fields


# --------------------------------------------------------------------------- mailhost


class Mailhost:
    """A throw-away mailhost under twistd, in its own temp dir."""

    def __init__(self, args, port: int):
        self.args = args
        self.port = port
        self.tmp = Path(tempfile.mkdtemp(prefix="mailhost-bench-"))
        self.data = self.tmp / "data"
        self.config = self.tmp / "mailhost.toml"
        self.logfile = self.tmp / "twistd.log"
        self.maildir = self.data / "mail" / DOMAIN / USER
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        # run this checkout's code (package + twisted/plugins/mailhost_plugin.py)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.data.mkdir(parents=True)
        self.config.write_text(
            f'hostname = "localhost"\n'
            f'data_dir = "{self.data}"\n'
            f"[listen]\n"
            f'smtp = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            f'[domains."{DOMAIN}"]\n'
            f"[limits]\n"
            f"connections_per_ip = 1000\n"
        )

    def add_user(self) -> None:
        # `mailhost` console script == mailhost.cli:main, run with this interpreter
        cmd = [self.args.python, "-c",
               "import sys; from mailhost.cli import main; sys.exit(main())",
               "--config", str(self.config), "user", "add", f"{USER}@{DOMAIN}",
               "--password-stdin"]
        try:
            r = subprocess.run(cmd, input=PASSWORD + "\n", capture_output=True, text=True,
                               env=self.env, cwd=self.tmp, timeout=120)
        except subprocess.TimeoutExpired:
            raise SetupError("`mailhost user add` did not finish within 120s") from None
        if r.returncode != 0:
            raise SetupError(
                f"`mailhost user add` failed (exit {r.returncode}):\n"
                f"{(r.stdout + r.stderr).strip()[-3000:]}")

    def start(self) -> None:
        self.write_config()
        self.add_user()
        cmd = [self.args.python, "-c",
               "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
               "-n", "--pidfile=", "mailhost", "--config", str(self.config)]
        log(f"starting mailhost: twistd -n --pidfile= mailhost --config {self.config}")
        with open(self.logfile, "wb") as lf:
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         cwd=self.tmp, start_new_session=True)
        deadline = time.monotonic() + self.args.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"twistd exited with status {self.proc.returncode} "
                                 f"before opening {self.target}\n{self.log_tail()}")
            if port_open("127.0.0.1", self.port, timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise SetupError(f"mailhost did not open {self.target} within "
                                 f"{self.args.startup_timeout}s\n{self.log_tail()}")
            time.sleep(0.1)
        try:
            banner = read_banner("127.0.0.1", self.port)
        except OSError as e:
            raise SetupError(f"no SMTP banner from {self.target}: {e}\n{self.log_tail()}") from None
        if not banner.startswith("220"):
            raise SetupError(f"unexpected banner from {self.target}: {banner!r}\n{self.log_tail()}")
        log(f"mailhost up on {self.target} (pid {self.proc.pid}): {banner}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return "(no twistd log)"
        return f"--- last {lines} lines of {self.logfile} ---\n" + "\n".join(text[-lines:])

    def stop(self) -> None:
        stop_server(self.proc, self.tmp, self.args.keep_tmp)


# --------------------------------------------------------------------------- main


def fmt_run(name: str, mode: str, f: dict) -> str:
    keys = ("smtp_rate", "deliver_rate", "smtp_secs", "deliver_secs", "delivered", "errors")
    extra = " ".join(f"{k}={f.get(k, '-')}" for k in keys)
    return (f"target={name} addr={f.get('target', '-')} mode={mode} msgs={f.get('msgs', '-')} "
            f"sessions={f.get('sessions', '-')} size={f.get('size', '-')} {extra} "
            f"ok={'yes' if f['ok'] else 'NO'}")


def ratio(a, b) -> str:
    try:
        return f"{float(a) / float(b):.2f}"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def bounded_int(lo: int, hi: int):
    def conv(s: str) -> int:
        v = int(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}")
        return v
    return conv


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=bounded_int(1, MAX_COUNT), default=2000,
                   help="messages per run (default 2000)")
    p.add_argument("--sessions", type=bounded_int(1, MAX_SESSIONS), default=10,
                   help="parallel SMTP sessions (default 10)")
    p.add_argument("--size", type=bounded_int(100, MAX_SIZE), default=2000,
                   help="message size in bytes (default 2000)")
    p.add_argument("--modes", default="per-conn,reuse",
                   help="comma list of per-conn,reuse (default both)")
    p.add_argument("--targets", default="mailhost,postfix",
                   help="comma list of mailhost,postfix (default both)")
    p.add_argument("--postfix", default="127.0.0.1:2525", help="Postfix peer HOST:PORT")
    p.add_argument("--port", type=bounded_int(0, 65535), default=0,
                   help="mailhost port (default: a free ephemeral port)")
    p.add_argument("--sender", default="bench@localhost", help="MAIL FROM address")
    p.add_argument("--peers-dir", type=Path,
                   default=Path(os.environ.get("PEERS_SCRIPTS", DEFAULT_PEERS_DIR)),
                   help=f"peers scripts (default {DEFAULT_PEERS_DIR})")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs twistd and the mailhost CLI")
    p.add_argument("--startup-timeout", type=bounded_int(1, 300), default=30,
                   help="seconds to wait for mailhost's port (default 30)")
    p.add_argument("--delivery-timeout", type=bounded_int(1, 1800), default=120,
                   help="seconds to wait for Maildir files after sending (default 120)")
    p.add_argument("--run-timeout", type=bounded_int(10, 3600), default=600,
                   help="hard limit per run, seconds (default 600)")
    p.add_argument("--max-seconds", type=bounded_int(10, 7200), default=1800,
                   help="total time budget; later runs are skipped (default 1800)")
    p.add_argument("--keep-tmp", action="store_true", help="keep mailhost's temp dir")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes must be from {sorted(MODES)}")
    if not args.targets or set(args.targets) - {"mailhost", "postfix"}:
        p.error("--targets must be from mailhost,postfix")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    peers_dir = args.peers_dir.resolve()
    bench_sh = peers_dir / "bench_smtp.sh"
    mailhost = None
    results: dict[tuple[str, str], dict] = {}
    try:
        if not bench_sh.is_file():
            raise SetupError(f"{bench_sh} not found (use --peers-dir)")
        if shutil.which("smtp-source") is None:
            raise SetupError("smtp-source not found: run ../shared/peers/install_peers.sh")

        targets: dict[str, tuple[str, Path]] = {}
        if "postfix" in args.targets:
            host, port = require_loopback(args.postfix)
            if not port_open(host, port):
                raise SetupError(f"Postfix peer {args.postfix} is not listening: run "
                                 "../shared/peers/start_peers.sh postfix")
            targets["postfix"] = (args.postfix, Path(peer_setting(peers_dir, "PEER_MAILDIR")))
        if "mailhost" in args.targets:
            avoid = {2525, 2526, 2527, 1143, 1110}
            port = args.port or free_port(avoid)
            if port in avoid:
                raise SetupError(f"port {port} belongs to a peer server; pick another")
            if port_open("127.0.0.1", port, timeout=0.5):
                raise SetupError(f"127.0.0.1:{port} is already in use")
            mailhost = Mailhost(args, port)
            mailhost.start()
            require_loopback(mailhost.target)
            targets["mailhost"] = (mailhost.target, mailhost.maildir)

        order = [t for t in ("mailhost", "postfix") if t in targets]
        for mode in args.modes:
            for name in order:
                if time.monotonic() - started > args.max_seconds:
                    log(f"time budget of {args.max_seconds}s used up; skipping {name}/{mode}")
                    continue
                if name == "mailhost" and mailhost.proc.poll() is not None:
                    log(f"mailhost died (status {mailhost.proc.returncode})\n{mailhost.log_tail()}")
                    break
                addr, maildir = targets[name]
                f = run_bench(peers_dir, addr, maildir, mode, args)
                results[(name, mode)] = f
                print(fmt_run(name, mode, f), flush=True)
                if not f["ok"] and f["err"]:
                    log(f"{name}/{mode}: " + f["err"].replace("\n", "\n#   "))
                    if name == "mailhost":
                        log(mailhost.log_tail(20))
        for mode in args.modes:
            m, p = results.get(("mailhost", mode)), results.get(("postfix", mode))
            if m and p:
                print(f"ratio mailhost/postfix mode={mode} "
                      f"smtp_rate={ratio(m.get('smtp_rate'), p.get('smtp_rate'))} "
                      f"deliver_rate={ratio(m.get('deliver_rate'), p.get('deliver_rate'))}"
                      f" ok={'yes' if m['ok'] and p['ok'] else 'NO'}",
                      flush=True)
    except SetupError as e:
        print(f"smtp_inbound: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smtp_inbound: interrupted", file=sys.stderr)
        return 2
    finally:
        if mailhost is not None:
            mailhost.stop()
    return 0 if results and all(f["ok"] for f in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
