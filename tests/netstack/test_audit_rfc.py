"""Audit of the netstack against the RFCs (and Linux/gVisor where the RFCs leave room).

Each test names the rule it proves. TCP rules run on two connections joined back to back
(``tcp_helpers.Pair``, fake clock) or with hand-made segments; IP/ICMP/UDP rules and the
connection table run through a sans-IO :class:`Stack` with explicit ``now``.

Covered here: RFC 5961 (challenge ACKs for out-of-window SYNs, the ACK acceptability range,
rate limits), RFC 9293 state-machine edges (data and FIN on a SYN-ACK, FIN completing a
passive handshake, half-open detection, TIME-WAIT reuse by a newer SYN), RFC 7323 (PAWS
spares RSTs, the 24-day idle rule, window-scale clamp, right window edge never retracts
beyond the scale granularity), RFC 6298 (RTO backoff doubling up to the cap, persist backoff),
RFC 1122 sender SWS avoidance, RFC 5927 (ICMP errors must quote a sequence number we sent),
RFC 1122 §3.2.1.3 source address checks, RFC 8200 / 5722 / 6946 fragment and extension
header rules, ICMP error rate limits.
"""

from __future__ import annotations

import errno
import struct

import pytest

from tests.netstack.netutil import (
    A4, A6, ACK, B4, B6, FIN, RST, SYN, csum, echo_request, ipv4, ipv6, parse, parse_tcp, pseudo, tcp, udp,
)
from tests.netstack.tcp_helpers import Pair, parse_packet, segment
from tsnet.netstack import tcp_wire
from tsnet.netstack.stack import Stack
from tsnet.netstack.tcp import TCPOptions, TCPState
from tsnet.netstack.tcp_wire import syn_options, ts_option

S = TCPState
MSS = b"\x02\x04\x04\xd8"  # MSS 1240
DAY = 24 * 3600.0


def sent(out: list) -> list[tcp_wire.Segment]:
    """Parse and take every packet in a connection's outbox."""
    segs = [parse_packet(bytes(p))[1] for p in out]
    out.clear()
    return segs


# --- RFC 5961 -----------------------------------------------------------------------------------------------------


def test_out_of_window_syn_gets_a_rate_limited_challenge_ack() -> None:
    """RFC 5961 §4.2: any SYN in a synchronized state, whatever its sequence number, gets a
    challenge ACK (never a reset), under the §7 rate limit."""
    p = Pair()
    p.handshake()
    p.a_out.clear()
    for i in range(30):
        p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt + 50_000_000 + i, 0, SYN), p.now)
    acks = sent(p.a_out)
    assert p.a.state == S.ESTABLISHED
    assert len(acks) == p.a.stats.challenge_acks == 10
    assert all(s.flags == ACK and s.ack == p.a.rcv_nxt & 0xFFFFFFFF for s in acks)
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt - 7, 0, SYN), p.now + 1.0)
    assert len(sent(p.a_out)) == 1 and p.a.stats.challenge_acks == 11


def test_ack_outside_the_acceptable_range_is_dropped_with_a_challenge_ack() -> None:
    """RFC 5961 §5.2: SEG.ACK must lie in [SND.UNA - MAX.SND.WND, SND.NXT]; otherwise the
    segment (with its data) is dropped and a rate-limited challenge ACK sent."""
    opts = TCPOptions(timestamps=False, sack=False)
    p = Pair(a_options=opts, b_options=opts)
    p.handshake()
    una, max_wnd = p.a.snd_una, p.a.max_snd_wnd
    assert max_wnd > 0
    p.a_out.clear()
    too_old = segment(p.b_port, p.a_port, p.a.rcv_nxt, una - max_wnd - 1, ACK, payload=b"inject")
    p.a.receive_segment(too_old, p.now)
    assert p.a.readable == 0 and p.a.stats.challenge_acks == 1
    [ack] = sent(p.a_out)
    assert ack.flags == ACK and ack.ack == p.a.rcv_nxt & 0xFFFFFFFF
    for _ in range(20):  # rate limited like every challenge ACK
        p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, p.a.snd_max + 10, ACK, payload=b"x"), p.now)
    assert p.a.readable == 0 and p.a.stats.challenge_acks == 10 and len(sent(p.a_out)) == 9
    # The edge of the range is acceptable: the data is taken.
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, una - max_wnd, ACK, payload=b"ok"), p.now)
    assert p.a.readable == 2 and p.a.state == S.ESTABLISHED


def test_out_of_window_rst_is_ignored_silently() -> None:
    """RFC 5961 §3.2: a RST outside the window is dropped without any reply."""
    p = Pair()
    p.handshake()
    p.a_out.clear()
    for off in (-100_000, 10_000_000):
        p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt + off, 0, RST | ACK), p.now)
    assert p.a.state == S.ESTABLISHED and not p.a_out and p.a.stats.challenge_acks == 0


# --- RFC 9293 state machine edges ---------------------------------------------------------------------------------


