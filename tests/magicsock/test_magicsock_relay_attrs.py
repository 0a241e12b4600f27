"""Who may take part in peer relays, as in tailscaled 1.96.4.

Our node's attributes switch roles off: ``disable-relay-client`` and ``only-tcp-443`` (no relay
candidates, CallMeMaybeVia ignored), ``disable-relay-server`` (allocation requests refused).
Grants (``cap/relay-target``, ``cap/relay``) are judged between the nodes' own primary addresses.
"""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from tsnet.control import tailcfg
from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.conn import MagicSock
from tsnet.magicsock.relaymanager import CAP_RELAY, CAP_RELAY_TARGET, node_has_cap, relay_roles
from tsnet.relay.client import sorted_pair
from tsnet.relay.geneve import PROTOCOL_DISCO, encode_header
from tsnet.relay.server import RelayServer

RELAY_ADDR = AddrPort.parse("192.0.2.3:40000")


def _grant_all() -> tuple[tailcfg.FilterRule, ...]:
    return (tailcfg.FilterRule(src_ips=("*",), cap_grant=(
        tailcfg.CapGrant(dsts=("0.0.0.0/0", "::/0"), cap_map={CAP_RELAY: None, CAP_RELAY_TARGET: None}),)),)


class Setup:
    """Our core with peers A (a relay-capable node, so a relay candidate) and B, all relay caps granted."""

    def __init__(self) -> None:
        self.me = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0)
        self.me.relay_server = RelayServer(DiscoPrivate.generate(), now=0.0)
        self.me.relay_server.set_addr_ports(static=[RELAY_ADDR])
        self.a_node, self.b_node = NodePrivate.generate().public, NodePrivate.generate().public
        self.a, self.b = d.DiscoBoxes(DiscoPrivate.generate()), d.DiscoBoxes(DiscoPrivate.generate())

    def netmap(self, cap_map=None, capabilities=None) -> SimpleNamespace:  # noqa: ANN001
        def peer(key, boxes, ip, name):  # noqa: ANN001, ANN202
            return SimpleNamespace(key=key, disco_key=boxes.public_key, endpoints=(), addresses=(),
                                   allowed_ips=(ipaddress.ip_network(ip + "/32"),), home_derp=1, cap=133,
                                   name=name, online=True)
        return SimpleNamespace(
            derp_map=None, packet_filter=_grant_all(), addresses=(ipaddress.ip_interface("100.64.0.1/32"),),
            cap_map=cap_map or {}, self_node=SimpleNamespace(capabilities=capabilities),
            peers=(peer(self.a_node, self.a, "100.64.0.2", "a"), peer(self.b_node, self.b, "100.64.0.3", "b")))

    def call_me_maybe_via_from_a(self) -> None:
        server = DiscoPrivate.generate().public
        ep = d.UDPRelayEndpoint(server, sorted_pair(self.me.disco_key, self.a.public_key), 1, 9, 30 * 10**9,
                                300 * 10**9, (AddrPort.parse("192.0.2.50:7000"),))
        self.me.receive_derp(1, self.a_node, self.a.seal(self.me.disco_key, d.CallMeMaybeVia(ep)), 1.0)

    def allocate_request_from_a(self) -> list:
        req = d.AllocateUDPRelayEndpointRequest(sorted_pair(self.a.public_key, self.b.public_key), 4)
        self.me.receive_derp(1, self.a_node, self.a.seal(self.me.disco_key, req), 1.0)
        return self.me.take_derp()


def test_relay_roles() -> None:
    assert relay_roles([]) == (True, True)
    assert relay_roles(["disable-relay-client"]) == (False, True)
    assert relay_roles(["only-tcp-443", "something-else"]) == (False, True)
    assert relay_roles(["disable-relay-server"]) == (True, False)


def test_without_attributes_both_roles_work() -> None:
    s = Setup()
    s.me.set_netmap(s.netmap(), 0.0)
    assert set(s.me.relay.servers) == {s.a_node, s.b_node}
    s.call_me_maybe_via_from_a()
    assert [to for _data, to in s.me.take_udp()] == [AddrPort.parse("192.0.2.50:7000")]  # our Bind
    [(region, to, pkt)] = s.allocate_request_from_a()
    assert (region, to) == (1, s.a_node)
    assert isinstance(s.a.open_message(pkt)[1], d.AllocateUDPRelayEndpointResponse)


