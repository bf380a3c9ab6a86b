"""Pure pieces of the SMTP server: trace headers, header scanning, SASL, parameters."""

from __future__ import annotations

import base64

import pytest

from mailhost.smtp.auth import (
    Credentials,
    SASLCancelled,
    SASLError,
    SASLExchange,
    authzid_allowed,
    decode_response,
    parse_plain,
)
from mailhost.smtp.commands import ParamError, parse_params
from mailhost.smtp.received import (
    END_BLANK,
    END_BODY,
    HEADER,
    HeaderScanner,
    address_literal,
    comment_safe,
    received_header,
    return_path,
    valid_helo,
)

T = 1_800_000_000.0  # 2027-01-15


def test_received_header_layout():
    h = received_header(helo="client.test", client_ip="192.0.2.1", hostname="mx.example.org",
                        protocol="ESMTPS", transaction_id="ABC01", recipients=["a@example.org"],
                        seconds=T, tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
    assert h.split(b"\n") == [
        b"Received: from client.test ([192.0.2.1])",
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)",
        b"\tby mx.example.org (mailhost) with ESMTPS id ABC01",
        b"\tfor <a@example.org>; Fri, 15 Jan 2027 08:00:00 +0000"]


def test_received_header_several_recipients_no_for_clause():
    h = received_header(helo="c.test", client_ip="::1", hostname="mx", protocol="ESMTP",
                        transaction_id="X", recipients=["a@x.test", "b@x.test"], seconds=T)
    assert b"for <" not in h
    assert h.startswith(b"Received: from c.test ([IPv6:::1])\n")
    assert h.endswith(b"id X; Fri, 15 Jan 2027 08:00:00 +0000")


def test_received_header_hostile_helo_and_hidden_ip():
    h = received_header(helo="bad) name\r\n(x", client_ip="192.0.2.1", hostname="mx",
                        protocol="SMTP", transaction_id="X", recipients=[], seconds=T)
    assert h.split(b"\n")[0] == b"Received: from [192.0.2.1] (HELO bad??name???x)"
    assert b"\r" not in h and h.count(b"\n") == 1
    hidden = received_header(helo="laptop", client_ip="192.0.2.1", hostname="mx",
                             protocol="ESMTPSA", transaction_id="X", recipients=[],
                             seconds=T, hide_ip=True)
    assert b"192.0.2.1" not in hidden and hidden.startswith(b"Received: from laptop\n")


def test_helpers():
    assert valid_helo("mail.example.org") and valid_helo("[192.0.2.1]")
    assert not valid_helo("bad name") and not valid_helo("")
    assert comment_safe("a(b)c\\d\x01é") == "a?b?c?d??"
    assert address_literal("10.0.0.1") == "[10.0.0.1]"
    assert return_path(None) == b"Return-Path: <>"
    assert return_path("a@b.test") == b"Return-Path: <a@b.test>"


def test_header_scanner():
    s = HeaderScanner()
    assert s.scan(b"Subject: x") == HEADER
    assert s.scan(b"Message-ID:") == HEADER
    assert s.scan(b"  <folded@id>") == HEADER
    assert s.scan(b"DATE: now") == HEADER
    assert s.scan(b"") == END_BLANK
    assert (s.has_date, s.has_message_id, s.message_id) == (True, True, "<folded@id>")
    t = HeaderScanner()
    assert t.scan(b"just a body line") == END_BODY and not t.in_headers


def test_sasl_plain_and_login():
    assert parse_plain(b"\0user@x.test\0pw") == Credentials(b"", b"user@x.test", b"pw")
    with pytest.raises(SASLError):
        parse_plain(b"user\0pw")
    with pytest.raises(SASLError):
        parse_plain(b"\0\0pw")
    with pytest.raises(SASLCancelled):
        decode_response(b"*")
    assert decode_response(b"=") == b""
    with pytest.raises(SASLError):
        decode_response(b"not base64!")
    login = SASLExchange(b"LOGIN")
    assert login.step(None) == base64.b64encode(b"Username:")
    assert login.step(base64.b64encode(b"u@x.test")) == base64.b64encode(b"Password:")
    assert login.step(base64.b64encode(b"pw")) == Credentials(b"", b"u@x.test", b"pw")
    plain = SASLExchange(b"PLAIN")
    assert plain.step(None) == b""
    assert plain.step(base64.b64encode(b"\0a@x.test\0p")).password == b"p"


def test_authzid_rule():
    assert authzid_allowed(Credentials(b"", b"a@x.test", b"p"))
    assert authzid_allowed(Credentials(b"A@X.test", b"a@x.test", b"p"))
    assert not authzid_allowed(Credentials(b"b@x.test", b"a@x.test", b"p"))
    assert not authzid_allowed(Credentials(b"\xff", b"a@x.test", b"p"))


def test_parse_params():
    assert parse_params(b"size=10 body=8BITMIME") == {"SIZE": "10", "BODY": "8BITMIME"}
    assert parse_params(None) == {}
    assert parse_params(b"SMTPUTF8") == {"SMTPUTF8": None}
    for bad in (b"SIZE=1 SIZE=2", b"=x", b"S\xffZE=1", b"A_B=1"):
        with pytest.raises(ParamError):
            parse_params(bad)