def test_syn_ack_carrying_data_and_fin_is_processed() -> None:
    """RFC 9293 §3.10.7.3: after a SYN-ACK that acknowledges our SYN, its text and FIN are
    processed (not silently dropped for the peer to resend)."""
    p = Pair(listen=False)
    syn = sent(p.a_out)[0]
    irs = 777_000
    synack = segment(p.b_port, p.a_port, irs, syn.seq + 1, SYN | ACK | FIN, payload=b"hello",
                     options=syn_options(1240, 7, True, None))
    p.a.receive_segment(synack, p.now)
    assert p.a.is_established and p.a.state == S.CLOSE_WAIT
    assert p.a.receive(100, p.now) == b"hello" and p.a.at_eof
    acks = sent(p.a_out)
    assert acks and acks[-1].ack == irs + 1 + 5 + 1


def test_fin_on_the_ack_completing_a_passive_open() -> None:
    """RFC 9293: the ACK that moves SYN-RECEIVED to ESTABLISHED may carry data and FIN; the
    connection then goes on to CLOSE-WAIT. A FIN without ACK in SYN-RECEIVED is dropped."""
    p = Pair()
    p.run(lambda: p.b is not None, duration=1)
    p.a_out.clear()  # the SYN-ACK reaches A only through our hand-made segments below
    assert p.b.state == S.SYN_RECEIVED
    rcv = p.b.rcv_nxt
    p.b.receive_segment(segment(p.a_port, p.b_port, rcv, 0, FIN), p.now)
    assert p.b.state == S.SYN_RECEIVED
    p.b.receive_segment(segment(p.a_port, p.b_port, rcv, p.b.snd_nxt, ACK | FIN, payload=b"bye"), p.now)
    assert p.b.state == S.CLOSE_WAIT and p.b.receive(10, p.now) == b"bye" and p.b.at_eof


def test_simultaneous_open_and_close_reach_the_expected_states() -> None:
    """RFC 9293 §3.5/§3.6: SYN-SENT + SYN -> SYN-RECEIVED -> ESTABLISHED on both sides;
    FIN-WAIT-1 + FIN -> CLOSING -> TIME-WAIT on both sides."""
    p = Pair(simultaneous=True)
    seen: set[tuple[S, S]] = set()

    def watch(pair: Pair) -> None:
        seen.add((pair.a.state, pair.b.state))

    assert p.run(p.established, duration=10, app=watch)
    assert any(S.SYN_RECEIVED in st for st in seen)
    p.a.close(p.now)
    p.b.close(p.now)
    assert p.run(lambda: p.a.state == S.TIME_WAIT and p.b.state == S.TIME_WAIT, duration=10, app=watch)
    assert any(S.CLOSING in st for st in seen)


# --- RFC 7323 -----------------------------------------------------------------------------------------------------


def test_paws_does_not_drop_a_rst() -> None:
    """RFC 7323 §5.3 R1: PAWS applies to non-RST segments only; an exact RST with an old
    timestamp still resets the connection."""
    p = Pair()
    p.handshake()
    old = (p.a._ts_recent - 100_000) & 0xFFFFFFFF
    p.a.receive_segment(segment(p.b_port, p.a_port, p.a.rcv_nxt, 0, RST, options=ts_option(old, 0)), p.now)
    assert p.a.state == S.CLOSED and isinstance(p.a.error, ConnectionResetError)


def test_paws_24_day_idle_rule() -> None:
    """RFC 7323 §5.5: a TS.Recent older than 24 days is not trusted: a segment with an 'older'
    TSval is then accepted and becomes TS.Recent; within 24 days it is dropped."""
    opts = TCPOptions(sack=False)
    p = Pair(a_options=opts, b_options=opts)
    p.handshake()
    a = p.a
    recent = a._ts_recent
    older = (recent - 5000) & 0xFFFFFFFF

    def data(ts: int, payload: bytes) -> tcp_wire.Segment:
        return segment(p.b_port, p.a_port, a.rcv_nxt, a.snd_nxt, ACK, payload=payload, options=ts_option(ts, 0))

    a.receive_segment(data(older, b"x"), p.now + 23 * DAY)
    assert a.readable == 0  # PAWS: dropped
    later = p.now + 25 * DAY
    a.receive_segment(data(older, b"y"), later)
    assert a.receive(10, later) == b"y" and a._ts_recent == older
    a.receive_segment(data((older + 10) & 0xFFFFFFFF, b"z"), later + 1)
    assert a.receive(10, later + 1) == b"z"


def test_window_scale_shift_above_14_is_clamped() -> None:
    """RFC 7323 §2.3: a shift count above 14 is used as 14."""
    from tsnet.netstack.tcp import TCPConnection
    syn = segment(40000, 80, 1000, 0, SYN, options=syn_options(1240, 20, False, None))
    c = TCPConnection.passive(bytes([100, 64, 0, 1]), 80, bytes([100, 64, 0, 2]), 40000, syn,
                              iss=5, now=0.0, outbox=[], changed=[])
    assert c.snd_wscale == 14


