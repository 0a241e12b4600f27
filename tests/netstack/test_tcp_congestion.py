"""Congestion control: HyStart++ (RFC 9406), controllers, lost retransmissions, RTO."""

from __future__ import annotations

import os

import pytest

from tests.netstack.tcp_helpers import Pair, Pump
from tsnet.netstack.congestion import Cubic, HyStartPP, Reno, make_controller
from tsnet.netstack.tcp_wire import Segment

MSS = 1228


def _round(hs: HyStartPP, start: int, n: int, rtt: float) -> int:
    """One round of ``n`` ACKs with RTT ``rtt``; returns the next round's start."""
    end = start + n * MSS
    for k in range(n):
        hs.on_ack(start + (k + 1) * MSS, end + n * MSS, rtt)
    return end + n * MSS


def test_hystart_enters_css_on_rtt_rise_then_exits_after_five_rounds() -> None:
    hs = HyStartPP()
    seq = _round(hs, 0, 10, 0.020)
    seq = _round(hs, seq, 10, 0.020)
    assert hs.growth_divisor == 1
    seq = _round(hs, seq, 10, 0.030)  # +10 ms > max(4 ms, min(20/8 ms, 16 ms))
    assert hs.growth_divisor == 4 and hs.css_baseline == pytest.approx(0.030)
    for _ in range(5):
        assert not hs.exit_to_ca
        seq = _round(hs, seq, 10, 0.031)
    assert hs.exit_to_ca


def test_hystart_small_rtt_rise_is_ignored_and_css_can_be_left() -> None:
    hs = HyStartPP()
    seq = _round(hs, 0, 10, 0.100)
    seq = _round(hs, seq, 10, 0.103)  # below the 12.5 ms threshold for a 100 ms RTT
    assert hs.growth_divisor == 1
    seq = _round(hs, seq, 10, 0.120)
    assert hs.growth_divisor == 4
    seq = _round(hs, seq, 10, 0.090)  # RTT fell below the baseline: spurious, back to slow start
    seq = _round(hs, seq, 10, 0.090)
    assert hs.growth_divisor == 1 and not hs.exit_to_ca


def test_hystart_needs_enough_samples() -> None:
    hs = HyStartPP()
    seq = _round(hs, 0, 10, 0.020)
    seq = _round(hs, seq, 5, 0.050)  # fewer than 8 samples in the round
    assert hs.growth_divisor == 1


@pytest.mark.parametrize("cls", [Reno, Cubic])
def test_css_slows_slow_start_growth(cls) -> None:
    cc = cls(MSS)
    w0 = cc.cwnd
    cc.on_ack(2 * MSS, 0.0, 0.02)
    normal = cc.cwnd - w0
    cc.hystart.css_baseline = 0.03
    w1 = cc.cwnd
    cc.on_ack(2 * MSS, 0.0, 0.02)
    assert cc.cwnd - w1 == pytest.approx(normal / 4, abs=2)


def test_make_controller_without_hystart() -> None:
    assert make_controller("cubic", MSS, hystart=False).hystart is None
    with pytest.raises(ValueError):
        make_controller("vegas", MSS)


def test_hystart_leaves_slow_start_on_a_queue_before_any_loss() -> None:
    """A 100 Mbit/s bottleneck with an unbounded queue: plain slow start would keep
    doubling until the receive window; HyStart++ sees the queueing delay and stops."""
    data = os.urandom(8_000_000)
    results = {}
    for hystart in (True, False):
        p = Pair(rate=12.5e6, delay=0.010)
        pump = Pump("a", data)

        def app(pair: Pair, hystart: bool = hystart) -> None:
            pump(pair)
            if not hystart:
                pair.a._cc.hystart = None

        assert p.run(lambda: pump.finished(p), duration=60, app=app)
        assert bytes(pump.received) == data
        assert p.a.stats.retransmits == 0
        results[hystart] = (p.a.stats.ssthresh, p.a.stats.cwnd)
    ssthresh, cwnd = results[True]
    assert ssthresh < 4 * 1024 * 1024  # slow start ended by HyStart++, not by a loss
    assert results[False][0] > 1 << 30  # without it, still in slow start at the end
    assert cwnd < results[False][1] / 2


def test_lost_retransmission_is_detected_without_rto() -> None:
    target = MSS * 60
    copies = {"n": 0}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload) and ((seg.seq - 1001) & 0xFFFFFFFF) == target:
            copies["n"] += 1
            if copies["n"] <= 2:
                return []  # the original and the first retransmission are lost
        return [0.0]

    p = Pair(fault=fault)
    data = os.urandom(600_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert copies["n"] == 3
    assert p.a.stats.timeouts == 0 and p.a.stats.lost_retransmits == 1


def test_rto_during_recovery_does_not_reduce_ssthresh_twice() -> None:
    """Fast recovery starts, then the path dies until the RTO: the timeout does not cut
    ssthresh a second time for the same loss episode (Linux behaves the same)."""
    target = MSS * 40
    holder: dict = {}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        p = holder["p"]
        if direction == "ab" and len(seg.payload) and ((seg.seq - 1001) & 0xFFFFFFFF) == target \
                and p.a.stats.fast_retransmits == 0:
            return []
        if p.a.stats.fast_retransmits and not p.a.stats.timeouts:
            holder.setdefault("ss_recovery", p.a._cc.ssthresh)
            return []  # blackout from recovery start until the RTO
        return [0.0]

    p = Pair(fault=fault)
    holder["p"] = p
    data = os.urandom(400_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    assert p.a.stats.timeouts == 1 and p.a.stats.fast_retransmits >= 1
    ss_after_rto = holder["ss_recovery"]
    assert p.a._cc.ssthresh >= ss_after_rto * 0.99 or p.a.stats.fast_retransmits > 1


@pytest.mark.parametrize("queue", [200_000, 500_000])
def test_slow_start_overshoot_into_a_drop_tail_queue_recovers_without_rto(queue: int) -> None:
    """Hundreds of segments lost in one window, retransmissions lost again: SACK
    recovery with lost-retransmission detection repairs it all without a timeout."""
    data = os.urandom(6_000_000)
    p = Pair(rate=12.5e6, queue_limit=queue, delay=0.010)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    assert p.queue_drops > 100
    assert p.a.stats.timeouts == 0
    assert p.a.stats.lost_retransmits >= 1 or p.a.stats.retransmits == p.queue_drops
    assert p.a.stats.retransmits < 2 * p.queue_drops
