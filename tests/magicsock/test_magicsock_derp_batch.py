"""MagicSock.receive_derp_batch: the same outcome as receive_derp per item, in order.

Two twin receivers (same keys, same seeded randomness and wall clock, so that
their WireGuard handshake answers are byte-identical) get the same DERP items:
one through a single ``receive_derp_batch`` call, the other one ``receive_derp``
call per item. Delivered packets, counters (magicsock's and WireGuard's), path
state, held and unknown initiations and the datagrams sent must all match.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab import packets
from tsnet.key import DiscoPrivate, NodePrivate, NodePublic
from tsnet.magicsock import disco
from tsnet.magicsock.conn import MagicSock, PeerConfig

NOW = 10.0
REGION = 1

Item = tuple[int, NodePublic, bytes]


def _net(last_octet: int) -> tuple[ipaddress.IPv4Network, ...]:
    return (ipaddress.ip_network(f"100.64.0.{last_octet}/32"),)


def _deterministic(m: MagicSock, seed: int) -> MagicSock:
    """Fix the WireGuard core's randomness and wall clock so that twins answer identically."""
    rng = random.Random(seed)
    m.wg._rng = rng.randbytes  # type: ignore[attr-defined]
    m.wg._wall_clock = lambda: 1_700_000_000.0  # type: ignore[attr-defined]
    return m