@pytest.mark.parametrize("scaling", [False, True])
def test_advertised_right_edge_never_retracts(scaling: bool) -> None:
    """RFC 9293 §3.8.6.2.2 / RFC 7323 §2.4: the right edge of the offered window (ACK + window)
    never moves left, except by less than the scale granularity, which the receiver still
    honours: data up to the largest edge it offered is accepted."""
    small = TCPOptions(recv_buffer=20_000, recv_buffer_max=20_000 if not scaling else 200_000,
                       window_scaling=scaling)
    p = Pair(b_options=small, a_options=TCPOptions(window_scaling=scaling))
    p.handshake()
    ws = p.b.rcv_wscale
    assert (ws > 0) == scaling
    from tests.netstack.tcp_helpers import Pump
    pump = Pump("a", bytes(150_000), read=False, shutdown=False)
    reads = {"n": 0}

    def app(pair: Pair) -> None:
        pump(pair)
        reads["n"] += 1
        if reads["n"] % 7 == 0 and pair.b.readable:
            pair.b.receive(3000, pair.now)  # the application reads slowly, in odd chunks

    p.run(lambda: False, duration=5.0, app=app)
    best = 0
    grain = (1 << ws) - 1
    for seg in p.segments("ba"):
        if seg.flags & (SYN | RST):
            continue
        edge = (seg.ack + (seg.window << ws)) & 0xFFFFFFFF
        assert edge >= best - grain
        best = max(best, edge)
    assert p.b.rcv_adv >= best


# --- RFC 6298 / RFC 1122 timers and SWS ---------------------------------------------------------------------------


def test_rto_min_backoff_doubles_and_is_capped() -> None:
    """RFC 6298: we follow Linux/gVisor's 200 ms minimum RTO (not the RFC's 1 s; the netstack
    spec B.2), double it on each expiry (§5.5) and cap it at max_rto."""
    times: list[float] = []

    def blackhole(direction: str, seg: tcp_wire.Segment, idx: int) -> list[float]:
        if direction == "ab" and seg.payload:
            times.append(p.now)
            return []
        return [0.0]

    opts = TCPOptions(max_rto=3.0, data_retries=8, rack=False)
    p = Pair(a_options=opts, fault=blackhole)
    p.handshake()
    assert p.a.stats.rto == pytest.approx(0.2)
    p.a.send(b"x" * 100, p.now)
    assert p.run(lambda: p.a.state == S.CLOSED, duration=60)
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:])]
    assert gaps == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 3.0]
    assert p.a.stats.timeouts == 9 and isinstance(p.a.error, TimeoutError)


def test_persist_timer_backs_off_and_is_capped() -> None:
    """Zero-window probes (RFC 9293 §3.8.6.1) come at RTO * 2^n intervals, capped at 60 s,
    and are never given up while the peer answers."""
    small = TCPOptions(recv_buffer=8 * 1024, recv_buffer_max=8 * 1024)
    p = Pair(a_options=TCPOptions(data_retries=3), b_options=small)
    p.handshake()
    from tests.netstack.tcp_helpers import Pump
    pump = Pump("a", bytes(40_000), read=False, shutdown=False)
    p.run(lambda: False, duration=400.0, app=pump)
    probes = [d.time for d in p.trace if d.direction == "ab" and len(d.seg.payload) == 1]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(gaps) >= 6
    for g0, g1 in zip(gaps, gaps[1:]):
        assert g1 == pytest.approx(min(2 * g0, 60.0), rel=0.05) or g1 == pytest.approx(60.0, rel=0.05)
    assert max(gaps) == pytest.approx(60.0, rel=0.05)
    assert p.a.state == S.ESTABLISHED and p.a.error is None


def test_sender_silly_window_avoidance() -> None:
    """RFC 1122 §4.2.3.4: with a usable window far below both a full segment and half the
    largest window the peer offered, the sender waits (no tiny segments) until the persist
    timer's override sends what fits."""
    opts = TCPOptions(timestamps=False, sack=False, rack=False)
    p = Pair(a_options=opts, b_options=opts)
    p.handshake()
    a = p.a
    now = p.now
    assert a.max_snd_wnd >= 60_000
    # The peer ACKs everything but offers only 100 bytes.
    a.receive_segment(segment(p.b_port, p.a_port, a.rcv_nxt, a.snd_max, ACK, window=100 >> a.snd_wscale or 1), now)
    p.a_out.clear()
    a.send(b"d" * 10_000, now)
    assert [s for s in sent(p.a_out) if s.payload] == []
    t = a.get_timer()
    assert t is not None and t > now
    a.handle_timer(t)
    data = [s for s in sent(p.a_out) if s.payload]
    assert len(data) == 1 and 0 < len(data[0].payload) <= max(100, 1 << a.snd_wscale)


# --- ICMP errors (RFC 5927) ---------------------------------------------------------------------------------------


def _icmp4(src: str, dst: str, kind: int, code: int, rest: int, quoted: bytes) -> bytes:
    body = struct.pack("!BBHI", kind, code, 0, rest) + quoted
    return ipv4(src, dst, 1, body[:2] + struct.pack("!H", csum(body)) + body[4:])


def _icmp6(src: str, dst: str, kind: int, code: int, rest: int, quoted: bytes) -> bytes:
    body = struct.pack("!BBHI", kind, code, 0, rest) + quoted
    body = body[:2] + struct.pack("!H", csum(pseudo(src, dst, 58, len(body)) + body)) + body[4:]
    return ipv6(src, dst, 58, body)


