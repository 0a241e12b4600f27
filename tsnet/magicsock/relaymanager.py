"""Peer relay glue for :class:`~tsnet.magicsock.conn.MagicSock` (sans-IO).

* :func:`cap_granted` evaluates a packet filter's CapGrants (who may use whom
  as a relay: ``tailscale.com/cap/relay-target`` on clients,
  ``tailscale.com/cap/relay`` on the relay node); :func:`node_has_cap` applies
  it between two nodes' primary addresses, as tailscaled does.
* :class:`RelayManager` is the client side: allocations on every candidate
  relay node over DERP, CallMeMaybeVia to the peer, the bind handshakes
  (:class:`tsnet.relay.client.RelayBindHandshake`) and, when one proves a path,
  a :class:`RelayReady` for the peer's :class:`~.endpoint.PeerEndpoint`.

Outputs are plain tuples for the owner to send: ``("derp", node, disco message)``
(seal to that node's disco key and send over DERP to its home region) and
``("udp", bytes, AddrPort)`` (already framed and sealed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tsnet.key import DiscoPublic, NodePublic
from tsnet.magicsock import disco
from tsnet.magicsock.addrport import AddrPort, IPAddress
from tsnet.relay.client import (
    EndpointDeduper,
    HandshakeState,
    RelayAllocation,
    RelayBindHandshake,
    RelayHandshakeFailed,
    RelayPathReady,
    sorted_pair,
)

__all__ = [
    "CAP_RELAY",
    "CAP_RELAY_TARGET",
    "NODE_ATTR_DISABLE_RELAY_CLIENT",
    "NODE_ATTR_ONLY_TCP_443",
    "NODE_ATTR_DISABLE_RELAY_SERVER",
    "relay_roles",
    "cap_granted",
    "node_has_cap",
    "RelayReady",
    "RelayManager",
]

CAP_RELAY = "tailscale.com/cap/relay"
CAP_RELAY_TARGET = "tailscale.com/cap/relay-target"
#: Self node attributes (``Node.CapMap``, or the legacy ``Capabilities`` list) that switch relay roles off.
NODE_ATTR_DISABLE_RELAY_CLIENT = "disable-relay-client"
NODE_ATTR_ONLY_TCP_443 = "only-tcp-443"
NODE_ATTR_DISABLE_RELAY_SERVER = "disable-relay-server"


def relay_roles(node_attrs: Iterable[str]) -> tuple[bool, bool]:
    """``(client_enabled, server_enabled)`` for a self node with these attributes.

    As tailscaled: ``disable-relay-client`` or ``only-tcp-443`` stop allocating on relay
    servers and make CallMeMaybeVia ignored; ``disable-relay-server`` stops serving.
    """
    attrs = set(node_attrs)
    client = NODE_ATTR_DISABLE_RELAY_CLIENT not in attrs and NODE_ATTR_ONLY_TCP_443 not in attrs
    return client, NODE_ATTR_DISABLE_RELAY_SERVER not in attrs


def _ip_matches(spec: str, ip: IPAddress) -> bool:
    if spec == "*":
        return True
    try:
        if "/" in spec:
            net = ipaddress.ip_network(spec, strict=False)
            return ip.version == net.version and ip in net
        if "-" in spec:
            lo, hi = (ipaddress.ip_address(x) for x in spec.split("-", 1))
            return lo.version == ip.version and lo <= ip <= hi  # type: ignore[operator]
        return ipaddress.ip_address(spec) == ip
    except ValueError:
        return False


def cap_granted(rules: Iterable[Any], cap: str, src: Iterable[IPAddress], dst: Iterable[IPAddress]) -> bool:
    """Whether a packet filter grants ``cap`` from any of ``src`` to any of ``dst`` (values ignored)."""
    srcs, dsts = list(src), list(dst)
    for rule in rules:
        grants = getattr(rule, "cap_grant", None)
        if not grants:
            continue
        if not any(_ip_matches(s, ip) for s in (rule.src_ips or ()) for ip in srcs):
            continue
        for g in grants:
            has = cap in (g.cap_map or {}) or cap in (g.caps or ())
            if has and any(_ip_matches(d, ip) for d in (g.dsts or ()) for ip in dsts):
                return True
    return False


def node_has_cap(rules: Iterable[Any], cap: str, src: Iterable[IPAddress], dst: Iterable[IPAddress]) -> bool:
    """tailscaled's ``nodeHasCap``: whether ``cap`` is granted from one node to another.

    ``src`` and ``dst`` are the nodes' own addresses in netmap order. Only one pair is judged:
    the source's first address that has a destination address of the same family, with the
    first such destination address, so a grant must cover the nodes' primary addresses.
    """
    dsts = list(dst)
    for s in src:
        for d in dsts:
            if s.version == d.version:
                return cap_granted(rules, cap, (s,), (d,))
    return False


@dataclass(frozen=True, slots=True)
class RelayReady:
    """A relay path to ``peer`` was proved by a ping/pong through the relay."""

    peer: NodePublic
    result: RelayPathReady


class RelayManager:
    """Client side of peer relays for one local disco key. Not thread-safe."""

    def __init__(self, boxes: disco.DiscoBoxes, node_key: NodePublic) -> None:
        self.boxes = boxes
        self.node_key = node_key
        #: candidate relay nodes (node key -> disco key), computed from the packet filter
        self.servers: dict[NodePublic, DiscoPublic] = {}
        self._allocs: dict[tuple[NodePublic, NodePublic], RelayAllocation] = {}
        self._handshakes: dict[int, list[tuple[NodePublic, RelayBindHandshake]]] = {}
        self._dedupe = EndpointDeduper()
        self._generation = 0
        self.expected_servers: list[DiscoPublic] = []  # servers whose challenges we now accept
        self.finished_servers: list[DiscoPublic] = []
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _next_gen(self) -> int:
        self._generation = (self._generation % 0xFFFFFFFF) + 1
        return self._generation

    def set_servers(self, servers: Mapping[NodePublic, DiscoPublic]) -> None:
        self.servers = dict(servers)

    def forget_server_endpoints(self, server_disco: DiscoPublic) -> None:
        """A path through this relay server was dropped: let the same endpoints be handshaken again."""
        self._dedupe.forget_server(server_disco)

    # --- allocation ---------------------------------------------------------------

    def discover(self, peer: NodePublic, peer_disco: DiscoPublic, now: float) -> list[tuple[NodePublic, disco.Message]]:
        """Allocate on every candidate server for ``peer``: returns requests to send over DERP."""
        out: list[tuple[NodePublic, disco.Message]] = []
        for server in self.servers:
            if server == peer:
                continue
            key = (server, peer)
            cur = self._allocs.get(key)
            if cur is not None and cur.get_timer() is not None:
                continue  # one outstanding allocation per server and peer
            alloc = RelayAllocation(server, self.boxes.public_key, peer_disco, self._next_gen())
            req = alloc.start(now)
            self._allocs[key] = alloc
            if req is not None:
                self._count("allocate_sent")
                out.append((server, req))
        return out

    def handle_allocate_response(
        self, server: NodePublic, msg: disco.AllocateUDPRelayEndpointResponse, now: float
    ) -> tuple[list[tuple[NodePublic, disco.Message]], list[tuple[bytes, AddrPort]]]:
        """An allocation answer over DERP: CallMeMaybeVia for the peer plus our own bind handshake."""
        for (srv, peer), alloc in list(self._allocs.items()):
            if srv != server:
                continue
            ep = alloc.handle_response(server, msg)
            if ep is None:
                continue
            del self._allocs[(srv, peer)]
            self._count("allocate_ok")
            via = disco.CallMeMaybeVia(ep)
            return [(peer, via)], self._start_handshake(peer, alloc.peer_disco, ep, now)
        self._count("allocate_response_unmatched")
        return [], []

    def handle_call_me_maybe_via(
        self, peer: NodePublic, peer_disco: DiscoPublic, msg: disco.CallMeMaybeVia, now: float
    ) -> list[tuple[bytes, AddrPort]]:
        return self._start_handshake(peer, peer_disco, msg.endpoint, now)

    def _start_handshake(
        self, peer: NodePublic, peer_disco: DiscoPublic, ep: disco.UDPRelayEndpoint, now: float
    ) -> list[tuple[bytes, AddrPort]]:
        # The endpoint must join exactly us and this peer (tailscaled binds with RemoteKey = the peer's
        # netmap disco key, so a relay server refuses anything else). Without this check a peer could hand
        # us an endpoint pairing us with a third node, and the path proved with that node would carry
        # this peer's WireGuard.
        if sorted_pair(*ep.client_disco) != sorted_pair(self.boxes.public_key, peer_disco):
            self._count("endpoint_not_for_us")
            return []
        if not self._dedupe.accept(peer_disco, ep):
            self._count("endpoint_duplicate")
            return []
        try:
            hs = RelayBindHandshake(self.boxes, ep, self._next_gen(), self.node_key)
        except ValueError:
            self._count("endpoint_not_for_us")
            return []
        lst = self._handshakes.setdefault(ep.vni, [])
        for _p, h in lst:
            if h.endpoint.server_disco == ep.server_disco:
                self.finished_servers.append(h.endpoint.server_disco)  # superseded: its challenges end too
        lst[:] = [(p, h) for p, h in lst if h.endpoint.server_disco != ep.server_disco]
        lst.append((peer, hs))
        self.expected_servers.append(ep.server_disco)
        self._count("handshake_started")
        return [(d.data, d.to) for d in hs.start(now)]

    # --- relay datagrams --------------------------------------------------------------

    def active_handshake(self, vni: int, sender: DiscoPublic, control: bool) -> tuple[NodePublic, RelayBindHandshake] | None:
        """The handshake a Geneve disco message with ``vni`` from ``sender`` belongs to, if one is running."""
        for peer, hs in self._handshakes.get(vni, ()):
            if hs.state not in (HandshakeState.BIND_SENT, HandshakeState.ANSWER_SENT):
                continue
            if (control and sender == hs.endpoint.server_disco) or (not control and sender == hs.peer_disco):
                return peer, hs
        return None

    def handle_disco(
        self, vni: int, sender: DiscoPublic, msg: disco.Message, src: AddrPort, control: bool, now: float
    ) -> tuple[list[tuple[bytes, AddrPort]], list[RelayReady]] | None:
        """Feed a Geneve-wrapped disco message. None if no handshake wants it (a pong counts as wanted
        only if it answers one of the handshake's own pings)."""
        found = self.active_handshake(vni, sender, control)
        if found is None:
            return None
        peer, hs = found
        if isinstance(msg, disco.Pong) and not hs.wants_pong(msg.tx_id):
            return None  # e.g. a heartbeat through an installed relay path: the peer's endpoint takes it
        out = [(d.data, d.to) for d in hs.receive_disco(sender, msg, src, control, now)]
        return out, self._collect(peer, hs)

    def _collect(self, peer: NodePublic, hs: RelayBindHandshake) -> list[RelayReady]:
        res = hs.result
        if res is None:
            return []
        self._handshakes[hs.vni] = [(p, h) for p, h in self._handshakes.get(hs.vni, []) if h is not hs]
        if not self._handshakes[hs.vni]:
            del self._handshakes[hs.vni]
        self.finished_servers.append(hs.endpoint.server_disco)
        if isinstance(res, RelayHandshakeFailed):
            self._count("handshake_failed")
            return []
        self._count("handshake_ok")
        return [RelayReady(peer, res)]

    # --- timers ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times = [t for a in self._allocs.values() if (t := a.get_timer()) is not None]
        times += [t for lst in self._handshakes.values() for _, h in lst if (t := h.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[tuple[NodePublic, disco.Message]]:
        """Expire handshakes and allocations; returns allocation retries to send over DERP."""
        out: list[tuple[NodePublic, disco.Message]] = []
        for key, alloc in list(self._allocs.items()):
            req = alloc.handle_timer(now)
            if req is not None:
                out.append((alloc.server_node, req))
            elif alloc.get_timer() is None:
                del self._allocs[key]
        for lst in list(self._handshakes.values()):
            for peer, hs in list(lst):
                hs.handle_timer(now)
                self._collect(peer, hs)
        return out
