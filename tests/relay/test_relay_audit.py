"""Peer relay rules checked against tailscaled 1.96.4: the client's handshake and relay manager, the server."""

from __future__ import annotations

from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.relaymanager import RelayManager
from tsnet.relay.client import HandshakeState, RelayBindHandshake, sorted_pair
from tsnet.relay.geneve import PROTOCOL_DISCO, PROTOCOL_WIREGUARD, encode_header
from tsnet.relay.server import RelayServer

SERVER_ADDR = AddrPort.parse("192.0.2.1:7000")
OTHER_ADDR = AddrPort.parse("192.0.2.66:7000")
A_ADDR = AddrPort.parse("198.51.100.1:41641")
B_ADDR = AddrPort.parse("203.0.113.9:5555")
WG = b"\x04\x00\x00\x00" + bytes(range(60))


def _keys() -> tuple[d.DiscoBoxes, d.DiscoBoxes, d.DiscoBoxes]:
    return tuple(d.DiscoBoxes(DiscoPrivate.generate()) for _ in range(3))  # type: ignore[return-value]


def _endpoint(server: d.DiscoBoxes, x: d.DiscoBoxes, y: d.DiscoBoxes, lamport: int = 1, vni: int = 9):
    return d.UDPRelayEndpoint(server.public_key, sorted_pair(x.public_key, y.public_key), lamport, vni,
                              30 * 10**9, 300 * 10**9, (SERVER_ADDR,))


def _geneve(boxes: d.DiscoBoxes, to: d.DiscoBoxes, msg: d.Message, vni: int = 9, control: bool = False) -> bytes:
    return encode_header(PROTOCOL_DISCO, vni, control=control) + boxes.seal(to.public_key, msg)


# --- client: which endpoints it takes -----------------------------------------------------


def test_call_me_maybe_via_must_pair_us_with_its_sender() -> None:
    me, peer, third = _keys()
    server = d.DiscoBoxes(DiscoPrivate.generate())
    rm = RelayManager(me, NodePrivate.generate().public)
    peer_node = NodePrivate.generate().public
    # The peer hands us an endpoint that pairs us with a third node: a path proved with that node
    # would carry the peer's WireGuard. Refused, nothing is sent and no challenge is expected.
    bad = d.CallMeMaybeVia(_endpoint(server, me, third))
    assert rm.handle_call_me_maybe_via(peer_node, peer.public_key, bad, 0.0) == []
    # Nor an endpoint for two other nodes.
    assert rm.handle_call_me_maybe_via(peer_node, peer.public_key, d.CallMeMaybeVia(_endpoint(server, peer, third)),
                                       0.0) == []
    assert rm.counters == {"endpoint_not_for_us": 2} and rm.expected_servers == []
    good = d.CallMeMaybeVia(_endpoint(server, me, peer))
    [(data, to)] = rm.handle_call_me_maybe_via(peer_node, peer.public_key, good, 0.0)
    assert to == SERVER_ADDR
    _, bind = server.open_message(data[8:])
    assert isinstance(bind, d.BindUDPRelayEndpoint) and bind.remote_key == peer.public_key
    assert rm.expected_servers == [server.public_key]


# --- client: the bind handshake ------------------------------------------------------------


def _answered(me: d.DiscoBoxes, peer: d.DiscoBoxes, server: d.DiscoBoxes) -> tuple[RelayBindHandshake, bytes]:
    """A handshake whose challenge from SERVER_ADDR was answered; returns it and its first ping's TxID."""
    hs = RelayBindHandshake(me, _endpoint(server, me, peer), generation=3, node_key=NodePrivate.generate().public)
    hs.start(0.0)
    ch = d.BindUDPRelayEndpointChallenge(9, 3, peer.public_key, bytes(range(32)))
    answer, ping = hs.receive_disco(server.public_key, ch, SERVER_ADDR, True, 0.1)
    assert hs.state is HandshakeState.ANSWER_SENT and hs.relay_addr == SERVER_ADDR
    _, msg = peer.open_message(ping.data[8:])
    return hs, msg.tx_id


