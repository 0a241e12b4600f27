"""Disco codec: byte-exact layouts from the protocol notes, round trips, and malformed input."""

from __future__ import annotations

import ipaddress

import nacl.public
import pytest
from hypothesis import given, settings, strategies as st

from tsnet.key import DiscoPrivate, DiscoPublic, NodePublic
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock import disco as d

TX = bytes(range(1, 13))
NK = NodePublic(bytes(range(32, 64)))
K1 = DiscoPublic(b"\x11" * 32)
K2 = DiscoPublic(b"\x22" * 32)
K3 = DiscoPublic(b"\x33" * 32)
V4 = AddrPort.parse("1.2.3.4:41641")
V6 = AddrPort.parse("[2001:db8::1]:443")
V4_WIRE = bytes(10) + b"\xff\xff" + bytes([1, 2, 3, 4]) + bytes([0xA2, 0xA9])  # 41641
V6_WIRE = ipaddress.IPv6Address("2001:db8::1").packed + b"\x01\xbb"


def test_magic_bytes():
    assert d.MAGIC == bytes.fromhex("5453f09f92ac")


def test_ping_layout_with_key_and_padding():
    assert d.Ping(TX, NK).to_bytes() == b"\x01\x00" + TX + NK.raw
    assert d.Ping(TX, NK, padding=5).to_bytes() == b"\x01\x00" + TX + NK.raw + bytes(5)
    assert d.Ping(TX).to_bytes() == b"\x01\x00" + TX
    # A zero node key is written as absent.
    assert d.Ping(TX, NodePublic.zero()).to_bytes() == b"\x01\x00" + TX


def test_ping_parse_rules():
    assert d.parse_message(b"\x01\x00" + TX) == d.Ping(TX, None, 0)
    # fewer than 32 bytes after the TxID: all padding, no key
    assert d.parse_message(b"\x01\x00" + TX + bytes(31)) == d.Ping(TX, None, 31)
    assert d.parse_message(b"\x01\x00" + TX + NK.raw + bytes(100)) == d.Ping(TX, NK, 100)
    # version is not checked
    assert d.parse_message(b"\x01\x07" + TX + NK.raw) == d.Ping(TX, NK, 0)
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x01\x00" + TX[:11])


def test_pong_layout():
    assert d.Pong(TX, V4).to_bytes() == b"\x02\x00" + TX + V4_WIRE
    assert d.Pong(TX, V6).to_bytes() == b"\x02\x00" + TX + V6_WIRE
    assert len(d.Pong(TX, V4).to_bytes()) == 2 + 30
    assert d.parse_message(b"\x02\x00" + TX + V4_WIRE + b"extra") == d.Pong(TX, V4)
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x02\x00" + TX + V4_WIRE[:-1])


def test_call_me_maybe_layout_and_lax_rules():
    msg = d.CallMeMaybe((V4, V6))
    assert msg.to_bytes() == b"\x03\x00" + V4_WIRE + V6_WIRE
    assert d.parse_message(msg.to_bytes()) == msg
    # ragged length, empty body or non-zero version: parses, but with an empty list
    assert d.parse_message(b"\x03\x00" + V4_WIRE + b"x") == d.CallMeMaybe(())
    assert d.parse_message(b"\x03\x00") == d.CallMeMaybe(())
    assert d.parse_message(b"\x03\x01" + V4_WIRE) == d.CallMeMaybe(())


@pytest.mark.parametrize(
    "cls,t",
    [
        (d.BindUDPRelayEndpoint, 4),
        (d.BindUDPRelayEndpointChallenge, 5),
        (d.BindUDPRelayEndpointAnswer, 6),
    ],
)
def test_bind_family_layout(cls, t):
    ch = bytes(range(100, 132))
    msg = cls(vni=0x00ABCDEF, generation=7, remote_key=K1, challenge=ch)
    raw = msg.to_bytes()
    assert raw == bytes([t, 0]) + bytes.fromhex("00abcdef") + bytes.fromhex("00000007") + K1.raw + ch
    assert len(raw) == 2 + 72
    assert d.parse_message(raw) == msg
    assert d.parse_message(bytes([t, 9]) + raw[2:] + b"trailing") == msg
    with pytest.raises(d.DiscoParseError):
        d.parse_message(raw[:-1])
    assert cls(1, 1, K1).challenge == bytes(32)


