"""Two (or more) WireGuard devices over a fake network with a fake clock."""

from __future__ import annotations

import pytest

from tests.wg.wgutil import Clock, CountingRng, Net, events_of, ipv4, ipv6, key, make_pair
from tsnet.wg import HandshakeCompleted, HandshakeFailed, Limits, PacketReceived, PeerEndpointChanged, WireGuard
from tsnet.wg.messages import TYPE_COOKIE_REPLY, TYPE_INITIATION, TYPE_RESPONSE, TYPE_TRANSPORT

A_ADDR = ("10.1.0.1", 51820)
B_ADDR = ("10.1.0.2", 51820)


def packets(dev: WireGuard) -> list[bytes]:
    return [e.packet for e in dev.drain_events() if isinstance(e, PacketReceived)]


def sent_types(net: Net, src: object) -> list[int]:
    return [p[0] for s, _d, p in net.log if s == src]


def establish(net: Net, a: WireGuard, b: WireGuard) -> None:
    a.send_packet(b.public_key, ipv4(b"first"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"first")]
    a.drain_events()


# -- handshakes and data -------------------------------------------------------


def test_handshake_and_data_both_ways() -> None:
    net, a, b = make_pair()
    pa, pb = a.public_key, b.public_key
    a.send_packet(pb, ipv4(b"ping"), net.clock.now)
    # Nothing usable yet: the packet is staged and an initiation goes out.
    assert sent_types(net, A_ADDR) == []
    net.pump()
    assert sent_types(net, A_ADDR) == [TYPE_INITIATION, TYPE_TRANSPORT]
    assert sent_types(net, B_ADDR) == [TYPE_RESPONSE]
    ev_a, ev_b = a.drain_events(), b.drain_events()
    assert ev_a == [HandshakeCompleted(pb, True)]
    assert ev_b == [HandshakeCompleted(pa, False), PacketReceived(pa, ipv4(b"ping"))]
    b.send_packet(pa, ipv4(b"pong"), net.clock.now)
    net.pump()
    assert packets(a) == [ipv4(b"pong")]
    st = a.peer_status(pb, net.clock.now)
    assert st.has_session and st.last_handshake == net.clock.now
    assert st.tx_bytes > 0 and st.rx_bytes > 0
    assert a.counters.total_dropped() == 0 and b.counters.total_dropped() == 0


def test_handshake_initiated_by_the_other_side() -> None:
    net, a, b = make_pair()
    b.send_packet(a.public_key, ipv6(b"from b"), net.clock.now)
    net.pump()
    assert packets(a) == [ipv6(b"from b")]
    a.send_packet(b.public_key, ipv4(b"reply"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"reply")]


def test_initiator_sends_keepalive_when_nothing_is_staged() -> None:
    net, a, b = make_pair()
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    # The responder's session is confirmed by the initiator's immediate keepalive.
    assert b.counters.keepalives_received == 1
    assert events_of(b, HandshakeCompleted) == [HandshakeCompleted(a.public_key, False)]
    b.send_packet(a.public_key, ipv4(b"now b can send"), net.clock.now)
    net.pump()
    assert packets(a) == [ipv4(b"now b can send")]


def test_padding_on_the_wire_and_trimming_on_receive() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    net.log.clear()
    pkt = ipv4(b"x")  # 21 bytes -> padded to 32
    a.send_packet(b.public_key, pkt, net.clock.now)
    net.pump()
    assert [len(p) for s, _d, p in net.log if s == A_ADDR] == [16 + 32 + 16]
    assert packets(b) == [pkt]
    big = ipv4(bytes(1259))  # 1279 bytes: padding would exceed the 1280 MTU, so only 1 byte is added
    a.send_packet(b.public_key, big, net.clock.now)
    net.pump()
    assert len(net.log[-1][2]) == 16 + 1280 + 16
    assert packets(b) == [big]