@pytest.mark.parametrize("v6", [False, True])
def test_forged_port_unreachable_does_not_fail_a_connect(v6: bool) -> None:
    """RFC 5927 §4.1 (Linux tcp_v4_err/tcp_v6_err): an ICMP error about a TCP connection is
    acted on only if the sequence number it quotes is one we sent and that is unacknowledged."""
    me, peer = (A6, B6) if v6 else (A4, B4)
    s = Stack([me], now=0.0)
    conn = s.tcp_connect(peer, 80, 0.0)
    [syn_pkt] = s.packets_to_send()
    forged = bytearray(syn_pkt[:(40 if v6 else 20) + 8])
    hdr = 40 if v6 else 20
    forged[hdr + 4:hdr + 8] = ((conn.iss + 12345) & 0xFFFFFFFF).to_bytes(4, "big")
    make = _icmp6 if v6 else _icmp4
    unreach = (1, 4) if v6 else (3, 3)
    s.receive_packet(make(peer, me, *unreach, 0, bytes(forged)), 0.0)
    assert conn.state == S.SYN_SENT and s.connections
    s.receive_packet(make(peer, me, *unreach, 0, bytes(syn_pkt[:hdr + 4])), 0.0)  # too short to show the seq
    assert conn.state == S.SYN_SENT
    s.receive_packet(make(peer, me, *unreach, 0, bytes(syn_pkt[:hdr + 8])), 0.0)  # the 8 bytes RFC 792 quotes
    assert conn.state == S.CLOSED and not s.connections


def test_packet_too_big_lowers_mss_v6() -> None:
    """RFC 8201 / RFC 4443 §3.2: Packet Too Big quoting a segment in flight lowers the MSS,
    never below what the 1280-byte IPv6 minimum MTU allows; one quoting a sequence number
    not in flight is ignored (RFC 5927 §4.1)."""
    s = Stack([A6], now=0.0, tcp_options=TCPOptions(mtu=1500, timestamps=False))
    conn = s.tcp_connect(B6, 80, 0.0)
    [syn_pkt] = s.packets_to_send()
    our = parse_tcp(parse(syn_pkt))
    s.receive_packet(tcp(B6, A6, 80, conn.local_port, 9000, our.seq + 1, SYN | ACK, options=b"\x02\x04\x05\xa0"), 0.0)
    s.packets_to_send()
    assert conn.send_mss == 1440
    s.tcp_send(conn, b"q" * 3000, 0.0)
    [first, *_] = [p for p in s.packets_to_send() if parse_tcp(parse(p)).data]
    stale = bytearray(first[:48])
    stale[44:48] = ((our.seq - 100_000) & 0xFFFFFFFF).to_bytes(4, "big")
    s.receive_packet(_icmp6(B6, A6, 2, 0, 1300, bytes(stale)), 0.0)
    assert conn.send_mss == 1440
    s.receive_packet(_icmp6(B6, A6, 2, 0, 1400, bytes(first[:1232])), 0.0)
    assert conn.send_mss == 1400 - 60 and s.counters.mss_lowered == 1
    s.receive_packet(_icmp6(B6, A6, 2, 0, 600, bytes(first[:1232])), 0.0)  # below the IPv6 minimum
    assert conn.send_mss == 1280 - 60


# --- source addresses (RFC 1122 §3.2.1.3, §4.2.3.10; RFC 4291) ----------------------------------------------------


@pytest.mark.parametrize("bad,me", [("224.0.0.1", A4), ("255.255.255.255", A4), ("0.0.0.0", A4),
                                    ("127.0.0.1", A4), ("ff02::1", A6), ("::", A6)])
def test_packets_from_impossible_sources_are_dropped(bad: str, me: str) -> None:
    s = Stack([me], now=0.0)
    s.tcp_listen(80)
    s.receive_packet(tcp(bad, me, 1234, 80, 1000, 0, SYN, options=MSS), 0.0)  # listener: no SYN-ACK
    ts_layout = b"\x01\x01\x08\x0a" + bytes(8)  # the IPv4 fast path's segment shape
    s.receive_packet(tcp(bad, me, 1234, 81, 1000, 5, ACK, options=ts_layout), 0.0)  # closed port: no RST
    s.receive_packet(udp(bad, me, 1234, 9, b"x"), 0.0)  # closed port: no ICMP
    s.receive_packet(echo_request(bad, me, 1, 1, b"ping"), 0.0)  # no echo reply
    assert s.packets_to_send() == [] and not s.connections
    assert s.counters.bad_source == 4


def test_connect_to_multicast_or_broadcast_is_refused() -> None:
    s = Stack([A4, A6], now=0.0)
    for dst in ("224.0.0.1", "255.255.255.255", "ff02::1"):
        with pytest.raises(OSError) as e:
            s.tcp_connect(dst, 80, 0.0)
        assert e.value.errno == errno.ENETUNREACH
    assert s.packets_to_send() == [] and not s.connections


# --- IP: fragments and extension headers (RFC 791/815, RFC 8200, RFC 5722, RFC 6946) ------------------------------


def _udp_seg(src: str, dst: str, data: bytes) -> bytes:
    pkt = udp(src, dst, 1, 7, data)
    return pkt[20:] if ":" not in src else pkt[40:]


