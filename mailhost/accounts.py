"""Accounts: the passwd file of argon2id hashes, the twisted.cred checker, the realm,
and login throttling shared by SMTP AUTH, POP3 and IMAP.

`<data_dir>/passwd` holds one `address:hash` line per account (PHC string). The running
server re-reads it when it changes, so `mailhost user add` takes effect at once. Hash
verification runs in the reactor's thread pool: a 50 ms hash never stalls other sessions.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.cred import credentials as cred_credentials
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailhost.address import Address, AddressError, parse_address
from mailhost.interfaces import IAccountDirectory
from mailhost.store.maildir import fsync_dir

log = Logger(namespace="mailhost.auth")

#: argon2id at OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): about 40-50 ms
#: per verification on one core. Stored PHC strings carry their own parameters, so
#: hashes made with other settings still verify.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def account_key(login: str | bytes) -> str:
    """Normalise a login name (a full address) to the account key; AddressError if bad."""
    if isinstance(login, bytes):
        login = login.decode("utf-8", errors="strict")
    addr = parse_address(login)
    return addr.key


class AccountFileError(Exception):
    """The passwd file could not be changed; the message says why."""


@implementer(IAccountDirectory)
class AccountDirectory:
    """The accounts in `<data_dir>/passwd`, re-read whenever the file changes."""

    def __init__(self, path: Path, reactor: Any = None, pool: Any = None) -> None:
        self.path = Path(path)
        self.reactor = reactor
        #: threads for password hashing; its own small pool, so a login flood uses at
        #: most that many cores and never queues ahead of the fsyncs in the reactor's pool
        self.pool = pool
        self._stamp: tuple[int, int, int] | None = None
        self._hashes: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._hashes, self._stamp = {}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._hashes = _read_passwd(self.path)
        self._stamp = stamp

    def exists(self, address: str) -> bool:
        self._refresh()
        return address.lower() in self._hashes

    def accounts(self) -> list[str]:
        self._refresh()
        return sorted(self._hashes)

    def hash_of(self, address: str) -> str | None:
        self._refresh()
        return self._hashes.get(address.lower())

    def verify(self, address: str, password: bytes | str) -> defer.Deferred:
        """Deferred -> the account key, or fails with UnauthorizedLogin."""
        try:
            key = account_key(address)
        except (AddressError, UnicodeDecodeError):
            return defer.fail(cred_error.UnauthorizedLogin("invalid login name"))
        stored = self.hash_of(key)
        if isinstance(password, bytes):
            password = password.decode("utf-8", errors="surrogateescape")
        # verify against a dummy hash for unknown users: same cost, no user enumeration
        target = stored or _DUMMY_HASH

        def check() -> bool:
            try:
                return _hasher.verify(target, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        if self.reactor is None:
            d = defer.maybeDeferred(check)
        else:
            pool = self.pool or self.reactor.getThreadPool()
            d = threads.deferToThreadPool(self.reactor, pool, check)

        def done(ok: bool) -> str:
            if ok and stored is not None and self.exists(key):
                return key
            raise cred_error.UnauthorizedLogin("bad credentials")

        return d.addCallback(done)


_DUMMY_HASH = _hasher.hash("mailhost dummy password for timing equality")


def _read_passwd(path: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            addr, sep, hashed = line.partition(":")
            if sep:
                hashes[addr.lower()] = hashed
    return hashes


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_passwd(path: Path, hashes: dict[str, str]) -> None:
    """Write the passwd file atomically with mode 0600 (temp, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for addr in sorted(hashes):
            f.write(f"{addr}:{hashes[addr]}\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def change_accounts(path: Path, change: Callable[[dict[str, str]], None]) -> None:
    """Apply `change` to the account map under an exclusive lock and write it back."""
    with _locked(path):
        hashes = _read_passwd(path) if path.exists() else {}
        change(hashes)
        _write_passwd(path, hashes)


# --- twisted.cred ------------------------------------------------------------------------


@implementer(ICredentialsChecker)
class PasswdChecker:
    """Checks IUsernamePassword against the account directory; avatar id = account key."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(self, directory: AccountDirectory) -> None:
        self.directory = directory

    def requestAvatarId(self, credentials):
        username = credentials.username
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                return defer.fail(cred_error.UnauthorizedLogin("invalid login name"))
        return self.directory.verify(username, credentials.password)


@implementer(IRealm)
class MailRealm:
    """One realm for every protocol: avatar factories are registered per interface."""

    def __init__(self) -> None:
        self._factories: dict[Any, Callable[[str, Any], Any]] = {}

    def register(self, interface: Any, factory: Callable[[str, Any], Any]) -> None:
        """`factory(account_key, mind)` returns the avatar for `interface`."""
        self._factories[interface] = factory

    def requestAvatar(self, avatarId, mind, *interfaces):
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        for iface in interfaces:
            factory = self._factories.get(iface)
            if factory is not None:
                avatar = factory(avatarId, mind)
                logout = getattr(avatar, "logout", lambda: None)
                return iface, avatar, logout
        raise NotImplementedError("no avatar for the requested interfaces")


# --- throttling --------------------------------------------------------------------------


class LoginLocked(cred_error.UnauthorizedLogin):
    """Too many failures from this IP or for this account: temporarily refused."""


@attrs.define
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Growing delay after failed logins, then a temporary lockout, per IP and account.

    `clock` is an IReactorTime (task.Clock in tests); `policy` is the `[auth]` config.
    """

    #: records kept per table; past it stale ones are pruned, then the oldest dropped
    max_records = 100_000

    def __init__(self, clock: Any, policy: Any) -> None:
        self.clock = clock
        self.policy = policy
        self._ips: dict[str, _Failures] = {}
        self._accounts: dict[str, _Failures] = {}

    def _get(self, table: dict[str, _Failures], key: str) -> _Failures:
        now = self.clock.seconds()
        f = table.get(key)
        if f is not None and f.locked_until <= now and now - f.last > self.policy.window:
            del table[key]
            f = None
        return f or _Failures()

    def locked(self, ip: str, account: str | None) -> bool:
        now = self.clock.seconds()
        records = [self._get(self._ips, ip)]
        if account:
            records.append(self._get(self._accounts, account))
        return any(r.locked_until > now for r in records)

    def failure_delay(self, ip: str, account: str | None) -> float:
        """Record a failure; return the delay before the failure reply is sent."""
        now = self.clock.seconds()
        worst = 0
        tables = [(self._ips, ip)] + ([(self._accounts, account)] if account else [])
        for table, key in tables:
            f = self._get(table, key)
            f.count += 1
            f.last = now
            if f.count >= self.policy.lockout_failures:
                f.locked_until = now + self.policy.lockout
            table[key] = f
            worst = max(worst, f.count)
            if len(table) > self.max_records:  # failures with ever new names or IPs
                self.prune()
                for stale in list(table)[:len(table) - self.max_records]:
                    del table[stale]
        excess = worst - self.policy.free_failures
        if excess <= 0:
            return 0.0
        return min(self.policy.max_delay, self.policy.delay * 2 ** (excess - 1))

    def success(self, ip: str, account: str) -> None:
        self._accounts.pop(account, None)
        f = self._ips.get(ip)
        if f is not None and f.locked_until <= self.clock.seconds():
            del self._ips[ip]

    def prune(self) -> None:
        """Forget records whose window has passed (memory stays bounded)."""
        for table in (self._ips, self._accounts):
            for key in list(table):
                self._get(table, key)
                if key in table and table[key].count == 0:
                    del table[key]


class Authenticator:
    """Portal login with throttling and log events; what every protocol calls."""

    def __init__(self, portal: Portal, throttle: LoginThrottle, clock: Any) -> None:
        self.portal = portal
        self.throttle = throttle
        self.clock = clock

    def login(self, username: bytes | str, password: bytes | str, ip: str, protocol: str,
              *interfaces: Any) -> defer.Deferred:
        """Deferred -> (interface, avatar, logout); fails with UnauthorizedLogin or
        LoginLocked after the throttle's delay."""
        if isinstance(username, bytes):
            username = username.decode("utf-8", errors="replace")
        try:
            key: str | None = account_key(username)
        except (AddressError, UnicodeDecodeError):
            key = None
        if self.throttle.locked(ip, key):
            log.info("login {result} protocol={protocol} ip={ip} account={account}",
                     result="locked", protocol=protocol, ip=ip, account=key or username)
            return defer.fail(LoginLocked("too many failed logins; try again later"))
        if isinstance(password, str):
            password = password.encode("utf-8")
        creds = cred_credentials.UsernamePassword((key or username).encode("utf-8"), password)
        d = self.portal.login(creds, None, *interfaces)

        def ok(result: Any) -> Any:
            self.throttle.success(ip, key or "")
            log.info("login {result} protocol={protocol} ip={ip} account={account}",
                     result="ok", protocol=protocol, ip=ip, account=key)
            return result

        def failed(failure: Any) -> Any:
            failure.trap(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials)
            delay = self.throttle.failure_delay(ip, key)
            log.info("login {result} protocol={protocol} ip={ip} account={account} "
                     "delay={delay}", result="failed", protocol=protocol, ip=ip,
                     account=key or username, delay=delay)
            if delay <= 0:
                return failure
            later: defer.Deferred = defer.Deferred()
            self.clock.callLater(delay, later.errback, failure)
            return later

        return d.addCallbacks(ok, failed)


def valid_account_address(address: str, domains: Any) -> Address:
    """Parse a new account's address; its domain must be configured. AddressError if not."""
    addr = parse_address(address)
    if addr.domain not in domains:
        raise AddressError(f"domain {addr.domain!r} is not configured in [domains]")
    if "+" in addr.local:
        raise AddressError("'+' is the sub-address separator and cannot be in an account name")
    if addr.local.startswith(".") or "/" in addr.local:
        raise AddressError("account names cannot start with '.' or contain '/'")
    return Address(addr.local.lower(), addr.domain)