def test_bad_inner_packets_are_dropped_and_counted() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    for bad in (b"\x45" + bytes(10), b"\x00" * 40, bytes([0x45, 0, 0x10, 0]) + bytes(16), ipv6()[:4] + b"\x00\x64" + ipv6()[6:]):
        a.send_packet(b.public_key, bad, net.clock.now)
    net.pump()
    assert packets(b) == []
    assert b.counters.drop_bad_inner_packet == 4


def test_keepalive_after_unanswered_data() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    net.log.clear()
    net.tick(net.clock.now + limits.keepalive_timeout - 0.01)
    assert [p for s, _d, p in net.log if s == B_ADDR] == []
    net.tick(net.clock.now + 0.02)
    keepalives = [p for s, _d, p in net.log if s == B_ADDR]
    assert len(keepalives) == 1 and len(keepalives[0]) == 32 and keepalives[0][0] == TYPE_TRANSPORT
    assert a.counters.keepalives_received == 1
    assert b.counters.keepalives_sent == 1


def test_no_keepalive_when_we_answered() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    b.send_packet(a.public_key, ipv4(b"answer"), net.clock.now)
    net.pump()
    ka_before = b.counters.keepalives_sent
    net.tick(net.clock.now + 11)
    assert b.counters.keepalives_sent == ka_before


def test_persistent_keepalive() -> None:
    net, a, b = make_pair()
    a.add_peer(b.public_key, persistent_keepalive=25)
    a.initiate_handshake(b.public_key, net.clock.now)  # no data: neither side owes a passive keepalive
    net.pump()
    sent = a.counters.keepalives_sent
    net.tick(net.clock.now + 24.9)
    assert a.counters.keepalives_sent == sent
    net.tick(net.clock.now + 0.2)
    assert a.counters.keepalives_sent == sent + 1
    net.tick(net.clock.now + 25.1)
    assert a.counters.keepalives_sent == sent + 2


# -- replay, forgery -----------------------------------------------------------


def test_duplicate_and_corrupted_transport_are_dropped() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    net.drop = lambda src, dst, p: True  # capture only
    for i in range(3):
        a.send_packet(b.public_key, ipv4(b"%d" % i), net.clock.now)
    net.pump()
    wire = [p for s, _d, p in net.log if s == A_ADDR][-3:]
    net.drop = None
    # A forged copy of the newest packet must not move the window past the older ones.
    forged = bytearray(wire[2])
    forged[-1] ^= 0x80
    b.receive_datagram(bytes(forged), A_ADDR, net.clock.now)
    assert b.counters.drop_data_invalid == 1
    for p in (wire[0], wire[1], wire[0], wire[2], wire[2]):
        b.receive_datagram(p, A_ADDR, net.clock.now)
    assert packets(b) == [ipv4(b"0"), ipv4(b"1"), ipv4(b"2")]
    assert b.counters.drop_replayed == 2


def test_garbage_and_unknown_index_are_counted() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    before = b.counters.as_dict()
    b.receive_datagram(b"", A_ADDR, net.clock.now)
    b.receive_datagram(b"\x01\x00\x00\x00" + bytes(10), A_ADDR, net.clock.now)  # wrong size for type 1
    b.receive_datagram(b"\x04\x00\x00\x01" + bytes(40), A_ADDR, net.clock.now)  # reserved byte set
    b.receive_datagram(b"\x04\x00\x00\x00" + b"\xff" * 40, A_ADDR, net.clock.now)  # unknown receiver
    b.receive_datagram(b"\x02\x00\x00\x00" + bytes(88), A_ADDR, net.clock.now)  # bad mac1
    after = b.counters.as_dict()
    assert after["drop_malformed"] - before["drop_malformed"] == 3
    assert after["drop_unknown_index"] - before["drop_unknown_index"] == 1
    assert after["drop_bad_mac1"] - before["drop_bad_mac1"] == 1
    assert after["drop_internal_error"] == 0


