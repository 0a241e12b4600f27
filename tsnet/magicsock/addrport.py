"""An IP address plus UDP port, normalised the way Go's ``netip.AddrPort`` is.

Disco and relay messages carry addresses as 16 bytes (IPv4 written as
``::ffff:a.b.c.d``) followed by a 2-byte big-endian port. On receipt the
IPv4-mapped form is unmapped, so ``AddrPort`` values compare equal regardless
of which form they arrived in.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

__all__ = ["AddrPort", "IPAddress", "ADDRPORT_WIRE_LEN", "is_private", "unmap"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: 16-byte IP plus 2-byte port.
ADDRPORT_WIRE_LEN = 18

_PORT = struct.Struct("!H")
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"
# Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193 only (Python's is_private is broader).
_PRIVATE_NETS = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("fc00::/7"),
)


def unmap(ip: IPAddress) -> IPAddress:
    """Turn ``::ffff:a.b.c.d`` into ``a.b.c.d``; other addresses unchanged."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_private(ip: IPAddress) -> bool:
    """RFC 1918 / RFC 4193 private address (Go ``netip.Addr.IsPrivate``)."""
    return any(ip in net for net in _PRIVATE_NETS if net.version == ip.version)


class AddrPort(NamedTuple):
    """An (IP, port) pair; IPv4 is always held as an ``IPv4Address``."""

    ip: IPAddress
    port: int

    @classmethod
    def parse(cls, text: str) -> AddrPort:
        """Parse ``1.2.3.4:5`` or ``[::1]:5``. Raises ValueError."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"bad ip:port {text!r}")
        else:
            host, sep, port = text.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(f"bad ip:port {text!r}")
        return cls.of(host, int(port))

    @classmethod
    def of(cls, host: str | IPAddress, port: int) -> AddrPort:
        """Build from a host string or address object (IPv6 scope ids are dropped)."""
        if isinstance(host, str):
            host = host.split("%", 1)[0]
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        return cls(unmap(ipaddress.ip_address(host)), port)

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple) -> AddrPort:  # type: ignore[type-arg]
        """From a socket module address tuple (``(host, port)`` or the 4-tuple IPv6 form)."""
        return cls.of(sockaddr[0], sockaddr[1])

    def to_sockaddr(self) -> tuple[str, int]:
        return (str(self.ip), self.port)

    @property
    def is_v6(self) -> bool:
        return self.ip.version == 6

    def to_wire(self) -> bytes:
        """16-byte (v4-mapped) address and 2-byte big-endian port."""
        if self.ip.version == 4:
            raw = _V4_PREFIX + self.ip.packed
        else:
            raw = self.ip.packed
        return raw + _PORT.pack(self.port)

    @classmethod
    def from_wire(cls, b: bytes | memoryview) -> AddrPort:
        """Decode 18 bytes written by :meth:`to_wire`. Caller checks the length."""
        ip = ipaddress.IPv6Address(bytes(b[:16]))
        return cls(unmap(ip), _PORT.unpack_from(b, 16)[0])

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"
