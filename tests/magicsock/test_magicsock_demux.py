"""Datagram classification in tailscaled's order."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from tsnet.key import DiscoPrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.demux import PacketKind, classify, is_stun_binding, looks_like_wireguard
from tsnet.relay.geneve import PROTOCOL_DISCO, PROTOCOL_WIREGUARD, encode_header

DISCO_PKT = d.DiscoBoxes(DiscoPrivate.generate()).seal(DiscoPrivate.generate().public, d.Ping(bytes(12)))
STUN_REQ = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
STUN_RESP = b"\x01\x01\x00\x0c\x21\x12\xa4\x42" + bytes(12) + bytes(12)
WG_INIT = b"\x01\x00\x00\x00" + bytes(144)
WG_DATA = b"\x04\x00\x00\x00" + bytes(28)


def test_stun_binding():
    assert classify(STUN_REQ).kind is PacketKind.STUN_BINDING
    assert classify(STUN_RESP).kind is PacketKind.STUN_BINDING
    assert is_stun_binding(STUN_RESP)
    # not binding method (byte 1 != 1), too short, or top bits set -> not STUN
    assert not is_stun_binding(b"\x01\x02" + STUN_RESP[2:])
    assert not is_stun_binding(STUN_RESP[:19])
    assert not is_stun_binding(b"\xc1" + STUN_RESP[1:])


def test_naked_disco():
    c = classify(DISCO_PKT)
    assert c.kind is PacketKind.DISCO and bytes(c.payload) == DISCO_PKT
    assert classify(d.MAGIC + bytes(32)).kind is PacketKind.DISCO
    # 37 bytes is too short to be disco and is not WireGuard either
    assert classify(d.MAGIC + bytes(31)).kind is PacketKind.UNKNOWN


def test_naked_wireguard_types_and_reserved_bytes():
    for t in (1, 2, 3, 4):
        assert classify(bytes([t, 0, 0, 0]) + bytes(40)).kind is PacketKind.WIREGUARD
    assert classify(WG_INIT).kind is PacketKind.WIREGUARD
    assert not looks_like_wireguard(b"\x05\x00\x00\x00" + bytes(40))
    assert not looks_like_wireguard(b"\x00\x00\x00\x00" + bytes(40))
    assert not looks_like_wireguard(b"\x01\x00\x01\x00" + bytes(40))
    assert classify(b"\x01\x00\x00\x01" + bytes(40)).kind is PacketKind.UNKNOWN
    assert classify(b"").kind is PacketKind.UNKNOWN


def test_geneve_disco_with_control_bit():
    pkt = encode_header(PROTOCOL_DISCO, 0xABCDEF, control=True) + DISCO_PKT
    c = classify(pkt)
    assert c.kind is PacketKind.GENEVE_DISCO
    assert c.vni == 0xABCDEF and c.control
    assert bytes(c.payload) == DISCO_PKT
    c = classify(encode_header(PROTOCOL_DISCO, 7) + DISCO_PKT)
    assert c.kind is PacketKind.GENEVE_DISCO and not c.control and c.vni == 7


def test_geneve_wireguard_strips_header():
    c = classify(encode_header(PROTOCOL_WIREGUARD, 42) + WG_DATA)
    assert c.kind is PacketKind.GENEVE_WIREGUARD and c.vni == 42
    assert bytes(c.payload) == WG_DATA


def test_geneve_disco_protocol_without_disco_falls_back_to_naked_wireguard():
    # tailscaled hands it to WireGuard, which cannot accept a leading zero type byte
    c = classify(encode_header(PROTOCOL_DISCO, 1) + b"junk" * 20)
    assert c.kind is PacketKind.UNKNOWN


def test_malformed_geneve_is_not_geneve():
    good = encode_header(PROTOCOL_WIREGUARD, 1) + WG_DATA
    for i, val in ((0, 0x40), (1, 0x01), (7, 0x01)):
        bad = bytearray(good)
        bad[i] |= val
        assert classify(bytes(bad)).kind is PacketKind.UNKNOWN
    # unknown Geneve protocol falls through to the naked checks
    assert classify(encode_header(0x6558, 1) + WG_DATA).kind is PacketKind.UNKNOWN


def test_disco_magic_never_mistaken_for_geneve():
    # byte 1 of the magic is 'S' (0x53): reserved bits set, so not Geneve
    assert classify(DISCO_PKT).kind is PacketKind.DISCO


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_classify_never_raises(data):
    c = classify(data)
    assert isinstance(c.kind, PacketKind)
