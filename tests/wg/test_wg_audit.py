"""Audit of the WireGuard core against the protocol rules (notes Part A, wireguard-go behaviour).

Each test proves one rule that the older device tests did not pin down:
handshake acceptance (replay, mac1, cookies, which responses count), key
confirmation, index uniqueness, counter and time limits at their real default
values, keepalive semantics, the replay window seen through the device,
staging while a handshake is pending, initiation timestamps and key erasure.
All timing uses explicit ``now``.
"""

from __future__ import annotations

from tests.wg.wgutil import Clock, CountingRng, Net, events_of, ipv4, key, make_pair
from tsnet.wg import HandshakeCompleted, Limits, PacketReceived, WireGuard
from tsnet.wg.cookie import LABEL_MAC1
from tsnet.wg.messages import (
    INITIATION,
    RESPONSE,
    TRANSPORT_HEADER,
    TYPE_COOKIE_REPLY,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    TYPE_TRANSPORT,
)
from tsnet.wg.noise import hash_, mac
from tsnet.wg.replay import WINDOW_SIZE
from tsnet.wg.session import Peer

A_ADDR = ("10.1.0.1", 51820)
B_ADDR = ("10.1.0.2", 51820)
ATTACKER = ("203.0.113.66", 4444)

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1


def packets(dev: WireGuard) -> list[bytes]:
    return [e.packet for e in dev.drain_events() if isinstance(e, PacketReceived)]


def peer_of(dev: WireGuard, other: WireGuard) -> Peer:
    return dev._peers[other.public_key]  # noqa: SLF001 - the audit inspects the session slots directly


def wire_from(net: Net, src: object, kind: int | None = None) -> list[bytes]:
    return [p for s, _d, p in net.log if s == src and (kind is None or p[0] == kind)]


def establish(net: Net, a: WireGuard, b: WireGuard) -> None:
    a.send_packet(b.public_key, ipv4(b"first"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"first")]
    a.drain_events()


def capture(net: Net) -> None:
    """From now on datagrams are logged but not delivered."""
    net.drop = lambda src, dst, p: True


def with_mac1(msg: bytearray, receiver_public: bytes) -> bytes:
    """Recompute mac1 for a handshake message addressed to ``receiver_public`` (what any sender can do)."""
    off1 = len(msg) - 32
    msg[off1 : off1 + 16] = mac(hash_(LABEL_MAC1, receiver_public), bytes(msg[:off1]))
    return bytes(msg)


def test_default_limits_are_the_protocol_constants() -> None:
    # wireguard-go device/constants.go and the WireGuard paper, section 6.
    lim = Limits()
    assert (lim.rekey_after_messages, lim.reject_after_messages) == (REKEY_AFTER_MESSAGES, REJECT_AFTER_MESSAGES)
    assert (lim.rekey_after_time, lim.reject_after_time, lim.rekey_attempt_time) == (120.0, 180.0, 90.0)
    assert (lim.rekey_timeout, lim.keepalive_timeout, lim.cookie_refresh_time) == (5.0, 10.0, 120.0)
    assert 0.333 <= lim.rekey_timeout_jitter < 0.334
    assert lim.handshake_initiation_min_interval == 0.020
    assert lim.max_handshake_retries == 18  # 20 initiations in all before giving up
    assert lim.zero_keys_after == 540.0 and lim.new_handshake_after == 15.0
    assert (lim.handshake_rate_per_second, lim.handshake_rate_burst) == (20.0, 5)
    assert (lim.max_staged_packets, lim.mtu) == (128, 1280)
    assert lim.reject_after_time - lim.keepalive_timeout - lim.rekey_timeout == 165.0  # last-minute rekey age


# -- handshake: initiations ------------------------------------------------------------


