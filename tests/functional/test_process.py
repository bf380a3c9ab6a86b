"""The real `twistd mailhost` process and the `mailhost` command, as an operator runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the checkout's twisted/plugins/ is found through sys.path (no install needed)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _twistd(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "mailhost", *args],
        cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_banner(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"twistd exited: {proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(512)
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start listening")


def _cli(*args: str, stdin: str | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "mailhost.cli", *args], input=stdin,
                          capture_output=True, text=True, env=_env(), cwd=cwd, timeout=60)


def test_bad_config_refuses_to_start_with_every_problem_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('hostname = "no such host!"\nfrobnicate = 1\n[limits]\nrecipients = "x"\n')
    proc = _twistd("--config", str(bad), cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "hostname: expected a host name" in out
    assert "frobnicate: unknown key" in out
    assert "limits.recipients: expected an integer" in out
    assert "data_dir: missing" in out
    assert "Traceback" not in out


def test_unusable_certificate_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'hostname = "localhost"\ndata_dir = "{tmp_path}/d"\n[domains."localhost"]\n'
                   f'[tls]\ncertificate = "{junk}"\nprivate_key = "{junk}"\n')
    proc = _twistd("--config", str(cfg), cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "cannot start: cannot use certificate" in out
    assert "Traceback" not in out


def test_server_runs_and_sigterm_exits_cleanly(tmp_path):
    port = _free_port()
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'hostname = "mx.example.org"\ndata_dir = "data"\n'
                   f'[listen]\nsmtp = ["tcp:{port}:interface=127.0.0.1"]\n'
                   '[domains."example.org"]\n')
    proc = _twistd("--config", str(cfg), cwd=tmp_path)
    try:
        banner = _wait_banner(port, proc)
        assert banner.startswith(b"220 mx.example.org")
        assert (tmp_path / "data" / "tls" / "selfsigned.pem").exists()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "mailhost stopped" in out
    assert "Traceback" not in out


_DEFAULT_DRIVER = r"""
import fcntl, json, os, signal, socket, struct, subprocess, sys, time
if os.environ.get("MAILHOST_TEST_NETNS"):  # a fresh namespace: bring loopback up
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS IFF_UP
proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                         "-n", "--pidfile=", "mailhost"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
banners, deadline = {}, time.monotonic() + 30
for port in (2525, 2587, 2110, 2143):
    while port not in banners and time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                banners[port] = s.recv(200).decode("ascii", "replace")
        except OSError:
            time.sleep(0.1)
for port in (2465, 2995, 2993):  # implicit TLS: a TCP connect is enough here
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        banners[port] = "tls"
    except OSError:
        pass
proc.send_signal(signal.SIGTERM)
out, _ = proc.communicate(timeout=60)
print(json.dumps({"banners": banners, "rc": proc.returncode, "out": out}))
"""


def test_embedded_default_starts_on_loopback(tmp_path):
    """`twistd -n mailhost` with no config: the README's first command.

    It runs in a private network namespace (unshare -n) so ports taken on this machine
    (a Postfix peer on 2525, say) cannot interfere with the fixed default ports.
    """
    import json
    import shutil

    cmd = [sys.executable, "-c", _DEFAULT_DRIVER]
    env = _env()
    if shutil.which("unshare") and subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", *cmd]
        env["MAILHOST_TEST_NETNS"] = "1"
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    banners = result["banners"]
    assert banners.get("2525", "").startswith("220 localhost"), result["out"]
    assert banners.get("2587", "").startswith("220 localhost")
    assert banners.get("2110", "").startswith("+OK")
    assert banners.get("2143", "").startswith("* OK")
    assert {"2465", "2995", "2993"} <= set(banners)
    assert (tmp_path / "mailhost-data" / "mail").is_dir()
    assert (tmp_path / "mailhost-data" / "tls" / "selfsigned.pem").is_file()
    assert result["rc"] == 0, result["out"]


def test_cli_user_lifecycle_and_check_config(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('hostname = "mx.example.org"\ndata_dir = "data"\n[domains."example.org"]\n')
    r = _cli("--config", str(cfg), "check-config")
    assert r.returncode == 0 and "configuration OK" in r.stdout
    r = _cli("--config", str(cfg), "user", "add", "Alice@Example.org", "--password-stdin",
             stdin="s3cret\n")
    assert r.returncode == 0, r.stderr
    root = tmp_path / "data" / "mail" / "example.org" / "alice"
    assert (root / "new").is_dir() and (root / ".Sent" / "cur").is_dir()
    passwd = tmp_path / "data" / "passwd"
    assert passwd.stat().st_mode & 0o777 == 0o600
    assert passwd.read_text().startswith("alice@example.org:$argon2id$")
    assert _cli("--config", str(cfg), "user", "add", "alice@example.org",
                "--password-stdin", stdin="x\n").returncode == 1
    assert _cli("--config", str(cfg), "user", "add", "bob@elsewhere.test",
                "--password-stdin", stdin="x\n").returncode == 1
    r = _cli("--config", str(cfg), "user", "passwd", "alice@example.org", "--password-stdin",
             stdin="new\n")
    assert r.returncode == 0
    assert _cli("--config", str(cfg), "user", "list").stdout == "alice@example.org\n"
    assert _cli("--config", str(cfg), "user", "del", "alice@example.org").returncode == 0
    assert _cli("--config", str(cfg), "user", "list").stdout == ""
    assert _cli("--config", str(cfg), "user", "del", "alice@example.org").returncode == 1


def test_cli_check_config_reports_all_problems(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('hostname = 5\n[listen]\nimap = ["carrier-pigeon:1"]\n')
    r = _cli("--config", str(cfg), "check-config")
    assert r.returncode == 1
    assert "hostname: expected a host name" in r.stderr
    assert "listen.imap[0]: unsupported endpoint type" in r.stderr
    assert "domains: at least one local domain" in r.stderr
    assert "Traceback" not in r.stderr


def test_json_log_lines_for_log_shippers(tmp_path):
    import json

    port = _free_port()
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'hostname = "mx.example.org"\ndata_dir = "data"\n'
                   f'[listen]\nsmtp = ["tcp:{port}:interface=127.0.0.1"]\n'
                   '[domains."example.org"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "--logger", "mailhost.logs.json_observer", "-n", "--pidfile=", "mailhost",
         "--config", str(cfg)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_banner(port, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    starting = [e for e in events if e.get("log_namespace") == "mailhost.service"
                and "hostname" in e]
    assert starting and starting[0]["hostname"] == "mx.example.org"
    assert proc.returncode == 0


def _tls_session(port: int):
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ctx.wrap_socket(raw)
    assert sock.recv(512).startswith(b"220")
    return sock, sock.getpeercert(binary_form=True)


def test_sighup_reloads_the_certificate_without_dropping_sessions(tmp_path):
    from mailhost.tls import create_self_signed

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    create_self_signed(cert, key, "old.example.org")
    port = _free_port()
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'hostname = "mx.example.org"\ndata_dir = "data"\n'
                   f'[listen]\nsubmissions = ["tcp:{port}:interface=127.0.0.1"]\n'
                   f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
                   '[domains."example.org"]\n')
    proc = _twistd("--config", str(cfg), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                old_session, old_cert = _tls_session(port)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        create_self_signed(cert, key, "new.example.org")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            new_session, new_cert = _tls_session(port)
            new_session.close()
            if new_cert != old_cert or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert new_cert != old_cert
        old_session.sendall(b"NOOP\r\n")  # the session from before the reload lives on
        assert old_session.recv(512).startswith(b"250")
        old_session.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "certificate reloaded" in out
    assert proc.returncode == 0, out