def test_replayed_initiation_and_flood_are_dropped() -> None:
    clock = Clock()
    net, a, b = make_pair(Limits(rekey_timeout=0.001), clock=clock)
    net.drop = lambda src, dst, p: True
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    first = net.log[-1][2]
    clock.advance(0.005)
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    second = net.log[-1][2]
    net.drop = None
    b.receive_datagram(first, A_ADDR, clock.now)
    assert b.counters.initiations_received == 1
    b.receive_datagram(second, A_ADDR, clock.now + 0.01)  # newer timestamp but within 20 ms: flood
    assert b.counters.drop_initiation_flood == 1
    b.receive_datagram(first, A_ADDR, clock.now + 1)  # an old initiation replayed later
    assert b.counters.drop_replayed_initiation == 1
    assert b.counters.initiations_received == 1


def test_initiation_from_unknown_peer() -> None:
    clock = Clock()
    stranger = WireGuard(key(9), now=clock.now, rng=CountingRng(9))
    b = WireGuard(key(2), now=clock.now, rng=CountingRng(2))
    stranger.add_peer(b.public_key, endpoint=B_ADDR)
    stranger.initiate_handshake(b.public_key, clock.now)
    (msg, _dst), = stranger.datagrams_to_send(clock.now)
    b.receive_datagram(msg, ("192.0.2.9", 1), clock.now)
    assert b.counters.drop_unknown_peer == 1
    assert b.datagrams_to_send(clock.now) == []


# -- rekeying and session limits -------------------------------------------------


def test_rekey_after_messages_and_old_session_still_accepted() -> None:
    limits = Limits(rekey_after_messages=5)
    net, a, b = make_pair(limits)
    establish(net, a, b)  # counter 0 used
    net.clock.advance(limits.rekey_timeout)  # initiations are at least REKEY_TIMEOUT apart
    net.drop = lambda src, dst, p: True
    for i in range(4):
        a.send_packet(b.public_key, ipv4(b"%d" % i), net.clock.now)
    net.pump()
    old = [p for s, _d, p in net.log if s == A_ADDR and p[0] == TYPE_TRANSPORT][-4:]
    assert a.counters.initiations_sent == 1
    a.send_packet(b.public_key, ipv4(b"5th"), net.clock.now)  # counter 5: above REKEY_AFTER_MESSAGES -> rekey
    assert a.counters.initiations_sent == 2
    net.drop = None
    net.log.clear()
    net.pump()  # completes the new handshake
    assert [e for e in a.drain_events() if isinstance(e, HandshakeCompleted)] == [HandshakeCompleted(b.public_key, True)]
    # Packets sealed under the old session arrive late: the old session is now "previous" and still accepted.
    for p in old:
        b.receive_datagram(p, A_ADDR, net.clock.now)
    assert [x for x in packets(b) if x != ipv4(b"5th")] == [ipv4(b"%d" % i) for i in range(4)]
    a.send_packet(b.public_key, ipv4(b"new"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"new")]


def test_rekey_after_time_only_by_the_initiator() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    net.clock.advance(limits.rekey_after_time + 1)
    b.send_packet(a.public_key, ipv4(b"b"), net.clock.now)
    assert b.counters.initiations_sent == 0  # the responder does not rekey on age
    a.send_packet(b.public_key, ipv4(b"a"), net.clock.now)
    assert a.counters.initiations_sent == 2
    net.pump()
    assert a.counters.handshakes_completed == 2


def test_reject_after_time() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    net.drop = lambda src, dst, p: True
    b.send_packet(a.public_key, ipv4(b"late"), net.clock.now)
    net.pump()
    late = net.log[-1][2]
    net.drop = None
    net.clock.advance(limits.reject_after_time)
    a.receive_datagram(late, B_ADDR, net.clock.now)
    assert a.counters.drop_expired_keypair == 1
    # Sending on an expired session stages the packet and starts a handshake.
    sent = a.counters.initiations_sent
    a.send_packet(b.public_key, ipv4(b"after"), net.clock.now)
    assert a.counters.initiations_sent == sent + 1
    assert a.peer_status(b.public_key, net.clock.now).staged_packets == 1
    net.pump()
    assert packets(b) == [ipv4(b"after")]


