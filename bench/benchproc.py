"""What every benchmark does with the mailhost process it started: stop it, clean up.

The benchmark scripts run as `python3 bench/<name>.py`, so this directory is on sys.path.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path


def stop_server(proc: subprocess.Popen | None, tmp: Path, keep: bool) -> None:
    """SIGTERM (SIGKILL after 15 s) the server, then remove its temp dir unless kept."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            sys.stderr.write("# mailhost ignored SIGTERM for 15s; sending SIGKILL\n")
            proc.kill()
            proc.wait(timeout=10)
        if proc.returncode not in (0, -signal.SIGTERM):
            sys.stderr.write(f"# twistd exited with status {proc.returncode}\n")
    if keep:
        sys.stderr.write(f"# kept {tmp}\n")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
