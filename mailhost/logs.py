"""Log output for operators: twisted.logger events, as text (twistd's default) or JSON.

JSON lines for log shippers: `twistd --logger mailhost.logs.json_observer -n mailhost`.
Each event keeps its stable keys (session, ip, account, queue_id, from, to, size,
result, code) next to `log_format` and `log_time`.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """An observer writing one JSON object per event to standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