def test_reject_after_messages() -> None:
    net, a, b = make_pair(Limits(rekey_after_messages=1000, reject_after_messages=4))
    establish(net, a, b)  # counter 0
    net.clock.advance(5)
    for i in range(3):
        a.send_packet(b.public_key, ipv4(b"%d" % i), net.clock.now)  # counters 1..3
    assert a.peer_status(b.public_key).has_session is False
    sent = a.counters.initiations_sent
    net.drop = lambda src, dst, p: True
    a.send_packet(b.public_key, ipv4(b"staged"), net.clock.now)  # no counter left: staged
    assert a.counters.initiations_sent == sent + 1
    assert a.peer_status(b.public_key).staged_packets == 1
    net.pump()
    net.drop = None
    net.log.clear()
    net.tick(net.clock.now + 6)  # the retransmission gets through
    got = packets(b)
    assert got[-1] == ipv4(b"staged")


def test_last_minute_handshake_on_receive() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    # Keep a's send path quiet (rekey_after_time would also trigger); only b sends.
    net.clock.advance(limits.reject_after_time - limits.keepalive_timeout - limits.rekey_timeout + 0.5)
    b.send_packet(a.public_key, ipv4(b"late"), net.clock.now)
    sent = a.counters.initiations_sent
    net.pump(rounds=1)
    assert a.counters.initiations_sent == sent + 1
    net.pump()
    assert a.counters.handshakes_completed == 2


def test_retransmit_with_jitter_then_give_up() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    net.drop = lambda src, dst, p: True  # the peer is unreachable
    start = net.clock.now
    a.send_packet(b.public_key, ipv4(b"lost"), start)
    times = [start]
    while True:
        t = a.get_timer()
        assert t is not None
        if t - start > 200:
            break
        net.clock.now = t
        before = a.counters.initiations_sent
        a.handle_timer(t)
        if a.counters.initiations_sent > before:
            times.append(t)
        net.pump()
        if a.counters.handshakes_failed:
            break
    assert a.counters.initiations_sent == 20 == len(times)
    gaps = [y - x for x, y in zip(times, times[1:], strict=False)]
    assert all(limits.rekey_timeout <= g <= limits.rekey_timeout + limits.rekey_timeout_jitter for g in gaps)
    assert len({round(g, 6) for g in gaps}) > 1  # jittered, not a constant interval
    assert events_of(a, HandshakeFailed) == [HandshakeFailed(b.public_key)]
    assert a.peer_status(b.public_key).staged_packets == 0
    # New data starts a fresh series.
    net.clock.advance(10)
    a.send_packet(b.public_key, ipv4(b"again"), net.clock.now)
    assert a.counters.initiations_sent == 21
    net.pump()  # lost as well
    net.drop = None
    net.tick(net.clock.now + 6)
    assert packets(b) == [ipv4(b"again")]


def test_new_handshake_when_peer_goes_silent() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    net.drop = lambda src, dst, p: src == B_ADDR  # b's replies vanish
    sent = a.counters.initiations_sent
    t0 = net.clock.now
    a.send_packet(b.public_key, ipv4(b"hello?"), t0)
    net.tick(t0 + limits.keepalive_timeout + limits.rekey_timeout - 0.01)
    assert a.counters.initiations_sent == sent
    net.tick(t0 + limits.keepalive_timeout + limits.rekey_timeout + limits.rekey_timeout_jitter + 0.01)
    assert a.counters.initiations_sent == sent + 1


def test_keys_zeroed_after_three_reject_times() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    assert a._keypairs  # noqa: SLF001 - the index table itself is what is being checked
    net.drop = lambda src, dst, p: True
    net.tick(net.clock.now + 3 * limits.reject_after_time + 1)
    assert not a._keypairs and not b._keypairs  # noqa: SLF001