def test_handshake_pong_counts_only_from_the_challenged_relay_address() -> None:
    me, peer, server = _keys()
    hs, tx = _answered(me, peer, server)
    # The peer's pong (or a captured copy of it) arriving from elsewhere with our VNI must not make
    # that address our relay path.
    assert hs.receive_datagram(_geneve(peer, me, d.Pong(tx, OTHER_ADDR)), OTHER_ADDR, 0.2) == []
    assert hs.state is HandshakeState.ANSWER_SENT and hs.result is None
    # A pong from the relay for a ping we never sent does not either.
    assert hs.receive_datagram(_geneve(peer, me, d.Pong(d.new_tx_id(), SERVER_ADDR)), SERVER_ADDR, 0.2) == []
    assert hs.result is None
    hs.receive_datagram(_geneve(peer, me, d.Pong(tx, SERVER_ADDR)), SERVER_ADDR, 0.3)
    assert hs.state is HandshakeState.DONE
    assert hs.result.relay_addr == SERVER_ADDR and abs(hs.result.latency - 0.2) < 1e-9


def test_handshake_answers_pings_from_anywhere_but_pings_only_the_relay() -> None:
    me, peer, server = _keys()
    hs, _tx = _answered(me, peer, server)
    # Like tailscaled, any Geneve ping from the peer gets a pong where it came from ...
    [pong] = hs.receive_datagram(_geneve(peer, me, d.Ping(d.new_tx_id())), OTHER_ADDR, 0.2)
    assert pong.to == OTHER_ADDR
    # ... but only one from the relay address draws a fresh ping of ours (and only there).
    out = hs.receive_datagram(_geneve(peer, me, d.Ping(d.new_tx_id())), SERVER_ADDR, 0.2)
    assert [dg.to for dg in out] == [SERVER_ADDR, SERVER_ADDR]
    kinds = [type(peer.open_message(dg.data[8:])[1]) for dg in out]
    assert kinds == [d.Pong, d.Ping]


def test_handshake_ignores_challenges_it_cannot_trust() -> None:
    me, peer, server = _keys()
    hs = RelayBindHandshake(me, _endpoint(server, me, peer), generation=3)
    hs.start(0.0)
    ch = d.BindUDPRelayEndpointChallenge(9, 3, peer.public_key, bytes(32))
    # From the peer's key instead of the server's; for another VNI; naming another remote key;
    # without the control bit.
    assert hs.receive_disco(peer.public_key, ch, SERVER_ADDR, True, 0.1) == []
    assert hs.receive_disco(server.public_key, d.BindUDPRelayEndpointChallenge(10, 3, peer.public_key, bytes(32)),
                            SERVER_ADDR, True, 0.1) == []
    assert hs.receive_disco(server.public_key, d.BindUDPRelayEndpointChallenge(9, 3, me.public_key, bytes(32)),
                            SERVER_ADDR, True, 0.1) == []
    assert hs.receive_disco(server.public_key, ch, SERVER_ADDR, False, 0.1) == []
    assert hs.state is HandshakeState.BIND_SENT and hs.relay_addr is None


def test_relay_manager_leaves_other_pongs_to_the_peer_endpoint() -> None:
    me, peer, server = _keys()
    rm = RelayManager(me, NodePrivate.generate().public)
    peer_node = NodePrivate.generate().public
    [(_bind, _to)] = rm.handle_call_me_maybe_via(peer_node, peer.public_key,
                                                 d.CallMeMaybeVia(_endpoint(server, me, peer)), 0.0)
    ch = d.BindUDPRelayEndpointChallenge(9, 1, peer.public_key, bytes(32))
    out, ready = rm.handle_disco(9, server.public_key, ch, SERVER_ADDR, True, 0.1)
    assert len(out) == 2 and ready == []
    # A pong for some other ping on this VNI (say a heartbeat through an installed relay path):
    # not the handshake's, so magicsock hands it to the peer's endpoint instead of swallowing it.
    assert rm.handle_disco(9, peer.public_key, d.Pong(d.new_tx_id(), SERVER_ADDR), SERVER_ADDR, False, 0.2) is None
    # The handshake's own pong completes it.
    tx = peer.open_message(out[1][0][8:])[1].tx_id
    out, ready = rm.handle_disco(9, peer.public_key, d.Pong(tx, SERVER_ADDR), SERVER_ADDR, False, 0.3)
    assert [r.peer for r in ready] == [peer_node] and ready[0].result.relay_addr == SERVER_ADDR


