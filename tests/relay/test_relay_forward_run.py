"""RelayServer.forward_run (a whole UDP_GRO run at once) behaves exactly like receive_datagram per segment."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab.relay import bound_relay_pair
from tsnet.key import DiscoPrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.geneve import PROTOCOL_DISCO, PROTOCOL_WIREGUARD, encode_header
from tsnet.relay.server import RelayServer

RELAY = AddrPort.parse("192.0.2.1:7000")
A_ADDR = AddrPort.parse("198.51.100.1:41641")
B_ADDR = AddrPort.parse("[2001:db8::2]:5555")  # the other side on IPv6: family counters must match too
STRANGER = AddrPort.parse("192.0.2.99:1")
# A second endpoint, allocated but never bound (its data is dropped as "not_bound").
UNBOUND_KEYS = (DiscoPrivate.generate().public, DiscoPrivate.generate().public)
VNI, UNBOUND_VNI, UNKNOWN_VNI = 1, 2, 77
STUN = b"\x01\x01\x00\x00\x21\x12\xa4\x42"


def _server() -> RelayServer:
    srv, ep, _ha, _hb = bound_relay_pair(RELAY, A_ADDR, B_ADDR, 0.0)
    assert ep.vni == VNI
    assert srv.allocate(*UNBOUND_KEYS, 0.0).vni == UNBOUND_VNI
    return srv


def _state(srv: RelayServer) -> tuple:
    # Which side a client is depends on its (random) disco key: compare per bound address instead.
    sides = []
    for ep in srv._by_vni.values():
        sides.append((ep.vni, ep.state, sorted(
            zip(map(str, ep.bound), ep.packets_rx, ep.bytes_rx, ep.last_seen, ep.in_progress_generation))))
    return (srv.forwarded_packets, srv.forwarded_bytes, srv.dropped, srv.stun_packets, sides, srv.metrics_text())


def _per_datagram(srv: RelayServer, segments: list[bytes], src: AddrPort, now: float) -> list[tuple[bytes, AddrPort]]:
    out = []
    for seg in segments:
        res = srv.receive_datagram(seg, src, now)
        if res is not None:
            out.append((bytes(res[0]), res[1]))
    return out


def _by_run(srv: RelayServer, buffer, seg_size: int, src: AddrPort, now: float) -> list[tuple[bytes, AddrPort]]:
    out = []
    for buf, seg, dst in srv.forward_run(buffer, seg_size, src, now):
        assert seg >= 1
        raw = bytes(buf)
        out += [(raw[i:i + seg], dst) for i in range(0, max(len(raw), 1), seg)]
    return out


def _segment(kind: str, size: int, fill: bytes) -> bytes:
    body = {
        "data": encode_header(PROTOCOL_WIREGUARD, VNI),
        "data_lax": b"\x01\x00\x7a\x12\x00\x00\x01\x09",  # odd version/reserved bits: still forwarded (lax)
        "disco_data": encode_header(PROTOCOL_DISCO, VNI),  # not control: forwarded like any data
        "unbound": encode_header(PROTOCOL_WIREGUARD, UNBOUND_VNI),
        "unknown": encode_header(PROTOCOL_WIREGUARD, UNKNOWN_VNI),
        "control": encode_header(PROTOCOL_DISCO, VNI, control=True),
        "control_other": encode_header(0x1234, VNI, control=True),
        "stun": STUN,
    }[kind] + fill * (size // max(1, len(fill)) + 1)
    return body[:size]


KINDS = ["data", "data_lax", "disco_data", "unbound", "unknown", "control", "control_other", "stun"]


@st.composite
def runs(draw):
    seg = draw(st.sampled_from([1, 5, 8, 9, 16, 20, 40, 64, 300, 1288]) | st.integers(1, 400))
    count = draw(st.integers(1, 12))
    # Mostly data with the odd other segment, as real runs look; sometimes anything goes.
    kind = st.sampled_from(["data"] * 6 + KINDS) if draw(st.booleans()) else st.sampled_from(KINDS)
    fill = draw(st.binary(min_size=1, max_size=4))
    segments = [_segment(draw(kind), seg, fill) for _ in range(count - 1)]
    segments.append(_segment(draw(kind), draw(st.integers(0, seg)) if count > 1 else seg, fill))
    src = draw(st.sampled_from([A_ADDR, A_ADDR, B_ADDR, STRANGER]))
    wrap = draw(st.sampled_from([bytes, bytearray, memoryview]))
    return segments, seg, src, wrap


@settings(max_examples=150, deadline=None)
@given(runs())
def test_run_path_matches_per_datagram_path(run) -> None:
    segments, seg, src, wrap = run
    if len(segments) > 1 and not segments[-1]:
        segments = segments[:-1]  # an empty segment cannot end a run: it would not exist
    one, many = _server(), _server()
    expected = _per_datagram(one, segments, src, 5.0)
    got = _by_run(many, wrap(b"".join(segments)), seg, src, 5.0)
    assert got == expected
    assert _state(many) == _state(one)


def test_uniform_run_is_returned_whole_and_counted_once() -> None:
    srv = _server()
    segs = [encode_header(PROTOCOL_WIREGUARD, VNI) + bytes([i]) * 1280 for i in range(40)] + [
        encode_header(PROTOCOL_WIREGUARD, VNI) + b"short"]
    buffer = b"".join(segs)
    out = srv.forward_run(buffer, 1288, A_ADDR, 3.0)
    assert out == [(buffer, 1288, B_ADDR)] and out[0][0] is buffer  # no copy, no slicing
    assert srv.forwarded_packets == {("udp4", "udp6"): 41}
    assert srv.forwarded_bytes == {("udp4", "udp6"): len(buffer)}
    [s] = [s for s in srv.sessions() if s.vni == VNI]
    side = s.bound.index(A_ADDR)
    assert s.packets[side] == 41 and s.bytes[side] == len(buffer)
    # The way back: B -> A.
    assert srv.forward_run(buffer, 1288, B_ADDR, 3.0) == [(buffer, 1288, A_ADDR)]
    assert srv.forwarded_packets == {("udp4", "udp6"): 41, ("udp6", "udp4"): 41}


def test_foreign_segments_split_the_run_around_them() -> None:
    srv = _server()
    data = [encode_header(PROTOCOL_WIREGUARD, VNI) + bytes([i]) * 92 for i in range(6)]
    other = encode_header(PROTOCOL_WIREGUARD, UNKNOWN_VNI) + bytes(92)
    buffer = b"".join(data[:3] + [other] + data[3:])
    before = dict(srv.dropped)  # (the bind handshake dropped a few early pings)
    out = srv.forward_run(buffer, 100, A_ADDR, 1.0)
    assert [(bytes(b), s, dst) for b, s, dst in out] == [
        (b"".join(data[:3]), 100, B_ADDR), (b"".join(data[3:]), 100, B_ADDR)]
    assert all(isinstance(b, memoryview) for b, _, _ in out)  # slices of the buffer, not copies
    assert srv.dropped == {**before, "unknown_vni": 1}
    assert srv.forwarded_packets == {("udp4", "udp6"): 6}


def test_bind_inside_a_run_gets_its_challenge_in_order() -> None:
    srv, ep, ha, _hb = bound_relay_pair(RELAY, A_ADDR, B_ADDR, 0.0)
    other = next(k for k in ep.client_disco if k != ha.boxes.public_key)
    bind = encode_header(PROTOCOL_DISCO, ep.vni, control=True) + ha.boxes.seal(
        srv.disco_public, d.BindUDPRelayEndpoint(ep.vni, 9, other))
    size = len(bind)
    data = encode_header(PROTOCOL_WIREGUARD, ep.vni) + bytes(size - 8)
    out = srv.forward_run(data + bind + data, size, A_ADDR, 1.0)
    assert [(dst, seg) for _, seg, dst in out] == [(B_ADDR, size), (A_ADDR, len(out[1][0])), (B_ADDR, size)]
    sender, msg = ha.boxes.open_message(bytes(out[1][0])[8:])
    assert sender == srv.disco_public and isinstance(msg, d.BindUDPRelayEndpointChallenge) and msg.generation == 9


def test_single_datagrams_and_bad_segment_size() -> None:
    srv = _server()
    pkt = encode_header(PROTOCOL_WIREGUARD, VNI) + b"x" * 50
    before = dict(srv.dropped)
    assert srv.forward_run(pkt, 58, A_ADDR, 1.0) == [(pkt, 58, B_ADDR)]
    assert srv.forward_run(pkt, 1 << 16, A_ADDR, 1.0) == [(pkt, 58, B_ADDR)]
    assert srv.forward_run(b"", 1, A_ADDR, 1.0) == []
    assert srv.dropped == {**before, "short": 1}
    with pytest.raises(ValueError):
        srv.forward_run(pkt, 0, A_ADDR, 1.0)


def test_rebind_between_runs_moves_the_forwarding() -> None:
    # forward_run caches the bound sides; a rebind (Bind, Challenge, Answer from a new address) must reset that.
    srv, ep, ha, hb = bound_relay_pair(RELAY, A_ADDR, B_ADDR, 0.0)
    data = ha.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(28)) * 3
    seg = len(data) // 3
    assert srv.forward_run(data, seg, A_ADDR, 1.0) == [(data, seg, B_ADDR)]
    new_addr = AddrPort.parse("198.51.100.1:9999")
    other = next(k for k in ep.client_disco if k != ha.boxes.public_key)
    bind = encode_header(PROTOCOL_DISCO, ep.vni, control=True) + ha.boxes.seal(
        srv.disco_public, d.BindUDPRelayEndpoint(ep.vni, 42, other))
    [(challenge, _, to)] = srv.forward_run(bind, len(bind), new_addr, 2.0)
    assert to == new_addr
    _, ch = ha.boxes.open_message(bytes(challenge)[8:])
    answer = encode_header(PROTOCOL_DISCO, ep.vni, control=True) + ha.boxes.seal(
        srv.disco_public, d.BindUDPRelayEndpointAnswer(ep.vni, 42, other, ch.challenge))
    assert srv.forward_run(answer, len(answer), new_addr, 2.0) == []
    back = hb.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(28)) * 3
    assert srv.forward_run(back, seg, B_ADDR, 3.0) == [(back, seg, new_addr)]
    assert srv.forward_run(data, seg, new_addr, 3.0) == [(data, seg, B_ADDR)]
    before = srv.dropped.get("unknown_source", 0)
    assert srv.forward_run(data, seg, A_ADDR, 3.0) == []
    assert srv.dropped["unknown_source"] == before + 3