def _endpoint(n_addrs=2):
    return d.UDPRelayEndpoint(
        server_disco=K1,
        client_disco=(K2, K3),
        lamport_id=0x0102030405060708,
        vni=0x123456,
        bind_lifetime_ns=30 * 10**9,
        steady_state_lifetime_ns=300 * 10**9,
        addr_ports=(V4, V6)[:n_addrs],
    )


def _endpoint_wire():
    return (
        K1.raw + K2.raw + K3.raw
        + bytes.fromhex("0102030405060708")
        + bytes.fromhex("00123456")
        + (30 * 10**9).to_bytes(8, "big")
        + (300 * 10**9).to_bytes(8, "big")
        + V4_WIRE + V6_WIRE
    )


def test_call_me_maybe_via_layout():
    msg = d.CallMeMaybeVia(_endpoint())
    raw = msg.to_bytes()
    assert raw == b"\x07\x00" + _endpoint_wire()
    assert (30 * 10**9).to_bytes(8, "big") == bytes.fromhex("00000006fc23ac00")
    assert d.parse_message(raw) == msg
    assert msg.endpoint.bind_lifetime == 30.0 and msg.endpoint.steady_state_lifetime == 300.0
    # version != 0 -> empty message that nobody acts on
    assert d.parse_message(b"\x07\x01" + _endpoint_wire()) == d.IgnoredMessage(d.MessageType.CALL_ME_MAYBE_VIA, 1)
    # zero addr:ports, or a ragged tail -> error
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x07\x00" + _endpoint_wire()[:124])
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x07\x00" + _endpoint_wire() + b"\x00")


def test_allocate_request_layout():
    msg = d.AllocateUDPRelayEndpointRequest((K2, K3), 0xDEADBEEF)
    raw = msg.to_bytes()
    assert raw == b"\x08\x00" + K2.raw + K3.raw + bytes.fromhex("deadbeef")
    assert len(raw) == 2 + 68
    assert d.parse_message(raw) == msg
    assert isinstance(d.parse_message(b"\x08\x05" + raw[2:]), d.IgnoredMessage)
    with pytest.raises(d.DiscoParseError):
        d.parse_message(raw[:-1])


def test_allocate_response_layout():
    msg = d.AllocateUDPRelayEndpointResponse(9, _endpoint(1))
    raw = msg.to_bytes()
    assert raw == b"\x09\x00" + bytes.fromhex("00000009") + _endpoint_wire()[:124] + V4_WIRE
    assert len(raw) - 2 == 146
    assert d.parse_message(raw) == msg
    with pytest.raises(d.DiscoParseError):
        d.parse_message(raw[:-1])
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x09\x00\x00\x00")


def test_unknown_type_and_short_header():
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x0a\x00" + bytes(100))
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"\x01")
    with pytest.raises(d.DiscoParseError):
        d.parse_message(b"")


def test_outer_packet_layout_matches_pynacl_box():
    a, b = DiscoPrivate.generate(), DiscoPrivate.generate()
    boxes = d.DiscoBoxes(a)
    nonce = bytes(range(24))
    pt = d.Ping(TX, NK).to_bytes()
    pkt = boxes.seal(b.public, d.Ping(TX, NK), nonce=nonce)
    assert pkt[:6] == d.MAGIC
    assert pkt[6:38] == a.public.raw
    assert pkt[38:62] == nonce
    expected = nacl.public.Box(nacl.public.PrivateKey(a.raw), nacl.public.PublicKey(b.public.raw)).encrypt(pt, nonce)
    assert pkt[38:] == bytes(expected)
    assert len(pkt) == 124  # an unpadded ping on the wire
    # the receiver opens it with its own private key and the sender key from bytes 6..38
    sender, msg = d.DiscoBoxes(b).open_message(pkt)
    assert sender == a.public and msg == d.Ping(TX, NK)


def test_box_cache_reused_and_bounded():
    boxes = d.DiscoBoxes(DiscoPrivate.generate(), max_peers=2)
    peers = [DiscoPrivate.generate().public for _ in range(3)]
    b0 = boxes.box_for(peers[0])
    assert boxes.box_for(peers[0]) is b0
    boxes.box_for(peers[1])
    boxes.box_for(peers[2])
    assert boxes.box_for(peers[0]) is not b0  # evicted, recomputed


