"""The seams between protocols and the decisions/storage behind them.

Protocols depend on these Interfaces, never on concrete classes, so session tests can
substitute in-memory fakes.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRecipientPolicy(Interface):
    """Decides, per recipient, what happens to mail (RFC 5321 §4.1.1.3 RCPT time)."""

    def decide_recipient(recipient, authenticated_as):
        """Return a `RecipientDecision` for an `Address`.

        `authenticated_as` is the account address string, or None for an
        unauthenticated (MX) client. May return a Deferred.
        """

    def may_send_as(account, sender):
        """True if `account` (str) may use envelope sender `sender` (Address or None)."""


class IMailStore(Interface):
    """Durable local delivery into mailboxes."""

    def open_delivery(mailboxes):
        """Start writing one message for a list of mailbox keys (`user@domain`).

        Returns an `IMessageWriter`.
        """


class IMessageWriter(Interface):
    """One message being written; durable only once `commit` has fired."""

    size = Attribute("bytes written so far")

    def write(data):
        """Append bytes (LF line ends)."""

    def commit():
        """Flush, fsync and link into every mailbox's new/; Deferred -> list of paths."""

    def abort():
        """Remove what was written; nothing is delivered."""


class IOutboundQueue(Interface):
    """The durable outbound queue (remote recipients, forwarding, DSNs)."""

    def open_entry(sender, recipients, dsn_params):
        """Start a queue entry; returns an `IMessageWriter` whose commit enqueues it."""


class IAccountDirectory(Interface):
    """The accounts of this server (the passwd file)."""

    def exists(address):
        """True if the account `user@domain` (lower-case key) exists now."""

    def verify(address, password):
        """Deferred -> the account key if the password is right, else failure."""
