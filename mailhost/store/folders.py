"""Maildir++ folders of one account: `.Name` directories under the Maildir root.

Nested folders are `.Parent.Child`; INBOX is the root itself. New accounts get the
special-use folders (RFC 6154) a mail client expects, subscribed.
"""

from __future__ import annotations

from pathlib import Path

from mailhost.store.maildir import make_maildir

#: folder name -> RFC 6154 special-use attribute
SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}

SUBSCRIPTIONS = "subscriptions"


def create_default_folders(root: Path) -> None:
    """Create INBOX and the special-use folders, and subscribe to them."""
    make_maildir(root)
    for name in SPECIAL_USE:
        folder = root / f".{name}"
        make_maildir(folder)
        (folder / "maildirfolder").touch()
    subs = root / SUBSCRIPTIONS
    if not subs.exists():
        subs.write_text("".join(f"{name}\n" for name in SPECIAL_USE), encoding="utf-8")
