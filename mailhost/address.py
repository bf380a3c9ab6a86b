"""Mail addresses as value objects: parsing and normalisation (case, IDNA, +tag).

Local parts are compared case-insensitively (as Postfix and Dovecot do for virtual users);
domains are lower-cased and IDNA-encoded to their ASCII form.
"""

from __future__ import annotations

import re

import attrs


class AddressError(ValueError):
    """An address that cannot be used; the message says why."""


# RFC 5321 §4.1.2: Dot-string / Quoted-string local parts. We accept UTF-8 local parts
# (RFC 6531) but no controls, spaces outside quotes, or unbalanced specials.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ADDRESS_LITERAL = re.compile(r"^\[[^\[\]\\\s]+\]$")


def normalise_domain(domain: str) -> str:
    """Lower-case and IDNA-encode a domain; raise AddressError if it is not valid."""
    d = domain.strip().rstrip(".")
    if not d:
        raise AddressError("empty domain")
    if _ADDRESS_LITERAL.match(d):
        return d.lower()
    try:
        d = d.encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError as e:
        raise AddressError(f"invalid internationalised domain {domain!r}") from e
    d = d.lower()
    if len(d) > 253 or not all(_LABEL.match(label) for label in d.split(".")):
        raise AddressError(f"invalid domain {domain!r}")
    return d


@attrs.frozen(order=True)
class Address:
    """A mail address `local@domain`, with the domain normalised and the case kept."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """The case-insensitive form used to look up accounts and aliases."""
        return f"{self.local.lower()}@{self.domain}"

    def without_tag(self, separator: str = "+") -> Address:
        """`user+tag@domain` -> `user@domain` (sub-addressing, RFC 5233 style)."""
        base, sep, _ = self.local.partition(separator)
        if sep and base:
            return Address(base, self.domain)
        return self


def parse_address(text: str) -> Address:
    """Parse `local@domain` (optionally in angle brackets); raise AddressError."""
    s = text.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    if any(c in s for c in "\r\n\0"):
        raise AddressError("address contains control characters")
    if ":" in s and s.startswith("@"):
        # RFC 5321 §4.1.2 source route: "@a,@b:user@dom" -> ignore the route
        s = s.split(":", 1)[1]
    local, at, domain = s.rpartition("@")
    if not at or not local:
        raise AddressError(f"{text!r} is not of the form local@domain")
    if len(local.encode("utf-8")) > 64:
        raise AddressError("local part longer than 64 octets")
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        raise AddressError(f"invalid local part {local!r}")
    return Address(local, normalise_domain(domain))
