"""The Stack's TCP plumbing: listeners, bounded SYN and accept queues, demux, table cleanup, ISNs."""

from __future__ import annotations

from tests.netstack.netutil import A4, ACK, B4, B6, A6, RST, SYN, parse, parse_tcp, tcp
from tsnet.netstack.stack import Stack
from tsnet.netstack.tcp import TCPState

MSS = b"\x02\x04\x04\xd8"  # MSS 1240


def syn(sport: int, dport: int = 80, src: str = B4, dst: str = A4, seq: int = 1000) -> bytes:
    return tcp(src, dst, sport, dport, seq, 0, SYN, options=MSS)


def synacks(s: Stack) -> dict[int, int]:
    """{client port: our ISS} for every SYN-ACK in the outbox."""
    found = {}
    for pkt in s.packets_to_send():
        seg = parse_tcp(parse(pkt))
        if seg.flags == SYN | ACK:
            found[seg.dport] = seg.seq
    return found


def run_timers_until_idle(s: Stack, now: float, limit: float = 1000.0) -> float:
    while (t := s.get_timer()) is not None and t < now + limit:
        now = t
        s.handle_timer(now)
        s.packets_to_send()
    return now


def test_syn_flood_is_bounded_and_drains() -> None:
    s = Stack([A4], now=0.0, max_half_open=64)
    listener = s.tcp_listen(80, backlog=16)
    s.receive_packets([syn(10000 + i) for i in range(5000)], 0.0)
    assert len(s.connections) == 16 and len(listener.half_open) == 16
    assert len(synacks(s)) == 16
    assert s.counters.tcp_syn_dropped == 5000 - 16
    # Nobody completes the handshake: SYN-ACK retries run out and the table empties.
    run_timers_until_idle(s, 0.0)
    assert not s.connections and not listener.half_open and not listener.accept_queue
    assert s.get_timer() is None
    assert len(s._heap) == 0 or all(e[2] not in s._deadline_of for e in s._heap)


def test_global_and_per_source_half_open_bounds() -> None:
    s = Stack([A4], now=0.0, max_half_open=60)
    s.tcp_listen(80, backlog=100)
    s.tcp_listen(81, backlog=100)
    s.receive_packets([syn(10000 + i, 80) for i in range(100)] + [syn(10000 + i, 81) for i in range(100)], 0.0)
    assert len(s.connections) == 40  # one flooding source gets two thirds
    s.receive_packets([syn(10000 + i, 80, src="100.64.0.3") for i in range(100)], 0.0)
    assert len(s.connections) == 60  # another source still gets the rest
    run_timers_until_idle(s, 0.0)
    assert not s.connections and s._half_open == 0 and not s._half_open_by_src


def test_syn_retransmission_is_deduplicated() -> None:
    s = Stack([A4], now=0.0)
    s.tcp_listen(80)
    s.receive_packets([syn(5555), syn(5555), syn(5555)], 0.0)
    assert len(s.connections) == 1
    assert s.counters.tcp_connections_opened == 1


def complete(s: Stack, sport: int, now: float, src: str = B4, dst: str = A4) -> None:
    s.receive_packet(syn(sport, src=src, dst=dst), now)
    iss = synacks(s)[sport]
    s.receive_packet(tcp(src, dst, sport, 80, 1001, (iss + 1) & 0xFFFFFFFF, ACK), now)


def test_accept_queue_bounded() -> None:
    s = Stack([A4], now=0.0)
    listener = s.tcp_listen(80, backlog=4)
    for i in range(4):
        complete(s, 20000 + i, 0.0)
    assert len(listener.accept_queue) == 4
    assert s.take_changed().count(listener) == 1
    # The queue is full: further SYNs are dropped (the client retries later).
    s.receive_packet(syn(30000), 0.0)
    assert synacks(s) == {} and s.counters.tcp_syn_dropped == 1
    conn = s.tcp_accept(listener)
    assert conn is not None and conn.state == TCPState.ESTABLISHED and conn.remote_port == 20000
    complete(s, 30000, 0.1)
    assert len(listener.accept_queue) == 4


