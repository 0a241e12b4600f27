"""Loss recovery: RTO with backoff and Karn's rule, SACK (RFC 6675) and NewReno (RFC 6582)."""

from __future__ import annotations

import errno
import os

import pytest

from tests.netstack.tcp_helpers import Pair, Pump
from tsnet.netstack.tcp import TCPOptions, TCPState
from tsnet.netstack.tcp_wire import SYN, Segment

S = TCPState


def drop_data_indices(lost: set[int]):
    """Drop the A->B data segments whose payload starts at these data offsets (first copy only)."""
    dropped: set[int] = set()

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload):
            off = (seg.seq - 1001) & 0xFFFFFFFF
            if off in lost and off not in dropped:
                dropped.add(off)
                return []
        return [0.0]

    fault.dropped = dropped  # type: ignore[attr-defined]
    return fault


@pytest.mark.parametrize("sack", [True, False])
def test_single_loss_recovers_without_rto(sack: bool) -> None:
    mss = 1240 - 12
    fault = drop_data_indices({mss * 30})
    opts = TCPOptions(sack=sack)
    p = Pair(a_options=opts, b_options=opts, fault=fault)
    data = os.urandom(400_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert fault.dropped == {mss * 30}
    assert p.a.stats.timeouts == 0
    assert p.a.stats.fast_retransmits == 1
    assert p.a.stats.retransmits == 1
    assert p.a.sack_ok is sack
    # The receiver reported the hole with SACK blocks (or plain dup ACKs without SACK).
    acks = p.segments("ba")
    assert any(s.sack_blocks for s in acks) is sack
    assert p.a.internal_errors == p.b.internal_errors == 0


def test_sack_recovers_several_losses_in_one_window_without_rto() -> None:
    mss = 1240 - 12
    lost = {mss * k for k in (40, 43, 47, 52)}
    fault = drop_data_indices(lost)
    p = Pair(fault=fault)
    data = os.urandom(600_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert fault.dropped == lost
    assert p.a.stats.timeouts == 0 and p.a.stats.fast_retransmits == 1
    assert p.a.stats.retransmits == len(lost)


def test_newreno_partial_acks_recover_several_losses() -> None:
    mss = 1240
    lost = {mss * k for k in (40, 44)}
    fault = drop_data_indices(lost)
    opts = TCPOptions(sack=False, timestamps=False)
    p = Pair(a_options=opts, b_options=opts, fault=fault)
    data = os.urandom(400_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == data
    assert p.a.stats.timeouts == 0 and p.a.stats.fast_retransmits == 1
    assert p.a.stats.retransmits == 2


def test_recovery_reduces_cwnd() -> None:
    mss = 1240 - 12
    fault = drop_data_indices({mss * 60})
    p = Pair(fault=fault, a_options=TCPOptions(congestion="reno"))
    data = os.urandom(300_000)
    pump = Pump("a", data)
    cwnds: list[int] = []

    def app(pair: Pair) -> None:
        pump(pair)
        cwnds.append(pair.a.stats.cwnd)

    assert p.run(lambda: pump.finished(p), duration=30, app=app)
    peak = max(cwnds[: cwnds.index(max(cwnds)) + 1])
    assert p.a.stats.ssthresh < peak
    assert p.a.stats.ssthresh >= 2 * mss


def test_tail_loss_needs_rto_and_backs_off_with_karn() -> None:
    """Lose the only segment (twice): RTO fires, doubles, and no RTT sample comes from
    the retransmission (Karn), so SRTT stays what the handshake measured. (RACK-TLP
    off: with it a tail loss probe repairs the first loss; see test_tcp_rack.py.)"""
    copies = {"n": 0}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload):
            copies["n"] += 1
            if copies["n"] <= 2:
                return []
        return [0.0]

    opts = TCPOptions(timestamps=False, rack=False)
    p = Pair(a_options=opts, b_options=opts, fault=fault)
    p.handshake()
    srtt = p.a.stats.srtt
    assert srtt == pytest.approx(0.02)
    rto0 = p.a.stats.rto
    assert rto0 == pytest.approx(0.2)  # clamped to min_rto
    t_send = p.now
    p.a.send(b"x" * 100, p.now)
    assert p.run(lambda: p.b.readable == 100, duration=10)
    assert p.a.stats.timeouts == 2
    # Delivered by the third copy, sent after RTO + 2*RTO.
    assert p.now - t_send == pytest.approx(rto0 + 2 * rto0 + 0.01, abs=0.002)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max, duration=5)
    assert p.a.stats.srtt == pytest.approx(srtt)  # Karn: no sample from the retransmission
    assert p.a.stats.rto == pytest.approx(4 * rto0)  # back-off kept until a clean sample
    p.a.send(b"y" * 100, p.now)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max, duration=5)
    assert p.a.stats.rto == pytest.approx(0.2)


def test_timestamps_allow_rtt_samples_from_retransmissions() -> None:
    copies = {"n": 0}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload):
            copies["n"] += 1
            if copies["n"] == 1:
                return []
        return [0.0]

    p = Pair(fault=fault, a_options=TCPOptions(rack=False))  # RTO path (a TLP would repair it first)
    p.handshake()
    p.a.send(b"x" * 100, p.now)
    assert p.run(lambda: p.a.snd_una == p.a.snd_max, duration=10)
    assert p.a.stats.timeouts == 1
    # The echoed timestamp is that of the retransmission, so the sample is the real RTT.
    assert p.a.stats.rto == pytest.approx(0.2)


