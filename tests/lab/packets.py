"""Tiny IPv4 / ICMP echo / UDP builders and parsers for tests (checksums included).

Deliberately independent of tsnet's own netstack so interop tests don't check
our code with our code.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "IPv4Packet",
    "IcmpEcho",
    "UdpDatagram",
    "checksum",
    "icmp_echo",
    "ipv4",
    "parse_icmp_echo",
    "parse_ipv4",
    "parse_udp",
    "udp",
]

PROTO_ICMP = 1
PROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum (ones' complement of the ones' complement sum)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _addr(a: str | ipaddress.IPv4Address) -> bytes:
    return ipaddress.IPv4Address(a).packed


def ipv4(src: str | ipaddress.IPv4Address, dst: str | ipaddress.IPv4Address, proto: int, payload: bytes, *, ttl: int = 64, ident: int = 0) -> bytes:
    """An IPv4 packet with a 20-byte header, DF set and a correct header checksum."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0, _addr(src), _addr(dst))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def icmp_echo(src: str, dst: str, ident: int, seq: int, data: bytes = b"", *, reply: bool = False) -> bytes:
    """An IPv4 ICMP echo request (or reply) packet."""
    kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(src, dst, PROTO_ICMP, body)


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """An IPv4 UDP packet with the pseudo-header checksum."""
    length = 8 + len(data)
    pseudo = _addr(src) + _addr(dst) + struct.pack("!BBH", 0, PROTO_UDP, length)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    csum = checksum(pseudo + seg) or 0xFFFF
    return ipv4(src, dst, PROTO_UDP, seg[:6] + struct.pack("!H", csum) + seg[8:])


@dataclass(frozen=True, slots=True)
class IPv4Packet:
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    proto: int
    ttl: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    is_reply: bool
    ident: int
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    sport: int
    dport: int
    data: bytes


def parse_ipv4(packet: bytes) -> IPv4Packet:
    """Parse and validate an IPv4 packet; trailing bytes beyond total length (WireGuard padding) are ignored."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise ValueError("not an IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total < ihl or total > len(packet):
        raise ValueError("bad IPv4 lengths")
    if checksum(packet[:ihl]) != 0:
        raise ValueError("bad IPv4 header checksum")
    return IPv4Packet(
        ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20]), packet[9], packet[8], bytes(packet[ihl:total])
    )


def parse_icmp_echo(payload: bytes) -> IcmpEcho:
    """Parse an ICMP echo request/reply (the IPv4 payload) and verify its checksum."""
    if len(payload) < 8:
        raise ValueError("short ICMP")
    if checksum(payload) != 0:
        raise ValueError("bad ICMP checksum")
    kind, code, _, ident, seq = struct.unpack_from("!BBHHH", payload)
    if kind not in (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST) or code != 0:
        raise ValueError(f"not an ICMP echo (type {kind} code {code})")
    return IcmpEcho(kind == ICMP_ECHO_REPLY, ident, seq, bytes(payload[8:]))


def parse_udp(ip: IPv4Packet) -> UdpDatagram:
    """Parse the UDP payload of ``ip`` and verify its checksum (0 means none, allowed in IPv4)."""
    seg = ip.payload
    if len(seg) < 8:
        raise ValueError("short UDP")
    sport, dport, length, csum = struct.unpack_from("!HHHH", seg)
    if length < 8 or length > len(seg):
        raise ValueError("bad UDP length")
    if csum:
        pseudo = ip.src.packed + ip.dst.packed + struct.pack("!BBH", 0, PROTO_UDP, length)
        if checksum(pseudo + seg[:length]) != 0:
            raise ValueError("bad UDP checksum")
    return UdpDatagram(sport, dport, bytes(seg[8:length]))
