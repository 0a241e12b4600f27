"""Peer relay end to end in memory: allocation over DERP, CallMeMaybeVia, both bind
handshakes, path installation in PeerEndpoint, WireGuard and heartbeats via the relay.

Direct UDP between the two clients is blocked, so the relay must win over DERP.
"""

from __future__ import annotations

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.demux import PacketKind, classify
from tsnet.magicsock.discorecv import DiscoPeer, DiscoReceiver
from tsnet.magicsock.endpoint import (
    DerpPath,
    PeerEndpoint,
    PingPurpose,
    SendPing,
    SendPong,
    StartRelayDiscovery,
    UDPPath,
)
from tsnet.relay.client import HandshakeState, RelayAllocation, RelayBindHandshake
from tsnet.relay.geneve import PROTOCOL_DISCO, encode_header
from tsnet.relay.server import RelayServer, answer_allocate_request

RELAY_ADDR = AddrPort.parse("192.0.2.10:40000")


class Client:
    def __init__(self, name, addr):
        self.name = name
        self.addr = addr
        self.node = NodePrivate.generate()
        self.boxes = d.DiscoBoxes(DiscoPrivate.generate())
        self.rx = DiscoReceiver(self.boxes)
        self.handshakes: dict[int, RelayBindHandshake] = {}
        self.alloc: RelayAllocation | None = None
        self.wireguard_in: list[bytes] = []


class World:
    def __init__(self):
        self.now = 0.0
        self.a = Client("a", AddrPort.parse("198.51.100.1:41641"))
        self.b = Client("b", AddrPort.parse("203.0.113.1:41641"))
        self.r_node = NodePrivate.generate().public
        self.r_boxes = d.DiscoBoxes(DiscoPrivate.generate())
        self.server = RelayServer(DiscoPrivate.generate(), now=0.0)
        self.server.set_addr_ports(static=[RELAY_ADDR])
        self.blocked_direct = 0
        for me, other in ((self.a, self.b), (self.b, self.a)):
            me.other = other
            me.rx.set_peers([DiscoPeer(other.node.public, other.boxes.public_key, 133),
                             DiscoPeer(self.r_node, self.r_boxes.public_key, 133)])
            me.ep = PeerEndpoint(other.node.public, other.boxes.public_key, my_node_key=me.node.public,
                                 home_derp=1, relay_capable=True)
            me.ep.update_from_netmap([other.addr], 0.0)  # direct candidate exists but is firewalled
            me.ep.relay_servers_available = me is self.a  # only A has R as a candidate relay
        self.r_netmap = {self.a.node.public: self.a.boxes.public_key, self.b.node.public: self.b.boxes.public_key}

    # --- transport -------------------------------------------------------------

    def udp(self, src: AddrPort, dst: AddrPort, data: bytes):
        if dst == RELAY_ADDR:
            out = self.server.receive_datagram(data, src, self.now)
            if out is not None:
                self.udp(RELAY_ADDR, out[1], bytes(out[0]))
            return
        client = self.a if dst == self.a.addr else self.b
        if src != RELAY_ADDR:
            self.blocked_direct += 1  # firewall between the clients
            return
        self.client_udp(client, src, data)

    def derp_to_client(self, client: Client, src_node, pkt: bytes):
        got = client.rx.receive(pkt, DerpPath(1), derp_src=src_node)
        assert got is not None, client.rx.dropped
        msg = got.message
        if isinstance(msg, d.AllocateUDPRelayEndpointResponse):
            se = client.alloc.handle_response(src_node, msg)
            assert se is not None
            # tell the peer (CallMeMaybeVia over DERP), then handshake ourselves
            self.derp_to_client(client.other, client.node.public,
                                client.boxes.seal(client.other.boxes.public_key, d.CallMeMaybeVia(se)))
            self.start_handshake(client, se)
        elif isinstance(msg, d.CallMeMaybeVia):
            self.start_handshake(client, msg.endpoint)
        elif isinstance(msg, (d.Ping, d.Pong)):
            self.apply(client, client.ep.handle_ping(msg, DerpPath(1), self.now) if isinstance(msg, d.Ping)
                       else client.ep.handle_pong(msg, DerpPath(1), self.now))

    def start_handshake(self, client: Client, se: d.UDPRelayEndpoint):
        h = RelayBindHandshake(client.boxes, se, generation=7, node_key=client.node.public)
        client.handshakes[se.vni] = h
        client.rx.expect_relay_server(se.server_disco)
        for dg in h.start(self.now):
            self.udp(client.addr, dg.to, dg.data)

    def client_udp(self, client: Client, src: AddrPort, data: bytes):
        c = classify(data)
        if c.kind is PacketKind.GENEVE_WIREGUARD:
            client.wireguard_in.append(bytes(c.payload))
            client.ep.note_recv_activity(UDPPath(src, c.vni), self.now)
            return
        assert c.kind is PacketKind.GENEVE_DISCO
        path = UDPPath(src, c.vni)
        got = client.rx.receive(c.payload, path, geneve_control=c.control)
        if got is None:
            return
        h = client.handshakes.get(c.vni)
        if h is not None and h.state is not HandshakeState.DONE:
            for dg in h.receive_disco(got.sender, got.message, src, c.control, self.now):
                self.udp(client.addr, dg.to, dg.data)
            if h.state is HandshakeState.DONE:
                client.rx.forget_relay_server(h.endpoint.server_disco)
                r = h.result
                self.apply(client, client.ep.handle_relay_path_ready(
                    UDPPath(r.relay_addr, r.vni), r.server_disco, r.latency, self.now))
            return
        if isinstance(got.message, d.Ping):
            self.apply(client, client.ep.handle_ping(got.message, path, self.now))
        elif isinstance(got.message, d.Pong):
            self.apply(client, client.ep.handle_pong(got.message, path, self.now))

    def apply(self, client: Client, actions):
        for act in actions:
            if isinstance(act, (SendPing, SendPong)):
                msg = act.ping if isinstance(act, SendPing) else act.pong
                pkt = client.boxes.seal(client.other.boxes.public_key, msg)
                if isinstance(act.path, DerpPath):
                    self.derp_to_client(client.other, client.node.public, pkt)
                elif act.path.vni is None:
                    self.udp(client.addr, act.path.addr, pkt)
                else:
                    self.udp(client.addr, act.path.addr, encode_header(PROTOCOL_DISCO, act.path.vni) + pkt)
            elif isinstance(act, StartRelayDiscovery):
                client.alloc = RelayAllocation(self.r_node, client.boxes.public_key, client.other.boxes.public_key, 1)
                req = client.boxes.seal(self.r_boxes.public_key, client.alloc.start(self.now))
                reply = answer_allocate_request(self.server, self.r_boxes, client.node.public, req, self.now,
                                                disco_key_of=self.r_netmap.get, is_granted=lambda n: True)
                self.derp_to_client(client, self.r_node, reply)

    def send_wireguard(self, client: Client, payload: bytes):
        plan = client.ep.send_plan(self.now)
        self.apply(client, plan.actions)
        if plan.udp is not None and plan.udp.vni is not None:
            h = client.handshakes[plan.udp.vni]
            self.udp(client.addr, plan.udp.addr, h.wrap_wireguard(payload))
        return plan


