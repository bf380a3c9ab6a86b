"""`mailhost queue ...`: inspect and steer the spool while the server may be running.

`list` and `show` read envelopes (written atomically, so always whole). `delete` removes
an entry's files (envelope first); the running server drops it at its next scan.
`flush` and `bounce` leave a request in `queue/control/` that the running server acts on
within `[queue] scan_interval` seconds (or at its next start).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TextIO

from mailhost.config import Config
from mailhost.queue.spool import PENDING, Envelope, SpoolFiles, valid_queue_id


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _load(config: Config, qid: str, out: TextIO) -> tuple[SpoolFiles, Envelope | None]:
    files = SpoolFiles(config.queue_dir)
    qid = qid.upper()
    if not valid_queue_id(qid):
        out.write(f"error: {qid!r} is not a queue id (16 hex digits)\n")
        return files, None
    try:
        return files, files.read_envelope(qid)
    except FileNotFoundError:
        out.write(f"error: no queue entry {qid}\n")
    except (OSError, ValueError) as e:
        out.write(f"error: cannot read queue entry {qid}: {e}\n")
    return files, None


def _describe(env: Envelope, now: float, out: TextIO) -> None:
    out.write(f"{env.id}  age {_age(now - env.created)}  size {env.size}  "
              f"from <{env.sender}>{'  (report)' if env.kind != 'normal' else ''}\n")
    for r in env.recipients:
        state = r.status + ("" if r.status != "failed" or r.reported else " (report pending)")
        line = f"    {state:<10} <{r.address}>  attempts {r.attempts}"
        if r.status == PENDING:
            line += f"  next {_when(r.next_attempt)}"
        out.write(line + "\n")
        if r.last_reply:
            host = f" [{r.remote_mta}]" if r.remote_mta else ""
            out.write(f"               last{host}: {r.last_reply}\n")


def queue_list(config: Config, out: TextIO) -> int:
    """List every entry: id, age, sender, recipients with state, next attempt, last reply."""
    files = SpoolFiles(config.queue_dir)
    envelopes = []
    for qid in files.ids():
        try:
            envelopes.append(files.read_envelope(qid))
        except (OSError, ValueError):
            continue  # removed while we looked
    now = time.time()
    for env in sorted(envelopes, key=lambda e: e.created):
        _describe(env, now, out)
    pending = sum(len(e.pending()) for e in envelopes)
    out.write(f"{len(envelopes)} entries, {pending} recipients pending\n")
    return 0


def queue_show(config: Config, qid: str, out: TextIO) -> int:
    """One entry in full: its state and the message headers."""
    files, env = _load(config, qid, out)
    if env is None:
        return 1
    _describe(env, time.time(), out)
    out.write(f"created {_when(env.created)}  ret {env.ret or '-'}  envid {env.envid or '-'}"
              f"  smtputf8 {env.smtputf8}  body {env.body or '7BIT'}\n\n")
    try:
        data = files.read_data(env.id)
    except OSError as e:
        out.write(f"error: cannot read the message: {e}\n")
        return 1
    end = data.find(b"\n\n")
    out.write(data[: end + 1 if end >= 0 else len(data)].decode("utf-8", "replace"))
    return 0


def queue_flush(config: Config, qid: str | None, out: TextIO) -> int:
    """Ask the server to try one entry (or all) now."""
    if qid is None:
        SpoolFiles(config.queue_dir).request("flush", "ALL")
        out.write("flush of all entries requested\n")
        return 0
    files, env = _load(config, qid, out)
    if env is None:
        return 1
    files.request("flush", env.id)
    out.write(f"flush of {env.id} requested\n")
    return 0


def queue_delete(config: Config, qid: str, out: TextIO) -> int:
    """Remove an entry without any report."""
    files, env = _load(config, qid, out)
    if env is None:
        return 1
    if not files.remove(env.id):
        out.write(f"error: no queue entry {env.id}\n")
        return 1
    out.write(f"deleted {env.id}\n")
    return 0


def queue_bounce(config: Config, qid: str, out: TextIO) -> int:
    """Ask the server to fail every pending recipient of an entry and report it."""
    files, env = _load(config, qid, out)
    if env is None:
        return 1
    files.request("bounce", env.id)
    out.write(f"bounce of {env.id} requested\n")
    return 0