def test_responder_next_keypair_is_confirmed_by_first_transport() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    # a rekeys; b answers, holding the new session as "next" until a's first packet arrives.
    net.clock.advance(6)
    net.drop = lambda src, dst, p: src == A_ADDR and p[0] == TYPE_TRANSPORT
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    b.drain_events()
    # b still sends on its current (old) session; a accepts it as "previous".
    b.send_packet(a.public_key, ipv4(b"old session"), net.clock.now)
    net.pump()
    assert packets(a) == [ipv4(b"old session")]
    net.drop = None
    a.send_packet(b.public_key, ipv4(b"confirm"), net.clock.now)
    net.pump()
    evs = b.drain_events()
    assert evs == [HandshakeCompleted(a.public_key, False), PacketReceived(a.public_key, ipv4(b"confirm"))]


def test_simultaneous_initiation_converges() -> None:
    net, a, b = make_pair()
    a.send_packet(b.public_key, ipv4(b"from a"), net.clock.now)
    b.send_packet(a.public_key, ipv4(b"from b"), net.clock.now)
    net.pump()
    # Each side completes its own initiation; the crossing responses' sessions are kept as spares.
    assert a.drain_events() == [HandshakeCompleted(b.public_key, True), PacketReceived(b.public_key, ipv4(b"from b"))]
    assert b.drain_events() == [HandshakeCompleted(a.public_key, True), PacketReceived(a.public_key, ipv4(b"from a"))]
    net.tick(net.clock.now + 30)
    a.send_packet(b.public_key, ipv4(b"a2"), net.clock.now)
    b.send_packet(a.public_key, ipv4(b"b2"), net.clock.now)
    net.pump()
    assert ipv4(b"a2") in packets(b)
    assert ipv4(b"b2") in packets(a)


def test_preshared_key() -> None:
    net, a, b = make_pair(psk=b"\x42" * 32)
    establish(net, a, b)
    net2, c, d = make_pair()
    c.add_peer(d.public_key, preshared_key=b"\x01" * 32)
    c.send_packet(d.public_key, ipv4(), net2.clock.now)
    net2.pump()
    assert c.counters.drop_handshake_invalid == 1 and packets(d) == []
    with pytest.raises(ValueError):
        c.add_peer(d.public_key, preshared_key=b"short")


# -- cookies and load ------------------------------------------------------------


def test_cookie_reply_under_load_then_mac2_accepted() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    b.set_under_load(True)
    a.send_packet(b.public_key, ipv4(b"under load"), net.clock.now)
    net.pump()
    assert sent_types(net, B_ADDR) == [TYPE_COOKIE_REPLY]
    assert b.counters.drop_needs_cookie == 1 and b.counters.cookie_replies_sent == 1
    assert a.counters.cookie_replies_received == 1
    # Like wireguard-go: no immediate resend; the retransmission carries mac2 and is accepted.
    net.tick(net.clock.now + limits.rekey_timeout + limits.rekey_timeout_jitter)
    assert b.counters.initiations_received == 1
    assert packets(b) == [ipv4(b"under load")]
    assert b.counters.drop_needs_cookie == 1


def test_forged_cookie_reply_is_dropped() -> None:
    net, a, b = make_pair()
    net.drop = lambda src, dst, p: True
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    init = net.log[-1][2]
    forged = b"\x03\x00\x00\x00" + init[4:8] + bytes(56)
    a.receive_datagram(forged, B_ADDR, net.clock.now)
    assert a.counters.drop_cookie_invalid == 1
    a.receive_datagram(b"\x03\x00\x00\x00" + b"\xee" * 60, B_ADDR, net.clock.now)
    assert a.counters.drop_unknown_index == 1


def test_automatic_under_load_threshold() -> None:
    limits = Limits(under_load_handshakes_per_second=3, under_load_duration=1.0)
    clock = Clock()
    b = WireGuard(key(2), now=clock.now, limits=limits, rng=CountingRng(2))
    assert not b.is_under_load(clock.now)
    for i in range(3):
        b.receive_datagram(b"\x01\x00\x00\x00" + bytes(144), ("192.0.2.1", i), clock.now + i * 0.1)
    assert b.is_under_load(clock.now + 0.3)
    assert not b.is_under_load(clock.now + 1.3)
    b.set_under_load(False)
    for i in range(5):
        b.receive_datagram(b"\x01\x00\x00\x00" + bytes(144), ("192.0.2.1", i), clock.now + 2)
    assert not b.is_under_load(clock.now + 2)
    b.set_under_load(None)
    assert b.is_under_load(clock.now + 2)


