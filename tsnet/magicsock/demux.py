"""Classify a datagram received on the magicsock UDP socket.

Order and tests follow tailscaled 1.96.4 ``packetLooksLike``:

1. STUN binding (>= 20 bytes, top two bits of byte 0 clear, magic cookie
   ``21 12 A4 42`` at bytes 4..8, byte 1 == 0x01).
2. A well-formed Geneve header (see :func:`tsnet.relay.geneve.looks_like_geneve`)
   with protocol 0x7A11 and disco behind it -> Geneve disco; 0x7A11 without
   disco -> naked WireGuard (tailscaled's fallback); 0x7A12 -> Geneve WireGuard.
   Other protocol values fall through.
3. Naked disco: magic prefix and >= 38 bytes.
4. Everything else goes to WireGuard. tailscaled hands it over unchecked and
   wireguard-go drops junk; we classify junk up front as ``UNKNOWN`` so it can be
   counted: WireGuard messages are types 1-4 as a little-endian u32, so bytes
   1..3 must be zero.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from tsnet.magicsock.disco import looks_like_disco
from tsnet.relay.geneve import GENEVE_HEADER_LEN, PROTOCOL_DISCO, PROTOCOL_WIREGUARD, CONTROL_FLAG, looks_like_geneve

__all__ = ["PacketKind", "Classified", "classify", "is_stun_binding", "looks_like_wireguard", "STUN_MAGIC_COOKIE"]

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_HEADER_LEN = 20


class PacketKind(enum.Enum):
    STUN_BINDING = "stun"
    DISCO = "disco"
    WIREGUARD = "wireguard"
    GENEVE_DISCO = "geneve-disco"
    GENEVE_WIREGUARD = "geneve-wireguard"
    UNKNOWN = "unknown"


class Classified(NamedTuple):
    """What a datagram is. ``payload`` excludes the Geneve header when there was one;
    ``vni``/``control`` are only meaningful for the Geneve kinds.

    A NamedTuple rather than a frozen dataclass: one is built per received
    datagram, and tuple construction costs a fraction of a frozen dataclass's.
    """

    kind: PacketKind
    payload: memoryview
    vni: int | None = None
    control: bool = False


def is_stun_binding(data: bytes | memoryview) -> bool:
    """A STUN message of the binding method (tailscaled's ``stun.Is`` plus byte 1 == 1)."""
    return (
        len(data) >= STUN_HEADER_LEN
        and data[0] & 0xC0 == 0
        and data[1] == 0x01
        and data[4:8] == STUN_MAGIC_COOKIE
    )


def looks_like_wireguard(data: bytes | memoryview) -> bool:
    """Message type 1-4 in a little-endian u32 whose upper three bytes are zero."""
    return len(data) >= 4 and 1 <= data[0] <= 4 and data[1] == 0 and data[2] == 0 and data[3] == 0


def classify(data: bytes | memoryview) -> Classified:
    """Decide who handles ``data``. Never raises."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    # Fast path for the common case, naked WireGuard: bytes 1..3 zero rule out STUN
    # (byte 1 == 1), Geneve (protocol in bytes 2..3) and disco (magic) alike.
    if len(mv) >= 4 and 1 <= mv[0] <= 4 and mv[1] == 0 and mv[2] == 0 and mv[3] == 0:
        return Classified(PacketKind.WIREGUARD, mv)
    if is_stun_binding(mv):
        return Classified(PacketKind.STUN_BINDING, mv)
    if looks_like_geneve(mv):
        proto = (mv[2] << 8) | mv[3]
        if proto == PROTOCOL_DISCO:
            inner = mv[GENEVE_HEADER_LEN:]
            if looks_like_disco(inner):
                vni = (mv[4] << 16) | (mv[5] << 8) | mv[6]
                return Classified(PacketKind.GENEVE_DISCO, inner, vni, bool(mv[1] & CONTROL_FLAG))
            return _naked(mv)
        if proto == PROTOCOL_WIREGUARD:
            vni = (mv[4] << 16) | (mv[5] << 8) | mv[6]
            return Classified(PacketKind.GENEVE_WIREGUARD, mv[GENEVE_HEADER_LEN:], vni, bool(mv[1] & CONTROL_FLAG))
    if looks_like_disco(mv):
        return Classified(PacketKind.DISCO, mv)
    return _naked(mv)


def _naked(mv: memoryview) -> Classified:
    if looks_like_wireguard(mv):
        return Classified(PacketKind.WIREGUARD, mv)
    return Classified(PacketKind.UNKNOWN, mv)
