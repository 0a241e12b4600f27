"""Disco acceptance rules checked against tailscaled 1.96.4, through the MagicSock core.

Each test drives one node's core with hand-made disco packets from its peers (and
from strangers) and asserts what the node sends back and which paths it learns.
"""

from __future__ import annotations

import ipaddress

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.conn import MagicSock, PathChanged, PeerConfig
from tsnet.magicsock.endpoint import DERP_MAGIC_IP, UDPPath
from tsnet.relay.geneve import PROTOCOL_DISCO, encode_header

A_ADDR = AddrPort.parse("203.0.113.10:41641")
B_ADDR = AddrPort.parse("203.0.113.20:41641")
NEW_ADDR = AddrPort.parse("198.51.100.77:5000")
RELAY_ADDR = AddrPort.parse("192.0.2.3:40000")
#: magic + sender key + nonce + tag + a pong's plaintext (type, version, TxID, 18-byte source)
PONG_PACKET_LEN = 6 + 32 + 24 + 16 + 2 + 12 + 18


class Node:
    """Our core with two peers, A and B; the test holds A's and B's disco keys."""

    def __init__(self) -> None:
        self.me = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0)
        self.a_node, self.b_node = NodePrivate.generate().public, NodePrivate.generate().public
        self.a, self.b = d.DiscoBoxes(DiscoPrivate.generate()), d.DiscoBoxes(DiscoPrivate.generate())
        self.stranger = d.DiscoBoxes(DiscoPrivate.generate())
        self.me.set_peers([
            PeerConfig(self.a_node, self.a.public_key, (A_ADDR,), 1, 133,
                       (ipaddress.ip_network("100.64.0.10/32"),), name="a"),
            PeerConfig(self.b_node, self.b.public_key, (B_ADDR,), 1, 133,
                       (ipaddress.ip_network("100.64.0.20/32"),), name="b"),
        ], 0.0)

    def seal(self, boxes: d.DiscoBoxes, msg: d.Message) -> bytes:
        return boxes.seal(self.me.disco_key, msg)

    @property
    def ep_a(self):  # noqa: ANN201
        return self.me.peers[self.a_node].ep

    def drain(self) -> tuple[list, list, list]:
        return self.me.take_udp(), self.me.take_derp(), self.me.take_events()

    def ping_a(self, now: float) -> bytes:
        """Have our node ping A (like ``tailscale ping``); returns the TxID of its UDP ping to A_ADDR."""
        self.me.ping(self.a_node, now)
        udp, _derp, _ = self.drain()
        [pkt] = [data for data, to in udp if to == A_ADDR]
        sender, msg = self.a.open_message(pkt)
        assert sender == self.me.disco_key and isinstance(msg, d.Ping)
        return msg.tx_id


def test_derp_ping_is_answered_only_to_the_peer_derp_vouches_for() -> None:
    n = Node()
    ping = n.seal(n.a, d.Ping(d.new_tx_id(), n.a_node))
    # A node outside our netmap relays A's ping to us over DERP: no pong, and no DERP region
    # learned for A.
    n.me.receive_derp(7, NodePrivate.generate().public, ping, 1.0)
    assert n.drain() == ([], [], [])
    assert n.ep_a.last_derp_region_heard == 0
    # Peer B forwards A's (sealed) ping: B's disco key is not the sender's either.
    n.me.receive_derp(7, n.b_node, ping, 1.0)
    assert n.drain()[1] == []
    assert n.me.disco.dropped == {"derp_source_not_a_peer": 1, "derp_source_disco_mismatch": 1}
    # A itself: the pong goes back over DERP in that region, to A, reporting the DERP "address".
    n.me.receive_derp(7, n.a_node, ping, 1.0)
    _udp, derp, _ = n.drain()
    [(region, to, pkt)] = derp
    assert (region, to) == (7, n.a_node)
    _, pong = n.a.open_message(pkt)
    assert isinstance(pong, d.Pong) and pong.src == AddrPort(DERP_MAGIC_IP, 7)
    assert n.ep_a.last_derp_region_heard == 7