def test_older_initiation_after_a_newer_one_is_a_replay_and_changes_nothing() -> None:
    # Timestamps must be strictly greater than the greatest seen from that peer; a replayed
    # (older or equal) initiation gets no response, leaves the sessions alone and does not roam.
    clock = Clock()
    net, a, b = make_pair(Limits(rekey_timeout=0.001), clock=clock)
    capture(net)
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    older = net.log[-1][2]
    clock.advance(1)
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    newer = net.log[-1][2]
    net.drop = None
    net.log.clear()
    b.receive_datagram(newer, A_ADDR, clock.now)
    assert b.counters.initiations_received == 1
    pending = peer_of(b, a).next
    assert pending is not None
    b.datagrams_to_send(clock.now)  # the response to the newer one
    for replay in (older, newer):
        b.receive_datagram(replay, ATTACKER, clock.now + 5)
    assert b.counters.drop_replayed_initiation == 2
    assert b.counters.initiations_received == 1
    assert b.datagrams_to_send(clock.now + 5) == []
    assert peer_of(b, a).next is pending
    assert b.peer_status(a.public_key).endpoint == A_ADDR


def test_initiation_with_a_bad_mac1_is_dropped_before_any_work_even_under_load() -> None:
    net, a, b = make_pair()
    capture(net)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    good = bytearray(net.log[-1][2])
    bad = bytearray(good)
    bad[116] ^= 1  # mac1 starts at offset 116
    for under_load in (False, True):
        b.set_under_load(under_load)
        b.receive_datagram(bytes(bad), A_ADDR, net.clock.now)
        # No response and, under load, no cookie reply either: mac1 is the DoS gate.
        assert b.datagrams_to_send(net.clock.now) == []
    assert b.counters.drop_bad_mac1 == 2
    assert b.counters.cookie_replies_sent == 0 and b.counters.initiations_received == 0
    # mac1 is bound to the receiver's static key: mac1 for someone else's key fails too.
    b.set_under_load(False)
    b.receive_datagram(with_mac1(bytearray(good), key(7).public.raw), A_ADDR, net.clock.now)
    assert b.counters.drop_bad_mac1 == 3
    b.receive_datagram(bytes(good), A_ADDR, net.clock.now)
    assert b.counters.initiations_received == 1


def test_cookie_is_tied_to_the_source_address_and_expires_after_cookie_refresh_time() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    b.set_under_load(True)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    assert b.counters.cookie_replies_sent == 1 and a.counters.cookie_replies_received == 1
    # The next initiation carries mac2; sent from another address, the cookie does not fit.
    capture(net)
    net.clock.advance(limits.rekey_timeout)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    with_mac2 = net.log[-1][2]
    assert with_mac2[132:148] != bytes(16)
    b.receive_datagram(with_mac2, ("192.0.2.77", 51820), net.clock.now)
    assert b.counters.drop_needs_cookie == 2 and b.counters.initiations_received == 0
    assert [p[0] for p, _d in b.datagrams_to_send(net.clock.now)] == [TYPE_COOKIE_REPLY]
    # Past COOKIE_REFRESH_TIME the initiator stops sending mac2 and the responder's secret has rotated.
    net.clock.advance(limits.cookie_refresh_time + 1)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    stale = net.log[-1][2]
    assert stale[132:148] == bytes(16)
    b.receive_datagram(with_mac2, A_ADDR, net.clock.now)  # a once-valid mac2 is no longer accepted
    assert b.counters.drop_needs_cookie == 3 and b.counters.initiations_received == 0


# -- handshake: responses --------------------------------------------------------------


def test_response_is_accepted_once_and_only_for_the_latest_pending_initiation() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    # b answers both of a's initiations, but a only hears the answers later.
    net.drop = lambda src, dst, p: src == B_ADDR
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    net.tick(net.clock.now + limits.rekey_timeout + limits.rekey_timeout_jitter)  # one retransmission
    assert a.counters.initiations_sent == 2
    first_response, second_response = wire_from(net, B_ADDR, TYPE_RESPONSE)
    net.drop = None
    # The response to the superseded initiation names an index that is no longer in the table.
    a.receive_datagram(first_response, B_ADDR, net.clock.now)
    assert a.counters.drop_unknown_index == 1 and a.counters.handshakes_completed == 0
    a.receive_datagram(second_response, B_ADDR, net.clock.now)
    assert a.counters.handshakes_completed == 1
    current = peer_of(a, b).current
    # A duplicate of the accepted response finds no pending handshake: nothing changes.
    a.receive_datagram(second_response, B_ADDR, net.clock.now)
    assert a.counters.drop_unknown_index == 2 and a.counters.handshakes_completed == 1
    assert peer_of(a, b).current is current


