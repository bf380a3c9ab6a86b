"""Address parsing and normalisation."""

import pytest

from mailhost.address import Address, AddressError, normalise_domain, parse_address


def test_domain_is_lowercased_and_local_part_kept():
    a = parse_address("<Alice.Smith@Example.ORG>")
    assert a == Address("Alice.Smith", "example.org")
    assert a.key == "alice.smith@example.org"
    assert str(a) == "Alice.Smith@example.org"


def test_idna_domain_is_encoded():
    assert parse_address("bob@bücher.example").domain == "xn--bcher-kva.example"


def test_tag_is_removed():
    assert parse_address("bob+lists@x.org").without_tag() == Address("bob", "x.org")
    assert parse_address("+tag@x.org").without_tag() == Address("+tag", "x.org")


def test_source_route_is_ignored():
    assert parse_address("<@relay.example:joe@x.org>") == Address("joe", "x.org")


@pytest.mark.parametrize("bad", ["", "nobody", "@x.org", "a@", "a b@x.org", "a@x..org",
                                 "a@-x.org", "a@x.org\r\nRCPT TO:<b@y>", "a\0@x.org",
                                 "x" * 65 + "@x.org", "a..b@x.org"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(AddressError):
        parse_address(bad)


def test_quoted_local_part_and_literal():
    assert parse_address('"john doe"@x.org').local == '"john doe"'
    assert normalise_domain("[127.0.0.1]") == "[127.0.0.1]"
