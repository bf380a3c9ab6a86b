"""TLS: certificate loading, a self-signed certificate for first start, and a server
context that SIGHUP can reload without dropping sessions.

TLS 1.2 and newer only, with Twisted's default modern cipher list (ECDHE + AEAD).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="mailhost.tls")


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says why."""


def create_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """Write a self-signed certificate for `hostname` (EC P-256, 10 years), mode 0600 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def certificate_paths(tls_config, tls_dir: Path, hostname: str) -> tuple[Path, Path]:
    """The configured PEM paths, or the self-signed pair (created once in tls_dir)."""
    if tls_config.certificate and tls_config.private_key:
        return Path(tls_config.certificate), Path(tls_config.private_key)
    cert, key = tls_dir / "selfsigned.pem", tls_dir / "selfsigned.key"
    if not (cert.exists() and key.exists()):
        create_self_signed(cert, key, hostname)
        log.info("created self-signed certificate {path} for {hostname}", path=str(cert),
                 hostname=hostname)
    return cert, key


def load_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """Build server CertificateOptions from a PEM chain (leaf first) and key (TLS >= 1.2).

    The context is built once here, so a key that does not match the certificate is an
    error at startup (or at reload), not at the first handshake.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        options = ssl.CertificateOptions(
            privateKey=key, certificate=chain[0], extraCertChain=chain[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        options.getContext()
        return options
    except Exception as e:  # noqa: BLE001 - cryptography/OpenSSL raise several types
        raise TLSConfigError(f"cannot use certificate {cert_path} / key {key_path}: "
                             f"{e}") from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A server TLS context factory whose certificate can be swapped at run time.

    Sessions already under TLS keep their context; new handshakes use the new one.
    """

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._options = load_options(cert_path, key_path)

    def reload(self) -> bool:
        """Re-read the certificate and key; keep the old ones if the new ones are bad."""
        try:
            self._options = load_options(self.cert_path, self.key_path)
        except TLSConfigError as e:
            log.error("certificate reload failed, keeping the old one: {error}", error=str(e))
            return False
        log.info("certificate reloaded from {path}", path=str(self.cert_path))
        return True

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)
