"""Runs of in-order segments (Stack.batch_segments) end exactly as the same segments one by one."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netstack.netutil import A4, ACK, B4, FIN, PSH, SYN, parse, parse_tcp, tcp
from tsnet.netstack.stack import Stack

MSS = b"\x02\x04\x04\xd8"  # 1240
WS = b"\x01\x03\x03\x07"  # window scale 7
SEG = 1228  # payload of a full segment with the timestamp option


def ts(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01\x08\x0a" + (tsval & 0xFFFFFFFF).to_bytes(4, "big") + (tsecr & 0xFFFFFFFF).to_bytes(4, "big")


def pair() -> tuple[list[Stack], int, int]:
    """Two identical stacks (same ISNs), each with one established, timestamped connection."""
    stacks = []
    for batch in (True, False):
        rnd = random.Random(7)
        s = Stack([A4], now=0.0, rng=lambda n, r=rnd: bytes(r.getrandbits(8) for _ in range(n)))
        s.batch_segments = batch
        s.tcp_listen(80)
        s.receive_packet(tcp(B4, A4, 5555, 80, 1000, 0, SYN, options=MSS + ts(100, 0) + WS), 0.0)
        (synack,) = [parse_tcp(parse(p)) for p in s.packets_to_send()]
        una = (synack.seq + 1) & 0xFFFFFFFF
        s.receive_packet(tcp(B4, A4, 5555, 80, 1001, una, ACK, options=ts(101, 0), window=512), 0.0)
        stacks.append(s)
    return stacks, una, 1001


def state(s: Stack) -> tuple:
    (conn,) = s.connections.values() or (None,)
    if conn is None:
        return ("closed",)
    return (conn.state, conn.rcv_nxt, conn.readable, conn.snd_una, conn.snd_wnd, conn.max_snd_wnd, conn._ts_recent,
            conn._unacked_segs, conn._delack_deadline, conn._rcv_rtt, conn.get_timer(), conn.stats.segments_received,
            conn.stats.bytes_received, conn.stats.dropped, conn._rcv_full, conn.snd_wl1, conn.snd_wl2)


segment = st.tuples(
    st.sampled_from(["next", "next", "next", "next", "gap", "old", "ack"]),  # where it goes
    st.integers(0, SEG),  # payload size
    st.sampled_from([ACK, ACK | PSH, ACK | PSH, ACK | FIN]),
    st.integers(-2, 3),  # tsval step (negative: PAWS)
    st.integers(0, 2),  # tsecr: 0 = none, 1 = same as before, 2 = newer
    st.integers(1, 600),  # window
    st.sampled_from([0, 0, 0, 700]),  # how far this segment's ACK moves (our data in flight)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(segment, min_size=1, max_size=40), st.integers(0, 3)), min_size=1, max_size=6))
def test_runs_match_one_by_one(batches) -> None:
    (batched, single), una, seq = pair()
    # Some data of ours in flight, so that incoming segments can acknowledge it.
    for s in (batched, single):
        (conn,) = s.connections.values()
        assert s.tcp_send(conn, bytes(4000), 0.0) == 4000 if hasattr(s, "tcp_send") else conn.send(bytes(4000), 0.0)
    assert batched.packets_to_send() == single.packets_to_send()
    acked, in_flight_end = una, una + 4000
    tsval, tsecr = 102, 0
    now = 0.0
    for segs, reads in batches:
        packets = []
        for where, size, flags, step, ecr, window, ack_step in segs:
            acked = min(acked + ack_step, in_flight_end)
            tsval += step
            tsecr = 0 if ecr == 0 else tsecr if ecr == 1 else tsecr + 5
            if where == "ack":
                size = 0
            s0 = seq + (3 * SEG if where == "gap" else -SEG if where == "old" else 0)
            data = bytes((s0 + i) & 0xFF for i in range(size))
            packets.append(tcp(B4, A4, 5555, 80, s0 & 0xFFFFFFFF, acked & 0xFFFFFFFF, flags, data, window=window,
                               options=ts(tsval, tsecr)))
            if where == "next":
                seq += size + (1 if flags & FIN else 0)
        now += 0.01
        for s in (batched, single):
            s.receive_packets(packets, now)
        assert batched.packets_to_send() == single.packets_to_send()
        assert state(batched) == state(single)
        for _ in range(reads):
            got = []
            for s in (batched, single):
                conns = list(s.connections.values())
                got.append(conns[0].receive(3000, now) if conns else b"")
            assert got[0] == got[1]
            assert batched.packets_to_send() == single.packets_to_send()


def test_a_bulk_batch_is_taken_as_runs_with_the_same_acks() -> None:
    (batched, single), una, seq = pair()
    packets = [tcp(B4, A4, 5555, 80, (seq + i * SEG) & 0xFFFFFFFF, una, ACK, bytes([i]) * SEG, window=512,
                   options=ts(200 + i, 50)) for i in range(100)]
    for s in (batched, single):
        s.receive_packets(packets, 1.0)
    acks_b, acks_s = batched.packets_to_send(), single.packets_to_send()
    assert acks_b == acks_s and len(acks_b) >= 3  # every 32 full segments, plus the batch's last
    (cb,), (cs,) = batched.connections.values(), single.connections.values()
    assert cb.receive(1 << 20, 1.0) == cs.receive(1 << 20, 1.0) == b"".join(bytes([i]) * SEG for i in range(100))
