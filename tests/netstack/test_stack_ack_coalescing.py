"""Stack-level ACK coalescing: in-order data is ACKed once per received batch (bounded stretch)."""

from __future__ import annotations

from tests.netstack.netutil import A4, ACK, B4, SYN, parse, parse_tcp, tcp
from tsnet.netstack.stack import Stack
from tsnet.netstack.tcp import ACK_STRETCH_SEGMENTS, TCPConnection

MSS = b"\x02\x04\x04\xd8"  # MSS 1240
SEG = 1240


def established(coalesce: bool = True, verify_checksums: bool = True) -> tuple[Stack, int]:
    """A stack with one accepted-by-handshake connection from B4:5555 to A4:80; returns (stack, our ISS+1)."""
    s = Stack([A4], now=0.0, coalesce_acks=coalesce, verify_checksums=verify_checksums)
    s.tcp_listen(80)
    s.receive_packet(tcp(B4, A4, 5555, 80, 1000, 0, SYN, options=MSS), 0.0)
    (synack,) = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    una = (synack.seq + 1) & 0xFFFFFFFF
    s.receive_packet(tcp(B4, A4, 5555, 80, 1001, una, ACK), 0.0)
    assert not s.packets_to_send()
    return s, una


def data(una: int, first: int, count: int) -> list[bytes]:
    """``count`` full in-order segments starting at segment number ``first``."""
    return [tcp(B4, A4, 5555, 80, 1001 + i * SEG, una, ACK, bytes([i & 0xFF]) * SEG)
            for i in range(first, first + count)]


def acks(s: Stack) -> list[int]:
    out = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert all(seg.flags == ACK and not seg.data for seg in out)
    return [seg.ack - 1001 for seg in out]


def test_one_ack_per_batch() -> None:
    s, una = established()
    s.receive_packets(data(una, 0, 10), 0.0)
    assert acks(s) == [10 * SEG]
    s.receive_packets(data(una, 10, 3), 0.001)
    assert acks(s) == [13 * SEG]
    (conn,) = s.connections.values()
    assert conn.rcv_nxt - 1001 == 13 * SEG


def test_big_batch_is_acked_every_stretch_and_at_its_end() -> None:
    s, una = established()
    n = 2 * ACK_STRETCH_SEGMENTS + 5
    s.receive_packets(data(una, 0, n), 0.0)
    assert acks(s) == [ACK_STRETCH_SEGMENTS * SEG, 2 * ACK_STRETCH_SEGMENTS * SEG, n * SEG]


def test_without_coalescing_every_second_segment_is_acked() -> None:
    s, una = established(coalesce=False)
    s.receive_packets(data(una, 0, 10), 0.0)
    assert acks(s) == [2 * SEG, 4 * SEG, 6 * SEG, 8 * SEG, 10 * SEG]


def test_single_segment_waits_for_the_delayed_ack_timer() -> None:
    s, una = established()
    s.receive_packets(data(una, 0, 1), 0.0)
    assert acks(s) == []
    t = s.get_timer()
    assert t is not None and 0.0 < t <= 0.040
    s.handle_timer(t)
    assert acks(s) == [SEG]


def test_out_of_order_segment_is_still_acked_at_once() -> None:
    s, una = established()
    s.receive_packets(data(una, 0, 4) + data(una, 5, 1), 0.0)
    # The hole is reported immediately (duplicate ACK for the sender's fast retransmit).
    got = acks(s)
    assert got and got[-1] == 4 * SEG


# -- the IPv4/TCP fast path of Stack.receive_packets --------------------------------------------------------------


