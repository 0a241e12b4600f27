"""Flow control and timers: zero window + persist, autotuning, backpressure, delayed
ACKs, keepalive, SACK blocks, timestamps/PAWS, Nagle."""

from __future__ import annotations

import errno
import os

import pytest

from tests.netstack.tcp_helpers import Pair, Pump, segment
from tsnet.netstack import tcp_wire
from tsnet.netstack.tcp import TCPOptions, TCPState
from tsnet.netstack.tcp_wire import ACK, Segment

S = TCPState


def test_zero_window_probe_then_reopen() -> None:
    small = TCPOptions(recv_buffer=16 * 1024, recv_buffer_max=16 * 1024)
    p = Pair(b_options=small)
    p.handshake()
    data = os.urandom(100_000)
    pump = Pump("a", data, read=False, shutdown=False)
    p.run(lambda: False, duration=2.0, app=pump)
    assert p.b.readable == 16 * 1024  # the buffer is full and no more was accepted
    assert p.a.snd_wnd == 0
    probes_before = sum(1 for s in p.segments("ab") if len(s.payload) == 1)
    # Persist timer probes with backoff while the window stays closed.
    p.run(lambda: False, duration=30.0, app=pump)
    probes = [d for d in p.trace if d.direction == "ab" and len(d.seg.payload) == 1]
    assert len(probes) - probes_before >= 3
    gaps = [b.time - a.time for a, b in zip(probes, probes[1:])]
    assert gaps[-1] > gaps[0]  # backed off
    assert p.b.readable == 16 * 1024 and p.a.state == S.ESTABLISHED
    # The application drains: a window update reopens the flow.
    pump.read = True
    assert p.run(lambda: len(pump.received) == len(data), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert p.a.error is None and p.a.internal_errors == 0 and p.b.internal_errors == 0


def test_zero_window_probes_answered_never_give_up() -> None:
    small = TCPOptions(recv_buffer=8 * 1024, recv_buffer_max=8 * 1024)
    p = Pair(a_options=TCPOptions(data_retries=3), b_options=small)
    p.handshake()
    pump = Pump("a", os.urandom(50_000), read=False, shutdown=False)
    p.run(lambda: False, duration=300.0, app=pump)
    assert p.a.state == S.ESTABLISHED and p.a.error is None


def test_send_buffer_backpressure() -> None:
    opts = TCPOptions(send_buffer=10_000)
    p = Pair(a_options=opts)
    p.handshake()
    assert p.a.send_space == 10_000
    assert p.a.send(b"x" * 25_000, p.now) == 10_000
    assert p.a.send_space == 0 and p.a.send(b"y", p.now) == 0
    p.a_changed.clear()
    p.a.app_changed = False
    assert p.run(lambda: p.a.send_space > 0, duration=5)
    assert p.a in p.a_changed  # the driver is told space grew
    assert p.run(lambda: p.a.send_space == 10_000, duration=5)


def test_receive_autotuning_grows_window() -> None:
    p = Pair(delay=0.025)
    data = os.urandom(6_000_000)
    pump = Pump("a", data)
    start = p.b.recv_buffer_size if p.b else 128 * 1024
    windows: list[int] = []

    def app(pair: Pair) -> None:
        pump(pair)
        if pair.b is not None and pair.b.state == S.ESTABLISHED:
            windows.append(pair.a.snd_wnd)

    assert p.run(lambda: pump.finished(p), duration=60, app=app)
    assert bytes(pump.received) == data
    assert p.b.recv_buffer_size > 4 * start
    assert p.b.recv_buffer_size <= 4 * 1024 * 1024
    assert max(windows) > 1024 * 1024
    assert p.b.internal_errors == 0


def test_out_of_order_data_stays_within_window() -> None:
    small = TCPOptions(recv_buffer=20_000, recv_buffer_max=20_000)
    p = Pair(b_options=small)
    p.handshake()
    base = p.b.rcv_nxt
    for k in range(1, 60):
        seg = segment(p.a_port, p.b_port, base + k * 1000, p.b.snd_nxt, ACK, payload=b"z" * 1000)
        p.b.receive_segment(seg, p.now)
    held = sum(b[1] - b[0] for b in p.b._ooo)
    assert held <= 20_000 and p.b.readable == 0
    assert p.b.rcv_adv - p.b.rcv_nxt <= 20_000


def test_delayed_ack_timing_and_every_second_segment() -> None:
    p = Pair()
    p.handshake()
    # One small segment: the ACK waits for the delayed-ACK timer (40 ms).
    t0 = p.now
    p.a.send(b"q", p.now)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max, duration=5)
    assert p.now - t0 == pytest.approx(0.010 + 0.040 + 0.010, abs=0.001)
    # Four full segments in one flight: ACKed every second one, at once.
    n_acks = len(p.segments("ba"))
    t1 = p.now
    p.a.send(b"x" * (4 * p.a.send_mss), p.now)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max, duration=5)
    assert len(p.segments("ba")) - n_acks == 2
    assert p.now - t1 == pytest.approx(0.020, abs=0.001)