def test_open_rejects_tampering_wrong_key_and_junk():
    a, b, c = (DiscoPrivate.generate() for _ in range(3))
    pkt = bytearray(d.DiscoBoxes(a).seal(b.public, d.Pong(TX, V4)))
    with pytest.raises(d.DiscoOpenError):
        d.DiscoBoxes(c).open(bytes(pkt))
    pkt[-1] ^= 1
    with pytest.raises(d.DiscoOpenError):
        d.DiscoBoxes(b).open(bytes(pkt))
    with pytest.raises(d.DiscoParseError):
        d.DiscoBoxes(b).open(b"not disco at all" * 4)
    with pytest.raises(d.DiscoParseError):
        d.DiscoBoxes(b).open(bytes(pkt[:70]))


def test_looks_like_disco_and_sender_key():
    assert d.looks_like_disco(d.MAGIC + bytes(32))
    assert not d.looks_like_disco(d.MAGIC + bytes(31))
    assert not d.looks_like_disco(b"TS\xf0\x9f\x92\xad" + bytes(32))
    assert d.sender_key(d.MAGIC + K1.raw + bytes(40)) == K1


# --- property tests ----------------------------------------------------------

keys = st.binary(min_size=32, max_size=32).map(DiscoPublic)
addrs = st.one_of(
    st.builds(lambda ip, p: AddrPort(ipaddress.IPv4Address(ip), p), st.integers(0, 2**32 - 1), st.integers(0, 65535)),
    st.builds(
        lambda ip, p: AddrPort.of(ipaddress.IPv6Address(ip), p),
        st.integers(0, 2**128 - 1),
        st.integers(0, 65535),
    ),
)
tx_ids = st.binary(min_size=12, max_size=12)
u32 = st.integers(0, 2**32 - 1)
endpoints = st.builds(
    d.UDPRelayEndpoint,
    keys,
    st.tuples(keys, keys),
    st.integers(0, 2**64 - 1),
    u32,
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
    st.lists(addrs, min_size=1, max_size=5).map(tuple),
)
messages = st.one_of(
    st.builds(d.Ping, tx_ids, st.binary(min_size=32, max_size=32).filter(any).map(NodePublic), st.integers(0, 64)),
    # without a node key, 32+ padding bytes would read back as a key (same in tailscaled)
    st.builds(d.Ping, tx_ids, st.none(), st.integers(0, 31)),
    st.builds(d.Pong, tx_ids, addrs),
    st.builds(d.CallMeMaybe, st.lists(addrs, min_size=1, max_size=6).map(tuple)),
    st.builds(d.BindUDPRelayEndpoint, u32, u32, keys, st.binary(min_size=32, max_size=32)),
    st.builds(d.BindUDPRelayEndpointChallenge, u32, u32, keys, st.binary(min_size=32, max_size=32)),
    st.builds(d.BindUDPRelayEndpointAnswer, u32, u32, keys, st.binary(min_size=32, max_size=32)),
    st.builds(d.CallMeMaybeVia, endpoints),
    st.builds(d.AllocateUDPRelayEndpointRequest, st.tuples(keys, keys), u32),
    st.builds(d.AllocateUDPRelayEndpointResponse, u32, endpoints),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(msg):
    assert d.parse_message(msg.to_bytes()) == msg


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes_only_raises_parse_error(data):
    try:
        d.parse_message(data)
    except d.DiscoParseError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9), st.integers(0, 255), st.binary(max_size=250))
def test_parse_known_types_with_random_bodies(t, ver, body):
    try:
        d.parse_message(bytes([t, ver]) + body)
    except d.DiscoParseError:
        pass


_RECEIVER = DiscoPrivate.generate()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_open_arbitrary_bytes_only_raises_disco_error(tail):
    boxes = d.DiscoBoxes(_RECEIVER)
    for data in (tail, d.MAGIC + tail, d.MAGIC + bytes(32) + tail, d.MAGIC + K1.raw + tail):
        try:
            boxes.open_message(data)
        except d.DiscoError:
            pass


def test_retain_drops_departed_peers_boxes():
    boxes = d.DiscoBoxes(DiscoPrivate.generate())
    keep, gone = DiscoPrivate.generate().public, DiscoPrivate.generate().public
    kept_box = boxes.box_for(keep)
    gone_box = boxes.box_for(gone)
    boxes.retain([keep])
    assert boxes.box_for(keep) is kept_box
    assert boxes.box_for(gone) is not gone_box