def _frag4(seg: bytes, off: int, end: int, more: bool, ident: int = 99) -> bytes:
    return ipv4(B4, A4, 17, seg[off:end], ident=ident, frag=(0x2000 if more else 0) | (off // 8))


def _frag6(nh: int, data: bytes, off: int, more: bool, ident: int = 99) -> bytes:
    return ipv6(B6, A6, 44, struct.pack("!BBHI", nh, 0, off | int(more), ident) + data)


def test_exact_duplicate_fragment_is_tolerated() -> None:
    """RFC 8200 §4.5: a fragment duplicated by the network may be dropped alone; the datagram
    still completes (Linux does the same). Other bytes at the same place are an overlap."""
    s = Stack([A4], now=0.0)
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B4, A4, b"d" * 2000)
    f0, f1 = _frag4(seg, 0, 1008, True), _frag4(seg, 1008, len(seg), False)
    s.receive_packets([f0, f0, f1], 0.0)
    assert [d for d, _ in ep.queue] == [b"d" * 2000] and s._reassembler.duplicates == 1
    ep.queue.clear()
    evil = bytearray(seg)
    evil[100] ^= 0xFF
    s.receive_packets([_frag4(seg, 0, 1008, True, 5), _frag4(bytes(evil), 0, 1008, True, 5),
                       _frag4(seg, 1008, len(seg), False, 5)], 0.0)
    assert not ep.queue


def test_overlap_discards_the_fragments_still_to_come() -> None:
    """RFC 5722 §4: after an overlap the whole datagram is discarded, including its fragments
    not yet received, until its reassembly time would have run out."""
    s = Stack([A6], now=0.0)
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B6, A6, b"o" * 2000)
    first = _frag6(17, seg[:1000], 0, True)
    overlap = _frag6(17, seg[504:1504], 504, True)
    s.receive_packets([first, overlap], 0.0)
    # The genuine fragments arrive afterwards: still refused (they could complete a mixed datagram).
    s.receive_packets([first, _frag6(17, seg[1000:], 1000, False)], 1.0)
    assert not ep.queue
    # After the reassembly timeout the identification may be used again.
    s.receive_packets([first, _frag6(17, seg[1000:], 1000, False)], 62.0)
    assert [d for d, _ in ep.queue] == [b"o" * 2000]


def test_fragments_per_datagram_are_bounded() -> None:
    """Reassembly cost per datagram is bounded: more than ``max_fragments`` pieces drop it
    (tiny fragments would otherwise cost quadratic work and far more memory than they carry)."""
    s = Stack([A4], now=0.0)
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B4, A4, b"t" * 4000)
    assert len(seg) == 4008
    pieces = [_frag4(seg, off, off + 8, True) for off in range(0, 4000, 8)]
    s.receive_packets(pieces + [_frag4(seg, 4000, 4008, False)], 0.0)
    assert not ep.queue and len(s._reassembler) == 0 and s._reassembler.memory == 0
    assert s._reassembler.dropped == 1  # the rest were refused as fragments of a dropped datagram
    # A datagram in a normal number of fragments is unaffected.
    s.receive_packets([_frag4(seg, 0, 2000, True, 3), _frag4(seg, 2000, 4008, False, 3)], 0.0)
    assert [d for d, _ in ep.queue] == [b"t" * 4000]


def test_atomic_fragment_is_processed_on_its_own() -> None:
    """RFC 6946 §4: an IPv6 fragment with offset 0 and M=0 is a whole datagram, processed
    without touching (or being dropped by) a pending reassembly with the same identification."""
    s = Stack([A6], now=0.0)
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B6, A6, b"p" * 2000)
    s.receive_packet(_frag6(17, seg[:1000], 0, True, ident=7), 0.0)
    s.receive_packet(_frag6(17, _udp_seg(B6, A6, b"atomic"), 0, False, ident=7), 0.0)
    s.receive_packet(_frag6(17, seg[1000:], 1000, False, ident=7), 0.0)
    assert sorted(d for d, _ in ep.queue) == sorted([b"atomic", b"p" * 2000])


def test_hop_by_hop_header_only_first() -> None:
    """RFC 8200 §4.1: hop-by-hop options may only follow the IPv6 header; elsewhere the
    packet is dropped (counted as malformed)."""
    s = Stack([A6], now=0.0)
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B6, A6, b"h")
    s.receive_packet(ipv6(B6, A6, 60, struct.pack("!BB6x", 0, 0) + struct.pack("!BB6x", 17, 0) + seg), 0.0)
    s.receive_packet(_frag6(0, struct.pack("!BB6x", 17, 0) + seg, 0, False), 0.0)  # after a Fragment header
    assert not ep.queue and s.counters.malformed == 2
    s.receive_packet(ipv6(B6, A6, 0, struct.pack("!BB6x", 17, 0) + seg), 0.0)
    assert [d for d, _ in ep.queue] == [b"h"]


@pytest.mark.parametrize("ttl", [0, 1])
def test_low_ttl_and_hop_limit_are_delivered(ttl: int) -> None:
    """RFC 1122 §3.2.1.7: a host must not discard a datagram for a TTL below 2 (only routers
    decrement it). IPv6 hop limit likewise (RFC 8200 §3). We send with 64."""
    s = Stack([A4, A6], now=0.0)
    ep = s.udp_bind(port=7)
    s.receive_packet(ipv4(B4, A4, 17, _udp_seg(B4, A4, b"v4"), ttl=ttl), 0.0)
    p6 = bytearray(ipv6(B6, A6, 17, _udp_seg(B6, A6, b"v6")))
    p6[7] = ttl
    s.receive_packet(bytes(p6), 0.0)
    assert [d for d, _ in ep.queue] == [b"v4", b"v6"]
    s.udp_sendto(ep, b"r", B4, 1, 0.0)
    s.udp_sendto(ep, b"r", B6, 1, 0.0)
    r4, r6 = s.packets_to_send()
    assert r4[8] == 64 and r6[7] == 64


