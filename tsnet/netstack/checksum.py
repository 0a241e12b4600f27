"""Internet checksum (RFC 1071) computed with big-integer arithmetic.

The one's-complement sum of 16-bit big-endian words is congruent to the
integer value of the byte string modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF),
so ``int.from_bytes(data) % 0xFFFF`` does the whole sum in C.  ``finish`` turns
a residue into the value to store; it never yields 0, which keeps UDP's
"0 means no checksum" rule satisfied for free.
"""

from __future__ import annotations

_from_bytes = int.from_bytes

# Reducing a packet-sized integer modulo 0xFFFF costs one hardware division per 30-bit digit.
# Folding first is cheaper: 2**(16k) == 1 (mod 0xFFFF), so x == (x >> 16k) + (x & (2**(16k) - 1)).
# Two folds take a 1280-byte packet from 341 digits to ~83 before the division loop.
FOLD_1 = 4960
FOLD_2 = 2480
MASK_1 = (1 << FOLD_1) - 1
MASK_2 = (1 << FOLD_2) - 1
#: Below this many bytes the folds do not pay for themselves.
FOLD_MIN_BYTES = 400


def residue(data: bytes | bytearray | memoryview) -> int:
    """``int.from_bytes(data, "big") % 0xFFFF``, computed faster for packet-sized data."""
    x = _from_bytes(data, "big")
    if len(data) >= FOLD_MIN_BYTES:
        x = (x >> FOLD_1) + (x & MASK_1)
        x = (x >> FOLD_2) + (x & MASK_2)
    return x % 0xFFFF


def partial(data: bytes | bytearray | memoryview) -> int:
    """Residue (mod 0xFFFF) of the one's-complement sum of ``data`` (odd lengths padded)."""
    r = residue(data)
    if len(data) & 1:
        # Padding with a zero byte multiplies by 256: do it on the small residue, not
        # by shifting (copying) the big integer.
        return (r << 8) % 0xFFFF
    return r


def finish(residue: int) -> int:
    """The 16-bit checksum field value for a residue (never 0)."""
    return 0xFFFF - (residue % 0xFFFF)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Checksum field value for ``data`` plus an already summed ``initial`` residue."""
    return finish(initial + partial(data))


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if ``data`` (which includes its checksum field) sums to zero."""
    return (initial + partial(data)) % 0xFFFF == 0


def pseudo_header_v4(src: bytes, dst: bytes, proto: int) -> int:
    """Residue of an IPv4 pseudo-header without its length field (add the L4 length later)."""
    return (_from_bytes(src, "big") + _from_bytes(dst, "big") + proto) % 0xFFFF


def pseudo_header_v6(src: bytes, dst: bytes, proto: int) -> int:
    """Residue of an IPv6 pseudo-header without its length field (add the L4 length later)."""
    return (_from_bytes(src, "big") + _from_bytes(dst, "big") + proto) % 0xFFFF
