"""Client-side allocation request timing, response matching and the Lamport-id rule."""

from __future__ import annotations

from dataclasses import replace

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.relay.client import AllocationState, EndpointDeduper, RelayAllocation, sorted_pair
from tsnet.relay.server import RelayServer, answer_allocate_request

RELAY_NODE = NodePrivate.generate().public
ME, PEER = DiscoPrivate.generate().public, DiscoPrivate.generate().public


def endpoint(lamport=1, vni=1, server=None):
    return d.UDPRelayEndpoint(server or ME, sorted_pair(ME, PEER), lamport, vni, 30 * 10**9, 300 * 10**9,
                              (AddrPort.parse("192.0.2.1:7000"),))


def test_request_is_sorted_and_resent_once_then_times_out():
    alloc = RelayAllocation(RELAY_NODE, ME, PEER, generation=5)
    req = alloc.start(100.0)
    assert req.client_disco == sorted_pair(ME, PEER) and req.generation == 5
    assert alloc.start(100.0) is None
    assert alloc.get_timer() == 103.0
    assert alloc.handle_timer(102.9) is None
    assert alloc.handle_timer(103.0) == req  # the single retry
    assert alloc.get_timer() == 110.0
    assert alloc.handle_timer(106.0) is None
    alloc.handle_timer(110.0)
    assert alloc.state is AllocationState.FAILED and alloc.get_timer() is None


def test_response_matching():
    alloc = RelayAllocation(RELAY_NODE, ME, PEER, generation=5)
    alloc.start(0.0)
    good = d.AllocateUDPRelayEndpointResponse(5, endpoint())
    assert alloc.handle_response(NodePrivate.generate().public, good) is None  # wrong DERP source
    assert alloc.handle_response(RELAY_NODE, replace(good, generation=6)) is None
    other_pair = replace(good.endpoint, client_disco=sorted_pair(ME, DiscoPrivate.generate().public))
    assert alloc.handle_response(RELAY_NODE, replace(good, endpoint=other_pair)) is None
    assert alloc.handle_response(RELAY_NODE, good) == good.endpoint
    assert alloc.state is AllocationState.DONE
    assert alloc.handle_response(RELAY_NODE, good) is None


def test_allocation_against_our_relay_server_core():
    srv = RelayServer(DiscoPrivate.generate(), now=0.0)
    srv.set_addr_ports(static=[AddrPort.parse("192.0.2.1:7000")])
    node_boxes = d.DiscoBoxes(DiscoPrivate.generate())
    a_priv = DiscoPrivate.generate()
    a_node = NodePrivate.generate().public
    a = d.DiscoBoxes(a_priv)
    relay_node = NodePrivate.generate().public
    alloc = RelayAllocation(relay_node, a.public_key, PEER, generation=1)
    pkt = a.seal(node_boxes.public_key, alloc.start(0.0))
    reply = answer_allocate_request(srv, node_boxes, a_node, pkt, 0.0,
                                    disco_key_of={a_node: a.public_key}.get, is_granted=lambda n: True)
    _, resp = a.open_message(reply)
    ep = alloc.handle_response(relay_node, resp)
    assert ep is not None and ep.server_disco == srv.disco_public


def test_lamport_dedupe():
    dd = EndpointDeduper()
    s1, s2 = DiscoPrivate.generate().public, DiscoPrivate.generate().public
    assert dd.accept(PEER, endpoint(lamport=2, server=s1))
    assert not dd.accept(PEER, endpoint(lamport=2, server=s1))  # duplicate
    assert not dd.accept(PEER, endpoint(lamport=1, server=s1))  # older
    assert dd.accept(PEER, endpoint(lamport=3, server=s1))  # newer supersedes
    assert dd.accept(PEER, endpoint(lamport=1, server=s2))  # another server is independent
    dd.forget(PEER)
    assert dd.accept(PEER, endpoint(lamport=1, server=s1))