def test_port_unreachable_is_rate_limited() -> None:
    """ICMP errors we generate share one token bucket (gVisor: 1000/s, burst 50)."""
    s = Stack([A4], now=0.0)
    s.receive_packets([udp(B4, A4, 1000 + i, 9, b"x") for i in range(200)], 0.0)
    assert len(s.packets_to_send()) == 50
    assert s.counters.icmp_errors_sent == 50 and s.counters.icmp_rate_limited == 150
    s.receive_packet(udp(B4, A4, 999, 9, b"x"), 0.01)  # ten tokens back after 10 ms
    assert len(s.packets_to_send()) == 1


# --- the connection table -----------------------------------------------------------------------------------------


def _accept_one(s: Stack, sport: int, isn: int) -> tuple:
    """Complete a handshake from B4:sport to A4:80 (no options); returns (conn, our ISS)."""
    s.receive_packet(tcp(B4, A4, sport, 80, isn, 0, SYN, options=MSS), 0.0)
    [sa] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert sa.flags == SYN | ACK
    s.receive_packet(tcp(B4, A4, sport, 80, isn + 1, sa.seq + 1, ACK), 0.0)
    assert s.packets_to_send() == []
    conn = s.connections[(bytes([100, 64, 0, 1]), 80, bytes([100, 64, 0, 2]), sport)]
    return conn, sa.seq


def test_half_open_connection_is_detected_after_peer_restart() -> None:
    """RFC 9293 §3.5.2 with RFC 5961: a restarted peer's new SYN on our ESTABLISHED 4-tuple
    gets a challenge ACK; the peer's RST answering it (seq = that ACK's ack) is exact and
    ends the stale connection; the retransmitted SYN then opens a new one."""
    s = Stack([A4], now=0.0)
    listener = s.tcp_listen(80)
    conn, _ = _accept_one(s, 5555, 1000)
    s.tcp_accept(listener)
    s.receive_packet(tcp(B4, A4, 5555, 80, 900_000, 0, SYN, options=MSS), 0.1)
    [ch] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert ch.flags == ACK and conn.state == S.ESTABLISHED
    s.receive_packet(tcp(B4, A4, 5555, 80, ch.ack, 0, RST), 0.1)
    assert conn.state == S.CLOSED and isinstance(conn.error, ConnectionResetError) and not s.connections
    s.receive_packet(tcp(B4, A4, 5555, 80, 900_000, 0, SYN, options=MSS), 1.1)
    [sa] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert sa.flags == SYN | ACK and sa.ack == 900_001


def test_time_wait_four_tuple_reused_only_by_a_newer_syn() -> None:
    """RFC 9293 §3.10.7.4 / RFC 6191: in TIME-WAIT a SYN with a higher sequence number than
    we received starts a new connection; an older one is only ACKed; a RST is ignored (RFC 1337)."""
    s = Stack([A4], now=0.0, tcp_options=TCPOptions(time_wait=60.0))
    listener = s.tcp_listen(80)
    conn, iss = _accept_one(s, 6000, 1000)
    s.tcp_accept(listener)
    s.tcp_close(conn, 0.0)  # we close first: FIN
    [fin] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert fin.flags & FIN
    s.receive_packet(tcp(B4, A4, 6000, 80, 1001, fin.seq + 1, ACK | FIN), 0.1)
    s.packets_to_send()
    assert conn.state == S.TIME_WAIT
    s.receive_packet(tcp(B4, A4, 6000, 80, 1002, 0, RST), 0.2)
    assert conn.state == S.TIME_WAIT  # RFC 1337
    s.receive_packet(tcp(B4, A4, 6000, 80, 500, 0, SYN, options=MSS), 0.3)  # older: not a new incarnation
    [r] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert r.flags == ACK and conn.state == S.TIME_WAIT
    s.receive_packet(tcp(B4, A4, 6000, 80, 100_000, 0, SYN, options=MSS), 0.4)
    [sa] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert sa.flags == SYN | ACK and sa.ack == 100_001
    new = s.connections[(bytes([100, 64, 0, 1]), 80, bytes([100, 64, 0, 2]), 6000)]
    assert new is not conn and new.state == S.SYN_RECEIVED


def test_unknown_protocol_gets_protocol_unreachable_or_parameter_problem() -> None:
    """RFC 1122 §3.2.2.1: ICMP protocol unreachable for a transport we do not have; RFC 8200 §4 /
    RFC 4443 §3.4: ICMPv6 parameter problem code 1 whose pointer is the offset of the Next Header
    field naming it (gVisor does both). Nothing for "no next header" (59) or for fragments."""
    s = Stack([A4, A6], now=0.0)
    gre4 = ipv4(B4, A4, 47, b"gre-payload")
    s.receive_packet(gre4, 0.0)
    [r4] = [parse(p) for p in s.packets_to_send()]
    assert (r4.src, r4.dst, r4.proto) == (A4, B4, 1) and csum(r4.payload) == 0
    assert r4.payload[:2] == bytes((3, 2)) and r4.payload[8:] == gre4
    plain = ipv6(B6, A6, 47, b"gre-payload")
    behind_dstopts = ipv6(B6, A6, 60, struct.pack("!BB6x", 47, 0) + b"gre-payload")
    for pkt, pointer in ((plain, 6), (behind_dstopts, 40)):
        s.receive_packet(pkt, 0.0)
        [r6] = [parse(p) for p in s.packets_to_send()]
        assert (r6.src, r6.dst, r6.proto) == (A6, B6, 58)
        assert csum(pseudo(A6, B6, 58, len(r6.payload)) + r6.payload) == 0
        assert r6.payload[:2] == bytes((4, 1)) and struct.unpack_from("!I", r6.payload, 4)[0] == pointer
        assert r6.payload[8:] == pkt
    s.receive_packet(ipv6(B6, A6, 59, b""), 0.0)  # no next header: silently done
    s.receive_packet(ipv4(B4, A4, 47, b"12345678", ident=3, frag=0x2000), 0.0)  # a fragment: no error
    assert s.packets_to_send() == []


