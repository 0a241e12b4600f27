"""STUN binding requests and responses the way Tailscale and derper use them (sans-IO).

Requests carry ``SOFTWARE=tailnode`` and a FINGERPRINT; derper ignores any other
request, and so does :func:`handle_request` here, which makes our responder
byte-compatible with derper's.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "MAGIC_COOKIE",
    "StunError",
    "StunResponse",
    "build_request",
    "build_response",
    "handle_request",
    "is_stun",
    "parse_request",
    "parse_response",
]

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
_BINDING_REQUEST = b"\x00\x01"
_BINDING_SUCCESS = b"\x01\x01"
_ATTR_SOFTWARE = 0x8022
_ATTR_FINGERPRINT = 0x8028
_ATTR_XOR_MAPPED = 0x0020
_ATTR_XOR_MAPPED_ALT = 0x8020
_ATTR_MAPPED = 0x0001
_SOFTWARE = b"tailnode"
_FINGERPRINT_XOR = 0x5354554E
_HEADER_LEN = 20


class StunError(ValueError):
    """A STUN message we cannot use."""


@dataclass(frozen=True, slots=True)
class StunResponse:
    """A parsed binding success: the transaction ID and the address the server saw."""

    txid: bytes
    addr: tuple[str, int]


def _fingerprint(data: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(data) ^ _FINGERPRINT_XOR)


def build_request(txid: bytes | None = None) -> bytes:
    """The 40-byte binding request tailscaled sends (SOFTWARE then FINGERPRINT)."""
    if txid is None:
        txid = os.urandom(12)
    if len(txid) != 12:
        raise ValueError("STUN transaction ID must be 12 bytes")
    head = _BINDING_REQUEST + b"\x00\x14" + MAGIC_COOKIE + txid
    head += struct.pack(">HH", _ATTR_SOFTWARE, len(_SOFTWARE)) + _SOFTWARE
    return head + struct.pack(">HH", _ATTR_FINGERPRINT, 4) + _fingerprint(head)


def is_stun(packet: bytes) -> bool:
    """The cheap test magicsock uses: header-sized, top two bits clear, cookie in place."""
    return len(packet) >= _HEADER_LEN and packet[0] & 0xC0 == 0 and packet[4:8] == MAGIC_COOKIE


def _attrs(msg: bytes):
    """Yield ``(type, value, offset_of_attr)`` for each attribute inside the header length."""
    (length,) = struct.unpack_from(">H", msg, 2)
    end = _HEADER_LEN + length
    if end > len(msg):
        raise StunError("STUN message shorter than its header length")
    pos = _HEADER_LEN
    while pos + 4 <= end:
        atype, alen = struct.unpack_from(">HH", msg, pos)
        if pos + 4 + alen > end:
            raise StunError("STUN attribute runs past the message")
        yield atype, msg[pos + 4 : pos + 4 + alen], pos
        pos += 4 + ((alen + 3) & ~3)


def parse_request(packet: bytes) -> bytes:
    """Validate a Tailscale binding request as derper does; return its transaction ID."""
    if not is_stun(packet) or packet[:2] != _BINDING_REQUEST:
        raise StunError("not a STUN binding request")
    software = None
    last: tuple[int, bytes, int] | None = None
    for attr in _attrs(packet):
        if attr[0] == _ATTR_SOFTWARE:
            software = attr[1]
        last = attr
    if software != _SOFTWARE:
        raise StunError("STUN request without SOFTWARE=tailnode")
    if last is None or last[0] != _ATTR_FINGERPRINT or len(last[1]) != 4:
        raise StunError("STUN request without a trailing FINGERPRINT")
    if last[1] != _fingerprint(packet[: last[2]]):
        raise StunError("STUN request FINGERPRINT mismatch")
    return packet[8:20]


def build_response(txid: bytes, addr: tuple[str, int]) -> bytes:
    """A binding success with one XOR-MAPPED-ADDRESS, laid out as derper writes it."""
    ip = ipaddress.ip_address(addr[0])
    port = addr[1] ^ 0x2112
    if isinstance(ip, ipaddress.IPv4Address):
        family, key = 1, MAGIC_COOKIE
    else:
        family, key = 2, MAGIC_COOKIE + txid
    xaddr = bytes(a ^ b for a, b in zip(ip.packed, key, strict=True))
    attr = struct.pack(">HHBBH", _ATTR_XOR_MAPPED, 4 + len(xaddr), 0, family, port) + xaddr
    return _BINDING_SUCCESS + struct.pack(">H", len(attr)) + MAGIC_COOKIE + txid + attr


def handle_request(packet: bytes, addr: tuple[str, int]) -> bytes | None:
    """The whole STUN server: the response bytes for a valid request from ``addr``, else None."""
    try:
        txid = parse_request(packet)
    except StunError:
        return None
    return build_response(txid, (addr[0], addr[1]))


def _unxor(value: bytes, txid: bytes, xor: bool) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("address attribute too short")
    family, port = value[1], struct.unpack_from(">H", value, 2)[0]
    raw = value[4:]
    want = {1: 4, 2: 16}.get(family)
    if want is None or len(raw) != want:
        raise StunError(f"address attribute with family {family} and {len(raw)} address bytes")
    if xor:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, MAGIC_COOKIE + txid))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def parse_response(packet: bytes) -> StunResponse:
    """Parse a binding success; XOR-MAPPED-ADDRESS preferred, MAPPED-ADDRESS as fallback."""
    if not is_stun(packet) or packet[:2] != _BINDING_SUCCESS:
        raise StunError("not a STUN binding success response")
    txid = packet[8:20]
    mapped = None
    for atype, value, _ in _attrs(packet):
        if atype in (_ATTR_XOR_MAPPED, _ATTR_XOR_MAPPED_ALT):
            return StunResponse(txid, _unxor(value, txid, True))
        if atype == _ATTR_MAPPED and mapped is None:
            mapped = _unxor(value, txid, False)
    if mapped is None:
        raise StunError("STUN response carries no mapped address")
    return StunResponse(txid, mapped)