def test_handshake_rate_limit_per_source_under_load() -> None:
    limits = Limits(handshake_rate_per_second=0.5, handshake_rate_burst=3)
    clock = Clock()
    net = Net(clock)
    b = net.add(B_ADDR, WireGuard(key(2), now=clock.now, limits=limits, rng=CountingRng(2)))
    b.set_under_load(True)
    initiators = []
    for i in range(5):
        dev = net.add(("192.0.2.50", 1000 + i), WireGuard(key(10 + i), now=clock.now, limits=limits,
                                                          rng=CountingRng(10 + i)))
        dev.add_peer(b.public_key, endpoint=B_ADDR)
        b.add_peer(dev.public_key)
        dev.initiate_handshake(b.public_key, clock.now)
        initiators.append(dev)
    net.pump()
    assert b.counters.cookie_replies_sent == 5
    net.tick(clock.now + limits.rekey_timeout + limits.rekey_timeout_jitter + 0.01)
    # All five retries carry a valid mac2, but they share one source host: only the burst gets through.
    assert b.counters.initiations_received == 3
    assert b.counters.drop_rate_limited == 2


# -- roaming, many peers, configuration ----------------------------------------------


def test_roaming_follows_authenticated_source() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    b.drain_events()
    new_addr = ("198.51.100.7", 40000)
    net.devices[new_addr] = net.devices.pop(A_ADDR)  # a moved
    a.send_packet(b.public_key, ipv4(b"from new place"), net.clock.now)
    net.pump()
    assert b.drain_events() == [
        PacketReceived(a.public_key, ipv4(b"from new place")),
        PeerEndpointChanged(a.public_key, new_addr),
    ]
    assert b.peer_status(a.public_key).endpoint == new_addr
    b.send_packet(a.public_key, ipv4(b"follow"), net.clock.now)
    net.pump()
    assert packets(a) == [ipv4(b"follow")]
    # A forged datagram from elsewhere does not move the endpoint.
    b.receive_datagram(b"\x04\x00\x00\x00" + bytes(60), ("203.0.113.66", 1), net.clock.now)
    assert b.peer_status(a.public_key).endpoint == new_addr


def test_roaming_disabled() -> None:
    net, a, b = make_pair(roaming=False)
    establish(net, a, b)
    new_addr = ("198.51.100.7", 40000)
    net.devices[new_addr] = net.devices.pop(A_ADDR)
    a.send_packet(b.public_key, ipv4(b"moved"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"moved")]
    assert b.peer_status(a.public_key).endpoint == A_ADDR


def test_many_peers_share_one_index_table() -> None:
    clock = Clock()
    net = Net(clock)
    hub = net.add(("10.0.0.1", 1), WireGuard(key(100), now=clock.now, rng=CountingRng(100)))
    spokes = []
    for i in range(40):
        addr = ("10.0.1.%d" % i, 2)
        s = net.add(addr, WireGuard(key(200 + i), now=clock.now, rng=CountingRng(200 + i)))
        s.add_peer(hub.public_key, endpoint=("10.0.0.1", 1))
        hub.add_peer(s.public_key, endpoint=addr)
        spokes.append(s)
    for i, s in enumerate(spokes):
        s.send_packet(hub.public_key, ipv4(b"spoke %d" % i), clock.now)
    net.pump()
    got = {e.peer: e.packet for e in hub.drain_events() if isinstance(e, PacketReceived)}
    assert got == {s.public_key: ipv4(b"spoke %d" % i) for i, s in enumerate(spokes)}
    assert len(hub._keypairs) == 40  # noqa: SLF001
    for i, s in enumerate(spokes):
        hub.send_packet(s.public_key, ipv4(b"back %d" % i), clock.now)
    net.pump()
    for i, s in enumerate(spokes):
        assert packets(s) == [ipv4(b"back %d" % i)]