def test_forged_response_with_valid_mac1_keeps_the_pending_handshake() -> None:
    # mac1 needs only our public key, so anyone can pass it; the Noise AEAD must then fail
    # without disturbing the handshake the real peer is about to answer.
    net, a, b = make_pair()
    capture(net)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    initiation = net.log[-1][2]
    our_index = INITIATION.unpack_from(initiation)[1]
    forged = bytearray(RESPONSE.size)
    RESPONSE.pack_into(forged, 0, TYPE_RESPONSE, 0x1234, our_index, key(8).public.raw, bytes(16), bytes(16), bytes(16))
    a.receive_datagram(with_mac1(forged, a.public_key.raw), ATTACKER, net.clock.now)
    assert a.counters.drop_handshake_invalid == 1
    assert a.handshake_pending(b.public_key, net.clock.now)
    assert a.peer_status(b.public_key).endpoint == B_ADDR  # no roaming on unauthenticated input
    net.drop = None
    b.receive_datagram(initiation, A_ADDR, net.clock.now)
    net.pump()
    assert a.counters.handshakes_completed == 1


def test_response_naming_a_session_index_is_not_a_response_to_anything() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    session_index = peer_of(a, b).current.local_index  # type: ignore[union-attr]
    forged = bytearray(RESPONSE.size)
    RESPONSE.pack_into(forged, 0, TYPE_RESPONSE, 1, session_index, key(8).public.raw, bytes(16), bytes(16), bytes(16))
    a.receive_datagram(with_mac1(forged, a.public_key.raw), B_ADDR, net.clock.now)
    assert a.counters.drop_unknown_index == 1 and a.counters.drop_handshake_invalid == 0


def test_late_response_after_giving_up_is_rejected() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    net.drop = lambda src, dst, p: src == B_ADDR
    a.send_packet(b.public_key, ipv4(b"lost"), net.clock.now)
    net.pump()
    net.tick(net.clock.now + limits.rekey_attempt_time + 3 * limits.rekey_timeout)
    assert a.counters.handshakes_failed == 1
    last_response = wire_from(net, B_ADDR, TYPE_RESPONSE)[-1]
    a.receive_datagram(last_response, B_ADDR, net.clock.now)
    assert a.counters.handshakes_completed == 0 and a.counters.drop_unknown_index == 1


def test_every_initiation_attempt_uses_a_fresh_index_and_ephemeral() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    capture(net)
    a.send_packet(b.public_key, ipv4(), net.clock.now)
    net.tick(net.clock.now + 4 * (limits.rekey_timeout + limits.rekey_timeout_jitter))
    inits = [INITIATION.unpack_from(p) for p in wire_from(net, A_ADDR, TYPE_INITIATION)]
    assert len(inits) == 5
    assert len({i[1] for i in inits}) == 5  # sender index
    assert len({i[2] for i in inits}) == 5  # ephemeral public key
    # Only the newest index is live: the index table holds exactly one handshake for the peer.
    assert list(a._handshakes) == [inits[-1][1]]  # noqa: SLF001


def test_giving_up_drops_and_counts_the_staged_packets_then_new_data_starts_afresh() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    capture(net)
    for i in range(3):
        a.send_packet(b.public_key, ipv4(b"%d" % i), net.clock.now)
    a.send_keepalive(b.public_key, net.clock.now)  # staged too, but not a packet anyone sent
    start = net.clock.now
    net.tick(start + limits.rekey_attempt_time + 3 * (limits.rekey_timeout + limits.rekey_timeout_jitter))
    assert a.counters.initiations_sent == limits.max_handshake_retries + 2 == 20
    assert a.counters.handshakes_failed == 1
    assert a.counters.drop_staged_handshake_failed == 3
    assert a.peer_status(b.public_key).staged_packets == 0
    assert a.counters.total_dropped() == 0  # a send-side drop, not a receive-side one
    sent = a.counters.initiations_sent
    net.tick(net.clock.now + 60)
    assert a.counters.initiations_sent == sent  # nothing retries on its own after giving up


# -- key confirmation ------------------------------------------------------------------