# --- server ----------------------------------------------------------------------------------


def _server_pair() -> tuple[RelayServer, d.DiscoBoxes, d.DiscoBoxes, d.UDPRelayEndpoint]:
    srv = RelayServer(DiscoPrivate.generate(), now=0.0)
    srv.set_addr_ports(static=[SERVER_ADDR])
    a, b = d.DiscoBoxes(DiscoPrivate.generate()), d.DiscoBoxes(DiscoPrivate.generate())
    return srv, a, b, srv.allocate(a.public_key, b.public_key, 0.0)


def _to_server(srv: RelayServer, boxes: d.DiscoBoxes, msg: d.Message, vni: int) -> bytes:
    return encode_header(PROTOCOL_DISCO, vni, control=True) + boxes.seal(srv.disco_public, msg)


def _bind(srv: RelayServer, boxes: d.DiscoBoxes, other: d.DiscoBoxes, ep, src: AddrPort, gen: int, now: float):
    out = srv.receive_datagram(_to_server(srv, boxes, d.BindUDPRelayEndpoint(ep.vni, gen, other.public_key), ep.vni),
                               src, now)
    _, ch = boxes.open_message(out[0][8:])
    srv.receive_datagram(_to_server(srv, boxes, d.BindUDPRelayEndpointAnswer(ep.vni, gen, other.public_key,
                                                                            ch.challenge), ep.vni), src, now)


def test_bind_needs_the_client_disco_private_key() -> None:
    srv, a, b, ep = _server_pair()
    # Someone who knows A's public disco key (it is in every netmap) but not its private key puts
    # it in the header and boxes with their own key: no challenge, so no binding.
    mallory = d.DiscoBoxes(DiscoPrivate.generate())
    forged = mallory.seal(srv.disco_public, d.BindUDPRelayEndpoint(ep.vni, 1, b.public_key))
    forged = forged[:6] + a.public_key.raw + forged[38:]
    assert srv.receive_datagram(encode_header(PROTOCOL_DISCO, ep.vni, control=True) + forged, B_ADDR, 0.0) is None
    assert srv.dropped == {"control_bad_box": 1}
    assert srv.sessions()[0].bound == (None, None)


def test_handshake_messages_are_never_forwarded() -> None:
    srv, a, b, ep = _server_pair()
    _bind(srv, a, b, ep, A_ADDR, 1, 0.0)
    _bind(srv, b, a, ep, B_ADDR, 1, 0.0)
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 1}
    # From a bound address, with the control bit: handled by the server (here: a peer-to-peer
    # ping is not a handshake message), never passed to the other side.
    ping = encode_header(PROTOCOL_DISCO, ep.vni, control=True) + a.seal(b.public_key, d.Ping(d.new_tx_id()))
    assert srv.receive_datagram(ping, A_ADDR, 1.0) is None
    assert srv.receive_datagram(encode_header(PROTOCOL_WIREGUARD, ep.vni, control=True) + WG, A_ADDR, 1.0) is None
    # The same bytes without the control bit are data: forwarded verbatim to the other side.
    data = encode_header(PROTOCOL_WIREGUARD, ep.vni) + WG
    out = srv.receive_datagram(data, A_ADDR, 1.0)
    assert out is not None and bytes(out[0]) == data and out[1] == B_ADDR
    # A bound client's datagram with another VNI is not forwarded on this endpoint.
    assert srv.receive_datagram(encode_header(PROTOCOL_WIREGUARD, ep.vni + 1) + WG, A_ADDR, 1.0) is None


