"""TSMP disco-key advertisement: IP protocol 99 inside WireGuard between Tailscale IPs.

Payload: ``0x61 ('a')`` followed by the sender's 32-byte disco public key, behind
a plain IPv4 (TTL 64, ID 0, checksum) or IPv6 (hop limit 64) header.
tailscaled 1.96.4 only acts on these with ``TS_USE_CACHED_NETMAP`` set; a node
must at least recognise and drop them. Applying one means swapping the peer's
disco key in magicsock (without the path reset a netmap change causes).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tsnet.key import KEY_LEN, DiscoPublic

__all__ = ["IPPROTO_TSMP", "TSMP_DISCO_ADVERTISEMENT", "DiscoKeyAdvertisement", "parse_disco_key_advertisement"]

IPPROTO_TSMP = 99
TSMP_DISCO_ADVERTISEMENT = 0x61
_PAYLOAD_LEN = 1 + KEY_LEN

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip4_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True, slots=True)
class DiscoKeyAdvertisement:
    src: IPAddress
    dst: IPAddress
    key: DiscoPublic

    def to_packet(self) -> bytes:
        """The complete IP packet."""
        payload = bytes([TSMP_DISCO_ADVERTISEMENT]) + self.key.raw
        if self.src.version == 4:
            if self.dst.version != 4:
                raise ValueError("src and dst must be the same family")
            hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, IPPROTO_TSMP, 0,
                                        self.src.packed, self.dst.packed))
            struct.pack_into("!H", hdr, 10, _ip4_checksum(bytes(hdr)))
            return bytes(hdr) + payload
        if self.dst.version != 6:
            raise ValueError("src and dst must be the same family")
        return struct.pack("!IHBB", 0x60000000, len(payload), IPPROTO_TSMP, 64) + self.src.packed + self.dst.packed + payload


def parse_disco_key_advertisement(packet: bytes | memoryview) -> DiscoKeyAdvertisement | None:
    """The advertisement carried by ``packet``, or None if it is anything else. Never raises."""
    n = len(packet)
    if n < 1:
        return None
    version = packet[0] >> 4
    if version == 4:
        if n < 20:
            return None
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or packet[9] != IPPROTO_TSMP or n < ihl + _PAYLOAD_LEN:
            return None
        src, dst = ipaddress.IPv4Address(bytes(packet[12:16])), ipaddress.IPv4Address(bytes(packet[16:20]))
        payload = packet[ihl:]
    elif version == 6:
        if n < 40 + _PAYLOAD_LEN or packet[6] != IPPROTO_TSMP:
            return None
        src, dst = ipaddress.IPv6Address(bytes(packet[8:24])), ipaddress.IPv6Address(bytes(packet[24:40]))
        payload = packet[40:]
    else:
        return None
    if payload[0] != TSMP_DISCO_ADVERTISEMENT:
        return None
    return DiscoKeyAdvertisement(src, dst, DiscoPublic(bytes(payload[1:_PAYLOAD_LEN])))