def test_responder_sends_nothing_until_the_initiator_confirms_the_session() -> None:
    net, a, b = make_pair()
    # Only the initiation and the response get through: a's confirming keepalive is held back.
    net.drop = lambda src, dst, p: src == A_ADDR and p[0] == TYPE_TRANSPORT
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    confirm = wire_from(net, A_ADDR, TYPE_TRANSPORT)
    assert len(confirm) == 1 and len(confirm[0]) == 32  # the initiator sends at once (a keepalive)
    assert peer_of(b, a).current is None and peer_of(b, a).next is not None
    net.log.clear()
    b.send_packet(a.public_key, ipv4(b"too early"), net.clock.now + 1)
    # Staged, not sent under the unconfirmed keys, and no initiation within REKEY_TIMEOUT of the response.
    assert b.datagrams_to_send(net.clock.now + 1) == []
    assert b.peer_status(a.public_key).staged_packets == 1
    assert b.counters.initiations_sent == 0
    # A forged packet under the pending session's index must not confirm it.
    forged = bytearray(confirm[0])
    forged[-1] ^= 1
    b.receive_datagram(bytes(forged), A_ADDR, net.clock.now + 1)
    assert peer_of(b, a).current is None and b.counters.drop_data_invalid == 1
    # The real keepalive confirms the session and releases the staged packet under the new keys.
    b.receive_datagram(confirm[0], A_ADDR, net.clock.now + 1)
    assert events_of(b, HandshakeCompleted) == [HandshakeCompleted(a.public_key, False)]
    out = b.datagrams_to_send(net.clock.now + 1)
    assert len(out) == 1
    _t, receiver, counter = TRANSPORT_HEADER.unpack_from(out[0][0])
    assert receiver == peer_of(a, b).current.local_index and counter == 0  # type: ignore[union-attr]
    a.receive_datagram(bytes(out[0][0]), B_ADDR, net.clock.now + 1)
    assert packets(a) == [ipv4(b"too early")]


def test_only_a_packet_under_the_new_keys_confirms_them() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    capture(net)
    a.send_packet(b.public_key, ipv4(b"old keys"), net.clock.now)
    net.pump()
    old_session = net.log[-1][2]
    # a rekeys; b answers and holds the new session as "next", its old one still "current".
    net.drop = lambda src, dst, p: src == A_ADDR and p[0] == TYPE_TRANSPORT
    net.clock.advance(6)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    pending = peer_of(b, a).next
    assert pending is not None
    b.drain_events()
    b.receive_datagram(old_session, A_ADDR, net.clock.now)  # authentic, but under the old keys
    assert packets(b) == [ipv4(b"old keys")]
    assert peer_of(b, a).next is pending and b.counters.handshakes_completed == 1
    net.drop = None
    a.send_packet(b.public_key, ipv4(b"new keys"), net.clock.now)
    net.pump()
    assert peer_of(b, a).current is pending and peer_of(b, a).next is None
    assert packets(b) == [ipv4(b"new keys")]


def test_confirmed_responder_session_erases_our_own_unanswered_initiation() -> None:
    # Once a session we answered is confirmed, our own pending initiation is superseded: its
    # ephemeral secret and index must go (wireguard-go overwrites that state on consuming the
    # peer's initiation), so a late response to it is refused instead of replacing the new session.
    limits = Limits()
    net, a, b = make_pair(limits)
    net.drop = lambda src, dst, p: src == B_ADDR and p[0] == TYPE_RESPONSE
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    late_response = wire_from(net, B_ADDR, TYPE_RESPONSE)[-1]
    assert a.handshake_pending(b.public_key, net.clock.now)
    net.drop = None
    net.clock.advance(limits.rekey_timeout + 1)  # no retransmission: a's timers are not run here
    b.initiate_handshake(a.public_key, net.clock.now)
    net.pump()
    assert events_of(a, HandshakeCompleted) == [HandshakeCompleted(b.public_key, False)]
    assert peer_of(a, b).handshake is None and a._handshakes == {}  # noqa: SLF001
    assert peer_of(a, b).timer_retransmit is None
    current = peer_of(a, b).current
    a.receive_datagram(late_response, B_ADDR, net.clock.now)
    assert a.counters.drop_unknown_index == 1 and peer_of(a, b).current is current
    a.send_packet(b.public_key, ipv4(b"on the confirmed session"), net.clock.now)
    b.send_packet(a.public_key, ipv4(b"and back"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"on the confirmed session")]
    assert packets(a) == [ipv4(b"and back")]