def test_out_of_order_segment_is_acked_immediately_with_sack() -> None:
    p = Pair()
    p.handshake()
    p.b_out.clear()
    base = p.b.rcv_nxt
    p.b.receive_segment(segment(p.a_port, p.b_port, base + 2000, p.b.snd_nxt, ACK, payload=b"b" * 1000), p.now)
    assert len(p.b_out) == 1
    from tests.netstack.tcp_helpers import parse_packet

    _, ack = parse_packet(p.b_out[-1])
    assert ack.ack == base & 0xFFFFFFFF and ack.sack_blocks == [(base + 2000, base + 3000)]
    # A second island: it is reported first (most recent first).
    p.b.receive_segment(segment(p.a_port, p.b_port, base + 5000, p.b.snd_nxt, ACK, payload=b"c" * 500), p.now)
    _, ack = parse_packet(p.b_out[-1])
    assert ack.sack_blocks == [(base + 5000, base + 5500), (base + 2000, base + 3000)]
    # Filling the first hole: ACKed at once, cumulative ACK jumps, one block left.
    p.b.receive_segment(segment(p.a_port, p.b_port, base, p.b.snd_nxt, ACK, payload=b"a" * 2000), p.now)
    _, ack = parse_packet(p.b_out[-1])
    assert ack.ack == (base + 3000) & 0xFFFFFFFF and ack.sack_blocks == [(base + 5000, base + 5500)]
    assert p.b.receive(10_000, p.now) == b"a" * 2000 + b"b" * 1000


def test_keepalive_probes_and_timeout() -> None:
    ka = TCPOptions(keepalive_idle=10.0, keepalive_interval=2.0, keepalive_count=3)
    p = Pair(a_options=ka)
    p.handshake()
    # With a live peer, probes are answered and the connection stays up.
    p.run(lambda: False, duration=35.0)
    assert p.a.state == S.ESTABLISHED
    probes = [s for s in p.segments("ab") if not len(s.payload) and s.seq == (p.a.snd_nxt - 1) & 0xFFFFFFFF]
    assert len(probes) >= 3
    # The peer disappears: after 3 unanswered probes, ETIMEDOUT.
    p.fault = lambda d, s, i: [] if d == "ab" else [0.0]
    t0 = p.now
    assert p.run(lambda: p.a.state == S.CLOSED, duration=60.0)
    assert isinstance(p.a.error, TimeoutError) and p.a.error.errno == errno.ETIMEDOUT
    assert p.now - t0 <= 10.0 + 3 * 2.0 + 2.1


def test_keepalive_off_by_default() -> None:
    p = Pair()
    p.handshake()
    n = len(p.trace)
    p.run(lambda: False, duration=3600.0)
    assert len(p.trace) == n and p.a.get_timer() is None