@pytest.mark.parametrize("attr", ["disable-relay-client", "only-tcp-443"])
@pytest.mark.parametrize("legacy", [False, True])
def test_relay_client_attributes(attr: str, legacy: bool) -> None:
    s = Setup()
    nm = s.netmap(capabilities=(attr,)) if legacy else s.netmap(cap_map={attr: None})
    s.me.set_netmap(nm, 0.0)
    assert s.me.relay.servers == {}
    assert not any(st.ep.relay_servers_available for st in s.me.peers.values())
    s.call_me_maybe_via_from_a()
    assert s.me.take_udp() == []
    assert s.me.disco.dropped == {"relay_client_disabled": 1}
    # The server role is untouched.
    assert len(s.allocate_request_from_a()) == 1
    # Control lifts the attribute: candidates again.
    s.me.set_netmap(s.netmap(), 2.0)
    assert set(s.me.relay.servers) == {s.a_node, s.b_node}


def test_disable_relay_server_refuses_allocations_and_ends_sessions() -> None:
    s = Setup()
    s.me.set_netmap(s.netmap(), 0.0)
    [(_region, _to, pkt)] = s.allocate_request_from_a()
    ep = s.a.open_message(pkt)[1].endpoint
    srv = s.me.relay_server
    assert srv.endpoint_gauge() == {"connecting": 1, "open": 0}
    # Control gives our node the attribute: the session ends at once and nothing new is allocated.
    s.me.set_netmap(s.netmap(cap_map={"disable-relay-server": None}), 1.0)
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 0}
    bind = d.BindUDPRelayEndpoint(ep.vni, 1, s.b.public_key)
    hdr = encode_header(PROTOCOL_DISCO, ep.vni, control=True)
    assert srv.receive_datagram(hdr + s.a.seal(srv.disco_public, bind), AddrPort.parse("198.51.100.1:1"), 1.0) is None
    assert srv.dropped == {"unknown_vni": 1}
    assert s.allocate_request_from_a() == []
    assert s.me.counters["relay_allocate_server_disabled"] == 1
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 0}
    assert set(s.me.relay.servers) == {s.a_node, s.b_node}  # still a relay client
    # Lifted again: allocations are answered (a fresh endpoint).
    s.me.set_netmap(s.netmap(), 2.0)
    [(_region, _to, pkt)] = s.allocate_request_from_a()
    assert s.a.open_message(pkt)[1].endpoint.lamport_id == ep.lamport_id + 1


# --- who is granted: the nodes' own primary addresses, as tailscaled's nodeHasCap ----------------


def _rule(cap: str, src: str, dst: str) -> tailcfg.FilterRule:
    return tailcfg.FilterRule(src_ips=(src,), cap_grant=(tailcfg.CapGrant(dsts=(dst,), cap_map={cap: None}),))


def test_node_has_cap_judges_the_first_same_family_pair() -> None:
    p4, p6 = ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2")
    s4, s6 = ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("fd7a:115c:a1e0::1")
    assert node_has_cap([_rule(CAP_RELAY, "100.64.0.2", "100.64.0.1/32")], CAP_RELAY, [p4, p6], [s4, s6])
    # Granted only between the v6 addresses, or across families: the v4 pair decides, so no.
    assert not node_has_cap([_rule(CAP_RELAY, "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1/128")], CAP_RELAY,
                            [p4, p6], [s4, s6])
    assert not node_has_cap([_rule(CAP_RELAY, "100.64.0.2", "fd7a:115c:a1e0::1/128")], CAP_RELAY, [p4, p6], [s4, s6])
    # A v6-only node is judged on v6.
    assert node_has_cap([_rule(CAP_RELAY, "fd7a:115c:a1e0::2", "::/0")], CAP_RELAY, [p6], [s4, s6])
    assert not node_has_cap([_rule(CAP_RELAY, "*", "*")], CAP_RELAY, [p6], [s4])  # no common family


def test_a_subnet_routers_host_route_does_not_make_it_granted() -> None:
    s = Setup()
    nm = s.netmap()
    # A is a subnet router: besides its own address it routes the host 10.9.9.9. Grants from that
    # host (to us, both caps) are not grants from A.
    a = nm.peers[0]
    a.addresses = (ipaddress.ip_interface("100.64.0.2/32"),)
    a.allowed_ips = (ipaddress.ip_network("10.9.9.9/32"), ipaddress.ip_network("100.64.0.2/32"))
    nm.packet_filter = (_rule(CAP_RELAY_TARGET, "10.9.9.9", "*"), _rule(CAP_RELAY, "10.9.9.9", "*"))
    s.me.set_netmap(nm, 0.0)
    assert s.me.relay.servers == {}
    assert s.allocate_request_from_a() == []
    assert s.me.counters["relay_allocate_not_granted"] == 1
    # Granted from A's own address: a candidate, and its allocations are answered.
    nm.packet_filter = (_rule(CAP_RELAY_TARGET, "100.64.0.2", "*"), _rule(CAP_RELAY, "100.64.0.2", "*"))
    s.me.set_netmap(nm, 1.0)
    assert set(s.me.relay.servers) == {s.a_node}
    assert len(s.allocate_request_from_a()) == 1