# -- index table ---------------------------------------------------------------------------


class SameIndexRng(CountingRng):
    """Randomness where every 4-byte draw (indices, jitter) is the same value."""

    def __call__(self, n: int) -> bytes:
        return b"\x07\x00\x00\x00" if n == 4 else super().__call__(n)


def test_index_collisions_are_resolved_and_every_session_stays_reachable() -> None:
    clock = Clock()
    net = Net(clock)
    hub = net.add(("10.0.0.1", 1), WireGuard(key(100), now=clock.now, rng=SameIndexRng(100)))
    spokes = []
    for i in range(6):
        addr = ("10.0.1.%d" % i, 2)
        s = net.add(addr, WireGuard(key(300 + i), now=clock.now, rng=SameIndexRng(300 + i)))
        s.add_peer(hub.public_key, endpoint=("10.0.0.1", 1))
        hub.add_peer(s.public_key, endpoint=addr)
        spokes.append(s)
    # Half of the sessions are initiated by the hub, half by the spokes: both tables fill up.
    for i, s in enumerate(spokes):
        if i % 2:
            hub.send_packet(s.public_key, ipv4(b"to %d" % i), clock.now)
        else:
            s.send_packet(hub.public_key, ipv4(b"from %d" % i), clock.now)
    net.pump()
    local = list(hub._keypairs)  # noqa: SLF001
    assert len(local) == 6 == len(set(local))
    assert all(kp.local_index == idx for idx, kp in hub._keypairs.items())  # noqa: SLF001
    for i, s in enumerate(spokes):
        hub.send_packet(s.public_key, ipv4(b"back %d" % i), clock.now)
        s.send_packet(hub.public_key, ipv4(b"up %d" % i), clock.now)
    net.pump()
    got = {(e.peer, e.packet) for e in hub.drain_events() if isinstance(e, PacketReceived)}
    for i, s in enumerate(spokes):
        assert (s.public_key, ipv4(b"up %d" % i)) in got
        assert ipv4(b"back %d" % i) in packets(s)
    assert hub.counters.total_dropped() == 0


# -- counter limits at their real values -----------------------------------------------------


def test_rekey_after_messages_at_the_default_limit() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    net.clock.advance(6)  # clear of REKEY_TIMEOUT since the first initiation
    kp = peer_of(a, b).current
    assert kp is not None
    kp.send_counter = REKEY_AFTER_MESSAGES - 1
    a.send_packet(b.public_key, ipv4(), net.clock.now)  # nonce 2^60 - 1: the next one is 2^60, not above
    assert a.counters.initiations_sent == 1
    a.send_packet(b.public_key, ipv4(), net.clock.now)  # nonce 2^60: the next one would be above
    assert a.counters.initiations_sent == 2
    # The batch path makes the same decision.
    net2, c, d = make_pair()
    establish(net2, c, d)
    net2.clock.advance(6)
    kp2 = peer_of(c, d).current
    kp2.send_counter = REKEY_AFTER_MESSAGES - 1  # type: ignore[union-attr]
    c.send_packets(d.public_key, [ipv4()], net2.clock.now)
    assert c.counters.initiations_sent == 1
    c.send_packets(d.public_key, [ipv4()], net2.clock.now)
    assert c.counters.initiations_sent == 2


