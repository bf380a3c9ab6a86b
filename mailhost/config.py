"""Configuration: TOML read with tomllib, validated into frozen attrs classes.

Every problem is reported with its key path, all at once (`ConfigError.problems`), so an
operator fixes a file in one pass. The key names are a contract with operators.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from mailhost.address import AddressError, normalise_domain, parse_address

ROLES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")

#: The embedded default: what `twistd -n mailhost` runs without --config.
DEFAULT_TOML = """\
hostname = "localhost"
data_dir = "./mailhost-data"

[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
submission = ["tcp:2587:interface=127.0.0.1"]
submissions = ["tcp:2465:interface=127.0.0.1"]
pop3 = ["tcp:2110:interface=127.0.0.1"]
pop3s = ["tcp:2995:interface=127.0.0.1"]
imap = ["tcp:2143:interface=127.0.0.1"]
imaps = ["tcp:2993:interface=127.0.0.1"]

[domains."localhost"]
"""


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every error with its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class ListenConfig:
    smtp: tuple[str, ...] = ()
    submission: tuple[str, ...] = ()
    submissions: tuple[str, ...] = ()
    pop3: tuple[str, ...] = ()
    pop3s: tuple[str, ...] = ()
    imap: tuple[str, ...] = ()
    imaps: tuple[str, ...] = ()


@attrs.frozen
class TLSConfig:
    certificate: str | None = None
    private_key: str | None = None


@attrs.frozen
class DomainConfig:
    name: str
    #: alias local part -> tuple of targets (local parts or full addresses), lower-cased
    aliases: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    catch_all: str | None = None


@attrs.frozen
class LimitsConfig:
    message_size: int = 26214400
    recipients: int = 100
    connections_per_ip: int = 20
    line_length: int = 4096
    idle_timeout: int = 300
    session_length: int = 1800
    bad_commands: int = 20
    commands_per_session: int = 10000
    imap_literal: int = 65536
    imap_command_length: int = 65536
    sessions_per_account: int = 50
    shutdown_grace: int = 30


@attrs.frozen
class AuthConfig:
    #: failures from one IP or for one account before the delay starts growing
    free_failures: int = 3
    #: first delay in seconds; doubles with each further failure up to max_delay
    delay: float = 1.0
    max_delay: float = 16.0
    #: failures that trigger a lockout, and its length in seconds
    lockout_failures: int = 10
    lockout: int = 900
    #: seconds after which failures are forgotten
    window: int = 900
    #: allow AUTH on the smtp (MX) role (under TLS only)
    smtp_auth: bool = False
    #: allow POP3/IMAP logins without TLS (not recommended)
    allow_cleartext: bool = False


@attrs.frozen
class SubmissionConfig:
    #: hide the client's IP address in the Received header of authenticated mail
    hide_client_ip: bool = False


@attrs.frozen
class QueueConfig:
    dns_servers: tuple[str, ...] = ()
    remote_port: int = 25
    smarthost: str | None = None
    #: "starttls" (required), "implicit" (TLS on connect) or "none" for the smarthost
    smarthost_tls: str = "starttls"
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    #: seconds between attempts; the last value repeats
    retry: tuple[int, ...] = (300, 600, 1200, 2400, 4800, 9600, 14400)
    lifetime: int = 5 * 86400
    delay_warning: int = 4 * 3600
    concurrency: int = 20
    per_destination: int = 4
    connect_timeout: int = 30
    command_timeout: int = 300
    #: destination domains for which verified TLS is required
    require_tls: tuple[str, ...] = ()
    #: seconds between scans of the queue directory for changes made by the CLI
    scan_interval: float = 5.0


@attrs.frozen
class Config:
    hostname: str
    data_dir: Path
    listen: ListenConfig = ListenConfig()
    tls: TLSConfig = TLSConfig()
    domains: Mapping[str, DomainConfig] = attrs.field(factory=dict)
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    submission: SubmissionConfig = SubmissionConfig()
    queue: QueueConfig = QueueConfig()
    #: where postmaster@<any local domain> goes when the domain has no alias or account
    #: of that name (RFC 5321 §4.5.1); None: no default
    postmaster: str | None = None
    #: where the config came from (for messages); None for the embedded default
    source: str | None = None

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def passwd_path(self) -> Path:
        return self.data_dir / "passwd"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"


# --- validation ---------------------------------------------------------------------

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")


class _Collector:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")


def _type_name(value: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _section(cls: type, table: Any, path: str, errors: _Collector,
             checks: Mapping[str, Any] | None = None) -> Any:
    """Build the attrs section `cls` from a TOML table, type-checking each key."""
    if not isinstance(table, dict):
        errors.add(path, f"expected a table, got {_type_name(table)}")
        return cls()
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in attrs.fields(cls)}
    for key, value in table.items():
        kp = f"{path}.{key}"
        field = fields.get(key)
        if field is None:
            errors.add(kp, "unknown key")
            continue
        default = field.default
        if isinstance(default, attrs.Factory):  # pragma: no cover - not used in sections
            default = default.factory()
        ok, converted = _convert(field.type, default, value)
        if not ok:
            errors.add(kp, f"expected {converted}, got {_type_name(value)} {value!r}")
            continue
        problem = (checks or {}).get(key, lambda v: None)(converted)
        if problem:
            errors.add(kp, problem)
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _convert(annotation: Any, default: Any, value: Any) -> tuple[bool, Any]:
    """Check a TOML value against a field; return (ok, value) or (False, expected)."""
    ann = str(annotation)
    if ann.startswith("tuple[str"):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True, tuple(value)
        return False, "an array of strings"
    if ann.startswith("tuple[int"):
        if isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            return True, tuple(value)
        return False, "a non-empty array of positive integers"
    if ann == "bool":
        return (True, value) if isinstance(value, bool) else (False, "a boolean")
    if ann == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        return False, "an integer"
    if ann == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, "a number"
    if ann.startswith("str"):
        return (True, value) if isinstance(value, str) else (False, "a string")
    return False, f"a value of type {ann}"  # pragma: no cover


def _positive(v: int | float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: int | float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _port(v: int) -> str | None:
    return None if 0 < v < 65536 else "must be a port number 1-65535"


def _host_port(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be 'host:port'"
    return None


def _validate_endpoint(description: str) -> str | None:
    """Check a server endpoint string with Twisted's own parser; nothing is bound."""
    from twisted.internet import endpoints

    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix", "systemd"):
        return f"unsupported endpoint type {kind!r} (use tcp:, tcp6:, unix: or systemd:)"
    if kind == "systemd":
        # sockets passed by systemd exist only under systemd: check the syntax here
        opts = dict(f.partition("=")[::2] for f in description.split(":")[1:])
        if set(opts) != {"domain", "index"} or opts["domain"] not in (
                "INET", "INET6", "UNIX") or not opts["index"].isdigit():
            return (f"invalid endpoint {description!r}: use "
                    "systemd:domain=INET|INET6|UNIX:index=N")
        return None
    try:
        # the endpoint object only stores its reactor until it listens
        endpoints.serverFromString(object(), description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        return f"invalid endpoint {description!r}: {e}"
    if kind in ("tcp", "tcp6"):
        fields = description.split(":")[1:]
        plain = [f for f in fields if "=" not in f]
        named = [f[5:] for f in fields if f.startswith("port=")]
        port = (plain or named or ["0"])[0]
        if not 0 <= int(port) <= 65535:
            return f"invalid endpoint {description!r}: port {port} out of range"
    return None


def _domain(name: str, table: Any, errors: _Collector) -> DomainConfig | None:
    path = f'domains."{name}"'
    try:
        dname = normalise_domain(name)
    except AddressError as e:
        errors.add(path, f"invalid domain name: {e}")
        return None
    if table is None:
        table = {}
    if not isinstance(table, dict):
        errors.add(path, f"expected a table, got {_type_name(table)}")
        return None
    aliases: dict[str, tuple[str, ...]] = {}
    catch_all = None
    for key, value in table.items():
        kp = f"{path}.{key}"
        if key == "aliases":
            if not isinstance(value, dict):
                errors.add(kp, f"expected a table, got {_type_name(value)}")
                continue
            for alias, targets in value.items():
                ap = f"{kp}.{alias}"
                if isinstance(targets, str):
                    targets = [targets]
                if not isinstance(targets, list) or not targets or not all(
                        isinstance(t, str) for t in targets):
                    errors.add(ap, "expected a string or a non-empty array of strings")
                    continue
                bad = [t for t in targets if _target_problem(t)]
                local = alias.lower()
                if _target_problem(local) or "@" in local:
                    errors.add(ap, "alias name must be a local part")
                    continue
                if bad:
                    errors.add(ap, f"invalid target(s) {', '.join(map(repr, bad))}")
                    continue
                aliases[local] = tuple(_norm_target(t) for t in targets)
        elif key == "catch_all":
            if not isinstance(value, str) or _target_problem(value):
                errors.add(kp, "expected a local part or an address")
                continue
            catch_all = _norm_target(value)
        else:
            errors.add(kp, "unknown key")
    return DomainConfig(name=dname, aliases=aliases, catch_all=catch_all)


def _target_problem(target: str) -> str | None:
    if "@" in target:
        try:
            parse_address(target)
        except AddressError as e:
            return str(e)
        return None
    if not target or any(c in target for c in " \t\r\n\0<>()[]\\,;:\"") or len(target) > 64:
        return "invalid local part"
    return None


def _norm_target(target: str) -> str:
    if "@" in target:
        return str(parse_address(target))
    return target.lower()


def from_dict(data: Mapping[str, Any], source: str | None = None,
              base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    errors = _Collector()
    hostname = data.get("hostname")
    if hostname is None:
        errors.add("hostname", "missing (required)")
        hostname = "localhost"
    elif not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
        errors.add("hostname", f"expected a host name, got {hostname!r}")
        hostname = "localhost"
    data_dir = data.get("data_dir")
    if data_dir is None:
        errors.add("data_dir", "missing (required)")
        data_dir = "."
    elif not isinstance(data_dir, str) or not data_dir:
        errors.add("data_dir", f"expected a path string, got {data_dir!r}")
        data_dir = "."
    ddir = Path(data_dir)
    if not ddir.is_absolute() and base_dir is not None:
        ddir = base_dir / ddir
    kwargs: dict[str, Any] = {"hostname": hostname.lower(), "data_dir": ddir, "source": source}

    known = {"hostname", "data_dir", "listen", "tls", "domains", "limits", "auth",
             "submission", "queue", "postmaster"}
    for key in data:
        if key not in known:
            errors.add(key, "unknown key")

    if "listen" in data:
        listen = _section(ListenConfig, data["listen"], "listen", errors)
        for role in ROLES:
            for i, desc in enumerate(getattr(listen, role)):
                problem = _validate_endpoint(desc)
                if problem:
                    errors.add(f"listen.{role}[{i}]", problem)
        kwargs["listen"] = listen
    if "tls" in data:
        tls = _section(TLSConfig, data["tls"], "tls", errors)
        if (tls.certificate is None) != (tls.private_key is None):
            errors.add("tls", "certificate and private_key must be given together")
        for key in ("certificate", "private_key"):
            value = getattr(tls, key)
            if value is not None and not Path(value).is_file():
                errors.add(f"tls.{key}", f"file not found: {value}")
        kwargs["tls"] = tls
    if "limits" in data:
        kwargs["limits"] = _section(LimitsConfig, data["limits"], "limits", errors,
                                    {k.name: _positive for k in attrs.fields(LimitsConfig)})
    if "auth" in data:
        kwargs["auth"] = _section(AuthConfig, data["auth"], "auth", errors, {
            "free_failures": _non_negative, "delay": _non_negative, "max_delay": _non_negative,
            "lockout_failures": _positive, "lockout": _non_negative, "window": _positive})
    if "submission" in data:
        kwargs["submission"] = _section(SubmissionConfig, data["submission"], "submission",
                                        errors)
    if "queue" in data:
        queue = _section(QueueConfig, data["queue"], "queue", errors, {
            "remote_port": _port, "smarthost": _host_port, "lifetime": _positive,
            "delay_warning": _positive, "concurrency": _positive,
            "per_destination": _positive, "connect_timeout": _positive,
            "command_timeout": _positive, "scan_interval": _positive,
            "smarthost_tls": lambda v: None if v in ("starttls", "implicit", "none")
            else "must be one of 'starttls', 'implicit', 'none'"})
        for i, server in enumerate(queue.dns_servers):
            problem = _host_port(server) if ":" in server else None
            if problem:
                errors.add(f"queue.dns_servers[{i}]", problem)
        kwargs["queue"] = queue

    if "postmaster" in data:
        pm = data["postmaster"]
        if not isinstance(pm, str) or "@" not in pm or _target_problem(pm):
            errors.add("postmaster", f"expected an address, got {pm!r}")
        else:
            kwargs["postmaster"] = _norm_target(pm)
    domains: dict[str, DomainConfig] = {}
    raw_domains = data.get("domains", {})
    if not isinstance(raw_domains, dict):
        errors.add("domains", f"expected a table, got {_type_name(raw_domains)}")
        raw_domains = {}
    for name, table in raw_domains.items():
        dom = _domain(name, table, errors)
        if dom is not None:
            if dom.name in domains:
                errors.add(f'domains."{name}"', "duplicate domain")
            domains[dom.name] = dom
    if not domains:
        errors.add("domains", "at least one local domain must be configured")
    kwargs["domains"] = domains

    if errors.problems:
        raise ConfigError(errors.problems)
    return Config(**kwargs)


def warnings(config: Config) -> list[str]:
    """Things that work but an operator should know (printed by check-config)."""
    out = []
    if config.postmaster is None:
        for name, domain in sorted(config.domains.items()):
            if "postmaster" not in domain.aliases and domain.catch_all is None:
                out.append(f'domains."{name}": no postmaster alias and no top-level '
                           "`postmaster`: mail to postmaster@ (RFC 5321 §4.5.1) is refused "
                           "unless an account of that name exists")
    return out


def load(path: str | Path | None = None) -> Config:
    """Load a config file, or the embedded default when `path` is None."""
    if path is None:
        return loads(DEFAULT_TOML, source=None, base_dir=Path.cwd())
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return loads(text, source=str(p), base_dir=p.parent.resolve())


def loads(text: str, source: str | None = None, base_dir: Path | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source or '<config>'}: TOML syntax error: {e}"]) from None
    return from_dict(data, source=source, base_dir=base_dir)
