"""Stored message bytes -> the dot-stuffed CRLF form of SMTP DATA and POP3 RETR/TOP.

RFC 5321 §4.5.2 and RFC 1939 §3 use the same transparency rule: line ends are CRLF and a
line starting with "." gets one more. `DotStuffer` applies it chunk by chunk, carrying
its state (start of line, a CR split from its LF) across chunk boundaries, so a message
of any size streams correctly at every offset (Twisted's SMTPClient stuffs each 16 KiB
chunk on its own and gets chunk boundaries wrong).
"""

from __future__ import annotations

#: what ends a multi-line response / the DATA section, after the last CRLF
TERMINATOR = b".\r\n"


class DotStuffer:
    """LF or CRLF line ends -> CRLF, plus dot-stuffing, correct across chunk boundaries."""

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False

    def encode(self, chunk: bytes) -> bytes:
        """Convert one chunk; a trailing CR is held back until the next chunk."""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            # the LF that may follow is in the next chunk: decide then
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if b"\r" in chunk:  # rare: files written with CRLF by another tool
            chunk = chunk.replace(b"\r\n", b"\n")
        # stuff on LF lines, then LF -> CRLF (fewest passes over the data)
        out = chunk.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        """What is still held back, plus CRLF if the message did not end with one.

        The caller sends `TERMINATOR` after this.
        """
        out = b"\r" if self._held_cr else b""
        self._held_cr = False
        if out or not self._at_line_start:
            out += b"\r\n"
        self._at_line_start = True
        return out