class Scene:
    """Receiver twins B1 and B2 with peers C (session up), A (no session yet), D (an initiation of
    ours held: no path) and a stranger S that knows B but is not in B's netmap."""

    def __init__(self, seed: int = 7) -> None:
        node, disco_key = NodePrivate.generate(), DiscoPrivate.generate()
        self.twins = [_deterministic(MagicSock(node, disco_key, now=0.0, rng=random.Random(seed)), seed)
                      for _ in range(2)]
        b = self.twins[0]
        self.a, self.c, self.d, self.s = (
            MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0, rng=random.Random(i))
            for i in range(4))
        for m, octet in ((self.a, 1), (self.c, 3), (self.d, 4), (self.s, 5)):
            # Every sender reaches B over DERP only (no endpoints).
            m.set_peers([PeerConfig(b.node_key, b.disco_key, (), REGION, 133, _net(2))], 0.0)
        for twin in self.twins:
            twin.set_peers([
                PeerConfig(self.a.node_key, self.a.disco_key, (), REGION, 133, _net(1)),
                PeerConfig(self.c.node_key, self.c.disco_key, (), REGION, 133, _net(3)),
                # No home region and no endpoints: nothing to send on until D is heard from.
                PeerConfig(self.d.node_key, self.d.disco_key, (), 0, 133, _net(4)),
            ], 0.0)
        # C <-> B session, the same on both twins.
        self.seq = 0
        self.c.send_packet(b.node_key, self.packet(3), 1.0)
        ((region, _, init),) = self.c.take_derp()
        answers = []
        for twin in self.twins:
            twin.receive_derp(region, self.c.node_key, bytes(init), 1.0)
            answers.append([bytes(d) for _, _, d in twin.take_derp()])
        assert answers[0] == answers[1] and len(answers[0]) == 1  # the twins really are twins
        self.c.receive_derp(REGION, b.node_key, answers[0][0], 1.0)
        self.first_c_data = [bytes(d) for _, _, d in self.c.take_derp()]
        # B's initiation to D: held, as D has no path yet.
        to_d = self.packet(4, src="100.64.0.2")
        for twin in self.twins:
            twin.send_packet(self.d.node_key, to_d, NOW - 1.0)  # still fresh at NOW
            assert twin.peers[self.d.node_key].held_initiation is not None
        self.held_to_d = self.twins[0].peers[self.d.node_key].held_initiation
        assert self.held_to_d == self.twins[1].peers[self.d.node_key].held_initiation
        for twin in self.twins:
            twin.take_packets(), twin.take_derp(), twin.take_udp(), twin.take_events()
        assert self.twins[0].counters == self.twins[1].counters

    def packet(self, dst_octet: int, src: str = "100.64.0.3") -> bytes:
        self.seq += 1
        return packets.icmp_echo(src, f"100.64.0.{dst_octet}", 1, self.seq)

    def derp_from(self, m: MagicSock) -> list[bytes]:
        return [bytes(d) for _, _, d in m.take_derp()]

    def pool(self) -> dict[str, list[Item]]:
        """Named kinds of items, each a list of (region, sender, packet)."""
        b = self.twins[0].node_key
        c, a, d, s = self.c, self.a, self.d, self.s
        c.send_packets(b, [self.packet(2) for _ in range(8)], NOW)
        c_data = self.first_c_data + self.derp_from(c)
        c_data, c_data2 = c_data[:7], c_data[7:]
        c.wg.send_keepalive(b, NOW)
        c._flush_wg(NOW)
        c_keepalive = self.derp_from(c)
        c.ping(b, NOW)
        c_ping = self.derp_from(c)
        a.send_packet(b, self.packet(2, src="100.64.0.1"), NOW)
        a_init = self.derp_from(a)
        a.ping(b, NOW)
        a_ping = [p for p in self.derp_from(a) if disco.looks_like_disco(p)]
        d.send_packet(b, self.packet(2, src="100.64.0.4"), NOW)
        d_init = self.derp_from(d)
        # D answers B's (held) initiation, then pings B: a disco message that, were the answer not
        # processed first, would make B re-send its initiation (HANDSHAKE_RETRY_AFTER has passed).
        assert self.held_to_d is not None
        d.receive_derp(REGION, b, self.held_to_d, NOW)
        d_response = self.derp_from(d)
        d.ping(b, NOW)
        d_ping = [p for p in self.derp_from(d) if disco.looks_like_disco(p)]
        s.send_packet(b, self.packet(2, src="100.64.0.5"), NOW)
        s_init = self.derp_from(s)
        s.ping(b, NOW)
        s_ping = [p for p in self.derp_from(s) if disco.looks_like_disco(p)]
        assert c_data and c_keepalive and c_ping and a_init and a_ping and d_init and s_init and s_ping and d_ping
        assert [len(r) for r in d_response] == [92]
        junk = [b"", b"\x04", b"\x04\x00\x00\x00" + bytes(12), bytes(range(200)), b"\x01" + bytes(147),
                disco.MAGIC + bytes(40)]  # the last: disco magic, bad box
        return {
            "c_data": [(REGION, c.node_key, p) for p in c_data],
            "c_data_region2": [(2, c.node_key, p) for p in c_data2],  # C is now heard via region 2
            "c_keepalive": [(REGION, c.node_key, p) for p in c_keepalive],
            "c_ping": [(REGION, c.node_key, p) for p in c_ping],
            "a_init": [(REGION, a.node_key, p) for p in a_init],
            "a_ping": [(REGION, a.node_key, p) for p in a_ping],
            "d_init": [(REGION, d.node_key, p) for p in d_init],
            "d_response": [(REGION, d.node_key, p) for p in d_response],
            "d_ping": [(REGION, d.node_key, p) for p in d_ping],
            "s_init": [(REGION, s.node_key, p) for p in s_init],
            "s_ping": [(REGION, s.node_key, p) for p in s_ping],
            "c_junk": [(REGION, c.node_key, p) for p in junk],
            "s_junk": [(REGION, s.node_key, p) for p in junk],
        }


def _state(m: MagicSock) -> dict[str, object]:
    """Everything receiving may change, in an order-free form where the order of sends may differ."""
    wg_out: Counter[tuple[object, ...]] = Counter()
    for region, dest, data in m.take_derp():
        # Disco boxes carry random nonces: only their size and destination are comparable.
        wg_out[(region, dest, len(data)) if disco.looks_like_disco(data) else (region, dest, bytes(data))] += 1
    return {
        "packets": m.take_packets(),
        "counters": dict(m.counters),
        "wg_counters": asdict(m.wg.counters),
        "paths": [m.peer_status(k, NOW) for k in sorted(m.peers, key=bytes)],
        "wg_peers": [m.wg.peer_status(k, NOW) for k in sorted(m.peers, key=bytes)],
        "derp_heard": {k: st.ep.last_derp_region_heard for k, st in m.peers.items()},
        "held": {k: st.held_initiation for k, st in m.peers.items()},
        "unknown_initiations": dict(m._unknown_initiations),
        "derp_out": wg_out,
        "udp_out": len(m.take_udp()),
        "events": [type(e).__name__ for e in m.take_events()],
    }


