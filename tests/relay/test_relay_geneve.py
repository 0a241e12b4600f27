from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tsnet.relay.geneve import (
    GeneveError,
    GeneveHeader,
    PROTOCOL_DISCO,
    PROTOCOL_WIREGUARD,
    encode_header,
    looks_like_geneve,
)


def test_layout():
    assert GeneveHeader(PROTOCOL_DISCO, 0x010203, control=True).to_bytes() == bytes.fromhex("00807a1101020300")
    assert encode_header(PROTOCOL_WIREGUARD, 5) == bytes.fromhex("00007a1200000500")
    assert encode_header(PROTOCOL_DISCO, 5, control=True) == bytes.fromhex("00807a1100000500")


def test_parse_is_lax_but_looks_like_is_strict():
    raw = bytes.fromhex("40bf7a12ffffff09")
    h = GeneveHeader.parse(raw)
    assert h == GeneveHeader(PROTOCOL_WIREGUARD, 0xFFFFFF, control=True, version=1)
    assert not looks_like_geneve(raw)
    assert looks_like_geneve(bytes.fromhex("00807a1100000100"))
    with pytest.raises(GeneveError):
        GeneveHeader.parse(raw[:7])


def test_vni_range():
    with pytest.raises(GeneveError):
        GeneveHeader(PROTOCOL_DISCO, 1 << 24)
    with pytest.raises(GeneveError):
        encode_header(PROTOCOL_DISCO, -1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, (1 << 24) - 1), st.booleans())
def test_round_trip(proto, vni, control):
    h = GeneveHeader(proto, vni, control)
    assert GeneveHeader.parse(h.to_bytes()) == h
    assert encode_header(proto, vni, control) == h.to_bytes()
