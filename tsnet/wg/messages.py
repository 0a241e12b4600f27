"""Wire layouts of the four WireGuard message types (little-endian header integers)."""

from __future__ import annotations

import struct

__all__ = [
    "COOKIE_REPLY",
    "COOKIE_REPLY_SIZE",
    "INITIATION",
    "INITIATION_SIZE",
    "KEEPALIVE_SIZE",
    "MAC_SIZE",
    "NONCE",
    "RESPONSE",
    "RESPONSE_SIZE",
    "TRANSPORT_HEADER",
    "TRANSPORT_HEADER_SIZE",
    "TRANSPORT_PREFIX",
    "TYPE_COOKIE_REPLY",
    "TYPE_INITIATION",
    "TYPE_RESPONSE",
    "TYPE_TRANSPORT",
    "TAG_SIZE",
    "mac_offsets",
]

# The type is a little-endian u32 whose upper three bytes (the "reserved" bytes) must be zero.
TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_COOKIE_REPLY = 3
TYPE_TRANSPORT = 4

MAC_SIZE = 16
TAG_SIZE = 16

# type, sender index, ephemeral, encrypted static, encrypted timestamp, mac1, mac2
INITIATION = struct.Struct("<II32s48s28s16s16s")
INITIATION_SIZE = INITIATION.size  # 148

# type, sender index, receiver index, ephemeral, encrypted empty, mac1, mac2
RESPONSE = struct.Struct("<III32s16s16s16s")
RESPONSE_SIZE = RESPONSE.size  # 92

# type, receiver index, nonce, encrypted cookie
COOKIE_REPLY = struct.Struct("<II24s32s")
COOKIE_REPLY_SIZE = COOKIE_REPLY.size  # 64

# type, receiver index, counter; the ciphertext follows
TRANSPORT_HEADER = struct.Struct("<IIQ")
TRANSPORT_HEADER_SIZE = TRANSPORT_HEADER.size  # 16
# type and receiver index: the part of a transport header that is fixed per session
TRANSPORT_PREFIX = struct.Struct("<II")
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # 32, also the minimum type-4 size

# ChaCha20-Poly1305 nonce: 4 zero bytes then the 64-bit counter.
NONCE = struct.Struct("<4xQ")


def mac_offsets(size: int) -> tuple[int, int]:
    """Offsets of mac1 and mac2 in a handshake message of ``size`` bytes (both are the last 32 bytes)."""
    return size - 2 * MAC_SIZE, size - MAC_SIZE