def test_closed_connections_leave_the_table() -> None:
    s = Stack([A6], now=0.0)
    listener = s.tcp_listen(80)
    complete(s, 40000, 0.0, src=B6, dst=A6)
    conn = s.tcp_accept(listener)
    assert conn is not None and len(s.connections) == 1
    s.receive_packet(tcp(B6, A6, 40000, 80, 1001, 0, RST), 0.0)
    assert conn.state == TCPState.CLOSED and isinstance(conn.error, ConnectionResetError)
    assert not s.connections
    assert s.counters.tcp_connections_closed == 1


def test_close_listener_resets_pending() -> None:
    s = Stack([A4], now=0.0)
    listener = s.tcp_listen(80, backlog=8)
    complete(s, 1, 0.0)
    s.receive_packet(syn(2), 0.0)
    s.packets_to_send()
    s.close_listener(listener, 0.0)
    rsts = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert sorted(r.dport for r in rsts if r.flags & RST) == [1, 2]
    assert not s.connections and not s.listeners
    # The port is closed now: a new SYN gets RST+ACK.
    s.receive_packet(syn(3), 0.0)
    [r] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert r.flags == RST | ACK


def test_isn_is_keyed_per_tuple_and_advances_with_time() -> None:
    s = Stack([A4], now=0.0)
    s.tcp_listen(80)
    s.receive_packets([syn(1), syn(2)], 5.0)
    first = synacks(s)
    assert first[1] != first[2]
    iss_1, _ = s._isn(bytes([100, 64, 0, 1]), 80, bytes([100, 64, 0, 2]), 1, 5.0)
    iss_2, _ = s._isn(bytes([100, 64, 0, 1]), 80, bytes([100, 64, 0, 2]), 1, 6.0)
    assert (iss_2 - iss_1) & 0xFFFFFFFF == 250_000  # the 4 µs clock of RFC 6528
    other = Stack([A4], now=0.0)
    assert other._isn(bytes([100, 64, 0, 1]), 80, bytes([100, 64, 0, 2]), 1, 5.0)[0] != iss_1  # secret key


def test_active_open_ports_and_timer_heap() -> None:
    s = Stack([A4], now=0.0)
    conns = [s.tcp_connect(B4, 443, 0.0) for _ in range(50)]
    ports = {c.local_port for c in conns}
    assert len(ports) == 50 and all(49152 <= p < 65536 for p in ports)
    assert s.get_timer() == min(c.get_timer() for c in conns)
    # Nobody answers: the SYN retries end with TimeoutError and the table empties.
    run_timers_until_idle(s, 0.0)
    assert not s.connections
    assert all(isinstance(c.error, TimeoutError) for c in conns)


def test_segment_to_unknown_tuple_on_listening_port() -> None:
    s = Stack([A4], now=0.0)
    s.tcp_listen(80)
    s.receive_packet(tcp(B4, A4, 7, 80, 1, 4242, ACK), 0.0)  # stray ACK: RST with seq = its ack
    [r] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert r.flags == RST and r.seq == 4242
    s.receive_packet(tcp(B4, A4, 7, 80, 1, 0, RST), 0.0)  # stray RST: ignored
    assert s.packets_to_send() == [] and not s.connections


