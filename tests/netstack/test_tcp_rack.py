"""RACK-TLP (RFC 8985): tail loss probes, time-based loss marking, reordering window."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.netstack.tcp_helpers import Pair, Pump
from tsnet.netstack.tcp import TCPOptions
from tsnet.netstack.tcp_wire import SYN, Segment

MSS = 1240 - 12  # IPv4, MTU 1280, timestamps on


def _drop_tail(count: int, size: int):
    """Drop the first copy of the last ``count`` full data segments of a ``size``-byte
    transfer (A->B); remember when the first of them was sent."""
    last = (size - 1) // MSS
    offsets = {MSS * (last - k) for k in range(count)}
    state: dict = {"dropped": set(), "t0": None}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload):
            off = (seg.seq - 1001) & 0xFFFFFFFF
            if off in offsets and off not in state["dropped"]:
                state["dropped"].add(off)
                if state["t0"] is None:
                    state["t0"] = state["pair"].now
                return []
        return [0.0]

    return fault, state, offsets


@pytest.mark.parametrize("count", [1, 2, 3])
def test_tail_loss_recovered_by_probe_without_rto(count: int) -> None:
    size = 100 * MSS
    fault, state, offsets = _drop_tail(count, size)
    p = Pair(fault=fault)
    state["pair"] = p
    data = os.urandom(size)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p) and p.a.snd_una == p.a.snd_max, duration=30, app=pump)
    assert bytes(pump.received) == data
    assert state["dropped"] == offsets
    st = p.a.stats
    assert st.timeouts == 0
    assert st.tlp_probes == 1
    # RTT is 20 ms: probe after 2*SRTT (+2 ms), repair within about another RTT,
    # far below the 200 ms minimum RTO the old behaviour waited for.
    assert p.now - state["t0"] < 0.16
    assert st.retransmits <= count + 1  # the probe (if it resent the last one) plus the holes
    assert p.a.internal_errors == p.b.internal_errors == 0


@pytest.mark.parametrize("count", [1, 3])
def test_tail_loss_without_rack_waits_for_rto(count: int) -> None:
    """The contrast: with RACK-TLP off the same losses need the retransmission timer."""
    size = 100 * MSS
    fault, state, _ = _drop_tail(count, size)
    opts = TCPOptions(rack=False)
    p = Pair(fault=fault, a_options=opts, b_options=opts)
    state["pair"] = p
    pump = Pump("a", os.urandom(size))
    assert p.run(lambda: pump.finished(p) and p.a.snd_una == p.a.snd_max, duration=30, app=pump)
    assert p.a.stats.timeouts >= 1 and p.a.stats.tlp_probes == 0
    assert p.now - state["t0"] >= 0.2


def test_single_segment_tail_loss_probe_timing_and_window_reduction() -> None:
    """One small segment in flight, lost: the probe goes out 2*SRTT + the delayed-ACK
    allowance after it, repairs the loss, and counts as one congestion event."""
    sent: list[float] = []

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload):
            sent.append(p.now)
            if len(sent) == 1:
                return []
        return [0.0]

    p = Pair(fault=fault)
    p.handshake()
    srtt = p.a.stats.srtt
    ssthresh = p.a.stats.ssthresh
    p.a.send(b"x" * 100, p.now)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max, duration=5)
    assert p.b.receive(1000, p.now) == b"x" * 100
    assert len(sent) == 2
    assert sent[1] - sent[0] == pytest.approx(2 * srtt + p.a.options.delayed_ack, abs=0.003)
    assert p.a.stats.timeouts == 0 and p.a.stats.tlp_probes == 1 and p.a.stats.retransmits == 1
    assert p.a.stats.ssthresh < ssthresh  # the probe repaired a real loss: one reduction


def test_probe_of_delivered_segment_is_not_a_congestion_event() -> None:
    """The peer's ACK is slow (not lost data): the probe's copy is a duplicate, the ACK
    that ends the episode echoes the original's timestamp, so the window stays."""
    acks_delayed = {"n": 0, "armed": False}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ba" and acks_delayed["armed"] and acks_delayed["n"] == 0:
            acks_delayed["n"] += 1
            return [0.2]  # the first ACK for the data arrives late
        return [0.0]

    p = Pair(fault=fault)
    p.handshake()
    ssthresh = p.a.stats.ssthresh
    acks_delayed["armed"] = True
    p.a.send(b"y" * 100, p.now)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max and p.b.readable == 100, duration=5)
    assert p.a.stats.tlp_probes == 1 and p.a.stats.timeouts == 0
    assert p.a.stats.ssthresh == ssthresh


