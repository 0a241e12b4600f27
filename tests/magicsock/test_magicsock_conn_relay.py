"""Peer relays through the MagicSock core: grants, allocation over DERP, CallMeMaybeVia, bind, relay path."""

from __future__ import annotations

import ipaddress

from tests.lab import packets
from tsnet.control import tailcfg
from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.conn import MagicSock, PeerConfig
from tsnet.magicsock.relaymanager import CAP_RELAY, CAP_RELAY_TARGET, cap_granted
from tsnet.relay.server import RelayServer

IPS = {"a": "100.64.0.1", "b": "100.64.0.2", "r": "100.64.0.3"}
UDP = {"a": AddrPort.parse("198.51.100.1:41641"), "b": AddrPort.parse("198.51.100.2:41641"),
       "r": AddrPort.parse("192.0.2.3:41641")}
RELAY_ADDR = AddrPort.parse("192.0.2.3:40000")


def _grant_all() -> tuple[tailcfg.FilterRule, ...]:
    dsts = ("0.0.0.0/0", "::/0")
    return (tailcfg.FilterRule(src_ips=("*",), cap_grant=(
        tailcfg.CapGrant(dsts=dsts, cap_map={CAP_RELAY: None, CAP_RELAY_TARGET: None}),)),)


class RelayNet:
    def __init__(self, *, grants: bool = True) -> None:
        self.now = 0.0
        self.m = {n: MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0) for n in IPS}
        self.server = RelayServer(DiscoPrivate.generate(), now=0.0)
        self.server.set_addr_ports(static=[RELAY_ADDR])
        self.m["r"].relay_server = self.server
        self.received = {n: 0 for n in IPS}
        for name, m in self.m.items():
            m.packet_filter = _grant_all() if grants else ()
            m.self_ips = (ipaddress.ip_address(IPS[name]),)
            m.set_peers([PeerConfig(o.node_key, o.disco_key, (UDP[on],), 1, 133,
                                    (ipaddress.ip_network(IPS[on] + "/32"),), name=on)
                         for on, o in self.m.items() if on != name], 0.0)
        self.by_key = {m.node_key: n for n, m in self.m.items()}

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for name, m in self.m.items():
                for data, dest in m.take_udp():
                    moved = True
                    self.udp(UDP[name], dest, bytes(data))
                for _region, dst, data in m.take_derp():
                    moved = True
                    self.m[self.by_key[dst]].receive_derp(1, m.node_key, bytes(data), self.now)
                self.received[name] += len(m.take_packets())
            if not moved:
                return

    def udp(self, src: AddrPort, dest: AddrPort, data: bytes) -> None:
        if dest == RELAY_ADDR:
            out = self.server.receive_datagram(data, src, self.now)
            if out is not None:
                fwd, to = out
                self.udp(RELAY_ADDR, to, bytes(fwd))
            return
        names = {v: k for k, v in UDP.items()}
        s, d = names.get(src), names.get(dest)
        if {s, d} == {"a", "b"}:
            return  # a and b cannot reach each other directly (hard NATs)
        if d is not None:
            self.m[d].receive_udp(data, src, self.now)

    def advance(self, until: float) -> None:
        while True:
            ts = [t for m in self.m.values() if (t := m.get_timer()) is not None and t <= until]
            if not ts:
                self.now = until
                return
            self.now = max(self.now, min(ts))
            for m in self.m.values():
                t = m.get_timer()
                if t is not None and t <= self.now:
                    m.handle_timer(self.now)
            self.pump()

    def ping_a_to_b(self, seq: int) -> None:
        self.m["a"].send_ip_packet(packets.icmp_echo(IPS["a"], IPS["b"], 1, seq), self.now)
        self.pump()


def test_cap_granted() -> None:
    rules = (tailcfg.FilterRule(src_ips=("100.64.0.3",), cap_grant=(
        tailcfg.CapGrant(dsts=("100.64.0.1/32",), cap_map={CAP_RELAY_TARGET: []}),)),)
    a, r, b = (ipaddress.ip_address(IPS[n]) for n in "arb")
    assert cap_granted(rules, CAP_RELAY_TARGET, [r], [a])
    assert not cap_granted(rules, CAP_RELAY_TARGET, [b], [a])
    assert not cap_granted(rules, CAP_RELAY_TARGET, [r], [b])
    assert not cap_granted(rules, CAP_RELAY, [r], [a])
    legacy = (tailcfg.FilterRule(src_ips=("100.64.0.0-100.64.0.9",), cap_grant=(
        tailcfg.CapGrant(dsts=("*",), caps=(CAP_RELAY,)),)),)
    assert cap_granted(legacy, CAP_RELAY, [b], [a])
    assert not cap_granted(legacy, CAP_RELAY, [ipaddress.ip_address("100.64.1.1")], [a])


