"""Who may send what to whom: local mailboxes, aliases, catch-all, relay, reject.

The policy returns a `RecipientDecision`; the SMTP protocol turns it into a reply.
Alias expansion follows targets through nested aliases (Postfix virtual_alias_maps
semantics: an alias wins over an account of the same name), detects loops, and splits
the result into local mailboxes and remote addresses to forward.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from mailhost.address import Address, AddressError, parse_address
from mailhost.config import Config
from mailhost.interfaces import IRecipientPolicy

#: how deep aliases may nest, and how many addresses one recipient may expand to
MAX_ALIAS_DEPTH = 10
MAX_EXPANSION = 1000


@attrs.frozen
class RecipientDecision:
    """The fate of one recipient: accept into `mailboxes` and/or `forward`, or reject."""

    accepted: bool
    mailboxes: tuple[str, ...] = ()
    forward: tuple[str, ...] = ()
    code: int = 250
    status: str = "2.1.5"
    text: str = "OK"

    @classmethod
    def reject(cls, code: int, status: str, text: str) -> RecipientDecision:
        return cls(False, code=code, status=status, text=text)

    @property
    def remote(self) -> bool:
        return bool(self.forward)


class _Loop(Exception):
    pass


@implementer(IRecipientPolicy)
class RecipientPolicy:
    """Decisions from the `[domains]` config and the account directory."""

    def __init__(self, config: Config, accounts: Any) -> None:
        self.config = config
        self.accounts = accounts

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.config.domains

    def _target_address(self, target: str, domain: str) -> Address:
        if "@" in target:
            return parse_address(target)
        return Address(target, domain)

    def expand(self, address: Address) -> tuple[list[str], list[str]]:
        """Resolve a local-domain address to (mailbox keys, remote addresses).

        Raises _Loop for a cycle with no way out, KeyError for an unknown user.
        """
        mailboxes: dict[str, None] = {}
        remote: dict[str, None] = {}
        seen_loop = False

        def visit(addr: Address, path: frozenset[str], depth: int) -> None:
            nonlocal seen_loop
            if len(mailboxes) + len(remote) > MAX_EXPANSION:
                return
            if not self.is_local_domain(addr.domain):
                remote[str(addr)] = None
                return
            key = addr.key
            if key in path or depth > MAX_ALIAS_DEPTH:
                seen_loop = True
                return
            domain = self.config.domains[addr.domain]
            local = addr.local.lower()
            base = addr.without_tag().local.lower()
            for name in dict.fromkeys((local, base)):
                targets = domain.aliases.get(name)
                if targets is not None:
                    for t in targets:
                        visit(self._target_address(t, addr.domain), path | {key}, depth + 1)
                    return
                account = f"{name}@{addr.domain}"
                if self.accounts.exists(account):
                    mailboxes[account] = None
                    return
            if base == "postmaster" and self.config.postmaster:
                # RFC 5321 §4.5.1: every domain accepts mail for its postmaster
                visit(parse_address(self.config.postmaster), path | {key}, depth + 1)
                return
            if domain.catch_all and depth == 0:
                visit(self._target_address(domain.catch_all, addr.domain), path | {key},
                      depth + 1)
                return
            raise KeyError(key)

        visit(address, frozenset(), 0)
        if not mailboxes and not remote and seen_loop:
            raise _Loop(str(address))
        return list(mailboxes), list(remote)

    def decide_recipient(self, recipient: Address, authenticated_as: str | None,
                         queue_available: bool = True) -> RecipientDecision:
        if not self.is_local_domain(recipient.domain):
            if authenticated_as is None:
                # RFC 5321 §3.6.2: no open relay, loopback clients included
                return RecipientDecision.reject(554, "5.7.1", "Relaying denied")
            if not queue_available:
                return RecipientDecision.reject(451, "4.3.0",
                                                "Outbound delivery not available")
            return RecipientDecision(True, forward=(str(recipient),), status="2.1.5",
                                     text="OK, will relay")
        try:
            mailboxes, remote = self.expand(recipient)
        except KeyError:
            return RecipientDecision.reject(550, "5.1.1",
                                            "No such user here")
        except _Loop:
            return RecipientDecision.reject(550, "5.4.6", "Alias loop detected")
        if remote and not queue_available:
            return RecipientDecision.reject(451, "4.3.0",
                                            "Forwarding not available, try again later")
        return RecipientDecision(True, mailboxes=tuple(mailboxes), forward=tuple(remote))

    def may_send_as(self, account: str, sender: Address | None) -> bool:
        """RFC 6409 §6.1: the account's own address, its +tag forms, or an alias of it."""
        if sender is None:
            return False
        if sender.without_tag().key == account.lower() or sender.key == account.lower():
            return True
        if not self.is_local_domain(sender.domain):
            return False
        try:
            mailboxes, _ = self.expand(sender)
        except (KeyError, _Loop):
            return False
        return account.lower() in mailboxes and sender.key != account.lower() and \
            self._is_alias(sender)

    def _is_alias(self, address: Address) -> bool:
        domain = self.config.domains[address.domain]
        return address.local.lower() in domain.aliases or \
            address.without_tag().local.lower() in domain.aliases

    def route_local(self, address: str) -> list[str] | None:
        """Mailbox keys for a local address (used for DSNs), None if it is remote."""
        try:
            addr = parse_address(address)
        except AddressError:
            return None
        if not self.is_local_domain(addr.domain):
            return None
        try:
            mailboxes, _ = self.expand(addr)
        except (KeyError, _Loop):
            return []
        return mailboxes