def test_remove_peer_forgets_sessions() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    net.drop = lambda src, dst, p: True
    a.send_packet(b.public_key, ipv4(), net.clock.now)
    net.pump()
    pkt = net.log[-1][2]
    b.remove_peer(a.public_key)
    b.receive_datagram(pkt, A_ADDR, net.clock.now)
    assert b.counters.drop_unknown_index == 1
    assert b.peers() == []
    b.remove_peer(a.public_key)  # idempotent
    b.send_packet(a.public_key, ipv4(), net.clock.now)
    assert b.counters.send_unknown_peer == 1


def test_staged_queue_is_bounded_and_ordered() -> None:
    net, a, b = make_pair(Limits(max_staged_packets=4))
    net.drop = lambda src, dst, p: True
    for i in range(10):
        a.send_packet(b.public_key, ipv4(b"%d" % i), net.clock.now)
    assert a.counters.drop_staged_overflow == 6
    net.pump()  # the first initiation is lost
    net.drop = None
    net.tick(net.clock.now + 6)
    assert packets(b) == [ipv4(b"%d" % i) for i in range(6, 10)]


def test_no_endpoint_is_counted() -> None:
    clock = Clock()
    a = WireGuard(key(1), now=clock.now, rng=CountingRng(1))
    a.add_peer(key(2).public)
    a.send_packet(key(2).public, ipv4(), clock.now)
    assert a.datagrams_to_send(clock.now) == []
    assert a.counters.drop_no_endpoint == 1


def test_configuration_errors() -> None:
    a = WireGuard(key(1), now=0.0)
    with pytest.raises(ValueError):
        a.add_peer(key(1).public)
    with pytest.raises(KeyError):
        a.set_endpoint(key(3).public, ("h", 1))
    with pytest.raises(KeyError):
        a.peer_status(key(3).public)


def test_batch_apis_match_single_calls() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    batch = [ipv4(b"%d" % i) for i in range(20)]
    a.send_packets(b.public_key, batch, net.clock.now)
    out = a.datagrams_to_send(net.clock.now)
    assert len(out) == 20
    b.receive_datagrams([(bytes(d), A_ADDR) for d, _ in out] + [(b"junk", A_ADDR)], net.clock.now)
    assert packets(b) == batch
    assert b.counters.drop_malformed == 1


def test_packets_received_mode() -> None:
    clock = Clock()
    net = Net(clock)
    a = net.add(A_ADDR, WireGuard(key(1), now=clock.now, rng=CountingRng(1)))
    b = net.add(B_ADDR, WireGuard(key(2), now=clock.now, rng=CountingRng(2), packet_events=False))
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, endpoint=A_ADDR)
    a.send_packet(b.public_key, ipv4(b"tuple"), clock.now)
    net.pump()
    assert b.packets_received() == [(a.public_key, ipv4(b"tuple"))]
    assert b.drain_events() == [HandshakeCompleted(a.public_key, False)]


def test_handle_timer_early_is_harmless() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    before = a.counters.as_dict()
    a.handle_timer(net.clock.now)
    b.handle_timer(net.clock.now)
    assert a.counters.as_dict() == before
    assert a.get_timer() is not None


def test_memoryview_and_bytearray_input_through_a_whole_handshake() -> None:
    net, a, b = make_pair()
    a.send_packet(b.public_key, memoryview(ipv4(b"mv")), net.clock.now)
    for _ in range(3):
        for d, _dst in a.datagrams_to_send(net.clock.now):
            b.receive_datagram(memoryview(bytes(d)), A_ADDR, net.clock.now)
        for d, _dst in b.datagrams_to_send(net.clock.now):
            a.receive_datagrams([(bytearray(d), B_ADDR)], net.clock.now)
    assert packets(b) == [ipv4(b"mv")]
    assert a.counters.total_dropped() == 0 and b.counters.total_dropped() == 0