def test_reject_after_messages_at_the_default_limit_never_reuses_or_exceeds_a_nonce() -> None:
    for batch in (False, True):
        net, a, b = make_pair()
        establish(net, a, b)
        net.clock.advance(6)
        kp = peer_of(a, b).current
        kp.send_counter = REJECT_AFTER_MESSAGES - 2  # type: ignore[union-attr]
        net.log.clear()
        capture(net)
        pkts = [ipv4(b"%d" % i) for i in range(4)]
        if batch:
            a.send_packets(b.public_key, pkts, net.clock.now)
        else:
            for p in pkts:
                a.send_packet(b.public_key, p, net.clock.now)
        net.pump()
        counters = [TRANSPORT_HEADER.unpack_from(p)[2] for p in wire_from(net, A_ADDR, TYPE_TRANSPORT)]
        assert counters == [REJECT_AFTER_MESSAGES - 2, REJECT_AFTER_MESSAGES - 1]
        assert a.peer_status(b.public_key).staged_packets == 2  # the rest waits for the new session
        assert not a.peer_status(b.public_key, net.clock.now).has_session
        assert wire_from(net, A_ADDR, TYPE_INITIATION)  # and a new handshake was started
        # The receiver accepts the last valid counter, in order.
        for p in wire_from(net, A_ADDR, TYPE_TRANSPORT):
            b.receive_datagram(p, A_ADDR, net.clock.now)
        assert packets(b) == pkts[:2]
        # The staged packets go out on the new session once the handshake completes.
        net.drop = None
        net.log.clear()
        for p in wire_from_all(net, a):
            b.receive_datagram(p, A_ADDR, net.clock.now)
        net.tick(net.clock.now + 6)
        assert packets(b) == pkts[2:]


def wire_from_all(net: Net, dev: WireGuard) -> list[bytes]:
    return [bytes(p) for p, _d in dev.datagrams_to_send(net.clock.now)]


def test_receiver_rejects_a_counter_at_the_default_reject_after_messages() -> None:
    net, a, b = make_pair()
    establish(net, a, b)
    kp = peer_of(a, b).current
    assert kp is not None
    for counter in (REJECT_AFTER_MESSAGES, 2**64 - 1):
        nonce = bytes(4) + counter.to_bytes(8, "little")
        forged_counter = kp.header + counter.to_bytes(8, "little") + kp.seal(nonce, ipv4(), None)
        b.receive_datagram(forged_counter, A_ADDR, net.clock.now)  # authentic, but past the limit
    assert b.counters.drop_replayed == 2 and packets(b) == []


# -- time limits -----------------------------------------------------------------------------------


def test_reject_after_time_boundary_on_previous_and_current() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    created = net.clock.now
    capture(net)
    b.send_packet(a.public_key, ipv4(b"old 1"), created)
    b.send_packet(a.public_key, ipv4(b"old 2"), created)
    net.pump()
    old1, old2 = net.log[-2][2], net.log[-1][2]
    net.drop = None
    # A rekey moves the first session to "previous"; it is accepted only until its own deadline.
    net.clock.now = created + 100
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    assert peer_of(a, b).previous is not None
    a.receive_datagram(old1, B_ADDR, created + limits.reject_after_time - 0.001)
    assert packets(a) == [ipv4(b"old 1")]
    a.receive_datagram(old2, B_ADDR, created + limits.reject_after_time)
    assert a.counters.drop_expired_keypair == 1 and packets(a) == []
    # Sending: the new current session is usable until exactly REJECT_AFTER_TIME after it was made.
    renewed = created + 100
    a.send_packet(b.public_key, ipv4(), renewed + limits.reject_after_time - 0.001)
    assert a.peer_status(b.public_key).staged_packets == 0
    a.send_packet(b.public_key, ipv4(), renewed + limits.reject_after_time)
    assert a.peer_status(b.public_key).staged_packets == 1


# -- keepalives --------------------------------------------------------------------------------------


def test_keepalives_are_authenticated_traffic_but_not_data() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    a.initiate_handshake(b.public_key, net.clock.now)
    net.pump()
    assert b.counters.keepalives_received == 1
    net.log.clear()
    # Receiving a keepalive owes no keepalive back (no ping-pong), and sending one arms no rekey.
    net.tick(net.clock.now + 3 * (limits.keepalive_timeout + limits.rekey_timeout))
    assert net.log == []
    a.send_keepalive(b.public_key, net.clock.now)
    net.pump()
    net.tick(net.clock.now + limits.keepalive_timeout + limits.rekey_timeout + 1)
    assert a.counters.initiations_sent == 1 and b.counters.keepalives_sent == 0
    # Data sent arms the new-handshake timer; a keepalive from the peer proves it alive and cancels it.
    a.send_packet(b.public_key, ipv4(b"data"), net.clock.now)
    net.pump()
    assert packets(b) == [ipv4(b"data")]
    net.tick(net.clock.now + limits.keepalive_timeout + 0.01)  # b's passive keepalive answers
    assert b.counters.keepalives_sent == 1 and a.counters.keepalives_received == 1
    net.tick(net.clock.now + limits.rekey_timeout + limits.rekey_timeout_jitter + 1)
    assert a.counters.initiations_sent == 1
    assert packets(a) == []  # keepalives are never delivered as packets


