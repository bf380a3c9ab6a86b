"""twistd options for `twistd mailhost`: only --config; the rest lives in the TOML file."""

from __future__ import annotations

import sys

from twisted.python import usage

from mailhost.config import ConfigError, load


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "path to mailhost.toml (default: the embedded default config)"],
    ]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load(self["config"])
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(e.problems)) \
                from None


def makeService(options: Options):
    """Build the service from validated options; TLS/data-dir problems exit cleanly."""
    from mailhost.service import makeService as make
    from mailhost.tls import TLSConfigError

    try:
        return make(options["parsed"])
    except (TLSConfigError, OSError) as e:
        sys.stderr.write(f"mailhost: cannot start: {e}\n")
        raise SystemExit(1) from None