def test_pong_counts_only_for_a_ping_we_sent_to_that_peer() -> None:
    n = Node()
    tx = n.ping_a(1.0)
    # Random TxID from A; A's TxID echoed by B (another peer's disco key), even from A's address.
    n.me.receive_udp(n.seal(n.a, d.Pong(d.new_tx_id(), NEW_ADDR)), A_ADDR, 1.01)
    n.me.receive_udp(n.seal(n.b, d.Pong(tx, NEW_ADDR)), A_ADDR, 1.01)
    assert n.ep_a.best is None and n.drain()[2] == []
    # The real pong from A sets the path.
    n.me.receive_udp(n.seal(n.a, d.Pong(tx, NEW_ADDR)), A_ADDR, 1.02)
    assert n.ep_a.best is not None and n.ep_a.best.path == UDPPath(A_ADDR)
    assert any(isinstance(e, PathChanged) for e in n.drain()[2])
    # Each TxID is good for one pong: a replay does not extend trust.
    trust = n.ep_a.trust_until
    n.me.receive_udp(n.seal(n.a, d.Pong(tx, NEW_ADDR)), A_ADDR, 3.0)
    assert n.ep_a.trust_until == trust


def test_pong_credits_the_address_pinged_not_the_pong_source() -> None:
    # tailscaled ranks the address it sent the ping to (a multi-homed peer may answer from
    # another address); the source of the pong is never learned as a path.
    n = Node()
    tx = n.ping_a(1.0)
    n.me.receive_udp(n.seal(n.a, d.Pong(tx, NEW_ADDR)), NEW_ADDR, 1.02)
    assert n.ep_a.best is not None and n.ep_a.best.path == UDPPath(A_ADDR)
    assert NEW_ADDR not in n.ep_a.candidates


def test_unauthenticated_packets_from_a_new_address_teach_nothing() -> None:
    n = Node()
    forged = bytearray(n.seal(n.a, d.Ping(d.new_tx_id(), n.a_node)))
    forged[-1] ^= 1  # A's key in the header, but the box does not open
    n.me.receive_udp(bytes(forged), NEW_ADDR, 1.0)
    n.me.receive_udp(n.seal(n.stranger, d.Ping(d.new_tx_id())), NEW_ADDR, 1.0)  # not a peer's key
    n.me.receive_udp(b"\x04\x00\x00\x00" + bytes(60), NEW_ADDR, 1.0)  # WireGuard for no session
    n.me.receive_udp(b"\x01\x00\x00\x00" + bytes(144), NEW_ADDR, 1.0)  # an initiation that does not open
    assert n.drain()[0] == []
    assert set(n.ep_a.candidates) == {A_ADDR}
    assert all(NEW_ADDR != p.addr for st in n.me.peers.values() for p in st.sources)
    # A genuine ping from the new address makes it a candidate and gets a pong there.
    n.me.receive_udp(n.seal(n.a, d.Ping(d.new_tx_id(), n.a_node)), NEW_ADDR, 1.0)
    [(pkt, to)] = n.drain()[0]
    assert to == NEW_ADDR and isinstance(n.a.open_message(pkt)[1], d.Pong)
    assert NEW_ADDR in n.ep_a.candidates


def test_call_me_maybe_counts_only_over_derp_from_its_owner() -> None:
    n = Node()
    cmm = n.seal(n.a, d.CallMeMaybe((NEW_ADDR,)))
    n.me.receive_udp(cmm, A_ADDR, 1.0)  # direct UDP: tailscaled ignores it
    n.me.receive_udp(encode_header(PROTOCOL_DISCO, 5) + cmm, RELAY_ADDR, 1.0)  # through a peer relay
    n.me.receive_derp(1, n.b_node, cmm, 1.0)  # over DERP, but from B's node key
    assert NEW_ADDR not in n.ep_a.candidates and n.drain()[0] == []
    assert n.me.disco.dropped == {"derp_only_message_not_via_derp": 2, "derp_source_disco_mismatch": 1}
    n.me.receive_derp(1, n.a_node, cmm, 1.0)
    assert NEW_ADDR in n.ep_a.candidates
    pinged = {to for _data, to in n.drain()[0]}
    assert pinged == {A_ADDR, NEW_ADDR}  # every candidate at once


def test_padded_ping_gets_a_small_pong_and_a_repeat_gets_none() -> None:
    n = Node()
    ping = n.seal(n.a, d.Ping(d.new_tx_id(), n.a_node, padding=1200))
    n.me.receive_udp(ping, NEW_ADDR, 1.0)
    [(pkt, to)] = n.drain()[0]
    assert to == NEW_ADDR and len(pkt) == PONG_PACKET_LEN < len(ping)  # never an amplifier
    # The same ping again from the same address (a duplicate or a replay): no second pong.
    n.me.receive_udp(ping, NEW_ADDR, 1.5)
    assert n.drain()[0] == []