# -- replay window through the device --------------------------------------------------------


def seal_with(a: WireGuard, b: WireGuard, counters: list[int]) -> list[bytes]:
    """Authentic transport datagrams from a to b with chosen counters (as a network could reorder them)."""
    kp = peer_of(a, b).current
    assert kp is not None
    out = []
    for c in counters:
        cb = c.to_bytes(8, "little")
        out.append(kp.header + cb + kp.seal(bytes(4) + cb, ipv4(b"c%d" % c), None))
    return out


def test_device_replay_window_edge_and_out_of_order() -> None:
    net, a, b = make_pair()
    establish(net, a, b)  # counter 0 used
    top = 20_000
    dgrams = dict(zip([top, top - 1, top - WINDOW_SIZE, top - WINDOW_SIZE - 1, 5, top + 1],
                      seal_with(a, b, [top, top - 1, top - WINDOW_SIZE, top - WINDOW_SIZE - 1, 5, top + 1]),
                      strict=True))
    for c in (top, top - 1, top - WINDOW_SIZE, top - WINDOW_SIZE - 1, 5, top - 1, top + 1):
        b.receive_datagram(dgrams[c], A_ADDR, net.clock.now)
    assert packets(b) == [ipv4(b"c%d" % c) for c in (top, top - 1, top - WINDOW_SIZE, top + 1)]
    assert b.counters.drop_replayed == 3  # too old, too old, duplicate


def test_replayed_or_forged_transport_never_roams_or_touches_timers() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    capture(net)
    b.send_packet(a.public_key, ipv4(b"once"), net.clock.now)
    net.pump()
    genuine = net.log[-1][2]
    a.receive_datagram(genuine, B_ADDR, net.clock.now)
    assert packets(a) == [ipv4(b"once")]
    # a sends data: its new-handshake timer is armed and only authentic, fresh traffic may cancel it.
    a.send_packet(b.public_key, ipv4(b"hello?"), net.clock.now)
    deadline = peer_of(a, b).timer_new_handshake
    assert deadline is not None
    forged = bytearray(genuine)
    forged[-1] ^= 1
    a.receive_datagram(genuine, ATTACKER, net.clock.now + 1)  # replay from elsewhere
    a.receive_datagram(bytes(forged), ATTACKER, net.clock.now + 1)  # forgery from elsewhere
    a.receive_datagrams([(genuine, ATTACKER), (bytes(forged), ATTACKER)], net.clock.now + 1)
    assert a.counters.drop_replayed == 2 and a.counters.drop_data_invalid == 2
    assert a.peer_status(b.public_key).endpoint == B_ADDR
    assert peer_of(a, b).timer_new_handshake == deadline
    assert packets(a) == []


# -- staging -------------------------------------------------------------------------------------


def test_default_staging_queue_keeps_the_newest_128_in_order() -> None:
    net, a, b = make_pair()
    capture(net)
    for i in range(200):
        a.send_packet(b.public_key, ipv4(b"%d" % i), net.clock.now)
    assert a.peer_status(b.public_key).staged_packets == 128
    assert a.counters.drop_staged_overflow == 72
    assert a.counters.initiations_sent == 1  # one handshake, not one per staged packet
    net.pump()  # that initiation is lost
    net.drop = None
    net.tick(net.clock.now + 6)
    assert packets(b) == [ipv4(b"%d" % i) for i in range(72, 200)]


# -- initiation timestamps ---------------------------------------------------------------------


