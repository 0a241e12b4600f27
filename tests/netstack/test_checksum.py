"""The big-integer Internet checksum (RFC 1071) against a plain word-by-word reference."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tsnet.netstack import checksum


def reference_sum(data: bytes) -> int:
    """One's-complement sum of 16-bit big-endian words, odd length padded with a zero byte."""
    if len(data) & 1:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=9000))
def test_residue_and_partial_match_the_word_sum(data: bytes) -> None:
    assert checksum.residue(data) == int.from_bytes(data, "big") % 0xFFFF
    # The residue and the folded 16-bit sum agree modulo 0xFFFF (0 and 0xFFFF are the same value).
    assert checksum.partial(data) % 0xFFFF == reference_sum(data) % 0xFFFF


@given(st.binary(min_size=2, max_size=3000))
def test_a_filled_in_checksum_verifies(data: bytes) -> None:
    body = bytearray(data[:2] + b"\x00\x00" + data[2:])
    ck = checksum.checksum(body)
    body[2:4] = ck.to_bytes(2, "big")
    assert ck != 0 and checksum.verify(body)
    body[-1] ^= 0x01
    assert not checksum.verify(body)


def test_fold_boundaries() -> None:
    for n in (checksum.FOLD_MIN_BYTES - 1, checksum.FOLD_MIN_BYTES, 620, 621, 1240, 1280, 1500, 65535):
        data = bytes((i * 7 + 3) & 0xFF for i in range(n))
        assert checksum.residue(data) == int.from_bytes(data, "big") % 0xFFFF
        assert checksum.residue(b"\xff" * n) == int.from_bytes(b"\xff" * n, "big") % 0xFFFF
