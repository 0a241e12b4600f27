"""Edge cases: sequence wraparound, SYN-RECEIVED rules, TIME-WAIT reuse, path MTU."""

from __future__ import annotations

import os

import pytest

from tests.netstack.tcp_helpers import Pair, Pump, parse_packet, segment
from tsnet.netstack.tcp import TCPConnection, TCPOptions, TCPState
from tsnet.netstack.tcp_wire import ACK, RST, SYN, Segment, syn_options

S = TCPState


@pytest.mark.parametrize("sack", [True, False])
def test_sequence_numbers_wrap_around(sack: bool) -> None:
    lost = {"done": False}

    def fault(direction: str, seg: Segment, idx: int) -> list[float]:
        # Lose the segment that straddles the 2**32 boundary once.
        if direction == "ab" and len(seg.payload) and not lost["done"] and seg.seq > 0xFFFF0000 \
                and (seg.seq + len(seg.payload)) > 0xFFFFFFFF:
            lost["done"] = True
            return []
        return [0.0]

    opts = TCPOptions(sack=sack)
    p = Pair(a_iss=0xFFFFFFFF - 50_000, b_iss=0xFFFFFFF0, a_options=opts, b_options=opts, fault=fault)
    data = os.urandom(200_000)
    back = os.urandom(20_000)
    ab, ba = Pump("a", data), Pump("b", back)

    def app(pair: Pair) -> None:
        ab(pair)
        ba(pair)

    assert p.run(lambda: ab.finished(p) and ba.finished(p), duration=30, app=app)
    assert bytes(ab.received) == data and bytes(ba.received) == back
    assert lost["done"] and p.a.stats.timeouts == 0
    assert p.a.internal_errors == p.b.internal_errors == 0


def _passive(options: TCPOptions = TCPOptions()) -> tuple[TCPConnection, list]:
    out: list = []
    syn = segment(40000, 80, 7000, 0, SYN, 65535, options=syn_options(1240, 7, True, (5, 0)))
    c = TCPConnection.passive(bytes([10, 0, 0, 2]), 80, bytes([10, 0, 0, 1]), 40000, syn, iss=300, now=0.0,
                              outbox=out, changed=[], options=options)
    return c, out


def test_passive_open_answers_syn_ack_with_negotiated_options() -> None:
    c, out = _passive()
    assert c.state == S.SYN_RECEIVED and len(out) == 1
    _, synack = parse_packet(out[0])
    assert synack.flags == SYN | ACK and synack.seq == 300 and synack.ack == 7001
    assert synack.mss == 1240 and synack.wscale == 7 and synack.sack_permitted and synack.has_ts
    assert synack.tsecr == 5
    # Without timestamps in the SYN, the SYN-ACK has none either.
    out2: list = []
    syn = segment(40000, 80, 7000, 0, SYN, 65535, options=syn_options(1000, None, False, None))
    c2 = TCPConnection.passive(bytes(4), 80, bytes([1, 1, 1, 1]), 40000, syn, iss=1, now=0.0, outbox=out2,
                               changed=[])
    _, sa2 = parse_packet(out2[0])
    assert sa2.wscale is None and not sa2.has_ts and not sa2.sack_permitted and sa2.mss == 1240
    assert c2.send_mss == 1000


def test_syn_received_repeats_syn_ack_for_retransmitted_syn() -> None:
    c, out = _passive()
    c.receive_segment(segment(40000, 80, 7000, 0, SYN, 65535, options=syn_options(1240, 7, True, (6, 0))), 0.5)
    assert c.state == S.SYN_RECEIVED and len(out) == 2
    _, again = parse_packet(out[1])
    assert again.flags == SYN | ACK and again.seq == 300


def test_syn_received_bad_ack_gets_rst() -> None:
    c, out = _passive()
    c.receive_segment(segment(40000, 80, 7001, 999, ACK, options=b""), 0.1)
    assert c.state == S.SYN_RECEIVED
    _, rst = parse_packet(out[-1])
    assert rst.flags == RST and rst.seq == 999


def test_syn_received_rst_closes() -> None:
    c, out = _passive()
    c.receive_segment(segment(40000, 80, 7001, 0, RST), 0.1)
    assert c.state == S.CLOSED and isinstance(c.error, ConnectionResetError)


def test_syn_received_synack_retransmission_timeout() -> None:
    c, out = _passive(TCPOptions(syn_retries=2))
    now = 0.0
    while c.state != S.CLOSED:
        now = c.get_timer()
        c.handle_timer(now)
    assert now == pytest.approx(1 + 2 + 4)
    assert len(out) == 3 and isinstance(c.error, TimeoutError)


def test_time_wait_reopen_check() -> None:
    p = Pair()
    p.handshake()
    p.a.close(p.now)
    p.run(lambda: p.b.state == S.CLOSE_WAIT, duration=5)
    p.b.close(p.now)
    assert p.run(lambda: p.a.state == S.TIME_WAIT, duration=5)
    newer = segment(p.b_port, p.a_port, p.a.rcv_nxt + 100_000, 0, SYN,
                    options=syn_options(1240, 7, True, ((p.a._ts_recent + 1000) & 0xFFFFFFFF, 0)))
    older = segment(p.b_port, p.a_port, p.a.rcv_nxt - 100, 0, SYN,
                    options=syn_options(1240, 7, True, ((p.a._ts_recent - 1000) & 0xFFFFFFFF, 0)))
    assert p.a.time_wait_reopen_ok(newer)
    assert not p.a.time_wait_reopen_ok(older)
    # A SYN in TIME-WAIT never resets the connection by itself.
    p.a.receive_segment(newer, p.now)
    assert p.a.state == S.TIME_WAIT


def test_path_mtu_lowers_segment_size() -> None:
    p = Pair()
    p.handshake()
    p.a.set_path_mtu(1000, p.now)
    assert p.a.send_mss == 1000 - 20 - 20 - 12
    data = os.urandom(50_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=10, app=pump)
    assert max(len(s.payload) for s in p.segments("ab")) == 1000 - 20 - 20 - 12
    assert bytes(pump.received) == data


def test_close_in_syn_received_sends_fin_after_handshake() -> None:
    p = Pair()
    p.run(lambda: p.b is not None, duration=1)
    p.b.send(b"bye", p.now)
    p.b.close(p.now)
    assert p.b.state == S.SYN_RECEIVED
    assert p.run(lambda: p.a.state == S.CLOSE_WAIT, duration=5)
    assert p.a.receive(10, p.now) == b"bye" and p.a.at_eof


def test_stats_track_estimates() -> None:
    p = Pair(delay=0.05)
    data = os.urandom(100_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert p.a.stats.srtt == pytest.approx(0.1, abs=0.01)
    assert p.a.stats.cwnd > 10 * p.a.send_mss
    assert p.a.stats.segments_sent > 0 and p.b.stats.segments_received > 0
    assert p.a.stats.bytes_sent == len(data)
