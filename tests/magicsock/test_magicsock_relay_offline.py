"""A relay server whose node control reports offline (or removed): relay paths through it drop at once."""

from __future__ import annotations

import ipaddress

from tests.magicsock.test_magicsock_conn_relay import IPS, RELAY_ADDR, UDP, RelayNet
from tsnet.magicsock.conn import PeerConfig


def _set_online(net: RelayNet, name: str, who: str, online: bool | None, *, drop: bool = False) -> None:
    """Give ``name`` a netmap where ``who`` has this online flag (or is gone, with ``drop``)."""
    m = net.m[name]
    m.set_peers([PeerConfig(o.node_key, o.disco_key, (UDP[on],), 1, 133, (ipaddress.ip_network(IPS[on] + "/32"),),
                            name=on, online=online if on == who else True)
                 for on, o in net.m.items() if on != name and not (drop and on == who)], net.now)


def _on_relay(net: RelayNet) -> None:
    net.ping_a_to_b(1)
    net.advance(2.0)
    for x, y in (("a", "b"), ("b", "a")):
        st = net.m[x].peer_status(net.m[y].node_key, net.now)
        assert st.kind == "peer-relay" and st.addr.startswith(f"{RELAY_ADDR}:vni:"), st


def test_relay_node_going_offline_drops_the_relay_path_at_once() -> None:
    net = RelayNet()
    a, b = net.m["a"], net.m["b"]
    for n in ("a", "b"):
        _set_online(net, n, "r", True)
    _on_relay(net)
    forwarded = sum(net.server.forwarded_packets.values())
    derp = a.counters.get("wg_sent_derp", 0)
    for n in ("a", "b"):
        _set_online(net, n, "r", False)
    for x, y in ((a, b), (b, a)):
        assert x.peer_status(y.node_key, net.now).kind == "derp"
    received = net.received["b"]
    net.ping_a_to_b(2)
    assert net.received["b"] == received + 1
    assert a.counters["wg_sent_derp"] == derp + 1
    assert sum(net.server.forwarded_packets.values()) == forwarded  # nothing more to the relay
    # A repeated "offline" is no new event.
    _set_online(net, "a", "r", False)
    assert a.peer_status(b.node_key, net.now).kind == "derp"
    # Back online: heartbeats rediscover the relay.
    for n in ("a", "b"):
        _set_online(net, n, "r", True)
    for i in range(10):
        net.advance(net.now + 1.0)
        net.ping_a_to_b(10 + i)
    assert a.peer_status(b.node_key, net.now).kind == "peer-relay"


def test_relay_node_removed_from_the_netmap_drops_the_relay_path() -> None:
    net = RelayNet()
    _on_relay(net)
    _set_online(net, "a", "r", None, drop=True)
    assert net.m["a"].peer_status(net.m["b"].node_key, net.now).kind == "derp"


def test_unknown_online_state_keeps_the_relay_path() -> None:
    net = RelayNet()
    _on_relay(net)
    _set_online(net, "a", "r", None)
    assert net.m["a"].peer_status(net.m["b"].node_key, net.now).kind == "peer-relay"


def test_another_peer_going_offline_keeps_the_relay_path() -> None:
    net = RelayNet()
    for n in ("a", "b"):
        _set_online(net, n, "r", True)
    _on_relay(net)
    _set_online(net, "a", "b", False)
    assert net.m["a"].peer_status(net.m["b"].node_key, net.now).kind == "peer-relay"


def test_relay_we_are_not_granted_still_ends_when_its_node_goes_offline() -> None:
    """b picked the relay (a only answered its CallMeMaybeVia): a's path through it still ends with the node."""
    net = RelayNet()
    _on_relay(net)
    a = net.m["a"]
    a.packet_filter = ()  # a no longer counts r as a relay candidate of its own
    _set_online(net, "a", "r", True)
    assert not a.relay.servers
    assert a.peer_status(net.m["b"].node_key, net.now).kind == "peer-relay"
    _set_online(net, "a", "r", False)
    assert a.peer_status(net.m["b"].node_key, net.now).kind == "derp"