def test_a_third_key_cannot_join_or_hijack_an_endpoint() -> None:
    srv, a, b, ep = _server_pair()
    _bind(srv, a, b, ep, A_ADDR, 1, 0.0)
    _bind(srv, b, a, ep, B_ADDR, 1, 0.0)
    c = d.DiscoBoxes(DiscoPrivate.generate())
    # A client of another endpoint, boxing correctly with its own key: not one of this pair.
    assert srv.receive_datagram(_to_server(srv, c, d.BindUDPRelayEndpoint(ep.vni, 1, a.public_key), ep.vni),
                                OTHER_ADDR, 1.0) is None
    assert srv.dropped == {"control_unknown_sender": 1}
    assert set(srv.sessions()[0].bound) == {A_ADDR, B_ADDR}
    assert srv.receive_datagram(encode_header(PROTOCOL_WIREGUARD, ep.vni) + WG, OTHER_ADDR, 1.0) is None


def test_superseded_handshake_stops_accepting_its_server_challenges() -> None:
    me, peer, server = _keys()
    rm = RelayManager(me, NodePrivate.generate().public)
    peer_node = NodePrivate.generate().public
    rm.handle_call_me_maybe_via(peer_node, peer.public_key, d.CallMeMaybeVia(_endpoint(server, me, peer, 1)), 0.0)
    # The server re-announces the endpoint with a newer Lamport id: the old handshake is replaced.
    rm.handle_call_me_maybe_via(peer_node, peer.public_key, d.CallMeMaybeVia(_endpoint(server, me, peer, 2)), 1.0)
    # magicsock accepts a server's Geneve control messages while a handshake with it runs: one
    # "expected" per handshake started, one "finished" per handshake ended (here: the replaced one).
    assert len(rm.expected_servers) - len(rm.finished_servers) == 1
    rm.handle_timer(31.0)  # the remaining one times out
    assert len(rm.expected_servers) - len(rm.finished_servers) == 0
    assert rm.counters["handshake_failed"] == 1


def test_allocate_response_only_from_a_server_we_asked() -> None:
    me, peer, _server = _keys()
    rm = RelayManager(me, NodePrivate.generate().public)
    relay_node, other_node = NodePrivate.generate().public, NodePrivate.generate().public
    peer_node = NodePrivate.generate().public
    rm.set_servers({relay_node: DiscoPrivate.generate().public})  # our only granted candidate
    [(to, req)] = rm.discover(peer_node, peer.public_key, 0.0)
    assert to == relay_node
    server = d.DiscoBoxes(DiscoPrivate.generate())
    resp = d.AllocateUDPRelayEndpointResponse(req.generation, _endpoint(server, me, peer))
    # The same answer from a node we never asked (not a granted relay candidate): ignored.
    assert rm.handle_allocate_response(other_node, resp, 0.1) == ([], [])
    assert rm.counters["allocate_response_unmatched"] == 1
    msgs, binds = rm.handle_allocate_response(relay_node, resp, 0.1)
    assert msgs == [(peer_node, d.CallMeMaybeVia(resp.endpoint))] and [t for _b, t in binds] == [SERVER_ADDR]


def test_handshake_sends_at_most_ten_pings_however_many_it_receives() -> None:
    me, peer, server = _keys()
    hs, _tx = _answered(me, peer, server)  # the first ping went out with the answer
    ours = 1
    for i in range(30):
        out = hs.receive_datagram(_geneve(peer, me, d.Ping(d.new_tx_id())), SERVER_ADDR, 0.2 + i * 0.01)
        assert isinstance(peer.open_message(out[0].data[8:])[1], d.Pong)  # every ping gets its pong
        ours += len(out) - 1
    assert ours == 10


def test_close_all_ends_open_sessions_at_once() -> None:
    srv, a, b, ep = _server_pair()
    _bind(srv, a, b, ep, A_ADDR, 1, 0.0)
    _bind(srv, b, a, ep, B_ADDR, 1, 0.0)
    data = encode_header(PROTOCOL_WIREGUARD, ep.vni) + WG
    assert srv.receive_datagram(data, A_ADDR, 1.0) is not None
    assert srv.close_all() == [ep.vni]
    assert srv.receive_datagram(data, A_ADDR, 1.0) is None
    assert srv.forward_run(data * 3, len(data), A_ADDR, 1.0) == []
    assert srv.endpoint_gauge() == {"connecting": 0, "open": 0} and srv.sessions() == []
