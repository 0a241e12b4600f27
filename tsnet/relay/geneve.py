"""The 8-byte Geneve header Tailscale puts in front of peer-relay traffic.

RFC 8926 fixed part, no options, as tailscaled's ``net/packet/geneve.go`` writes it::

    byte 0     Ver(2)=0 | OptLen(6)=0
    byte 1     O(1) control flag (0x80) | C(1)=0 | reserved(6)=0
    bytes 2-3  protocol: 0x7A11 disco, 0x7A12 WireGuard
    bytes 4-6  24-bit VNI
    byte 7     reserved, 0

Decoding is lax like tailscaled's relay server (version, reserved bits and
byte 7 are not checked); :func:`looks_like_geneve` is magicsock's stricter test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "GENEVE_HEADER_LEN",
    "PROTOCOL_DISCO",
    "PROTOCOL_WIREGUARD",
    "CONTROL_FLAG",
    "MAX_VNI",
    "GeneveError",
    "GeneveHeader",
    "looks_like_geneve",
]

GENEVE_HEADER_LEN = 8
PROTOCOL_DISCO = 0x7A11
PROTOCOL_WIREGUARD = 0x7A12
CONTROL_FLAG = 0x80
MAX_VNI = (1 << 24) - 1

_HDR = struct.Struct("!BBHI")


class GeneveError(ValueError):
    """Too short to hold a Geneve header, or a field out of range on encode."""


@dataclass(frozen=True, slots=True)
class GeneveHeader:
    protocol: int
    vni: int
    control: bool = False
    version: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.vni <= MAX_VNI:
            raise GeneveError(f"VNI {self.vni} does not fit in 24 bits")
        if not 0 <= self.version <= 3:
            raise GeneveError("Geneve version must be 0..3")
        if not 0 <= self.protocol <= 0xFFFF:
            raise GeneveError("protocol is u16")

    def to_bytes(self) -> bytes:
        return _HDR.pack(self.version << 6, CONTROL_FLAG if self.control else 0, self.protocol, self.vni << 8)

    @classmethod
    def parse(cls, data: bytes | memoryview) -> GeneveHeader:
        if len(data) < GENEVE_HEADER_LEN:
            raise GeneveError(f"{len(data)} bytes is too short for a Geneve header")
        b0, b1, proto, vni = _HDR.unpack_from(data)
        return cls(proto, vni >> 8, bool(b1 & CONTROL_FLAG), b0 >> 6)


def encode_header(protocol: int, vni: int, control: bool = False) -> bytes:
    """Fast path for senders: the 8 header bytes without building a dataclass."""
    if not 0 <= vni <= MAX_VNI:
        raise GeneveError(f"VNI {vni} does not fit in 24 bits")
    return _HDR.pack(0, CONTROL_FLAG if control else 0, protocol, vni << 8)


def looks_like_geneve(data: bytes | memoryview) -> bool:
    """magicsock's test: zero version bits, zero reserved bits in byte 1, zero byte 7."""
    return len(data) >= GENEVE_HEADER_LEN and data[0] & 0xC0 == 0 and data[1] & 0x3F == 0 and data[7] == 0
