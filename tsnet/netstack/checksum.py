"""Internet checksum (RFC 1071) computed with big-integer arithmetic.

The one's-complement sum of 16-bit big-endian words is congruent to the
integer value of the byte string modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF),
so ``int.from_bytes(data) % 0xFFFF`` does the whole sum in C.  ``finish`` turns
a residue into the value to store; it never yields 0, which keeps UDP's
"0 means no checksum" rule satisfied for free.
"""

from __future__ import annotations

_from_bytes = int.from_bytes


def partial(data: bytes | bytearray | memoryview) -> int:
    """Residue (mod 0xFFFF) of the one's-complement sum of ``data`` (odd lengths padded)."""
    r = _from_bytes(data, "big") % 0xFFFF
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