def test_syn_retries_then_timeout() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        return [] if seg.flags & SYN else [0.0]

    p = Pair(a_options=TCPOptions(syn_retries=3), fault=fault)
    t0 = p.now
    assert p.run(lambda: p.a.state == S.CLOSED, duration=100)
    syns = sum(1 for _ in range(p.sent_count["ab"]))
    assert syns == 4  # first SYN + 3 retries
    assert p.now - t0 == pytest.approx(1 + 2 + 4 + 8)
    assert isinstance(p.a.error, TimeoutError) and p.a.error.errno == errno.ETIMEDOUT


def test_syn_retransmission_after_loss_connects() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        return [] if direction == "ab" and idx == 0 else [0.0]

    p = Pair(fault=fault)
    p.handshake()
    assert p.now - 1000.0 == pytest.approx(1.0 + 0.03, abs=0.001)  # SYN, SYN-ACK, ACK
    assert p.a.stats.timeouts == 1


def test_synack_loss_is_retransmitted_by_the_server() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        return [] if direction == "ba" and idx == 0 else [0.0]

    p = Pair(fault=fault)
    p.handshake()
    assert p.a.stats.timeouts + p.b.stats.timeouts >= 1
    assert p.a.internal_errors == p.b.internal_errors == 0


def test_data_retries_give_up_with_timeout_error() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        return [] if direction == "ab" and len(seg.payload) else [0.0]

    p = Pair(a_options=TCPOptions(data_retries=4), fault=fault)
    p.handshake()
    p.a.send(b"lost" * 100, p.now)
    assert p.run(lambda: p.a.state == S.CLOSED, duration=100)
    assert isinstance(p.a.error, TimeoutError) and p.a.error.errno == errno.ETIMEDOUT
    assert p.a.stats.timeouts == 5


def test_user_timeout_gives_up() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        return [] if direction == "ab" and len(seg.payload) else [0.0]

    p = Pair(a_options=TCPOptions(user_timeout=3.0), fault=fault)
    p.handshake()
    t0 = p.now
    p.a.send(b"lost", p.now)
    assert p.run(lambda: p.a.state == S.CLOSED, duration=100)
    assert isinstance(p.a.error, TimeoutError)
    assert p.now - t0 == pytest.approx(3.0, abs=0.01)


def test_rto_go_back_n_recovers_burst_loss() -> None:
    """Lose a whole flight: RTO, slow start again, everything arrives. (RACK-TLP off:
    with it the probe's SACK starts a fast recovery instead, see test_tcp_rack.py.)"""
    state = {"dropping": True, "count": 0}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if direction == "ab" and len(seg.payload) and state["dropping"]:
            state["count"] += 1
            if state["count"] >= 10:
                state["dropping"] = False
            return []
        return [0.0]

    p = Pair(fault=fault, a_options=TCPOptions(rack=False))
    data = os.urandom(200_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    assert p.a.stats.timeouts >= 1


def test_duplicates_and_reordering_deliver_exact_bytes() -> None:
    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        if idx % 7 == 3:
            return [0.0, 0.0]
        if idx % 11 == 5:
            return [0.004]
        return [0.0]

    p = Pair(fault=fault)
    data = os.urandom(300_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert bytes(pump.received) == data
    assert p.a.internal_errors == p.b.internal_errors == 0


def test_limited_transmit_sends_new_data_on_first_dup_acks() -> None:
    mss = 1240 - 12
    fault = drop_data_indices({0})
    p = Pair(fault=fault)
    p.handshake()
    p.a.send(b"d" * (20 * mss), p.now)
    assert p.run(lambda: p.b.readable == 20 * mss, duration=10)
    sent = [((s.seq - 1001) & 0xFFFFFFFF) // mss for s in p.segments("ab") if len(s.payload)]
    # Delivered order: 1..9 (0 was lost), then 10 and 11 from limited transmit, then 0 again.
    assert sent.index(0) > sent.index(10) and sent.index(0) > sent.index(11)
    assert p.a.stats.timeouts == 0 and p.a.stats.fast_retransmits == 1


def test_duplicate_segment_is_reported_with_dsack() -> None:
    from tests.netstack.tcp_helpers import parse_packet, segment
    from tsnet.netstack.tcp_wire import ACK

    p = Pair()
    p.handshake()
    base = p.b.rcv_nxt
    p.b.receive_segment(segment(p.a_port, p.b_port, base, p.b.snd_nxt, ACK, payload=b"a" * 1000), p.now)
    p.b_out.clear()
    p.b.receive_segment(segment(p.a_port, p.b_port, base, p.b.snd_nxt, ACK, payload=b"a" * 1000), p.now)
    _, ack = parse_packet(p.b_out[-1])
    assert ack.ack == (base + 1000) & 0xFFFFFFFF and ack.sack_blocks == [(base, base + 1000)]
    # Reported once only.
    p.b.receive_segment(segment(p.a_port, p.b_port, base + 1000, p.b.snd_nxt, ACK, payload=b"b" * 100), p.now)
    p.advance(0.1)
    assert all(not s.sack_blocks for s in p.segments("ba")[-1:])
