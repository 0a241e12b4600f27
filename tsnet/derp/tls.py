"""TLS helpers: a throwaway self-signed certificate for tests and the server SSL context."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["SelfSignedCert", "generate_self_signed", "server_ssl_context"]


@dataclass(frozen=True, slots=True)
class SelfSignedCert:
    """PEM cert and key, plus the ``sha256-raw:`` CertName that pins it in a DERPMap."""

    cert_pem: bytes
    key_pem: bytes
    cert_der: bytes

    @property
    def cert_name(self) -> str:
        return "sha256-raw:" + hashlib.sha256(self.cert_der).hexdigest()


def generate_self_signed(hostname: str = "127.0.0.1", days: int = 30) -> SelfSignedCert:
    """An ECDSA P-256 leaf for ``hostname`` (DNS and, when it is an IP, IP SAN) valid ±``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return SelfSignedCert(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
    )


def server_ssl_context(
    cert_file: str | None = None, key_file: str | None = None, self_signed: SelfSignedCert | None = None
) -> ssl.SSLContext:
    """A server context from files, or from an in-memory self-signed pair (written to a private temp dir)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if self_signed is not None:
        # ssl can only load chains from files; the files live only as long as this call.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            with open(cert_path, "wb") as f:
                f.write(self_signed.cert_pem)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self_signed.key_pem)
            ctx.load_cert_chain(cert_path, key_path)
    elif cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    else:
        raise ValueError("server_ssl_context needs cert_file and key_file, or self_signed")
    return ctx
