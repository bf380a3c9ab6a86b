"""The `mailhost` command: check-config, user add/passwd/del/list, queue ....

Without --config it acts on the embedded default configuration, like `twistd mailhost`.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TextIO

from mailhost.accounts import (
    AccountDirectory,
    change_accounts,
    hash_password,
    valid_account_address,
)
from mailhost.address import AddressError
from mailhost.config import Config, ConfigError, load
from mailhost.store.maildir import make_maildir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailhost", description="Manage a mailhost server.")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="path to mailhost.toml (default: the embedded default config)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check-config", help="validate the configuration and print every problem")

    user = sub.add_parser("user", help="manage accounts").add_subparsers(dest="action",
                                                                          required=True)
    add = user.add_parser("add", help="create an account and its Maildir")
    add.add_argument("address")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    pw = user.add_parser("passwd", help="change an account's password")
    pw.add_argument("address")
    pw.add_argument("--password-stdin", action="store_true")
    rm = user.add_parser("del", help="delete an account (its Maildir is kept)")
    rm.add_argument("address")
    user.add_parser("list", help="list accounts")

    queue = sub.add_parser("queue", help="inspect and manage the outbound queue")
    qs = queue.add_subparsers(dest="action", required=True)
    qs.add_parser("list", help="list queued messages")
    for name, text in (("show", "show one entry"), ("delete", "delete an entry"),
                       ("bounce", "fail every pending recipient now and bounce")):
        qs.add_parser(name, help=text).add_argument("id")
    qs.add_parser("flush", help="try now (one entry, or all)").add_argument("id", nargs="?")
    return p


def _read_password(from_stdin: bool, stdin: TextIO, err: TextIO) -> str | None:
    if from_stdin:
        line = stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            err.write("mailhost: passwords do not match\n")
            return None
    if not password:
        err.write("mailhost: empty password refused\n")
        return None
    return password


def _user(config: Config, args: argparse.Namespace, out: TextIO, err: TextIO,
          stdin: TextIO) -> int:
    if args.action == "list":
        for address in AccountDirectory(config.passwd_path).accounts():
            out.write(address + "\n")
        return 0
    try:
        addr = valid_account_address(args.address, config.domains)
    except AddressError as e:
        err.write(f"mailhost: {args.address}: {e}\n")
        return 1
    key = addr.key
    existing = AccountDirectory(config.passwd_path).exists(key)
    if args.action == "add" and existing:
        err.write(f"mailhost: {key}: account already exists\n")
        return 1
    if args.action in ("passwd", "del") and not existing:
        err.write(f"mailhost: {key}: no such account\n")
        return 1
    if args.action == "del":
        change_accounts(config.passwd_path, lambda h: h.pop(key, None))
        out.write(f"deleted {key} (its mail in {config.mail_dir / addr.domain / addr.local} "
                  "is kept)\n")
        return 0
    password = _read_password(args.password_stdin, stdin, err)
    if password is None:
        return 1
    hashed = hash_password(password)
    if args.action == "add":
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        box = config.mail_dir / addr.domain / addr.local
        make_maildir(box)
        from mailhost.store.folders import create_default_folders

        create_default_folders(box)

    def put(hashes: dict[str, str]) -> None:
        hashes[key] = hashed

    change_accounts(config.passwd_path, put)
    out.write(f"{'added' if args.action == 'add' else 'changed password of'} {key}\n")
    return 0


def _queue(config: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        from mailhost.queue import cli as qcli
    except ImportError:
        err.write("mailhost: the outbound queue is not available in this build\n")
        return 1
    if args.action == "list":
        return qcli.queue_list(config, out)
    if args.action == "flush":
        return qcli.queue_flush(config, args.id, out)
    return getattr(qcli, f"queue_{args.action}")(config, args.id, out)


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         stdin: TextIO = sys.stdin) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        err.write(f"mailhost: invalid configuration ({len(e.problems)} problem(s)):\n")
        for problem in e.problems:
            err.write(f"  {problem}\n")
        return 1
    if args.command == "check-config":
        from mailhost.tls import TLSConfigError, load_options

        if config.tls.certificate and config.tls.private_key:
            from pathlib import Path

            try:
                load_options(Path(config.tls.certificate), Path(config.tls.private_key))
            except TLSConfigError as e:
                err.write(f"mailhost: invalid configuration (1 problem(s)):\n  tls: {e}\n")
                return 1
        from mailhost.config import warnings

        for warning in warnings(config):
            err.write(f"mailhost: warning: {warning}\n")
        out.write(f"configuration OK ({config.source or 'embedded default'}): "
                  f"{len(config.domains)} domain(s), data_dir {config.data_dir}\n")
        return 0
    try:
        if args.command == "user":
            return _user(config, args, out, err, stdin)
        return _queue(config, args, out, err)
    except OSError as e:
        err.write(f"mailhost: {e.filename or ''}: {e.strerror}\n")
        return 1


def run() -> None:  # pragma: no cover - console entry point
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