@pytest.mark.parametrize("lose", ["syn", "synack"])
def test_lost_handshake_segment_means_one_segment_initial_window_and_3s_rto(lose: str) -> None:
    """RFC 5681 §3.1 / RFC 6928 §2: if the SYN or SYN-ACK was lost, the sender's initial window is
    one segment; RFC 6298 §5.7: without an RTT sample, the RTO starts at 3 s once data flows.
    (Without timestamps: with them the handshake's last exchange still gives a valid sample.)"""
    dropped = {"n": 0}

    def fault(direction: str, seg: tcp_wire.Segment, idx: int) -> list[float]:
        want = (SYN if lose == "syn" else SYN | ACK)
        if seg.flags == want and not dropped["n"]:
            dropped["n"] += 1
            return []
        return [0.0]

    opts = TCPOptions(timestamps=False, rack=False)
    p = Pair(a_options=opts, b_options=opts, fault=fault)
    p.handshake()
    sender = p.a if lose == "syn" else p.b
    assert sender.stats.timeouts == 1
    assert sender.send_mss <= sender.stats.cwnd < 2 * sender.send_mss  # (the SYN's ACK may add a byte)
    if lose == "syn":  # the SYN-ACK answering the retransmitted SYN is not timed (Karn)
        assert sender.stats.srtt is None and sender.stats.rto == pytest.approx(3.0)
    clean = Pair(a_options=opts, b_options=opts)
    clean.handshake()
    assert clean.a.stats.cwnd >= 10 * clean.a.send_mss - 1 and clean.b.stats.cwnd >= 10 * clean.b.send_mss - 1


def test_routing_header_with_segments_left_is_dropped() -> None:
    """RFC 8200 §4.4 / RFC 5095: a Routing header with Segments Left > 0 means we are not the
    final destination; we forward nothing, so the packet is dropped (one with 0 is processed)."""
    s = Stack([A6], now=0.0)
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B6, A6, b"r")
    s.receive_packet(ipv6(B6, A6, 43, struct.pack("!BBBB4x", 17, 0, 0, 1) + seg), 0.0)
    assert not ep.queue and s.counters.malformed == 1
    s.receive_packet(ipv6(B6, A6, 43, struct.pack("!BBBB4x", 17, 0, 0, 0) + seg), 0.0)
    assert [d for d, _ in ep.queue] == [b"r"]


def test_first_fragment_must_hold_the_transport_header() -> None:
    """RFC 7112 (IPv6 header chain in the first fragment) and RFC 1858 §3 (IPv4 tiny fragments,
    TCP fragment at offset 8): such fragments are dropped, and the datagram never completes."""
    s = Stack([A4, A6], now=0.0)
    s.tcp_listen(80)
    syn = tcp(B4, A4, 1234, 80, 1000, 0, SYN, options=MSS)[20:]  # 24 bytes of TCP
    s.receive_packets([ipv4(B4, A4, 6, syn[:8], ident=1, frag=0x2000),  # only the ports in the first
                       ipv4(B4, A4, 6, syn[8:], ident=1, frag=1)], 0.0)
    s.receive_packets([ipv4(B4, A4, 6, syn[:16], ident=2, frag=0x2000),  # offset 8 rewrites the flags
                       ipv4(B4, A4, 6, syn[8:], ident=2, frag=1)], 0.0)
    assert s.packets_to_send() == [] and not s.connections
    assert s.counters.malformed == 4  # both first fragments, and both TCP fragments at offset 8
    ep = s.udp_bind(port=7)
    seg = _udp_seg(B6, A6, b"u" * 100)
    dstopts = struct.pack("!BB6x", 17, 0)
    chain = dstopts + seg
    s.receive_packets([_frag6(60, chain[:8], 0, True, 4), _frag6(60, chain[8:], 8, False, 4)], 0.0)  # UDP not in #1
    assert not ep.queue
    s.receive_packets([_frag6(60, chain[:16], 0, True, 5), _frag6(60, chain[16:], 16, False, 5)], 0.0)
    assert [d for d, _ in ep.queue] == [b"u" * 100]


