"""The MagicSock core (sans-IO) with a fake clock and an in-memory network and DERP."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab import packets
from tests.magicsock.twocores import TwoCores
from tsnet.control.server import default_derp_map
from tsnet.derp import stun
from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.conn import (
    Endpoint,
    EndpointsChanged,
    EndpointType,
    HomeDerpChanged,
    MagicSock,
    PathChanged,
    PeerConfig,
)
from tsnet.magicsock.netcheck import StunProber, StunTarget, stun_targets

STUN_SERVER = AddrPort.parse("192.0.2.1:3478")
DERP_MAP = default_derp_map("192.0.2.1", 8080, stun_port=3478)


class Net(TwoCores):
    """Two cores; UDP between fixed addresses (optionally blocked), DERP region 900, a STUN server."""

    def __init__(self, *, block_direct: bool = False) -> None:
        super().__init__()
        self.block_direct = block_direct
        for m in (self.a, self.b):
            m.set_sockets({4: 41641}, [ipaddress.ip_address("10.0.0.1")], 0.0)
            m.set_derp_map(DERP_MAP, 0.0)
        self.pump()
        for me, other in ((self.a, self.b), (self.b, self.a)):
            eps = tuple(e.addr for e in other.endpoints if e.type is EndpointType.STUN)
            me.set_peers([PeerConfig(other.node_key, other.disco_key, eps, 900, 133,
                                     (ipaddress.ip_network(self.ip[id(other)] + "/32"),), name="peer")], 0.0)

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for m in (self.a, self.b):
                for data, dest in m.take_udp():
                    moved = True
                    src = self.addr[id(m)]
                    if dest == STUN_SERVER:
                        txid = stun.parse_request(bytes(data))
                        m.receive_udp(stun.build_response(txid, src.to_sockaddr()), STUN_SERVER, self.now)
                    elif dest == self.addr[id(self.other(m))] and not self.block_direct:
                        self.other(m).receive_udp(bytes(data), src, self.now)
                for region, dst, data in m.take_derp():
                    moved = True
                    o = self.other(m)
                    assert dst == o.node_key and region == 900
                    o.receive_derp(region, m.node_key, bytes(data), self.now)
                for peer, pkt in m.take_packets():
                    self.received[id(m)].append(pkt)
            if not moved:
                return



def test_netcheck_sets_endpoints_and_home() -> None:
    net = Net()
    a = net.a
    assert a.home_derp == 900
    assert a.endpoints == (Endpoint(AddrPort.parse("198.51.100.1:41641"), EndpointType.STUN),
                           Endpoint(AddrPort.parse("10.0.0.1:41641"), EndpointType.LOCAL))
    evs = a.take_events()
    assert any(isinstance(e, HomeDerpChanged) and e.region == 900 for e in evs)
    assert isinstance([e for e in evs if isinstance(e, EndpointsChanged)][-1], EndpointsChanged)
    assert a.last_report is not None and a.last_report.udp and a.last_report.preferred_derp == 900


def test_derp_first_then_direct_and_status() -> None:
    net = Net()
    net.echo(net.a, 1)
    # Delivered (request and reply) while no path was trusted: DERP carried it.
    assert net.b.counters["wg_received_derp"] > 0
    assert len(net.received[id(net.b)]) == 1
    st = net.a.peer_status(net.b.node_key, net.now)
    assert st.kind == "direct" and st.addr == "203.0.113.1:41641" and st.trusted
    assert any(isinstance(e, PathChanged) and e.new == "203.0.113.1:41641" for e in net.a.take_events())
    derp = net.a.counters["wg_sent_derp"]
    net.echo(net.a, 2)
    assert net.a.counters["wg_sent_derp"] == derp
    assert len(net.received[id(net.b)]) == 2
    # Heartbeats keep it trusted while traffic continues.
    for i in range(10):
        net.advance(net.now + 1.0)
        net.echo(net.a, 3 + i)
    assert net.a.peer_status(net.b.node_key, net.now).kind == "direct"
    # Idle long enough and trust expires: the status says DERP (plus the untrusted direct path).
    net.advance(net.now + 60)
    st = net.a.peer_status(net.b.node_key, net.now)
    assert not st.trusted and st.kind == "derp" and st.addr == "203.0.113.1:41641"


def test_blocked_direct_stays_on_derp() -> None:
    net = Net(block_direct=True)
    for i in range(20):
        net.echo(net.a, i)
        net.advance(net.now + 1.0)
    assert len(net.received[id(net.b)]) == 20
    assert net.a.peer_status(net.b.node_key, net.now).kind == "derp"
    assert net.b.counters.get("disco_recv_callmemaybe", 0) > 0


def test_wireguard_from_an_unknown_source_is_routed_by_key() -> None:
    net = Net()
    net.echo(net.a, 1)
    assert net.a.peer_status(net.b.node_key, net.now).kind == "direct"
    # a's NAT rebinds: the same session now arrives from a new address nobody pinged.
    net.addr[id(net.a)] = AddrPort.parse("198.51.100.1:50000")
    before = len(net.received[id(net.b)])
    net.echo(net.a, 2)
    assert len(net.received[id(net.b)]) == before + 1


def test_cmm_waits_for_fresh_endpoints() -> None:
    net = Net()
    a = net.a
    net.advance(30.0)
    a.endpoints_at = 0.0  # pretend the last STUN answer is 30 s old (> 27 s: stale)
    sent_stun = a.counters.get("stun_sent", 0)
    net.block_direct = True  # no pong: the send keeps wanting discovery
    a.send_ip_packet(packets.icmp_echo("100.64.0.1", "100.64.0.2", 1, 1), net.now)
    # The CallMeMaybe was held back and a re-STUN started; answering it releases the CMM.
    assert a.counters.get("stun_sent", 0) > sent_stun
    cmm_before = net.b.counters.get("disco_recv_callmemaybe", 0)
    net.pump()
    assert net.b.counters.get("disco_recv_callmemaybe", 0) == cmm_before + 1
    assert a.endpoints_at == net.now


def test_send_ip_packet_routes_by_allowed_ips() -> None:
    net = Net()
    assert not net.a.send_ip_packet(packets.icmp_echo("100.64.0.1", "100.64.0.99", 1, 1), 0.0)
    assert net.a.counters["send_no_route"] == 1
    assert not net.a.send_ip_packet(b"\x00junk", 0.0)
    assert net.a.counters["send_bad_packet"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_junk_never_raises(data: bytes, via_derp: bool) -> None:
    m = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0)
    if via_derp:
        m.receive_derp(1, NodePrivate.generate().public, data, 0.0)
    else:
        m.receive_udp(data, AddrPort.parse("192.0.2.9:1"), 0.0)
    m.receive_udp(disco.MAGIC + data, AddrPort.parse("192.0.2.9:1"), 0.0)
    assert not m.take_packets()


# --- netcheck -------------------------------------------------------------------


def _answer(prober: StunProber, mapping: dict[AddrPort, AddrPort], now: float) -> None:
    for data, dest in prober.datagrams_to_send():
        if dest in mapping:
            txid = stun.parse_request(data)
            prober.receive(stun.build_response(txid, mapping[dest].to_sockaddr()), dest, now)


def _targets() -> list[StunTarget]:
    return [StunTarget(1, "1a", AddrPort.parse("192.0.2.1:3478")), StunTarget(2, "2a", AddrPort.parse("192.0.2.2:3478"))]


def test_netcheck_easy_nat_and_preferred_region() -> None:
    p = StunProber(_targets(), 0.0)
    me = AddrPort.parse("198.51.100.7:41641")
    out = p.datagrams_to_send()
    t2 = out[1]
    txid = stun.parse_request(t2[0])
    p.receive(stun.build_response(txid, me.to_sockaddr()), t2[1], 0.010)
    txid = stun.parse_request(out[0][0])
    p.receive(stun.build_response(txid, me.to_sockaddr()), out[0][1], 0.030)
    assert p.done
    r = p.report()
    assert r.udp and r.ipv4 and not r.ipv6 and r.global_v4 == me
    assert r.mapping_varies_by_dest_ip is False and not r.hard_nat
    assert r.preferred_derp == 2 and r.region_latency[1] > r.region_latency[2]


def test_netcheck_hard_nat_detected() -> None:
    p = StunProber(_targets(), 0.0)
    _answer(p, {AddrPort.parse("192.0.2.1:3478"): AddrPort.parse("198.51.100.7:1000"),
                AddrPort.parse("192.0.2.2:3478"): AddrPort.parse("198.51.100.7:2000")}, 0.01)
    r = p.report()
    assert r.mapping_varies_by_dest_ip is True and r.hard_nat
    assert set(r.mapped) == {AddrPort.parse("198.51.100.7:1000"), AddrPort.parse("198.51.100.7:2000")}


def test_netcheck_retries_then_times_out() -> None:
    p = StunProber(_targets(), 0.0)
    assert len(p.datagrams_to_send()) == 2  # both lost
    t = p.get_timer()
    assert t is not None and t > 0
    p.handle_timer(t)
    resent = p.datagrams_to_send()
    assert len(resent) == 2
    # Only region 1 answers the retry.
    txid = stun.parse_request(resent[0][0])
    assert p.receive(stun.build_response(txid, ("198.51.100.7", 9)), resent[0][1], t + 0.005)
    assert not p.receive(stun.build_response(txid, ("198.51.100.7", 9)), resent[0][1], t + 0.006)  # duplicate
    assert not p.done and p.expired(5.0)
    r = p.report()
    assert r.udp and r.preferred_derp == 1 and r.mapping_varies_by_dest_ip is None
    assert abs(r.region_latency[1] - 0.005) < 1e-9


def test_netcheck_no_udp() -> None:
    p = StunProber(_targets(), 0.0)
    r = p.report()
    assert not r.udp and r.preferred_derp == 0 and r.global_v4 is None


def test_stun_targets_from_derp_map() -> None:
    targets = stun_targets(DERP_MAP)
    assert targets == [StunTarget(900, "900a", STUN_SERVER)]
    assert stun_targets(default_derp_map("192.0.2.1", 8080)) == []  # STUNPort -1: none
    json_map = {"Regions": {"5": {"Nodes": [{"Name": "5a", "IPv4": "192.0.2.5", "IPv6": "2001:db8::5",
                                              "STUNPort": 0}]}}}
    got = stun_targets(json_map)
    assert [str(t.addr) for t in got] == ["192.0.2.5:3478", "[2001:db8::5]:3478"]


def test_hard_nat_with_configured_port_adds_stun4localport() -> None:
    m = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0)
    m.set_sockets({4: 41641}, [], 0.0, configured_port=41641)
    m.derp_map = {"Regions": {"1": {"Nodes": [{"IPv4": "192.0.2.1", "STUNPort": 3478}]},
                              "2": {"Nodes": [{"IPv4": "192.0.2.2", "STUNPort": 3478}]}}}
    m.restun(0.0)
    mapping = {AddrPort.parse("192.0.2.1:3478"): AddrPort.parse("198.51.100.7:1000"),
               AddrPort.parse("192.0.2.2:3478"): AddrPort.parse("198.51.100.7:2000")}
    for data, dest in m.take_udp():
        txid = stun.parse_request(bytes(data))
        m.receive_udp(stun.build_response(txid, mapping[dest].to_sockaddr()), dest, 0.01)
    types = {str(e.addr): e.type for e in m.endpoints}
    assert types["198.51.100.7:41641"] is EndpointType.STUN4_LOCAL_PORT
    assert types["198.51.100.7:1000"] is EndpointType.STUN
    assert m.last_report is not None and m.last_report.hard_nat


# --- cryptokey routing on receive -----------------------------------------------


def _ipv6_udp(src: str, dst: str) -> bytes:
    """An IPv6 UDP packet (checksum left zero: only the source check is under test here)."""
    payload = b"\x30\x39\x00\x35\x00\x0cspoo"
    return (b"\x60\x00\x00\x00" + len(payload).to_bytes(2, "big") + b"\x11\x40"
            + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload)


def test_inner_source_must_route_back_to_the_sending_peer() -> None:
    """A peer may only use source addresses that the AllowedIPs table (longest prefix) gives to it."""
    net = Net()
    a, b = net.a, net.b
    sub = ipaddress.ip_network
    # b's view: a owns 100.64.0.1/32, fd7a::1/128 and the subnet 10.0.0.0/8, except 10.1.2.3,
    # which a third node owns (a longer prefix); 10.9.0.0/16 also belongs to that third node.
    third = NodePrivate.generate().public
    eps = tuple(e.addr for e in a.endpoints if e.type is EndpointType.STUN)
    b.set_peers([
        PeerConfig(a.node_key, a.disco_key, eps, 900, 133,
                   (sub("100.64.0.1/32"), sub("fd7a:115c:a1e0::1/128"), sub("10.0.0.0/8")), name="a"),
        PeerConfig(third, DiscoPrivate.generate().public, (), 900, 133,
                   (sub("10.1.2.3/32"), sub("10.9.0.0/16")), name="third"),
    ], net.now)
    a.set_peers([PeerConfig(b.node_key, b.disco_key, (), 900, 133, (sub("0.0.0.0/0"), sub("::/0")), name="b")],
                net.now)

    def deliver(pkt: bytes) -> bool:
        before = len(net.received[id(b)])
        assert a.send_ip_packet(pkt, net.now)
        net.pump()
        got = net.received[id(b)][before:]
        assert got in ([], [pkt])
        return bool(got)

    cases = [
        ("100.64.0.1", True),   # a's own address
        ("10.200.0.7", True),   # in a's subnet route
        ("100.64.0.2", False),  # b's own address
        ("100.64.0.9", False),  # nobody's
        ("10.1.2.3", False),    # inside a's /8, but the third node's /32 is the longer match
        ("10.9.4.4", False),    # the third node's /16 beats a's /8
    ]
    for src, allowed in cases * 2:  # twice: the second round goes through the per-address cache
        assert deliver(packets.udp(src, "100.64.0.2", 5, 6, b"x")) is allowed, src
    assert deliver(_ipv6_udp("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"))
    assert not deliver(_ipv6_udp("fd7a:115c:a1e0::5", "fd7a:115c:a1e0::2"))
    assert b.counters["wg_source_not_allowed"] == 2 * 4 + 1
