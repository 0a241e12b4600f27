"""Hypothesis: arbitrary and mutated datagrams never raise out of the receive path and are counted."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wg.wgutil import ipv4, make_pair
from tsnet.wg import PacketReceived, WireGuard
from tsnet.wg.messages import TYPE_TRANSPORT

A_ADDR = ("10.1.0.1", 51820)

# One established pair, reused: building sessions per example would dominate the run time.
_NET, _A, _B = make_pair()
_A.send_packet(_B.public_key, ipv4(b"setup"), _NET.clock.now)
_NET.pump()
_B.drain_events()


def _capture_valid() -> list[bytes]:
    """One valid message of each kind that the pair produced."""
    net, a, b = make_pair()
    net.drop = lambda src, dst, p: True
    b.set_under_load(True)
    a.send_packet(b.public_key, ipv4(b"x" * 30), net.clock.now)
    net.pump()
    init = net.log[-1][2]
    b.receive_datagram(init, A_ADDR, net.clock.now)  # -> cookie reply
    cookie = bytes(b.datagrams_to_send(net.clock.now)[0][0])
    b.set_under_load(False)
    b.receive_datagram(init, A_ADDR, net.clock.now)
    resp = bytes(b.datagrams_to_send(net.clock.now)[0][0])
    a.receive_datagram(resp, ("10.1.0.2", 51820), net.clock.now)
    data = [bytes(d) for d, _ in a.datagrams_to_send(net.clock.now)]
    return [init, cookie, resp, *data]


VALID = _capture_valid()


def _received_total(dev: WireGuard) -> int:
    c = dev.counters
    return (
        c.total_dropped()
        + c.data_received
        + c.keepalives_received
        + c.initiations_received
        + c.responses_received
        + c.cookie_replies_received
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    before = _received_total(_B)
    _B.receive_datagram(data, A_ADDR, _NET.clock.now)
    assert _B.counters.drop_internal_error == 0
    assert _received_total(_B) == before + 1  # every datagram is accounted for exactly once


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(VALID))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
    st.sampled_from(["flip", "truncate", "extend", "type4"]),
)
def test_mutated_valid_messages_never_raise(which: int, edits: list[tuple[int, int]], how: str) -> None:
    msg = bytearray(VALID[which])
    if how == "flip":
        for pos, x in edits:
            msg[pos % len(msg)] ^= x
    elif how == "truncate":
        del msg[edits[0][0] % len(msg) :]
    elif how == "extend":
        msg += bytes(x for _, x in edits)
    else:
        msg[0:4] = TYPE_TRANSPORT.to_bytes(4, "little")
    before = _received_total(_B)
    _B.receive_datagram(bytes(msg), A_ADDR, _NET.clock.now)
    assert _B.counters.drop_internal_error == 0
    assert _received_total(_B) == before + 1
    events = _B.drain_events()
    unchanged = how == "type4" and VALID[which][0] == TYPE_TRANSPORT
    if not unchanged:  # nothing forged is ever delivered
        assert not any(isinstance(e, PacketReceived) for e in events)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_batches_and_memoryviews_never_raise(datas: list[bytes]) -> None:
    _B.receive_datagrams([(memoryview(d), A_ADDR) for d in datas] + [(bytearray(d), A_ADDR) for d in datas],
                         _NET.clock.now)
    assert _B.counters.drop_internal_error == 0


def _sealed_pool(count: int) -> tuple[WireGuard, list[bytes], list[bytes]]:
    net, a, b = make_pair()
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    b.drain_events()
    pkts = [ipv4(b"n%d" % i) for i in range(count)]
    a.send_packets(b.public_key, pkts, net.clock.now)
    wire = [bytes(d) for d, _ in a.datagrams_to_send(net.clock.now)]
    return b, pkts, wire


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 149), max_size=300), st.booleans())
def test_any_order_with_duplicates_delivers_each_packet_once(order: list[int], batched: bool) -> None:
    b, pkts, wire = _sealed_pool(150)
    if batched:
        b.receive_datagrams([(wire[i], A_ADDR) for i in order], 1000.0)
    else:
        for i in order:
            b.receive_datagram(wire[i], A_ADDR, 1000.0)
    got = [e.packet for e in b.drain_events() if isinstance(e, PacketReceived)]
    expected_order = list(dict.fromkeys(order))  # first occurrence of each, in arrival order
    assert got == [pkts[i] for i in expected_order]
    assert b.counters.drop_replayed == len(order) - len(expected_order)
