"""Disco codec + demux + PeerEndpoint together: two nodes behind port-restricted NATs.

A simulated network with a fake clock: UDP through two NATs (endpoint-independent
mapping, address-and-port-dependent filtering) and an in-memory DERP. Both sides
start on DERP and must end on a trusted direct path, as tailscaled does.
"""

from __future__ import annotations

import heapq
import itertools

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.demux import PacketKind, classify
from tsnet.magicsock.endpoint import (
    DerpPath,
    PeerEndpoint,
    SendCallMeMaybe,
    SendPing,
    SendPong,
    UDPPath,
)

LATENCY = 0.010


class Nat:
    def __init__(self, inside: AddrPort, public: AddrPort):
        self.inside, self.public = inside, public
        self.allowed: set[AddrPort] = set()  # remote addr:ports we have sent to

    def outbound(self, dst: AddrPort) -> AddrPort:
        self.allowed.add(dst)
        return self.public

    def inbound_ok(self, src: AddrPort) -> bool:
        return src in self.allowed


class Node:
    def __init__(self, name, nat: Nat, region: int):
        self.name = name
        self.node = NodePrivate.generate()
        self.boxes = d.DiscoBoxes(DiscoPrivate.generate())
        self.nat = nat
        self.region = region
        self.peer: PeerEndpoint | None = None
        self.peer_node: Node | None = None


class Sim:
    def __init__(self):
        self.now = 0.0
        self.q = []
        self.seq = itertools.count()
        self.udp_delivered = 0
        self.udp_dropped = 0

    def at(self, t, fn, *args):
        heapq.heappush(self.q, (t, next(self.seq), fn, args))

    def carry_out(self, me: Node, actions):
        peer = me.peer_node
        for a in actions:
            if isinstance(a, (SendPing, SendPong)):
                msg = a.ping if isinstance(a, SendPing) else a.pong
                pkt = me.boxes.seal(peer.boxes.public_key, msg)
                if isinstance(a.path, DerpPath):
                    self.at(self.now + LATENCY, self.derp_deliver, peer, me, pkt)
                else:
                    src = me.nat.outbound(a.path.addr)
                    self.at(self.now + LATENCY, self.udp_deliver, a.path.addr, src, pkt)
            elif isinstance(a, SendCallMeMaybe):
                cmm = d.CallMeMaybe((me.nat.public,))
                self.at(self.now + LATENCY, self.derp_deliver, peer, me, me.boxes.seal(peer.boxes.public_key, cmm))

    def udp_deliver(self, dst: AddrPort, src: AddrPort, pkt: bytes):
        node = next((n for n in self.nodes if n.nat.public == dst), None)
        if node is None or not node.nat.inbound_ok(src):
            self.udp_dropped += 1
            return
        self.udp_delivered += 1
        c = classify(pkt)
        assert c.kind is PacketKind.DISCO
        sender, msg = node.boxes.open_message(c.payload)
        assert sender == node.peer_node.boxes.public_key
        if isinstance(msg, d.Ping):
            assert msg.node_key == node.peer_node.node.public
            self.carry_out(node, node.peer.handle_ping(msg, UDPPath(src), self.now))
        elif isinstance(msg, d.Pong):
            assert msg.src == node.nat.public  # the peer saw our NAT's public side
            self.carry_out(node, node.peer.handle_pong(msg, UDPPath(src), self.now))

    def derp_deliver(self, node: Node, from_node: Node, pkt: bytes):
        sender, msg = node.boxes.open_message(pkt)
        region = DerpPath(from_node.region)
        if isinstance(msg, d.Ping):
            self.carry_out(node, node.peer.handle_ping(msg, region, self.now))
        elif isinstance(msg, d.Pong):
            self.carry_out(node, node.peer.handle_pong(msg, region, self.now))
        elif isinstance(msg, d.CallMeMaybe):
            self.carry_out(node, node.peer.handle_call_me_maybe(msg, self.now))

    def run_until(self, t_end):
        while True:
            timers = [(n.peer.get_timer(), n) for n in self.nodes if n.peer.get_timer() is not None]
            next_timer = min(timers, key=lambda x: x[0]) if timers else None
            next_msg = self.q[0][0] if self.q else None
            candidates = [t for t in (next_msg, next_timer and next_timer[0]) if t is not None]
            if not candidates or min(candidates) > t_end:
                self.now = t_end
                return
            if next_msg is not None and (next_timer is None or next_msg <= next_timer[0]):
                t, _, fn, args = heapq.heappop(self.q)
                self.now = t
                fn(*args)
            else:
                self.now = next_timer[0]
                node = next_timer[1]
                self.carry_out(node, node.peer.handle_timer(self.now))


def build():
    a = Node("a", Nat(AddrPort.parse("10.0.0.2:41641"), AddrPort.parse("203.0.113.1:41641")), region=1)
    b = Node("b", Nat(AddrPort.parse("10.1.0.2:41641"), AddrPort.parse("198.51.100.1:41641")), region=2)
    for me, other in ((a, b), (b, a)):
        me.peer_node = other
        me.peer = PeerEndpoint(other.node.public, other.boxes.public_key, my_node_key=me.node.public,
                               home_derp=other.region)
        # netmap: the peer's STUN-discovered public endpoint
        me.peer.update_from_netmap([other.nat.public], 0.0)
    sim = Sim()
    sim.nodes = [a, b]
    return sim, a, b


def test_both_sides_hole_punch_to_a_trusted_direct_path():
    sim, a, b = build()
    # A has WireGuard to send: first packet goes via DERP, discovery starts.
    plan = a.peer.send_plan(0.0)
    assert plan.udp is None and plan.derp_region == 2
    sim.carry_out(a, plan.actions)
    sim.run_until(1.0)
    # A's first ping was filtered by B's NAT; B, told by CallMeMaybe, pinged back
    # through A's fresh mapping and got a pong: B is direct already.
    assert sim.udp_dropped >= 1
    assert b.peer.best is not None and b.peer.best.path == UDPPath(a.nat.public)
    # B sends traffic too (WireGuard replies), and A's next ping round gets through.
    sim.carry_out(b, b.peer.send_plan(1.0).actions)
    sim.run_until(4.0)
    sim.carry_out(a, a.peer.send_plan(4.0).actions)
    sim.run_until(10.0)
    for me, other in ((a, b), (b, a)):
        assert me.peer.best.path == UDPPath(other.nat.public)
        assert abs(me.peer.best.latency - 2 * LATENCY) < 1e-6
        assert me.peer.is_trusted(sim.now)
        plan = me.peer.send_plan(sim.now)
        assert plan.udp == UDPPath(other.nat.public) and plan.derp_region is None


def test_heartbeats_keep_direct_path_trusted_while_active_then_go_idle():
    sim, a, b = build()
    sim.carry_out(a, a.peer.send_plan(0.0).actions)
    sim.run_until(1.0)
    sim.carry_out(b, b.peer.send_plan(1.0).actions)
    sim.run_until(6.0)
    sim.carry_out(a, a.peer.send_plan(6.0).actions)
    for t in range(7, 40):
        sim.run_until(float(t))
        sim.carry_out(a, a.peer.send_plan(float(t)).actions)
        assert a.peer.is_trusted(float(t))
    # stop sending: heartbeats end 45 s after the last send, trust lapses
    sim.run_until(120.0)
    assert a.peer.get_timer() is None
    assert not a.peer.is_trusted(120.0)
    assert a.peer.addr_for_send(120.0).derp_region == 2