def _batch_vs_single(scene: Scene, items: list[Item]) -> tuple[dict[str, object], dict[str, object]]:
    batched, single = scene.twins
    batched.receive_derp_batch(items, NOW)
    for region, src, data in items:
        single.receive_derp(region, src, data, NOW)
    return _state(batched), _state(single)


def test_mixed_batch_matches_per_item_processing() -> None:
    scene = Scene()
    p = scene.pool()
    c = p["c_data"]
    items = (c[:3] + p["c_ping"] + c[3:5] + p["s_init"] + p["c_junk"][:3] + p["a_init"] + p["d_init"]
             + p["c_keepalive"] + c[5:6] + c[5:6]  # a replay
             + p["s_junk"] + p["a_ping"] + p["d_response"] + p["d_ping"] + p["s_ping"] + c[6:] + p["c_junk"][3:]
             + p["c_data_region2"])
    got, want = _batch_vs_single(scene, items)
    assert got == want
    # And the outcome is the expected one, not merely the same.
    delivered = got["packets"]
    assert [peer for peer, _ in delivered] == [scene.c.node_key] * 9  # C's 9 distinct packets, the replay dropped
    counters = got["counters"]
    assert counters["derp_from_unknown_peer"] == 1 + len(p["s_junk"]) - 1  # S's initiation and its non-disco junk
    assert counters["wg_initiation_unknown_kept"] == 2  # S's real initiation, then its 148-byte junk one
    assert counters["wg_initiation_released"] == 1  # D was heard: B's held initiation to D went out
    assert counters["disco_recv_ping"] == len(p["c_ping"]) + len(p["a_ping"]) + len(p["d_ping"])
    # D's answer was processed before D's ping: the handshake was complete, nothing to retry.
    assert "wg_handshake_retried_on_disco" not in counters
    assert [w.has_session for w in got["wg_peers"] if w.public_key == scene.d.node_key] == [True]
    assert counters["disco_dropped"] >= 2  # the bad boxes from C and S (and S's pings: S is unknown)
    assert got["wg_counters"]["drop_replayed"] == 1
    assert got["derp_heard"][scene.c.node_key] == 2 and got["derp_heard"][scene.d.node_key] == REGION
    assert got["held"][scene.d.node_key] is None
    assert scene.s.node_key in got["unknown_initiations"]


def test_receive_derp_is_a_batch_of_one_and_never_raises() -> None:
    scene = Scene()
    b = scene.twins[0]
    b.receive_derp(REGION, scene.c.node_key, memoryview(scene.first_c_data[0]), NOW)
    assert [peer for peer, _ in b.take_packets()] == [scene.c.node_key]
    # Items that are not even (region, key, bytes): counted, and the rest of the batch still goes through.
    b.receive_derp_batch([(REGION, scene.c.node_key, None), (REGION, None, None),  # type: ignore[list-item]
                          (REGION, scene.c.node_key, scene.first_c_data[0])], NOW)
    assert b.counters["derp_internal_error"] == 2
    assert b.wg.counters.drop_replayed == 1  # the third item was processed (a replay of the first packet)
    b.receive_derp_batch([], NOW)
    assert b.counters["wg_received_derp"] == 3  # the initiation during setup, the packet, its replay


def test_derp_sources_are_cached_and_bounded() -> None:
    scene = Scene()
    b = scene.twins[0]
    p = scene.pool()
    b.receive_derp_batch(p["c_data"][:2] + p["c_data_region2"], NOW)
    assert set(b._derp_sources) == {(REGION, scene.c.node_key), (2, scene.c.node_key)}
    from tsnet.magicsock import conn

    for region in range(conn._DERP_SOURCE_CACHE_MAX + 5):
        b.receive_derp_batch([(region, scene.c.node_key, b"\x04" + bytes(31))], NOW)
    assert len(b._derp_sources) <= conn._DERP_SOURCE_CACHE_MAX


KINDS = ["c_data", "c_data_region2", "c_keepalive", "c_ping", "a_init", "a_ping", "d_init", "d_response", "d_ping",
         "s_init", "s_ping", "c_junk", "s_junk"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 20)), min_size=1, max_size=30))
def test_any_batch_matches_per_item_processing(picks: list[tuple[str, int]]) -> None:
    scene = Scene()
    pool = scene.pool()
    items = [pool[kind][i % len(pool[kind])] for kind, i in picks]
    got, want = _batch_vs_single(scene, items)
    assert got == want