def test_port_unreachable_is_a_soft_error_for_an_established_connection() -> None:
    """RFC 1122 §4.2.3.9 / RFC 5927: port unreachable for a synchronized connection does not
    abort it (only a connect in SYN-SENT fails)."""
    s = Stack([A4], now=0.0)
    conn = s.tcp_connect(B4, 80, 0.0)
    [syn_pkt] = s.packets_to_send()
    our = parse_tcp(parse(syn_pkt))
    s.receive_packet(tcp(B4, A4, 80, conn.local_port, 5000, our.seq + 1, SYN | ACK, options=MSS), 0.0)
    s.packets_to_send()
    s.tcp_send(conn, b"z" * 100, 0.0)
    [data] = s.packets_to_send()
    s.receive_packet(_icmp4(B4, A4, 3, 3, 0, bytes(data[:28])), 0.0)
    assert conn.state == S.ESTABLISHED and conn.error is None


def test_data_on_a_syn_is_not_acknowledged_and_taken_when_resent() -> None:
    """RFC 9293 §3.10.7.2 allows queuing text that came with a SYN; like Linux without TCP Fast
    Open we do not: the SYN-ACK acknowledges only the SYN, so the peer sends the data again."""
    s = Stack([A4], now=0.0)
    listener = s.tcp_listen(80)
    s.receive_packet(tcp(B4, A4, 2222, 80, 1000, 0, SYN, data=b"early", options=MSS), 0.0)
    [sa] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert sa.flags == SYN | ACK and sa.ack == 1001
    s.receive_packet(tcp(B4, A4, 2222, 80, 1001, sa.seq + 1, ACK | 0x08, data=b"early"), 0.0)
    conn = s.tcp_accept(listener)
    assert conn is not None and s.tcp_receive(conn, 100, 0.0) == b"early"


def test_sack_scoreboard_is_bounded() -> None:
    """A peer SACKing thousands of separate 1-byte ranges cannot grow the sender's scoreboard
    (and the per-ACK work over it) without bound; the connection still completes."""
    opts = TCPOptions(rack=False)
    p = Pair(a_options=opts, b_options=opts)
    p.handshake()
    a = p.a
    a.send(bytes(12_000), p.now)
    p.a_out.clear()  # nothing reaches B: only our forged SACKs arrive
    una = a.snd_una
    assert a.snd_max - una >= 12_000
    ts = a._ts_recent
    for k in range(600):
        blocks = b"".join(struct.pack("!II", (una + 4 + 4 * (3 * k + m)) & 0xFFFFFFFF,
                                      (una + 5 + 4 * (3 * k + m)) & 0xFFFFFFFF) for m in range(3))
        sack = bytes((1, 1, 5, 2 + len(blocks))) + blocks
        ts = (ts + 1) & 0xFFFFFFFF
        a.receive_segment(segment(p.b_port, p.a_port, a.rcv_nxt, una, ACK,
                                  options=ts_option(ts, 0) + sack), p.now)
    assert 0 < len(a._sacked) <= 256 and a.internal_errors == 0 and a.state == S.ESTABLISHED
    p.a_out.clear()
    # The real receiver takes over: everything is delivered.
    a.snd_nxt = a.snd_una  # (as after an RTO: resend from SND.UNA)
    from tests.netstack.tcp_helpers import Pump
    pump = Pump("a", b"", shutdown=False)
    assert p.run(lambda: a.snd_una == a.snd_max, duration=30, app=pump)
    assert len(pump.received) == 12_000


def test_syn_fin_to_a_listener_is_dropped() -> None:
    """SYN+FIN is not a connection attempt (Linux discards it in LISTEN): no SYN-ACK, no state."""
    s = Stack([A4], now=0.0)
    s.tcp_listen(80)
    s.receive_packet(tcp(B4, A4, 1234, 80, 1000, 0, SYN | FIN, options=MSS), 0.0)
    assert s.packets_to_send() == [] and not s.connections


def test_udp_length_field_is_checked() -> None:
    """RFC 768: a UDP length beyond the IP payload is malformed (dropped, counted); bytes after
    a shorter length are IP padding and not part of the datagram."""
    s = Stack([A4], now=0.0)
    ep = s.udp_bind(port=7)
    seg = bytearray(_udp_seg(B4, A4, b"data"))
    seg[4:6] = struct.pack("!H", len(seg) + 10)
    seg[6:8] = b"\x00\x00"  # (no checksum over IPv4, so only the length is wrong)
    s.receive_packet(ipv4(B4, A4, 17, bytes(seg)), 0.0)
    assert not ep.queue and s.counters.malformed == 1
    short = bytearray(_udp_seg(B4, A4, b"data"))
    short[6:8] = b"\x00\x00"
    s.receive_packet(ipv4(B4, A4, 17, bytes(short) + b"pad"), 0.0)
    assert [d for d, _ in ep.queue] == [b"data"]


def test_window_scale_dropped_when_the_syn_ack_lacks_it() -> None:
    """RFC 7323 §2.2: scaling is used only if both SYNs carried the option: a SYN-ACK without it
    turns it off for our receive side too (we offered it in our SYN)."""
    p = Pair(b_options=TCPOptions(window_scaling=False))
    assert p.segments("ab") == [] and sent(list(p.a_out))[0].wscale == 7
    p.handshake()
    assert p.a.rcv_wscale == p.a.snd_wscale == p.b.rcv_wscale == p.b.snd_wscale == 0
    from tests.netstack.tcp_helpers import Pump
    pump = Pump("b", bytes(200_000))
    assert p.run(lambda: pump.finished(p), duration=30, app=pump)
    assert all(s.window <= 0xFFFF for s in p.segments("ab"))
    assert p.a.rcv_adv - p.a.rcv_nxt <= 0xFFFF