def test_initiating_to_many_peers_at_once_keeps_timestamps_at_the_wall_clock() -> None:
    # Timestamps only need to grow per peer. Bumping them device-wide ran them ahead of the wall
    # clock by 2^24 ns per peer initiated in the same instant, and a node restarted with the same
    # key within that lead had its initiations dropped as replays.
    clock = Clock()
    wall = [1_700_000_000.0]
    net = Net(clock)
    a = net.add(A_ADDR, WireGuard(key(1), now=clock.now, rng=CountingRng(1), wall_clock=lambda: wall[0]))
    b = net.add(B_ADDR, WireGuard(key(2), now=clock.now, rng=CountingRng(2)))
    b.add_peer(a.public_key, endpoint=A_ADDR)
    for i in range(200):
        a.add_peer(key(1000 + i).public)  # no endpoint: the initiations go nowhere
        a.initiate_handshake(key(1000 + i).public, clock.now)
    a.add_peer(b.public_key, endpoint=B_ADDR)
    a.initiate_handshake(b.public_key, clock.now)
    net.pump()
    assert a.counters.handshakes_completed == 1
    # The same node key restarts one second later (fresh device state, same wall clock source).
    wall[0] += 1.0
    clock.advance(1.0)
    del net.devices[A_ADDR]
    a2 = net.add(A_ADDR, WireGuard(key(1), now=clock.now, rng=CountingRng(11), wall_clock=lambda: wall[0]))
    a2.add_peer(b.public_key, endpoint=B_ADDR)
    a2.initiate_handshake(b.public_key, clock.now)
    net.pump()
    assert b.counters.drop_replayed_initiation == 0
    assert a2.counters.handshakes_completed == 1


def test_initiation_timestamps_grow_per_peer_even_within_one_clock_step() -> None:
    clock = Clock()
    net = Net(clock)
    a = net.add(A_ADDR, WireGuard(key(1), now=clock.now, rng=CountingRng(1), wall_clock=lambda: 1_700_000_000.0))
    b = net.add(B_ADDR, WireGuard(key(2), now=clock.now, rng=CountingRng(2)))
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, endpoint=A_ADDR)
    for _ in range(3):  # a frozen wall clock: each initiation still carries a newer timestamp
        clock.advance(6)
        a.initiate_handshake(b.public_key, clock.now)
        net.pump()
    assert b.counters.initiations_received == 3 and b.counters.drop_replayed_initiation == 0


# -- key erasure ---------------------------------------------------------------------------------


def test_key_erasure_counts_from_the_newest_session_and_takes_handshake_state_too() -> None:
    limits = Limits()
    net, a, b = make_pair(limits)
    establish(net, a, b)
    t0 = net.clock.now
    net.tick(t0 + 400)
    a.initiate_handshake(b.public_key, net.clock.now)  # a new session at t0 + 400 re-arms the wipe
    net.pump()
    assert a.counters.handshakes_completed == 2
    capture(net)
    net.tick(t0 + limits.zero_keys_after + 1)
    assert peer_of(a, b).current is not None  # 540 s after the first session, but not after the newest
    # Leave an initiation in flight at the moment of the wipe: its secret goes as well.
    net.tick(t0 + 400 + limits.zero_keys_after - 1)
    a.initiate_handshake(b.public_key, net.clock.now)
    assert peer_of(a, b).handshake is not None
    net.clock.now = t0 + 400 + limits.zero_keys_after
    a.handle_timer(net.clock.now)
    b.handle_timer(net.clock.now)
    for dev, other in ((a, b), (b, a)):
        peer = peer_of(dev, other)
        assert peer.previous is None and peer.current is None and peer.next is None
        assert dev._keypairs == {}  # noqa: SLF001
    assert peer_of(a, b).handshake is None and a._handshakes == {}  # noqa: SLF001


def test_forged_far_ahead_counter_does_not_slide_the_window_in_either_receive_path() -> None:
    for batched in (False, True):
        net, a, b = make_pair()
        establish(net, a, b)
        genuine = seal_with(a, b, [1, 2, 3])
        forged = bytearray(genuine[2])
        forged[8:16] = (1 + 100 * WINDOW_SIZE).to_bytes(8, "little")  # the tag no longer verifies
        dgrams = [bytes(forged), genuine[0], genuine[1], genuine[2]]
        if batched:
            b.receive_datagrams([(d, A_ADDR) for d in dgrams], net.clock.now)
        else:
            for d in dgrams:
                b.receive_datagram(d, A_ADDR, net.clock.now)
        assert packets(b) == [ipv4(b"c1"), ipv4(b"c2"), ipv4(b"c3")]
        assert b.counters.drop_data_invalid == 1 and b.counters.drop_replayed == 0
        assert peer_of(b, a).current.replay.highest == 3  # type: ignore[union-attr]