def test_add_peer_again_updates_only_what_is_given() -> None:
    net, a, b = make_pair(psk=b"\x42" * 32)
    establish(net, a, b)
    a.add_peer(b.public_key, persistent_keepalive=30)
    st = a.peer_status(b.public_key)
    assert st.persistent_keepalive == 30 and st.endpoint == B_ADDR and st.has_session
    a.add_peer(b.public_key, endpoint=("10.1.0.2", 51820))  # PSK untouched: a new handshake still works
    net.clock.advance(6)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    assert a.counters.handshakes_completed == 2
    a.add_peer(b.public_key, persistent_keepalive=0)
    assert a.peer_status(b.public_key).persistent_keepalive is None
    with pytest.raises(ValueError):
        a.add_peer(b.public_key, persistent_keepalive=-1)


def test_initiator_under_load_cookies_the_response() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    a.set_under_load(True)
    a.send_packet(b.public_key, ipv4(b"x"), net.clock.now)
    net.pump()
    # b's response lacked mac2: a answered with a cookie, which b files under its pending session's index.
    assert a.counters.drop_needs_cookie == 1
    assert b.counters.cookie_replies_received == 1
    net.tick(net.clock.now + limits.rekey_timeout + limits.rekey_timeout_jitter)
    # The retried initiation gets a response that carries mac2 and is accepted.
    assert a.counters.handshakes_completed == 1
    assert packets(b) == [ipv4(b"x")]


def test_timestamps_stay_monotonic_when_the_wall_clock_steps_back() -> None:
    clock = Clock()
    wall = [1_700_000_000.0]
    net = Net(clock)
    a = net.add(A_ADDR, WireGuard(key(1), now=clock.now, rng=CountingRng(1), wall_clock=lambda: wall[0]))
    b = net.add(B_ADDR, WireGuard(key(2), now=clock.now, rng=CountingRng(2)))
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, endpoint=A_ADDR)
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    wall[0] -= 3600  # NTP step backwards
    clock.advance(6)
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    assert b.counters.drop_replayed_initiation == 0
    assert a.counters.handshakes_completed == 2


def test_receiver_rejects_counters_at_or_above_its_limit() -> None:
    clock = Clock()
    net = Net(clock)
    a = net.add(A_ADDR, WireGuard(key(1), now=clock.now, rng=CountingRng(1)))
    b = net.add(B_ADDR, WireGuard(key(2), now=clock.now, rng=CountingRng(2),
                                  limits=Limits(reject_after_messages=3, rekey_after_messages=2)))
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, endpoint=A_ADDR)
    for i in range(5):
        a.send_packet(b.public_key, ipv4(b"%d" % i), clock.now)  # counters 0..4 on a's side
    net.pump()
    assert packets(b) == [ipv4(b"0"), ipv4(b"1"), ipv4(b"2")]
    assert b.counters.drop_replayed == 2


def test_receive_buffer_may_be_reused() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    buf = bytearray(2048)
    for i in range(3):
        a.send_packet(b.public_key, ipv4(b"reuse %d" % i), net.clock.now)
    for d, _dst in a.datagrams_to_send(net.clock.now):
        buf[: len(d)] = d
        b.receive_datagram(memoryview(buf)[: len(d)], A_ADDR, net.clock.now)
        buf[:] = bytes(len(buf))  # the driver scribbles over its buffer before the next recv
    assert packets(b) == [ipv4(b"reuse %d" % i) for i in range(3)]


@pytest.mark.parametrize(("inner", "wire"), [(36, 80), (84, 128), (1280, 1312), (20, 64)])
def test_padded_sizes_match_wireguard_go(inner: int, wire: int) -> None:
    # Notes A.4 (verified against wireguard-go): a 36-byte ICMP reply is 48 bytes of plaintext, 80 on the wire.
    net, a, b = make_pair()
    establish(net, a, b)
    net.log.clear()
    a.send_packet(b.public_key, ipv4(bytes(inner - 20)), net.clock.now)
    net.pump()
    assert [len(p) for s, _d, p in net.log if s == A_ADDR] == [wire]
    assert packets(b) == [ipv4(bytes(inner - 20))]
