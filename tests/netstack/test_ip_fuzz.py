"""Hypothesis: random bytes and mutated valid packets never make the Stack raise."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.netstack.netutil import A4, A6, ACK, B4, B6, SYN, echo_request, ipv4, ipv6, tcp, udp
from tsnet.netstack.stack import Stack

SEEDS = [
    echo_request(B4, A4, 1, 1, b"payload"),
    echo_request(B6, A6, 1, 1, b"payload"),
    udp(B4, A4, 1000, 53, b"query"),
    udp(B6, A6, 1000, 53, b"query"),
    udp(B4, A4, 1000, 9, b"closed port"),
    tcp(B4, A4, 40000, 80, 1, 0, SYN, options=b"\x02\x04\x05\xb4\x01\x03\x03\x07"),
    tcp(B6, A6, 40000, 81, 1, 5, ACK, b"data"),
    ipv4(B4, A4, 17, udp(B4, A4, 1, 53, b"x" * 40)[20:36], ident=7, frag=0x2000),
    ipv4(B4, A4, 17, udp(B4, A4, 1, 53, b"x" * 40)[36:], ident=7, frag=2),
    ipv6(B6, A6, 44, struct.pack("!BBHI", 17, 0, 1, 9) + udp(B6, A6, 1, 53, b"y" * 40)[40:56]),
    ipv6(B6, A6, 0, struct.pack("!BB6x", 17, 0) + udp(B6, A6, 1, 53, b"z")[40:]),
    ipv4(B4, A4, 1, struct.pack("!BBHI", 3, 3, 0, 0) + udp(A4, B4, 53, 1000, b"q")[:28]),
]


def fresh() -> Stack:
    s = Stack([A4, A6], now=0.0)
    s.udp_bind(port=53)
    s.tcp_listen(80)
    return s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_bytes_never_raise(packets: list[bytes]) -> None:
    s = fresh()
    s.receive_packets(packets, 1.0)
    assert s.counters.internal_errors == 0
    s.packets_to_send()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    pkt = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        if op == 0 and pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] = draw(st.integers(0, 255))
        elif op == 1 and pkt:
            del pkt[draw(st.integers(0, len(pkt) - 1)):]
        elif op == 2:
            pkt += draw(st.binary(max_size=16))
        elif pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(pkt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=1, max_size=10), st.floats(0, 100))
def test_mutated_packets_never_raise(packets: list[bytes], now: float) -> None:
    s = fresh()
    s.receive_packets(SEEDS + packets, now)
    s.handle_timer(now + 60)
    assert s.counters.internal_errors == 0
