"""TCPConnection basics: handshakes, data, half-close, close, TIME-WAIT, resets."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from tests.netstack.tcp_helpers import Pair, Pump, segment
from tsnet.netstack import tcp_wire
from tsnet.netstack.tcp import TCPConnection, TCPOptions, TCPState
from tsnet.netstack.tcp_wire import ACK, FIN, RST, SYN

S = TCPState


def _no_bugs(p: Pair) -> None:
    for c in p.conns():
        assert c.internal_errors == 0


def test_handshake_active_passive_negotiates_options() -> None:
    p = Pair()
    syn = p.segments("ab")
    p.handshake()
    first = p.segments("ab")[0]
    assert first.flags == SYN and first.mss == 1240 and first.sack_permitted and first.has_ts
    assert first.wscale == 7  # smallest shift that makes 4 MiB fit in 16 bits
    synack = p.segments("ba")[0]
    assert synack.flags == SYN | ACK and synack.ack == (1000 + 1) and synack.seq == 50000
    for c in (p.a, p.b):
        assert c.is_established and c.ts_ok and c.sack_ok
        assert c.snd_wscale == 7 and c.rcv_wscale == 7
        assert c.send_mss == 1240 - 12
    assert p.a in p.a_changed and p.b in p.b_changed
    assert syn is not None
    _no_bugs(p)


def test_handshake_ipv6_mss() -> None:
    p = Pair(v6=True)
    p.handshake()
    assert p.segments("ab")[0].mss == 1220
    assert p.a.send_mss == 1220 - 12


def test_options_off_negotiation() -> None:
    p = Pair(b_options=TCPOptions(window_scaling=False, sack=False, timestamps=False))
    p.handshake()
    synack = p.segments("ba")[0]
    assert synack.wscale is None and not synack.has_ts and not synack.sack_permitted
    for c in (p.a, p.b):
        assert not c.ts_ok and not c.sack_ok and c.snd_wscale == 0 and c.rcv_wscale == 0
        assert c.send_mss == 1240
    # Data segments carry no options then.
    p.a.send(b"x" * 5000, p.now)
    p.run(lambda: p.b.readable == 5000, duration=5)
    data = [s for s in p.segments("ab") if len(s.payload)]
    assert data and all(not s.has_ts for s in data)
    assert max(len(s.payload) for s in data) == 1240


def test_simultaneous_open() -> None:
    p = Pair(simultaneous=True)
    p.handshake()
    assert p.a.is_established and p.b.is_established
    p.a.send(b"hello", p.now)
    p.b.send(b"world", p.now)
    p.run(lambda: p.a.readable == 5 and p.b.readable == 5, duration=5)
    assert p.b.receive(10, p.now) == b"hello" and p.a.receive(10, p.now) == b"world"
    _no_bugs(p)


@pytest.mark.parametrize("v6", [False, True])
def test_bulk_transfer_sha256(v6: bool) -> None:
    p = Pair(v6=v6)
    data = os.urandom(1_500_000)
    pump = Pump("a", data)
    assert p.run(lambda: pump.finished(p), duration=60, app=pump)
    assert hashlib.sha256(pump.received).digest() == hashlib.sha256(data).digest()
    assert p.b.stats.bytes_received == len(data)
    assert p.a.stats.retransmits == 0
    _no_bugs(p)


def test_both_directions_at_once() -> None:
    p = Pair()
    d1, d2 = os.urandom(300_000), os.urandom(200_000)
    ab, ba = Pump("a", d1), Pump("b", d2)

    def app(pair: Pair) -> None:
        ab(pair)
        ba(pair)

    assert p.run(lambda: ab.finished(p) and ba.finished(p), duration=60, app=app)
    assert bytes(ab.received) == d1 and bytes(ba.received) == d2
    _no_bugs(p)


def test_half_close_client_first_then_server_keeps_sending() -> None:
    p = Pair()
    p.handshake()
    p.a.send(b"request", p.now)
    p.a.shutdown(p.now)
    p.run(lambda: p.b.at_eof is False and p.b.readable == 7 and p.b.state == S.CLOSE_WAIT, duration=5)
    assert p.b.receive(100, p.now) == b"request" and p.b.at_eof
    p.run(lambda: p.a.state == S.FIN_WAIT_2, duration=5)
    with pytest.raises(BrokenPipeError):
        p.a.send(b"more", p.now)
    # The other direction still works.
    reply = os.urandom(100_000)
    pump = Pump("b", reply)
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert bytes(pump.received) == reply and p.a.at_eof
    assert p.run(lambda: p.b.state == S.CLOSED, duration=5)
    assert p.a.state == S.TIME_WAIT
    assert p.run(lambda: p.a.state == S.CLOSED, duration=5)
    assert p.a.error is None and p.b.error is None
    _no_bugs(p)


def test_half_close_server_first() -> None:
    p = Pair()
    p.handshake()
    p.b.send(b"banner", p.now)
    p.b.shutdown(p.now)
    assert p.run(lambda: p.a.at_eof is False and p.a.readable == 6 and p.a.state == S.CLOSE_WAIT, duration=5)
    p.a.receive(100, p.now)
    assert p.a.at_eof
    p.a.send(b"ok", p.now)
    assert p.run(lambda: p.b.readable == 2, duration=5)
    p.a.close(p.now)
    assert p.run(lambda: p.a.state == S.CLOSED, duration=5)
    assert p.b.state == S.TIME_WAIT


def test_simultaneous_close_goes_through_closing() -> None:
    p = Pair()
    p.handshake()
    p.a.close(p.now)
    p.b.close(p.now)
    assert p.a.state == S.FIN_WAIT_1 and p.b.state == S.FIN_WAIT_1
    seen: set[TCPState] = set()

    def watch(pair: Pair) -> None:
        seen.add(pair.a.state)

    assert p.run(lambda: p.a.state == S.TIME_WAIT and p.b.state == S.TIME_WAIT, duration=5, app=watch)
    assert S.CLOSING in seen
    assert p.run(lambda: p.a.state == S.CLOSED and p.b.state == S.CLOSED, duration=5)
    _no_bugs(p)


def test_time_wait_duration_and_fin_reack() -> None:
    p = Pair(a_options=TCPOptions(time_wait=3.0))
    p.handshake()
    p.a.close(p.now)
    assert p.run(lambda: p.b.state == S.CLOSE_WAIT, duration=5)
    p.b.close(p.now)
    assert p.run(lambda: p.a.state == S.TIME_WAIT, duration=5)
    entered = p.now
    p.run(lambda: p.b.state == S.CLOSED, duration=5)
    # A retransmitted FIN is re-ACKed and restarts the timer.
    p.advance(1.0)
    fin = segment(p.b_port, p.a_port, p.b.snd_nxt - 1, p.a.snd_nxt, FIN | ACK)
    before = p.a.stats.segments_sent
    p.a.receive_segment(fin, p.now)
    assert p.a.stats.segments_sent == before + 1
    reack = p.a_out[-1]
    assert p.a.state == S.TIME_WAIT
    assert p.a.get_timer() == pytest.approx(p.now + 3.0)
    p.a_out.clear()
    assert reack
    p.advance(2.9)
    assert p.a.state == S.TIME_WAIT and p.now - entered > 3.0
    p.advance(0.2)
    assert p.a.state == S.CLOSED and p.a.error is None


def test_time_wait_ignores_rst() -> None:
    p = Pair()
    p.handshake()
    p.a.close(p.now)
    p.run(lambda: p.b.state == S.CLOSE_WAIT, duration=5)
    p.b.close(p.now)
    assert p.run(lambda: p.a.state == S.TIME_WAIT, duration=5)
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, 0, RST), p.now)
    assert p.a.state == S.TIME_WAIT


def test_connection_refused() -> None:
    p = Pair(listen=False)
    assert p.run(lambda: p.a.state == S.CLOSED, duration=5)
    assert isinstance(p.a.error, ConnectionRefusedError) and p.a.error.errno == errno.ECONNREFUSED
    assert p.rst_replies == 1
    with pytest.raises(ConnectionRefusedError):
        p.a.send(b"x", p.now)


def test_syn_sent_ignores_rst_without_acceptable_ack() -> None:
    p = Pair()
    p.a_out.clear()
    p.a.receive_segment(segment(80, 40000, 0, 0, RST), p.now)
    assert p.a.state == S.SYN_SENT
    p.a.receive_segment(segment(80, 40000, 0, 12345, RST | ACK), p.now)
    assert p.a.state == S.SYN_SENT
    # An unacceptable ACK (no RST) is answered by RST seq=its ack.
    p.a.receive_segment(segment(80, 40000, 0, 12345, ACK), p.now)
    assert p.a.state == S.SYN_SENT
    _, rst = __import__("tests.netstack.tcp_helpers", fromlist=["parse_packet"]).parse_packet(p.a_out[-1])
    assert rst.flags & RST and rst.seq == 12345


def test_reset_by_peer() -> None:
    p = Pair()
    p.handshake()
    p.b.abort(p.now)
    assert p.b.state == S.CLOSED and p.b.error is None
    assert p.run(lambda: p.a.state == S.CLOSED, duration=5)
    assert isinstance(p.a.error, ConnectionResetError) and p.a.error.errno == errno.ECONNRESET
    assert p.a in p.a_changed
    with pytest.raises(ConnectionResetError):
        p.a.send(b"x", p.now)


def test_in_window_rst_gets_challenge_ack() -> None:
    p = Pair()
    p.handshake()
    p.a_out.clear()
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt + 100, 0, RST), p.now)
    assert p.a.state == S.ESTABLISHED and p.a.stats.challenge_acks == 1
    assert len(p.a_out) == 1
    # Out-of-window RST: silently dropped.
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt + 10_000_000, 0, RST), p.now)
    assert p.a.state == S.ESTABLISHED and len(p.a_out) == 1
    # Exact RST: reset.
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, 0, RST), p.now)
    assert p.a.state == S.CLOSED and isinstance(p.a.error, ConnectionResetError)


def test_syn_in_established_gets_challenge_ack_and_rate_limit() -> None:
    p = Pair()
    p.handshake()
    p.a_out.clear()
    for _ in range(50):
        p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt + 5, 0, SYN), p.now)
    assert p.a.state == S.ESTABLISHED
    assert 1 <= p.a.stats.challenge_acks <= 10 and len(p.a_out) == p.a.stats.challenge_acks
    # The next second allows more.
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt + 5, 0, SYN), p.now + 1.5)
    assert p.a.stats.challenge_acks == 11


def test_ack_of_unsent_data_is_acked_and_dropped() -> None:
    p = Pair()
    p.handshake()
    p.a_out.clear()
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, p.a.snd_nxt + 5000, ACK, payload=b"zz"),
                        p.now)
    assert p.a.readable == 0 and len(p.a_out) == 1 and p.a.stats.dropped == 1


def test_close_with_unread_data_resets() -> None:
    p = Pair()
    p.handshake()
    p.a.send(b"unread", p.now)
    assert p.run(lambda: p.b.readable == 6, duration=5)
    p.b.close(p.now)
    assert p.b.state == S.CLOSED
    assert p.run(lambda: p.a.state == S.CLOSED, duration=5)
    assert isinstance(p.a.error, ConnectionResetError)


def test_data_after_close_resets() -> None:
    p = Pair()
    p.handshake()
    p.b.close(p.now)
    assert p.run(lambda: p.b.state == S.FIN_WAIT_2, duration=5)
    p.a.send(b"too late", p.now)
    assert p.run(lambda: p.a.state == S.CLOSED, duration=5)
    assert isinstance(p.a.error, ConnectionResetError) and p.b.state == S.CLOSED


def test_fin_wait_2_timeout_after_close() -> None:
    p = Pair(b_options=TCPOptions(fin_wait_2_timeout=5.0))
    p.handshake()
    p.b.close(p.now)
    assert p.run(lambda: p.b.state == S.FIN_WAIT_2, duration=5)
    t0 = p.now
    assert p.run(lambda: p.b.state == S.CLOSED, duration=10)
    assert p.now - t0 == pytest.approx(5.0, abs=0.1)
    assert p.a.state == S.CLOSE_WAIT


def test_abort_in_syn_sent_sends_nothing() -> None:
    out: list = []
    c = TCPConnection.active(bytes(4), 1, bytes([1, 2, 3, 4]), 2, iss=5, now=0.0, outbox=out, changed=[])
    assert len(out) == 1
    c.abort(0.0)
    assert c.state == S.CLOSED and len(out) == 1 and c.get_timer() is None


def test_send_before_established_is_queued() -> None:
    p = Pair()
    assert p.a.send(b"early", p.now) == 5
    assert p.run(lambda: p.b is not None and p.b.readable == 5, duration=5)
    assert p.b.receive(100, p.now) == b"early"


def test_stray_segments_do_not_crash() -> None:
    p = Pair()
    p.handshake()
    for flags in range(64):
        p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, p.a.snd_una, flags, payload=b"abc"), p.now)
    assert p.a.internal_errors == 0
    assert tcp_wire.SEQ_MASK == 0xFFFFFFFF


def test_changed_list_contract() -> None:
    p = Pair()
    p.handshake()
    p.a_changed.clear()
    p.a.app_changed = False
    p.b.send(b"one", p.now)
    assert p.run(lambda: p.a.readable == 3, duration=5)
    assert p.a_changed == [p.a] and p.a.app_changed
    # While the flag is still set, further changes do not append again (edge-triggered).
    p.b.send(b"two", p.now)
    assert p.run(lambda: p.a.readable == 6, duration=5)
    assert p.a_changed == [p.a]
    # Once the driver resets it, the next change is reported again.
    p.a.app_changed = False
    p.b.shutdown(p.now)
    assert p.run(lambda: p.a.state == S.CLOSE_WAIT, duration=5)
    assert p.a_changed == [p.a, p.a]


def test_lossy_bidirectional_packets_fit_mtu() -> None:
    def fault(direction: str, seg, idx: int) -> list[float]:
        return [] if idx % 9 == 4 else [0.0]

    for v6 in (False, True):
        p = Pair(fault=fault, v6=v6)  # the helper asserts every packet fits the 1280 MTU
        d1, d2 = os.urandom(200_000), os.urandom(200_000)
        ab, ba = Pump("a", d1), Pump("b", d2)

        def app(pair: Pair) -> None:
            ab(pair)
            ba(pair)

        assert p.run(lambda: ab.finished(p) and ba.finished(p), duration=60, app=app)
        assert bytes(ab.received) == d1 and bytes(ba.received) == d2
        with_sack = [s for s in p.segments("ab") + p.segments("ba") if s.sack_blocks and len(s.payload)]
        assert with_sack  # data segments that also carried SACK blocks


def test_send_and_shutdown_before_established() -> None:
    p = Pair()
    p.a.send(b"queued", p.now)
    p.a.shutdown(p.now)
    assert p.a.state == S.SYN_SENT
    assert p.run(lambda: p.b is not None and p.b.state == S.CLOSE_WAIT, duration=5)
    assert p.b.receive(100, p.now) == b"queued" and p.b.at_eof
    assert p.run(lambda: p.a.state == S.FIN_WAIT_2, duration=5)


def test_close_in_syn_sent_deletes_connection() -> None:
    p = Pair()
    p.a.close(p.now)
    assert p.a.state == S.CLOSED and p.a.error is None and p.a.get_timer() is None
