"""Receive-side disco acceptance (sans-IO), as tailscaled 1.96.4 ``handleDiscoMessage`` applies it.

:class:`DiscoReceiver` opens a disco packet that arrived naked over UDP, inside
Geneve (relay path), or over DERP, and either returns a :class:`ReceivedDisco`
for the caller to route (pings/pongs to the peer's endpoint, CallMeMaybe to
``handle_call_me_maybe``, relay messages to the relay manager / relay server)
or drops it and counts why. Rules:

* Geneve control packets must be a ``BindUDPRelayEndpointChallenge`` from a relay
  server disco key we are handshaking with (:meth:`DiscoReceiver.expect_relay_server`).
* Everything else must come from a netmap peer's disco key.
* Ping/Pong: any path. A ping over DERP must come from a DERP source that is a
  known peer with the box sender's disco key (its pong goes to that node).
* CallMeMaybe, CallMeMaybeVia, Allocate request/response: DERP only; the DERP
  source node key must be a known peer whose disco key equals the box sender.
  CallMeMaybeVia also needs the relay client enabled and the peer's capability
  version >= 121. An allocate request needs the sender to be one of its two
  ClientDisco keys (grant and server checks are the relay server's job).
* Bind/Answer outside a relay server, unknown types, bad boxes: dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tsnet.key import DiscoPublic, NodePublic
from tsnet.magicsock import disco
from tsnet.magicsock.endpoint import DerpPath, UDPPath

__all__ = ["RELAY_CAPABLE_CAP_VERSION", "DiscoPeer", "ReceivedDisco", "DiscoReceiver"]

#: tailscaled's ``capVerIsRelayCapable`` threshold.
RELAY_CAPABLE_CAP_VERSION = 121


@dataclass(frozen=True, slots=True)
class DiscoPeer:
    node_key: NodePublic
    disco_key: DiscoPublic
    cap: int = 0


@dataclass(frozen=True, slots=True)
class ReceivedDisco:
    """An accepted disco message. ``nodes`` are the peers it may belong to: exactly the
    DERP source for DERP-only messages, every peer sharing the disco key for UDP."""

    sender: DiscoPublic
    message: disco.Message
    path: UDPPath | DerpPath
    nodes: tuple[NodePublic, ...]
    relay_handshake: bool = False


_DERP_ONLY = (
    disco.CallMeMaybe,
    disco.CallMeMaybeVia,
    disco.AllocateUDPRelayEndpointRequest,
    disco.AllocateUDPRelayEndpointResponse,
)


class DiscoReceiver:
    """Opens and vets incoming disco packets for one local disco key."""

    def __init__(self, boxes: disco.DiscoBoxes, *, relay_client_enabled: bool = True) -> None:
        self.boxes = boxes
        self.relay_client_enabled = relay_client_enabled
        self._peers: dict[NodePublic, DiscoPeer] = {}
        self._by_disco: dict[DiscoPublic, tuple[NodePublic, ...]] = {}
        self._relay_servers: dict[DiscoPublic, int] = {}
        self.received: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    # --- peer table ---------------------------------------------------------

    def set_peers(self, peers: Iterable[DiscoPeer]) -> None:
        """Replace the netmap peer table. Peers with a zero disco key are ignored (pre-disco)."""
        self._peers = {p.node_key: p for p in peers if not p.disco_key.is_zero()}
        by_disco: dict[DiscoPublic, list[NodePublic]] = {}
        for p in self._peers.values():
            by_disco.setdefault(p.disco_key, []).append(p.node_key)
        self._by_disco = {k: tuple(v) for k, v in by_disco.items()}
        self.boxes.retain([*self._by_disco, *self._relay_servers])  # departed peers' boxes

    def expect_relay_server(self, server_disco: DiscoPublic) -> None:
        """A bind handshake with this relay server started: accept its challenges."""
        self._relay_servers[server_disco] = self._relay_servers.get(server_disco, 0) + 1

    def forget_relay_server(self, server_disco: DiscoPublic) -> None:
        """One handshake with this server ended."""
        n = self._relay_servers.get(server_disco, 0) - 1
        if n <= 0:
            self._relay_servers.pop(server_disco, None)
        else:
            self._relay_servers[server_disco] = n

    # --- receive --------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def receive(
        self,
        packet: bytes | memoryview,
        path: UDPPath | DerpPath,
        *,
        derp_src: NodePublic | None = None,
        geneve_control: bool = False,
    ) -> ReceivedDisco | None:
        """Vet one disco packet (the bytes after any Geneve header). None means dropped."""
        try:
            sender = disco.sender_key(packet)
        except disco.DiscoError:
            self._drop("not_disco")
            return None
        if geneve_control:
            if not isinstance(path, UDPPath) or path.vni is None or sender not in self._relay_servers:
                self._drop("unexpected_relay_handshake")
                return None
            nodes: tuple[NodePublic, ...] = ()
        else:
            nodes = self._by_disco.get(sender, ())
            if not nodes:
                self._drop("unknown_sender")
                return None
        try:
            _, msg = self.boxes.open_message(packet)
        except disco.DiscoOpenError:
            self._drop("bad_box")
            return None
        except disco.DiscoError:
            self._drop("parse_error")
            return None
        if geneve_control:
            if not isinstance(msg, disco.BindUDPRelayEndpointChallenge):
                self._drop("relay_handshake_not_challenge")
                return None
            return self._accept(ReceivedDisco(sender, msg, path, (), relay_handshake=True))
        if isinstance(msg, disco.Ping) and isinstance(path, DerpPath):
            # tailscaled answers a DERP ping only to a DERP source in its peer map, over DERP to that
            # node. Anyone can send us DERP frames (a replayed capture, a node outside our netmap):
            # the pong goes to the node DERP vouches for, whose disco key must be the box's sender.
            peer = self._derp_peer(derp_src, sender)
            if peer is None:
                return None
            return self._accept(ReceivedDisco(sender, msg, path, (peer.node_key,)))
        if isinstance(msg, (disco.Ping, disco.Pong)):
            return self._accept(ReceivedDisco(sender, msg, path, nodes))
        if isinstance(msg, _DERP_ONLY):
            if not isinstance(path, DerpPath) or derp_src is None:
                self._drop("derp_only_message_not_via_derp")
                return None
            peer = self._derp_peer(derp_src, sender)
            if peer is None:
                return None
            if isinstance(msg, disco.CallMeMaybeVia):
                if not self.relay_client_enabled:
                    self._drop("relay_client_disabled")
                    return None
                if peer.cap < RELAY_CAPABLE_CAP_VERSION:
                    self._drop("peer_not_relay_capable")
                    return None
            if isinstance(msg, disco.AllocateUDPRelayEndpointRequest) and sender not in msg.client_disco:
                self._drop("allocate_sender_not_client")
                return None
            return self._accept(ReceivedDisco(sender, msg, path, (derp_src,)))
        # Bind/Answer (only a relay server takes them), version-ignored messages.
        self._drop("unexpected_message")
        return None

    def _derp_peer(self, derp_src: NodePublic | None, sender: DiscoPublic) -> DiscoPeer | None:
        """The peer DERP says sent this, if it is in our netmap and owns the box's disco key."""
        peer = self._peers.get(derp_src) if derp_src is not None else None
        if peer is None:
            self._drop("derp_source_not_a_peer")
            return None
        if peer.disco_key != sender:
            self._drop("derp_source_disco_mismatch")
            return None
        return peer

    def _accept(self, r: ReceivedDisco) -> ReceivedDisco:
        name = type(r.message).__name__
        self.received[name] = self.received.get(name, 0) + 1
        return r