def test_whole_flight_lost_recovered_by_probe_and_rack() -> None:
    """The first 10 data segments all vanish: the probe (new data) is SACKed and RACK
    marks everything sent before it lost, no RTO."""
    count = {"n": 0}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload) and count["n"] < 10:
            count["n"] += 1
            return []
        return [0.0]

    p = Pair(fault=fault)
    data = os.urandom(200_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    st = p.a.stats
    assert st.timeouts == 0 and st.tlp_probes == 1 and st.fast_retransmits == 1 and st.rack_marks >= 1
    assert st.retransmits == 10


@pytest.mark.parametrize("target_seg", [60, 95])
def test_lost_retransmission_recovered_without_rto(target_seg: int) -> None:
    """A hole's first retransmission is lost as well. Segment 60: data sent after the
    retransmission gets SACKed, so RACK marks it lost after RACK.rtt + reo_wnd.
    Segment 95: the retransmission is the last thing sent (the whole transfer is
    already out), nothing later can be SACKed, and the once-per-recovery probe
    resends it. Neither waits for the RTO."""
    target = MSS * target_seg
    copies = {"n": 0}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload) and ((seg.seq - 1001) & 0xFFFFFFFF) == target:
            copies["n"] += 1
            if copies["n"] <= 2:
                return []
        return [0.0]

    p = Pair(fault=fault)
    data = os.urandom(200 * MSS)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert copies["n"] == 3
    st = p.a.stats
    assert st.timeouts == 0 and st.retransmits == 2
    if target_seg == 60:
        assert st.lost_retransmits == 1 and st.tlp_probes == 0
    else:
        assert st.tlp_probes == 1


def _reorder_every(n: int, extra: float):
    """Delay every n-th A->B data segment by ``extra`` seconds (first copy only)."""
    seen: set[int] = set()

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload):
            off = (seg.seq - 1001) & 0xFFFFFFFF
            if off % (n * MSS) == 0 and off and off not in seen:
                seen.add(off)
                return [extra]
        return [0.0]

    return fault


def test_reordering_adapts_window_and_stops_spurious_retransmits() -> None:
    """Every 20th segment arrives 8 ms late (behind several later ones). The first
    time may look like a loss; its D-SACK marks the path as reordering and widens the
    reordering window, so afterwards nothing is retransmitted needlessly."""
    size = 2_000 * MSS
    p = Pair(fault=_reorder_every(20, 0.008))
    data = os.urandom(size)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    st = p.a.stats
    assert st.reordering_seen
    assert st.timeouts == 0
    assert st.retransmits <= 2  # ~100 reordered segments

    # Without RACK the three-duplicate-ACK rule fires on every one of them.
    opts = TCPOptions(rack=False)
    q = Pair(fault=_reorder_every(20, 0.008), a_options=opts, b_options=opts)
    pump2 = Pump("a", data)
    assert q.run(lambda: pump2.finished(q), duration=60, app=pump2)
    assert bytes(pump2.received) == data
    assert q.a.stats.retransmits > 20


def test_rack_option_off_or_no_sack_disables_it() -> None:
    p = Pair(a_options=TCPOptions(rack=False))
    p.handshake()
    assert not p.a._rack and p.b._rack
    q = Pair(a_options=TCPOptions(sack=False))
    q.handshake()
    assert not q.a._rack and not q.b._rack


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.01, 0.03, 0.08]), st.sampled_from([0.0, 0.1]),
       st.integers(20_000, 150_000))
def test_random_loss_everywhere_delivers_exact_bytes(seed: int, loss: float, reorder: float, size: int) -> None:
    """Random loss (of originals, retransmissions and probes alike) plus reordering over
    the whole transfer in both directions: every byte arrives exactly once, in order."""
    rng = random.Random(seed)

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if seg.flags & SYN:
            return [0.0]
        r = rng.random()
        if r < loss:
            return []
        if r < loss + reorder * 0.3:
            return [rng.uniform(0.0, 0.012)]
        return [0.0]

    p = Pair(fault=fault)
    data = rng.randbytes(size)
    pump = Pump("a", data)
    back = Pump("b", data[: size // 4])

    def app(pair: Pair) -> None:
        pump(pair)
        back(pair)

    assert p.run(lambda: pump.finished(p) and back.finished(p), duration=600, app=app)
    assert bytes(pump.received) == data and bytes(back.received) == data[: size // 4]
    assert p.a.internal_errors == 0 and p.b.internal_errors == 0