def test_window_scaling_negotiated_or_not() -> None:
    p = Pair()
    p.handshake()
    assert p.a.rcv_wscale == 7 and p.b.snd_wscale == 7
    p2 = Pair(a_options=TCPOptions(window_scaling=False))
    p2.handshake()
    first = p2.segments("ab")[0]
    assert first.wscale is None
    assert p2.segments("ba")[0].wscale is None
    assert p2.a.snd_wscale == p2.a.rcv_wscale == p2.b.snd_wscale == p2.b.rcv_wscale == 0
    data = os.urandom(300_000)
    pump = Pump("a", data)
    assert p2.run(lambda: pump.finished(p2), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert all(s.window <= 0xFFFF for s in p2.segments("ba"))


def test_timestamps_on_every_segment_and_paws() -> None:
    p = Pair()
    data = os.urandom(50_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    for d in p.trace[1:]:
        if not d.seg.flags & tcp_wire.RST:
            assert d.seg.has_ts
    # An old timestamp (PAWS) is dropped even if otherwise acceptable.
    before = p.b.readable
    ts_old = (p.b._ts_recent - 1000) & 0xFFFFFFFF
    old = segment(p.a_port, p.b_port, p.b.rcv_nxt, p.b.snd_nxt, ACK, payload=b"old",
                  options=tcp_wire.ts_option(ts_old, 0))
    dropped = p.b.stats.dropped
    p.b.receive_segment(old, p.now)
    assert p.b.readable == before and p.b.stats.dropped == dropped + 1


def test_ts_offset_is_used() -> None:
    p = Pair(ts_offsets=(123456, 0))
    p.handshake()
    syn = p.segments("ab")[0]
    assert syn.tsval == (int(1000.0 * 1000) + 123456) & 0xFFFFFFFF


def test_nagle_holds_small_segments() -> None:
    p = Pair(a_options=TCPOptions(nagle=True))
    p.handshake()
    n0 = len([s for s in p.segments("ab") if len(s.payload)])
    p.a_out.clear()
    p.a.send(b"a", p.now)
    p.a.send(b"b", p.now)
    p.a.send(b"c", p.now)
    assert len(p.a_out) == 1  # only the first small segment goes out while unacked
    assert p.run(lambda: p.b.readable == 3, duration=5)
    data_segs = [s for s in p.segments("ab") if len(s.payload)]
    assert len(data_segs) - n0 == 2
    # Without Nagle each send goes out at once.
    q = Pair()
    q.handshake()
    q.a_out.clear()
    for ch in b"abc":
        q.a.send(bytes([ch]), q.now)
    assert len(q.a_out) == 3


def test_window_field_never_exceeds_buffer_and_swsa() -> None:
    small = TCPOptions(recv_buffer=30_000, recv_buffer_max=30_000)
    p = Pair(b_options=small)
    p.handshake()
    pump = Pump("a", os.urandom(200_000), read=False, shutdown=False)
    p.run(lambda: p.a.snd_wnd == 0, duration=5, app=pump)
    # Reading a few bytes does not reopen the window by a silly amount.
    p.b_out.clear()
    p.b.receive(100, p.now)
    assert not p.b_out
    # Reading a lot does (window update).
    p.b.receive(20_000, p.now)
    assert p.b_out


def _drop_acks(d: str, s: Segment, i: int) -> list[float]:
    return [] if d == "ba" else [0.0]


def test_ack_loss_is_covered_by_cumulative_acks() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        return [] if direction == "ba" and idx % 3 == 1 else [0.0]

    p = Pair(fault=fault)
    data = os.urandom(500_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data


def test_receive_buffer_smaller_than_a_segment_still_flows() -> None:
    tiny = TCPOptions(recv_buffer=1000, recv_buffer_max=1000)
    p = Pair(b_options=tiny)
    data = os.urandom(30_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    assert all(len(s.payload) <= 1000 for s in p.segments("ab"))
    # Window updates (not persist probes) carry the flow: no long stalls.
    assert p.now - 1000.0 < 5.0


def test_receiver_does_not_advertise_silly_windows() -> None:
    small = TCPOptions(recv_buffer=30_000, recv_buffer_max=30_000)
    p = Pair(b_options=small)
    p.handshake()
    pump = Pump("a", os.urandom(200_000), read=False, shutdown=False)
    p.run(lambda: p.a.snd_wnd == 0, duration=5, app=pump)
    # Reading a few bytes at a time: no ACK offers a window smaller than min(buf/2, MSS).
    n = len(p.segments("ba"))
    for _ in range(20):
        p.b.receive(50, p.now)
        p.run(lambda: False, duration=0.05, app=None)
    later = p.segments("ba")[n:]
    assert all(s.window == 0 or s.window << p.b.rcv_wscale >= min(15_000, p.b.send_mss) for s in later)


def test_coalesced_acks_per_batch() -> None:
    data = os.urandom(2_000_000)
    acks = {}
    for coalesce in (False, True):
        p = Pair(coalesce=coalesce)  # a flight sent at once arrives as one batch
        pump = Pump("a", data)
        assert p.run(lambda: pump.finished(p), duration=30, app=pump)
        assert bytes(pump.received) == data
        acks[coalesce] = len(p.segments("ba"))
        assert p.a.stats.retransmits == 0
    assert acks[True] < acks[False] / 3


def test_coalesced_acks_still_ack_out_of_order_at_once() -> None:
    p = Pair()
    p.handshake()
    p.b.coalesce_acks = True
    p.b_out.clear()
    base = p.b.rcv_nxt
    # In-order full segments: no ACK until flush_acks().
    for k in range(4):
        p.b.receive_segment(segment(p.a_port, p.b_port, base + 1228 * k, p.b.snd_nxt, ACK, payload=b"y" * 1228),
                            p.now)
    assert not p.b_out
    p.b.flush_acks(p.now)
    assert len(p.b_out) == 1
    # Out of order: ACKed at once (the sender needs these duplicate ACKs / SACKs).
    base += 4 * 1228
    p.b.receive_segment(segment(p.a_port, p.b_port, base + 5000, p.b.snd_nxt, ACK, payload=b"x" * 1000), p.now)
    assert len(p.b_out) == 2
    p.b.flush_acks(p.now)  # nothing in-order is waiting
    assert len(p.b_out) == 2


def test_autotuning_never_shrinks_below_the_configured_buffer() -> None:
    odd = TCPOptions(recv_buffer=200_000, recv_buffer_max=100_000)  # max below the initial size
    p = Pair(b_options=odd)
    data = os.urandom(1_000_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == data and p.b.recv_buffer_size == 200_000


def test_set_options_live_keepalive_and_nagle() -> None:
    p = Pair(a_options=TCPOptions(nagle=True))
    p.handshake()
    assert p.a.get_timer() is None
    p.a.set_options(TCPOptions(nagle=True, keepalive_idle=5.0, keepalive_interval=1.0, keepalive_count=2), p.now)
    assert p.a.get_timer() == pytest.approx(p.now + 5.0)
    # Nagle holds the second small write until the first is ACKed; turning it off sends it.
    p.a_out.clear()
    p.a.send(b"a", p.now)
    p.a.send(b"b", p.now)
    assert len(p.a_out) == 1
    p.a.set_options(TCPOptions(nagle=False), p.now)
    assert len(p.a_out) == 2
    assert p.a.get_timer() is not None  # the RTO for the data (keepalive now off)
    assert p.run(lambda: p.b.readable == 2, duration=5)
    assert p.run(lambda: p.a.get_timer() is None, duration=5)