def test_geneve_ping_from_a_peer_is_answered_through_the_relay_without_a_candidate() -> None:
    n = Node()
    tx = d.new_tx_id()
    n.me.receive_udp(encode_header(PROTOCOL_DISCO, 5) + n.seal(n.a, d.Ping(tx, n.a_node)), RELAY_ADDR, 1.0)
    [(pkt, to)] = n.drain()[0]
    assert to == RELAY_ADDR and pkt[:8] == encode_header(PROTOCOL_DISCO, 5)  # O bit clear, same VNI
    _, pong = n.a.open_message(pkt[8:])
    assert isinstance(pong, d.Pong) and pong.tx_id == tx and pong.src == RELAY_ADDR
    assert RELAY_ADDR not in n.ep_a.candidates
    # The same ping with the control bit set is a relay handshake message: dropped.
    n.me.receive_udp(encode_header(PROTOCOL_DISCO, 5, control=True) + n.seal(n.a, d.Ping(tx, n.a_node)),
                     RELAY_ADDR, 1.0)
    assert n.drain()[0] == []


def test_call_me_maybe_via_on_a_trusted_direct_path_still_binds_but_keeps_direct() -> None:
    n = Node()
    tx = n.ping_a(1.0)
    n.me.receive_udp(n.seal(n.a, d.Pong(tx, NEW_ADDR)), A_ADDR, 1.01)
    assert n.ep_a.is_trusted(1.01) and n.ep_a.best.path == UDPPath(A_ADDR)
    n.drain()
    server = d.DiscoBoxes(DiscoPrivate.generate())
    pair = tuple(sorted((n.me.disco_key, n.a.public_key), key=lambda k: k.raw))
    ep = d.UDPRelayEndpoint(server.public_key, pair, 1, 9, 30 * 10**9, 300 * 10**9, (RELAY_ADDR,))
    # A asks (it lacks a good path of its own): we bind too, as tailscaled does, or A's relay
    # handshake could never complete.
    n.me.receive_derp(1, n.a_node, n.seal(n.a, d.CallMeMaybeVia(ep)), 1.1)
    [(bind, to)] = n.drain()[0]
    assert to == RELAY_ADDR and bind[:8] == encode_header(PROTOCOL_DISCO, 9, control=True)
    ch = d.BindUDPRelayEndpointChallenge(9, server.open_message(bind[8:])[1].generation, n.a.public_key, bytes(32))
    n.me.receive_udp(encode_header(PROTOCOL_DISCO, 9, control=True) + server.seal(n.me.disco_key, ch), RELAY_ADDR, 1.2)
    udp = n.drain()[0]
    [ping] = [data for data, _to in udp if not data[1] & 0x80]
    relay_tx = n.a.open_message(ping[8:])[1].tx_id
    n.me.receive_udp(encode_header(PROTOCOL_DISCO, 9) + n.seal(n.a, d.Pong(relay_tx, RELAY_ADDR)), RELAY_ADDR, 1.25)
    # The relay path is proved, but the trusted direct path stays.
    assert n.me.relay.counters["handshake_ok"] == 1
    assert n.ep_a.best.path == UDPPath(A_ADDR)
    # Later the direct path has lapsed and the relay path is in use (trusted): a CallMeMaybeVia for
    # that same relay server is skipped, so our bound side does not move under live traffic.
    n.ep_a.handle_relay_path_ready(UDPPath(RELAY_ADDR, 9), server.public_key, 0.01, 20.0)
    assert n.ep_a.is_trusted(20.0) and n.ep_a.best.path == UDPPath(RELAY_ADDR, 9)
    ep2 = d.UDPRelayEndpoint(server.public_key, pair, 2, 9, 30 * 10**9, 300 * 10**9, (RELAY_ADDR,))
    n.me.receive_derp(1, n.a_node, n.seal(n.a, d.CallMeMaybeVia(ep2)), 20.5)
    assert n.drain()[0] == [] and n.me.counters["relay_cmmvia_skipped"] == 1


def test_pings_from_many_addresses_keep_per_peer_state_bounded() -> None:
    # A captured ping of A's replayed from spoofed sources opens like a genuine one (disco has no
    # replay window; tailscaled dedupes only per address): the status-only source set stays bounded,
    # and runtime candidates age out after 45 s as tailscaled's do.
    n = Node()
    ping = n.seal(n.a, d.Ping(d.new_tx_id(), n.a_node))
    for i in range(200):
        n.me.receive_udp(ping, AddrPort.parse(f"198.51.{i // 250}.{i % 250 + 1}:{1000 + i}"), 1.0)
    n.drain()
    assert len(n.me.peers[n.a_node].sources) <= 32
    n.ep_a.send_plan(50.0)  # a send 49 s later runs discovery, which drops expired candidates
    assert set(n.ep_a.candidates) == {A_ADDR}
