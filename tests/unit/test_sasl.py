"""SASL PLAIN parsing shared by SMTP, POP3 and IMAP (RFC 4616)."""

import pytest

from mailhost.sasl import Credentials, MalformedPlain, authzid_allowed, parse_plain


def test_plain_with_and_without_authzid():
    assert parse_plain(b"\0alice@x.org\0pw") == Credentials(b"", b"alice@x.org", b"pw")
    creds = parse_plain(b"Alice@X.org\0alice@x.org\0pw")
    assert authzid_allowed(creds)
    assert not authzid_allowed(parse_plain(b"bob@x.org\0alice@x.org\0pw"))
    assert not authzid_allowed(parse_plain(b"\xff\0alice@x.org\0pw"))


@pytest.mark.parametrize("bad", [b"", b"alice\0pw", b"\0\0pw", b"a\0b\0c\0d"])
def test_malformed_plain_is_refused(bad):
    with pytest.raises(MalformedPlain):
        parse_plain(bad)