def test_relay_path_is_found_installed_and_kept_alive():
    w = World()
    a, b = w.a, w.b
    wg = b"\x04\x00\x00\x00" + bytes(60)
    plan = w.send_wireguard(a, wg)
    assert plan.udp is None and plan.derp_region == 1  # first packet: DERP
    assert w.blocked_direct >= 1  # direct pings were firewalled
    # allocation, CallMeMaybeVia and both handshakes ran to completion synchronously
    assert all(h.state is HandshakeState.DONE for c in (a, b) for h in c.handshakes.values())
    assert w.server.endpoint_gauge() == {"connecting": 0, "open": 1}
    vni = next(iter(a.handshakes))
    for c in (a, b):
        assert c.ep.best.path == UDPPath(RELAY_ADDR, vni)
        assert c.ep.best.relay_server_disco == w.server.disco_public
    # WireGuard now goes only via the relay, Geneve 0x7A12, and arrives intact
    w.now = 1.0
    plan = w.send_wireguard(a, wg)
    assert plan.udp == UDPPath(RELAY_ADDR, vni) and plan.derp_region is None
    assert b.wireguard_in == [wg]
    # heartbeats through the relay keep the path trusted while A keeps sending
    for t in range(3, 40, 3):
        w.now = float(t)
        w.send_wireguard(a, wg)
        acts = a.ep.handle_timer(w.now)
        assert any(isinstance(x, SendPing) and x.purpose is PingPurpose.HEARTBEAT and x.path.vni == vni for x in acts)
        w.apply(a, acts)
        assert a.ep.is_trusted(w.now + 6.0)
    assert w.server.forwarded_packets[("udp4", "udp4")] > 20
    # the relay server sees both sides active: no GC
    w.server.handle_timer(60.0)
    assert w.server.endpoint_gauge()["open"] == 1
