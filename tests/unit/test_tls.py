"""TLS settings: certificate loading, self-signed creation, reload."""

import ssl as stdlib_ssl

import pytest
from OpenSSL import SSL

from mailhost.tls import ServerTLS, TLSConfigError, create_self_signed, load_options


def test_self_signed_certificate_is_usable_and_key_private(tmp_path):
    create_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mx.example.org")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    cert = stdlib_ssl._ssl._test_decode_cert(str(tmp_path / "c.pem"))
    assert ("DNS", "mx.example.org") in cert["subjectAltName"]
    ctx = load_options(tmp_path / "c.pem", tmp_path / "k.pem").getContext()
    assert isinstance(ctx, SSL.Context)


def test_mismatched_key_and_garbage_are_clear_errors(tmp_path):
    create_self_signed(tmp_path / "a.pem", tmp_path / "a.key", "a")
    create_self_signed(tmp_path / "b.pem", tmp_path / "b.key", "b")
    with pytest.raises(TLSConfigError, match="cannot use certificate"):
        load_options(tmp_path / "a.pem", tmp_path / "b.key")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(TLSConfigError):
        load_options(tmp_path / "junk.pem", tmp_path / "a.key")
    with pytest.raises(TLSConfigError, match="cannot read"):
        load_options(tmp_path / "missing.pem", tmp_path / "a.key")


def test_reload_keeps_the_old_certificate_when_the_new_one_is_bad(tmp_path):
    create_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "x")
    server = ServerTLS(tmp_path / "c.pem", tmp_path / "k.pem")
    before = server.getContext()
    (tmp_path / "c.pem").write_text("broken")
    assert server.reload() is False
    assert isinstance(server.getContext(), SSL.Context) and before is not None
    create_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "y")
    assert server.reload() is True
