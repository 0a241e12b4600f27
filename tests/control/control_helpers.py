"""Shared helpers for the control tests: a loopback server harness and a netmap watcher."""

import trio

from tsnet.control.client import ClientConfig
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate


class Harness:
    def __init__(self, server, port, nursery):
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.nursery = nursery

    def config(self, hostname, auth_key=None, **kw):
        return ClientConfig(control_url=self.url, machine_key=MachinePrivate.generate(), node_key=NodePrivate.generate(),
                            disco_key=DiscoPrivate.generate().public, hostname=hostname, auth_key=auth_key, **kw)

    def authkey(self, **kw):
        return self.server.store.create_authkey(self.server.now(), **kw).key


class NetmapWatcher:
    """Collects netmaps and lets tests wait for a condition without sleeping."""

    def __init__(self):
        self.latest = None
        self.count = 0
        self._changed = trio.Event()

    def __call__(self, nm):
        self.latest = nm
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate, timeout=10):
        with trio.fail_after(timeout):
            while self.latest is None or not predicate(self.latest):
                await self._changed.wait()
        return self.latest


def self_signed_cert(directory, ip: str):
    """Write a self-signed certificate for ``ip`` (an IP SAN) and its key; return (cert_path, key_path)."""
    import datetime as dt
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = Path(directory)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