def test_fast_path_checks_both_checksums_and_odd_lengths() -> None:
    s, una = established()
    good = tcp(B4, A4, 5555, 80, 1001, una, ACK, b"abc")  # odd segment length
    bad_tcp = bytearray(tcp(B4, A4, 5555, 80, 1004, una, ACK, b"xyz"))
    bad_tcp[-1] ^= 0x01
    bad_ip = bytearray(tcp(B4, A4, 5555, 80, 1004, una, ACK, b"xyz"))
    bad_ip[10] ^= 0xFF  # IPv4 header checksum
    s.receive_packets([good, bytes(bad_tcp), bytes(bad_ip)], 0.0)
    assert s.counters.bad_checksum == 1 and s.counters.malformed == 1
    (conn,) = s.connections.values()
    assert conn.rcv_nxt - 1001 == 3
    # The same segment as a bytearray (general path) and as bytes (fast path) are equivalent.
    s.receive_packets([bytearray(tcp(B4, A4, 5555, 80, 1004, una, ACK, b"de")),
                       tcp(B4, A4, 5555, 80, 1006, una, ACK, b"f")], 0.0)
    assert conn.rcv_nxt - 1001 == 6
    assert conn.receive(100, 0.0) == b"abcdef"


def test_unverified_checksums_when_the_input_is_authenticated() -> None:
    """verify_checksums=False (packets decrypted by WireGuard): a bad TCP checksum is not looked at,
    while the IPv4 header checksum still is."""
    s, una = established(verify_checksums=False)
    bad_tcp = bytearray(tcp(B4, A4, 5555, 80, 1001, una, ACK, b"xyz"))
    bad_tcp[-4] ^= 0x01  # inside the payload: only the TCP checksum could tell
    bad_ip = bytearray(tcp(B4, A4, 5555, 80, 1004, una, ACK, b"uvw"))
    bad_ip[10] ^= 0xFF
    s.receive_packets([bytes(bad_tcp), bytes(bad_ip)], 0.0)
    assert s.counters.bad_checksum == 0 and s.counters.malformed == 1
    (conn,) = s.connections.values()
    assert conn.receive(100, 0.0) == bytes(bad_tcp[-3:])


def _ts(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01\x08\x0a" + tsval.to_bytes(4, "big") + tsecr.to_bytes(4, "big")


def test_timestamped_segments_take_the_stack_fast_path_with_the_same_outcome(monkeypatch) -> None:
    """Segments with the usual timestamp layout go straight to TCPConnection.receive_fast; in-order data,
    an out-of-order segment (general path: SACK) and the hole's repair all end up as the same bytes."""
    s = Stack([A4], now=0.0)
    s.tcp_listen(80)
    s.receive_packet(tcp(B4, A4, 5555, 80, 1000, 0, SYN, options=MSS + _ts(100, 0)), 0.0)
    (synack,) = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    una = (synack.seq + 1) & 0xFFFFFFFF
    s.receive_packet(tcp(B4, A4, 5555, 80, 1001, una, ACK, options=_ts(101, 0)), 0.0)
    (conn,) = s.connections.values()
    assert conn.ts_ok
    s.batch_segments = False  # this test is about the per-segment fast path
    calls = []
    fast = TCPConnection.receive_fast

    def spy(self, *args):  # type: ignore[no-untyped-def]
        calls.append(fast(self, *args))
        return calls[-1]

    monkeypatch.setattr(TCPConnection, "receive_fast", spy)
    seg = lambda i, tsval: tcp(B4, A4, 5555, 80, 1001 + i * SEG, una, ACK, bytes([65 + i]) * SEG,  # noqa: E731
                               options=_ts(tsval, 0))
    before = conn.stats.segments_received
    s.receive_packets([seg(0, 102), seg(1, 103), seg(3, 104)], 0.0)  # 2 is missing
    assert calls == [True, True, False]  # the out-of-order one needs the general rules
    acks = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert acks and acks[-1].ack == (1001 + 2 * SEG) & 0xFFFFFFFF  # the hole, at once
    s.receive_packets([seg(2, 105)], 0.0)
    assert conn.stats.segments_received == before + 4
    assert conn.receive(10 * SEG, 0.0) == b"".join(bytes([65 + i]) * SEG for i in range(4))