def test_frag_needed_lowers_mss_for_segments_in_flight() -> None:
    import struct

    from tests.netstack.netutil import csum, ipv4

    s = Stack([A4], now=0.0)
    conn = s.tcp_connect(B4, 80, 0.0)
    [syn_pkt] = s.packets_to_send()
    our_syn = parse_tcp(parse(syn_pkt))
    s.receive_packet(tcp(B4, A4, 80, conn.local_port, 5000, our_syn.seq + 1, SYN | ACK, options=MSS), 0.0)
    s.packets_to_send()
    assert conn.state == TCPState.ESTABLISHED and conn.send_mss == 1240
    s.tcp_send(conn, b"d" * 3000, 0.0)
    data_pkts = [p for p in s.packets_to_send() if parse_tcp(parse(p)).data]
    assert data_pkts

    def frag_needed(quoted: bytes, mtu: int) -> bytes:
        body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted[:28]
        return ipv4(B4, A4, 1, body[:2] + struct.pack("!H", csum(body)) + body[4:])

    stale = bytearray(data_pkts[0][:28])
    stale[24:28] = (our_syn.seq - 5000 & 0xFFFFFFFF).to_bytes(4, "big")  # a sequence number never sent
    s.receive_packet(frag_needed(bytes(stale), 1000), 0.0)
    assert conn.send_mss == 1240
    s.receive_packet(frag_needed(bytes(data_pkts[0]), 1000), 0.0)
    assert conn.send_mss == 960 and s.counters.mss_lowered == 1
    s.receive_packet(frag_needed(bytes(data_pkts[0]), 100), 0.0)  # clamped to the 576-byte minimum
    assert conn.send_mss == 536


def test_tsmp_ping_and_reject() -> None:
    import struct

    from tests.netstack.netutil import ipv4, ipv6

    s = Stack([A4, A6], now=0.0)
    s.peerapi_port = 4242
    s.receive_packet(ipv4(B4, A4, 99, b"p" + b"12345678", ident=0x1234), 0.0)
    s.receive_packet(ipv6(B6, A6, 99, b"p" + b"abcdefgh"), 0.0)
    r4, r6 = (parse(p) for p in s.packets_to_send())
    assert (r4.src, r4.dst, r4.proto, r4.payload) == (A4, B4, 99, b"o12345678" + struct.pack("!H", 4242))
    assert (r6.src, r6.dst, r6.payload) == (A6, B6, b"oabcdefgh" + struct.pack("!H", 4242))
    # A reject of our SYN (sent by the target) fails the connect at once.
    conn = s.tcp_connect(B4, 22, 0.0)
    s.packets_to_send()
    s.receive_packet(ipv4(B4, A4, 99, b"!" + bytes((6,)) + b"A" + struct.pack("!HH", conn.local_port, 22)), 0.0)
    assert conn.state == TCPState.CLOSED and not s.connections


def test_handshake_completing_into_a_full_accept_queue_is_reset() -> None:
    s = Stack([A4], now=0.0)
    listener = s.tcp_listen(80, backlog=2)
    s.receive_packets([syn(1), syn(2)], 0.0)
    iss = synacks(s)
    s.receive_packet(tcp(B4, A4, 1, 80, 1001, iss[1] + 1, ACK), 0.0)
    s.receive_packet(syn(3), 0.0)  # one slot in each queue: accepted
    iss.update(synacks(s))
    s.receive_packet(tcp(B4, A4, 2, 80, 1001, iss[2] + 1, ACK), 0.0)
    s.packets_to_send()
    s.receive_packet(tcp(B4, A4, 3, 80, 1001, iss[3] + 1, ACK), 0.0)
    [rst] = [parse_tcp(parse(p)) for p in s.packets_to_send()]
    assert rst.flags & RST and rst.dport == 3
    assert [c.remote_port for c in listener.accept_queue] == [1, 2]
    assert s.counters.tcp_accept_overflow == 1 and len(s.connections) == 2 and s._half_open == 0


def test_icmp_unreachable_fails_a_pending_connect() -> None:
    import struct

    from tests.netstack.netutil import csum, ipv6, pseudo

    s = Stack([A6], now=0.0)
    conn = s.tcp_connect(B6, 80, 0.0)
    [syn_pkt] = s.packets_to_send()
    body = struct.pack("!BBHI", 1, 4, 0, 0) + bytes(syn_pkt)
    body = body[:2] + struct.pack("!H", csum(pseudo(B6, A6, 58, len(body)) + body)) + body[4:]
    s.receive_packet(ipv6(B6, A6, 58, body), 0.0)
    assert conn.state == TCPState.CLOSED and not s.connections
    assert s.counters.icmp_errors_received == 1