def test_blocked_direct_moves_to_the_peer_relay() -> None:
    net = RelayNet()
    a, b = net.m["a"], net.m["b"]
    assert set(a.relay.servers) == {net.m["b"].node_key, net.m["r"].node_key}
    net.ping_a_to_b(1)
    assert net.received["b"] == 1  # over DERP at once
    net.advance(2.0)
    for x, y in ((a, b), (b, a)):
        st = x.peer_status(y.node_key, net.now)
        assert st.kind == "peer-relay", st
        assert st.addr is not None and st.addr.startswith(f"{RELAY_ADDR}:vni:")
    assert net.m["r"].counters["relay_allocate_answered"] >= 1
    assert b.counters.get("disco_recv_callmemaybevia", 0) >= 1
    derp = a.counters["wg_sent_derp"]
    forwarded = sum(net.server.forwarded_packets.values())
    for i in range(5):
        net.ping_a_to_b(2 + i)
    assert net.received["b"] == 6
    assert a.counters["wg_sent_derp"] == derp
    assert sum(net.server.forwarded_packets.values()) == forwarded + 5  # WireGuard via the relay
    # Heartbeats through the relay keep it trusted while traffic continues.
    for i in range(10):
        net.advance(net.now + 1.0)
        net.ping_a_to_b(10 + i)
    assert a.peer_status(b.node_key, net.now).kind == "peer-relay"


def test_without_grants_no_relay_is_tried() -> None:
    net = RelayNet(grants=False)
    a, b = net.m["a"], net.m["b"]
    assert not a.relay.servers
    for i in range(5):
        net.ping_a_to_b(i)
        net.advance(net.now + 1.0)
    assert a.peer_status(b.node_key, net.now).kind == "derp"
    assert "relay_allocate_answered" not in net.m["r"].counters
    assert not net.server.forwarded_packets


def test_relay_node_refuses_allocation_without_cap_relay() -> None:
    net = RelayNet()
    # The relay node's own filter lacks cap/relay: clients still try, it never answers.
    only_target = (tailcfg.FilterRule(src_ips=("*",), cap_grant=(
        tailcfg.CapGrant(dsts=("0.0.0.0/0",), cap_map={CAP_RELAY_TARGET: None}),)),)
    net.m["r"].packet_filter = only_target
    net.ping_a_to_b(1)
    net.advance(12.0)
    assert net.m["r"].counters.get("relay_allocate_not_granted", 0) >= 1
    assert net.m["a"].peer_status(net.m["b"].node_key, net.now).kind == "derp"


def test_relay_wireguard_batch_is_delivered_in_order_through_the_fast_path() -> None:
    """A drained batch of relayed WireGuard datagrams (as the UDP reader hands it over) reaches WireGuard
    in order; a datagram with an unusual but valid Geneve header (control flag) takes the general path."""
    net = RelayNet()
    a, b = net.m["a"], net.m["b"]
    net.ping_a_to_b(1)
    net.advance(2.0)
    assert a.peer_status(b.node_key, net.now).kind == "peer-relay"
    for i in range(8):
        a.send_ip_packet(packets.icmp_echo(IPS["a"], IPS["b"], 7, 100 + i), net.now)
    out = a.take_udp()
    assert len(out) == 8 and all(dest == RELAY_ADDR for _, dest in out)
    forwarded = []
    for data, _ in out:
        fwd = net.server.receive_datagram(bytes(data), UDP["a"], net.now)
        assert fwd is not None
        forwarded.append(bytes(fwd[0]))
    odd = bytearray(forwarded[3])
    odd[1] |= 0x80  # the control flag: not the fast path's shape
    forwarded[3] = bytes(odd)
    b.take_packets()
    b.receive_udp_batch([(memoryview(d), RELAY_ADDR) for d in forwarded], net.now)
    got = [packets.parse_icmp_echo(packets.parse_ipv4(p).payload).seq for _, p in b.take_packets()]
    assert got == [100 + i for i in range(8)]
    assert len(b._relay_paths) == 1  # one path object for the whole batch
