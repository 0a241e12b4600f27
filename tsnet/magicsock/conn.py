"""magicsock: one UDP socket per family, WireGuard over the best path per peer (sans-IO core).

:class:`MagicSock` ties the pieces together the way tailscaled's magicsock does:

* every datagram from the UDP socket is classified (:mod:`.demux`) and goes to
  netcheck (STUN), the disco receiver (naked or Geneve disco) or WireGuard
  (naked or Geneve-wrapped);
* packets arriving over DERP are disco (addressed to our node key) or raw
  WireGuard from the DERP source node;
* the WireGuard core runs with roaming off; each peer's WireGuard endpoint is
  just its node key, and every outgoing WireGuard datagram asks that peer's
  :class:`~.endpoint.PeerEndpoint` where to go: a trusted UDP path (direct
  beats peer relay) alone, otherwise the untrusted UDP path plus DERP, or DERP
  alone (so traffic flows over DERP at once and moves to direct when a pong
  confirms it);
* disco actions are carried out: pings/pongs on the path they name,
  CallMeMaybe over DERP with our current endpoints (re-STUNning first when
  they are older than 27 s), which makes the peer ping us back through our
  fresh NAT mapping (hole punching);
* incoming WireGuard needs no address → peer table: the WireGuard core finds
  the session by receiver index (data) or by the initiator's static key
  (handshakes), so datagrams from unknown sources (a NAT's new mapping, a
  relay) are routed cryptographically. Sources proven by disco or by
  decryption are remembered for status only;
* first contact without a 5 s stall: a handshake initiation WireGuard produces
  while a peer has no path at all is held (the newest one) and sent as soon as
  a path appears (home DERP region from the netmap, the peer reaching us over
  DERP, a confirmed UDP path); an initiation arriving over DERP from a node our
  netmap does not list yet is kept (bounded) and answered when the netmap adds
  it; and a disco message from a peer whose handshake is still unanswered
  (after 1 s) re-sends it at once instead of after REKEY_TIMEOUT;
* user-requested disco pings (:meth:`MagicSock.ping`, like ``tailscale ping``)
  report the first pong's path and latency as :class:`DiscoPingResult`;
* endpoint discovery: local interface addresses with the bound port plus
  STUN against the DERP map's STUN servers (periodically, 20-26 s), reported
  as :class:`EndpointsChanged`; netcheck picks the home DERP region
  (:class:`HomeDerpChanged`).

The core never does I/O and never reads a clock: callers pass ``now``
(seconds, monotonic) and collect :meth:`MagicSock.take_udp`,
:meth:`MagicSock.take_derp`, :meth:`MagicSock.take_packets` and
:meth:`MagicSock.take_events`. :class:`tsnet.magicsock.driver.MagicSockDriver`
is the trio driver.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tsnet.key import DiscoPrivate, DiscoPublic, NodePrivate, NodePublic
from tsnet.magicsock import disco
from tsnet.magicsock.addrport import AddrPort, IPAddress
from tsnet.magicsock.demux import PacketKind, classify
from tsnet.magicsock.discorecv import RELAY_CAPABLE_CAP_VERSION, DiscoPeer, DiscoReceiver
from tsnet.magicsock.endpoint import (
    Action,
    BestPathChanged,
    CliPongReceived,
    DerpPath,
    PeerEndpoint,
    SendCallMeMaybe,
    SendPing,
    SendPong,
    StartRelayDiscovery,
    UDPPath,
)
from tsnet.magicsock.netcheck import NetcheckReport, StunProber, stun_targets
from tsnet.magicsock.relaymanager import (
    CAP_RELAY,
    CAP_RELAY_TARGET,
    RelayManager,
    RelayReady,
    node_has_cap,
    relay_roles,
)
from tsnet.magicsock.tsmp import IPPROTO_TSMP
from tsnet.relay.geneve import PROTOCOL_DISCO, PROTOCOL_WIREGUARD, encode_header
from tsnet.relay.server import RelayError, RelayServer
from tsnet.wg.device import WireGuard

__all__ = [
    "ENDPOINTS_FRESH_ENOUGH",
    "EndpointType",
    "Endpoint",
    "PeerConfig",
    "PathStatus",
    "EndpointsChanged",
    "HomeDerpChanged",
    "PathChanged",
    "DiscoPingResult",
    "MagicSockEvent",
    "MagicSock",
    "peers_from_netmap",
]

log = logging.getLogger("tsnet.magicsock")

#: Our STUN endpoints must be this fresh before a CallMeMaybe goes out.
ENDPOINTS_FRESH_ENOUGH = 27.0
RESTUN_MIN, RESTUN_MAX = 20.0, 26.0
#: A CallMeMaybe waits at most this long for a re-STUN before going out anyway.
CMM_MAX_WAIT = 3.0
#: A handshake initiation held for a peer without a path (or received over DERP from a
#: node not in our netmap yet) is worth sending/replaying only this long: WireGuard
#: sends a fresh one after REKEY_TIMEOUT (5 s) anyway.
HELD_INITIATION_MAX_AGE = 5.0
#: Initiations from unknown DERP senders kept for replay (the newest per sender).
UNKNOWN_INITIATIONS_MAX = 16
#: Bound of the (source, VNI) -> UDPPath cache of received peer-relay traffic (cleared when full).
_RELAY_PATH_CACHE_MAX = 1024
#: Bound of a peer's remembered UDP sources (status only): replayed pings from spoofed addresses must not grow it.
_PEER_SOURCES_MAX = 32
#: Bound of the (region, sender) -> _DerpSource cache of received DERP WireGuard (cleared when full).
_DERP_SOURCE_CACHE_MAX = 1024
#: Bound of the inner-source -> peer cache for sources that only a prefix route covers (cleared when full).
_SRC_PREFIX_CACHE_MAX = 4096
#: disco.looks_like_disco, inlined on the DERP receive path (0x54: the magic's first byte, never a
#: WireGuard message type, so WireGuard datagrams are told apart by one byte).
_DISCO_MAGIC = disco.MAGIC
_DISCO_MAGIC_LEN = len(disco.MAGIC)
_DISCO_HEADER_LEN = disco.HEADER_LEN
#: A disco message from a peer re-sends our unanswered initiation at once, if it went
#: out at least this long ago (which also limits the re-sends to one per second).
HANDSHAKE_RETRY_AFTER = 1.0
#: User-requested pings whose answers are still awaited (the oldest are forgotten beyond).
MAX_CLI_PINGS = 256
_INITIATION_SIZE = 148

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EndpointType(enum.IntEnum):
    """tailcfg.EndpointType values (what ``MapRequest.EndpointTypes`` carries)."""

    UNKNOWN = 0
    LOCAL = 1
    STUN = 2
    PORTMAPPED = 3
    STUN4_LOCAL_PORT = 4
    EXPLICIT_CONF = 5


@dataclass(frozen=True, slots=True)
class Endpoint:
    addr: AddrPort
    type: EndpointType

    def __str__(self) -> str:
        return str(self.addr)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """What magicsock needs to know about one peer (from the netmap)."""

    node_key: NodePublic
    disco_key: DiscoPublic | None
    endpoints: tuple[AddrPort, ...] = ()
    home_derp: int = 0
    cap: int = 0
    allowed_ips: tuple[IPNetwork, ...] = ()
    name: str = ""
    #: control's view of the node's connection (None: not said); a relay server going offline drops its paths
    online: bool | None = None
    #: the node's own tailnet addresses in netmap order, for relay grant checks (empty: its single-IP AllowedIPs)
    addresses: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class PathStatus:
    """One peer's current path, as ``tailscale status`` would show it.

    ``kind`` is ``direct``, ``peer-relay``, ``derp`` or ``none``; ``addr`` is
    ``ip:port`` (direct), ``ip:port:vni:N`` (relay) or None; ``derp_region``
    the region DERP traffic would use.
    """

    node_key: NodePublic
    name: str
    kind: str
    addr: str | None
    derp_region: int | None
    latency: float | None
    last_change: float | None
    trusted: bool
    handshake: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_key": str(self.node_key),
            "name": self.name,
            "kind": self.kind,
            "addr": self.addr,
            "derp_region": self.derp_region,
            "latency": self.latency,
            "last_change": self.last_change,
            "trusted": self.trusted,
            "handshake": self.handshake,
        }


@dataclass(frozen=True, slots=True)
class EndpointsChanged:
    """Our endpoint list changed: report it to control (lite map update)."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class HomeDerpChanged:
    """Netcheck picked a (new) home DERP region; ``report`` is the netcheck that did."""

    region: int
    report: NetcheckReport | None


@dataclass(frozen=True, slots=True)
class PathChanged:
    """A peer's best UDP path changed (None: back to DERP only)."""

    peer: NodePublic
    old: str | None
    new: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class DiscoPingResult:
    """The first pong to a user-requested disco ping (:meth:`MagicSock.ping`).

    ``kind`` is ``direct``, ``peer-relay`` or ``derp``: the path the answered ping
    took; ``addr`` is ``ip:port`` (direct) or ``ip:port:vni:N`` (relay), None for
    DERP; ``derp_region`` is set for DERP only. ``latency`` is the round trip in
    seconds; ``pong_src`` our address as the peer saw it.
    """

    request: int
    peer: NodePublic
    kind: str
    addr: str | None
    derp_region: int | None
    latency: float
    pong_src: AddrPort

    @property
    def path(self) -> str:
        """``direct 127.0.0.1:41641``, ``peer-relay 10.0.0.5:7000:vni:3`` or ``derp region 900``."""
        if self.kind == "derp":
            return f"derp region {self.derp_region}"
        return f"{self.kind} {self.addr}"


MagicSockEvent = EndpointsChanged | HomeDerpChanged | PathChanged | DiscoPingResult


@dataclass(frozen=True, slots=True)
class _DerpSource:
    """WireGuard's view of a datagram that came over DERP (used only for cookie replies)."""

    region: int
    node: NodePublic


@dataclass(slots=True)
class _Peer:
    config: PeerConfig
    ep: PeerEndpoint
    last_change: float | None = None
    #: UDP sources seen for this peer (proved by disco or by WireGuard decryption)
    sources: set[UDPPath] = field(default_factory=set)
    #: our latest handshake initiation to it, produced while it had no path (sent when one appears)
    held_initiation: bytes | None = None
    held_at: float = 0.0


def _sockaddr_family(addr: AddrPort) -> int:
    return 6 if addr.is_v6 else 4


def peers_from_netmap(netmap: Any) -> list[PeerConfig]:
    """PeerConfigs for every peer of a :class:`tsnet.control.netmap.NetworkMap`."""
    out = []
    for p in netmap.peers:
        eps = []
        for ip, port in p.endpoints:
            try:
                eps.append(AddrPort.of(ip, port))
            except ValueError:
                continue
        allowed = p.allowed_ips or tuple(ipaddress.ip_network(a, strict=False) for a in p.addresses)
        out.append(PeerConfig(p.key, p.disco_key, tuple(eps), p.home_derp, p.cap, tuple(allowed), p.name,
                              getattr(p, "online", None), tuple(a.ip for a in p.addresses)))
    return out


class MagicSock:
    """The magicsock core (sans-IO). See the module docstring.

    Args:
        node_private: our WireGuard (node) key.
        disco_private: our disco key (fresh per process, like tailscaled's).
        now: the caller's monotonic clock.
        drop_direct_udp: test hook: silently drop direct (non-relay, non-STUN)
            UDP both ways, as if a firewall blocked the peers' direct path.
        rng: randomness for re-STUN jitter (tests inject a seeded one).
    """

    def __init__(
        self,
        node_private: NodePrivate,
        disco_private: DiscoPrivate,
        *,
        now: float,
        drop_direct_udp: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.node_private = node_private
        self.node_key = node_private.public
        self.wg = WireGuard(node_private, now=now, roaming=False, packet_events=False)
        self.boxes = disco.DiscoBoxes(disco_private)
        self.disco_key = self.boxes.public_key
        self.disco = DiscoReceiver(self.boxes, relay_client_enabled=True)
        self.relay = RelayManager(self.boxes, self.node_key)
        #: a peer relay server this node runs (allocations over DERP are answered with it)
        self.relay_server: RelayServer | None = None
        #: False when our node has the ``disable-relay-server`` attribute: allocation requests are refused
        self.relay_server_enabled = True
        self.packet_filter: tuple[Any, ...] = ()
        self.self_ips: tuple[IPAddress, ...] = ()
        self.drop_direct_udp = drop_direct_udp
        self._rng = rng or random.Random()
        self.peers: dict[NodePublic, _Peer] = {}
        self._routes: dict[IPAddress, NodePublic] = {}
        self._prefix_routes: list[tuple[IPNetwork, NodePublic]] = []
        # The same table for checking inner source addresses on receive: exact routes keyed by the
        # packed address (as it sits in a packet), and prefix lookups remembered per address (bounded).
        self._src_routes: dict[bytes, NodePublic] = {}
        self._src_prefix_cache: dict[bytes, NodePublic | None] = {}
        self._udp_out: list[tuple[bytes | bytearray, AddrPort]] = []
        self._derp_out: list[tuple[int, NodePublic, bytes | bytearray]] = []
        self._events: list[MagicSockEvent] = []
        self._received: list[tuple[NodePublic, bytes]] = []
        #: (source, VNI) -> UDPPath for received peer-relay WireGuard (one object per relay path, not per packet)
        self._relay_paths: dict[tuple[AddrPort, int], UDPPath] = {}
        #: (region, sender) -> _DerpSource for received DERP WireGuard (one object per sender, not per packet)
        self._derp_sources: dict[tuple[int, NodePublic], _DerpSource] = {}
        self.derp_map: Any = None
        self.home_derp = 0
        self.local_addresses: tuple[IPAddress, ...] = ()
        self.ports: dict[int, int] = {}
        self.configured_port = 0
        self.endpoints: tuple[Endpoint, ...] = ()
        self.endpoints_at: float | None = None
        self.last_report: NetcheckReport | None = None
        self._stun_mapped: tuple[AddrPort, ...] = ()
        self._prober: StunProber | None = None
        self._next_stun: float | None = None
        self._pending_cmm: dict[tuple[NodePublic, int], float] = {}
        #: sender -> (region, initiation, when): handshakes from nodes not in our netmap yet
        self._unknown_initiations: dict[NodePublic, tuple[int, bytes, float]] = {}
        #: user-requested pings: request -> its TxIDs, and TxID -> request
        self._cli_requests: dict[int, list[bytes]] = {}
        self._cli_txs: dict[bytes, int] = {}
        self._cli_seq = 0
        self.counters: dict[str, int] = {}

    # --- counters -------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- configuration --------------------------------------------------------

    def set_sockets(self, ports: dict[int, int], local_addresses: Iterable[IPAddress], now: float,
                    configured_port: int = 0) -> None:
        """The driver bound its sockets: ``ports`` maps family (4/6) to port; interface addresses to advertise."""
        self.ports = dict(ports)
        self.configured_port = configured_port
        self.local_addresses = tuple(local_addresses)
        self._update_endpoints(now)

    def set_derp_map(self, derp_map: Any, now: float) -> None:
        """A (new) DERP map: pick a provisional home region and run netcheck."""
        self.derp_map = derp_map
        regions = sorted(int(r) for r in (getattr(derp_map, "regions", None) or {}))
        if regions and self.home_derp not in regions:
            self._set_home(regions[0], None)
        self.restun(now)

    def set_peers(self, peers: Iterable[PeerConfig], now: float) -> None:
        """Reconfigure the peer set (add, update, remove). A changed disco key resets that peer's paths."""
        new = {p.node_key: p for p in peers if p.node_key != self.node_key}
        old_servers = dict(self.relay.servers)
        came_online = {k for k, st in self.peers.items() if st.config.online is False and k in new
                       and new[k].online is not False}
        # Nodes that left or went offline: their IPs end relay paths through a server there (a relay advertises
        # its node's endpoint IPs). Any peer, not only our own candidates: the far end may have picked the relay.
        gone_relay_ips = set()
        for key, old_st in self.peers.items():
            if key not in new or (new[key].online is False and old_st.config.online is not False):
                gone_relay_ips.update(ep.ip for ep in old_st.config.endpoints)
        for key in [k for k in self.peers if k not in new]:
            del self.peers[key]
            self.wg.remove_peer(key)
            log.info("magicsock: peer %s removed", key.short())
        added: list[_Peer] = []
        for key, cfg in new.items():
            st = self.peers.get(key)
            if st is None:
                ep = PeerEndpoint(key, cfg.disco_key, my_node_key=self.node_key, home_derp=cfg.home_derp,
                                  relay_capable=cfg.cap >= RELAY_CAPABLE_CAP_VERSION)
                st = self.peers[key] = _Peer(cfg, ep)
                self.wg.add_peer(key, endpoint=key)
                actions = ep.update_from_netmap(cfg.endpoints, now)
                added.append(st)
            else:
                st.config = cfg
                actions = st.ep.update_from_netmap(cfg.endpoints, now, disco_key=cfg.disco_key,
                                                   home_derp=cfg.home_derp,
                                                   relay_capable=cfg.cap >= RELAY_CAPABLE_CAP_VERSION)
            self._do(st, actions, now)
            if st.held_initiation is not None:
                self._release_held(st, now)  # e.g. control just told us its home DERP region
        self.disco.set_peers(DiscoPeer(p.node_key, p.disco_key, p.cap) for p in new.values() if p.disco_key)
        routes: dict[IPAddress, NodePublic] = {}
        prefixes: list[tuple[IPNetwork, NodePublic]] = []
        for key, cfg in new.items():
            for net in cfg.allowed_ips:
                if net.prefixlen == net.max_prefixlen:
                    routes[net.network_address] = key
                else:
                    prefixes.append((net, key))
        prefixes.sort(key=lambda x: -x[0].prefixlen)  # longest prefix first
        self._routes, self._prefix_routes = routes, prefixes
        self._src_routes = {ip.packed: key for ip, key in routes.items()}
        self._src_prefix_cache = {}
        self._update_relay_servers()
        # A known relay server restarted (new disco key) or came back online: rediscover without the 30 s wait.
        if any(k in old_servers and (old_servers[k] != d or k in came_online) for k, d in self.relay.servers.items()):
            for st in self.peers.values():
                st.ep.relay_servers_changed()
        if gone_relay_ips:
            for st in self.peers.values():
                best = st.ep.best
                actions = st.ep.relay_server_gone(gone_relay_ips, now)
                if actions and best is not None and best.relay_server_disco is not None:
                    self.relay.forget_server_endpoints(best.relay_server_disco)
                self._do(st, actions, now)
        if self._unknown_initiations:
            for st in added:
                self._replay_unknown_initiation(st, now)

    def _replay_unknown_initiation(self, st: _Peer, now: float) -> None:
        """A new peer's handshake reached us over DERP before control told us about it: answer it now.

        Two nodes coming up together each learn of the other at a different moment;
        without this the initiator would wait REKEY_TIMEOUT (5 s) for its retry. The
        WireGuard core authenticates the replayed initiation as if it had just arrived.
        """
        key = st.config.node_key
        held = self._unknown_initiations.pop(key, None)
        if held is None:
            return
        region, data, at = held
        if now - at > HELD_INITIATION_MAX_AGE:
            self._count("wg_initiation_replay_expired")
            return
        self._count("wg_initiation_replayed")
        if not st.ep.last_derp_region_heard:
            st.ep.last_derp_region_heard = region
        self.wg.receive_datagram(data, _DerpSource(region, key), now)
        self._after_wg_receive(now)

    @staticmethod
    def _host_ips(cfg: PeerConfig) -> list[IPAddress]:
        # The node's own addresses, as tailscaled judges grants: a subnet router's single-host
        # routes are not the router.
        if cfg.addresses:
            return list(cfg.addresses)
        return [n.network_address for n in cfg.allowed_ips if n.prefixlen == n.max_prefixlen]

    def _update_relay_servers(self) -> None:
        """Relay candidates: relay-capable peers our packet filter grants ``cap/relay-target`` from."""
        servers = {}
        if self.self_ips and self.disco.relay_client_enabled:  # no candidates under disable-relay-client
            for key, st in self.peers.items():
                cfg = st.config
                if cfg.cap >= RELAY_CAPABLE_CAP_VERSION and cfg.disco_key is not None and node_has_cap(
                        self.packet_filter, CAP_RELAY_TARGET, self._host_ips(cfg), self.self_ips):
                    servers[key] = cfg.disco_key
        if servers.keys() != self.relay.servers.keys():
            log.info("magicsock: peer relay candidates: %s",
                     " ".join(self.peers[k].config.name or k.short() for k in servers) or "none")
        self.relay.set_servers(servers)
        for key, st in self.peers.items():
            st.ep.relay_servers_available = any(k != key for k in servers)

    def set_netmap(self, netmap: Any, now: float) -> None:
        """Apply a control :class:`~tsnet.control.netmap.NetworkMap`: DERP map (when changed), peers, packet
        filter (relay grants) and our node attributes (``disable-relay-client``/``only-tcp-443``: no relay
        client; ``disable-relay-server``: allocation requests refused and open relay sessions closed)."""
        if netmap.derp_map is not None and netmap.derp_map != self.derp_map:
            self.set_derp_map(netmap.derp_map, now)
        self.packet_filter = tuple(netmap.packet_filter or ())
        self.self_ips = tuple(a.ip for a in netmap.addresses)
        attrs = [*(getattr(netmap, "cap_map", None) or ()),
                 *(getattr(getattr(netmap, "self_node", None), "capabilities", None) or ())]
        was_serving = self.relay_server_enabled
        self.disco.relay_client_enabled, self.relay_server_enabled = relay_roles(attrs)
        if was_serving and not self.relay_server_enabled and self.relay_server is not None:
            self.relay_server.close_all()  # tailscaled stops its relay server: its sessions end too
        self.set_peers(peers_from_netmap(netmap), now)

    # --- sending --------------------------------------------------------------

    def peer_for_ip(self, dst: IPAddress) -> NodePublic | None:
        """The peer whose AllowedIPs hold ``dst`` (exact host routes first, then longest prefix)."""
        key = self._routes.get(dst)
        if key is not None:
            return key
        for net, key in self._prefix_routes:
            if dst.version == net.version and dst in net:
                return key
        return None

    def send_ip_packet(self, packet: bytes | bytearray | memoryview, now: float) -> bool:
        """Route an IP packet to the peer owning its destination. False (and counted) when none does."""
        try:
            ver = packet[0] >> 4
            if ver == 4:
                dst: IPAddress = ipaddress.IPv4Address(bytes(packet[16:20]))
            elif ver == 6:
                dst = ipaddress.IPv6Address(bytes(packet[24:40]))
            else:
                raise ValueError
        except (IndexError, ValueError):
            self._count("send_bad_packet")
            return False
        key = self.peer_for_ip(dst)
        if key is None:
            self._count("send_no_route")
            return False
        self.send_packet(key, packet, now)
        return True

    def send_packet(self, peer: NodePublic, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Encrypt ``packet`` to ``peer`` and route the datagrams. Raises KeyError for an unknown peer."""
        self.wg.send_packet(peer, packet, now)
        self._flush_wg(now)

    def send_packets(self, peer: NodePublic, packets: list[bytes | bytearray | memoryview], now: float) -> None:
        self.wg.send_packets(peer, packets, now)
        self._flush_wg(now)

    def _flush_wg(self, now: float) -> None:
        out = self.wg.datagrams_to_send(now)
        if not out:
            return
        last_key: Any = None
        udp_append = self._udp_out.append
        derp_append = self._derp_out.append
        # Per run of datagrams to one peer: its plan, decided once (the plan's discovery
        # work must not repeat per packet of a burst), then a tight append loop.
        direct_to = None  # AddrPort for naked UDP sends
        no_path: _Peer | None = None  # the run's peer when it has no path at all
        relay_to = None  # UDPPath with a VNI
        relay_header = b""  # its Geneve header, encoded once per run
        region = None
        n_direct = n_relay = n_derp = n_hooked = 0
        hooked = False
        for payload, dest in out:
            if dest.__class__ is NodePublic:
                if dest is not last_key:
                    st = self.peers.get(dest)
                    if st is None:
                        self._count("wg_send_unknown_peer")
                        continue
                    plan = st.ep.send_plan(now)
                    last_key = dest
                    if plan.actions:
                        self._do(st, list(plan.actions), now)
                    direct_to = relay_to = no_path = None
                    hooked = False
                    if st.held_initiation is not None and plan.has_route:
                        self._release_held(st, now)  # keep the order: the held initiation first
                    udp = plan.udp
                    if udp is not None:
                        if udp.vni is not None:
                            relay_to = udp
                            relay_header = encode_header(PROTOCOL_WIREGUARD, udp.vni)
                        elif self.drop_direct_udp:
                            hooked = True
                        else:
                            direct_to = udp.addr
                    region = plan.derp_region
                    if not plan.has_route:
                        self._count("wg_send_no_path")
                        no_path = st
                if direct_to is not None:
                    udp_append((payload, direct_to))
                    n_direct += 1
                elif relay_to is not None:
                    udp_append((relay_header + payload, relay_to.addr))
                    n_relay += 1
                elif hooked:
                    n_hooked += 1
                elif no_path is not None and len(payload) == _INITIATION_SIZE and payload[0] == 1:
                    # No path yet: keep the newest initiation and send it when one appears.
                    no_path.held_initiation = bytes(payload)
                    no_path.held_at = now
                    self._count("wg_initiation_held")
                if region is not None:
                    derp_append((region, dest, payload))
                    n_derp += 1
            elif isinstance(dest, AddrPort):  # a cookie reply to a UDP source
                self._send_udp_path(UDPPath(dest), payload, PROTOCOL_WIREGUARD)
            elif isinstance(dest, UDPPath):
                self._send_udp_path(dest, payload, PROTOCOL_WIREGUARD)
            elif isinstance(dest, _DerpSource):
                self._derp_out.append((dest.region, dest.node, payload))
            else:
                self._count("wg_send_bad_dest")
        c = self.counters
        if n_direct:
            c["udp_sent_direct"] = c.get("udp_sent_direct", 0) + n_direct
        if n_relay:
            c["udp_sent_relay"] = c.get("udp_sent_relay", 0) + n_relay
        if n_derp:
            c["wg_sent_derp"] = c.get("wg_sent_derp", 0) + n_derp
        if n_hooked:
            c["udp_dropped_by_hook"] = c.get("udp_dropped_by_hook", 0) + n_hooked

    def _release_held(self, st: _Peer, now: float) -> None:
        """Send the peer's held handshake initiation if it now has a path (drop it when too old)."""
        data = st.held_initiation
        if data is None:
            return
        if now - st.held_at > HELD_INITIATION_MAX_AGE:
            st.held_initiation = None
            self._count("wg_initiation_held_expired")
            return
        plan = st.ep.addr_for_send(now)
        if not plan.has_route:
            return
        st.held_initiation = None
        self._count("wg_initiation_released")
        if plan.udp is not None:
            self._send_udp_path(plan.udp, data, PROTOCOL_WIREGUARD)
        if plan.derp_region is not None:
            self._derp_out.append((plan.derp_region, st.config.node_key, data))
            self._count("wg_sent_derp")

    def _send_udp_path(self, path: UDPPath, payload: bytes | bytearray, protocol: int) -> None:
        if path.vni is not None:
            payload = encode_header(protocol, path.vni) + payload
            self._count("udp_sent_relay")
        elif self.drop_direct_udp:
            self._count("udp_dropped_by_hook")
            return
        else:
            self._count("udp_sent_direct")
        self._udp_out.append((payload, path.addr))

    def _send_disco(self, st: _Peer, path: DerpPath | UDPPath, message: disco.Message) -> None:
        disco_key = st.ep.disco_key
        if disco_key is None:
            self._count("disco_send_no_key")
            return
        try:
            packet = self.boxes.seal(disco_key, message)
        except disco.DiscoError:
            self._count("disco_send_bad_key")
            return
        self._count(f"disco_sent_{type(message).__name__.lower()}")
        if isinstance(path, DerpPath):
            self._derp_out.append((path.region, st.config.node_key, packet))
        else:
            self._send_udp_path(path, packet, PROTOCOL_DISCO)

    # --- actions --------------------------------------------------------------

    def _do(self, st: _Peer, actions: list[Action], now: float) -> None:
        for a in actions:
            cls = a.__class__
            if cls is SendPing:
                self._send_disco(st, a.path, a.ping)  # type: ignore[union-attr]
            elif cls is SendPong:
                self._send_disco(st, a.path, a.pong)  # type: ignore[union-attr]
            elif cls is SendCallMeMaybe:
                self._call_me_maybe(st, a.region, now)  # type: ignore[union-attr]
            elif cls is BestPathChanged:
                self._path_changed(st, a, now)  # type: ignore[arg-type]
            elif cls is StartRelayDiscovery:
                self._start_relay_discovery(st, now)
            elif cls is CliPongReceived:
                self._cli_pong(st, a)  # type: ignore[arg-type]

    # --- user-requested pings ("tailscale ping") ----------------------------------------

    def ping(self, peer: NodePublic, now: float, size: int = 0) -> int:
        """Send a disco ping to ``peer`` on every path WireGuard could use; returns a request id.

        A trusted direct or relay path is pinged alone; otherwise DERP plus every
        candidate address. The first pong comes back as a :class:`DiscoPingResult`
        event (from :meth:`take_events`) with that request id; later pongs to the
        same request only feed path discovery. Pings that stay unanswered just
        expire: the caller times out and calls :meth:`cancel_ping`. Raises KeyError
        for an unknown peer and ValueError when the peer has no disco key or no
        path at all (no DERP region known yet).
        """
        st = self.peers[peer]
        if st.ep.disco_key is None:
            raise ValueError(f"peer {peer.short()} has no disco key")
        actions = st.ep.cli_ping(now, size)
        txs = [a.ping.tx_id for a in actions if isinstance(a, SendPing)]
        if not txs:
            raise ValueError(f"no path to peer {peer.short()} yet")
        self._cli_seq += 1
        request = self._cli_seq
        self._cli_requests[request] = txs
        for tx in txs:
            self._cli_txs[tx] = request
        while len(self._cli_requests) > MAX_CLI_PINGS:
            self.cancel_ping(next(iter(self._cli_requests)))
        self._count("cli_pings")
        self._do(st, actions, now)
        return request

    def cancel_ping(self, request: int) -> None:
        """Stop waiting for an answer to ``request`` (unknown or answered ids are ignored)."""
        for tx in self._cli_requests.pop(request, ()):
            self._cli_txs.pop(tx, None)

    def _cli_pong(self, st: _Peer, pong: CliPongReceived) -> None:
        request = self._cli_txs.get(pong.tx_id)
        if request is None:
            return  # answered already (another path was faster) or cancelled
        self.cancel_ping(request)
        path = pong.path
        if isinstance(path, DerpPath):
            kind, addr, region = "derp", None, path.region
        else:
            kind, addr, region = ("direct" if path.is_direct else "peer-relay"), str(path), None
        self._events.append(DiscoPingResult(request, st.config.node_key, kind, addr, region, pong.latency,
                                            pong.pong_src))

    # --- peer relays (client and server) ---------------------------------------------

    def _send_disco_to_node(self, node: NodePublic, message: disco.Message, fallback_region: int = 0) -> None:
        st = self.peers.get(node)
        if st is None:
            self._count("relay_unknown_node")
            return
        region = st.config.home_derp or st.ep.last_derp_region_heard or fallback_region
        if not region:
            self._count("relay_no_derp_region")
            return
        self._send_disco(st, DerpPath(region), message)

    def _start_relay_discovery(self, st: _Peer, now: float) -> None:
        if st.ep.disco_key is None:
            return
        for server, req in self.relay.discover(st.config.node_key, st.ep.disco_key, now):
            self._send_disco_to_node(server, req)
        self._sync_relay_servers()

    def _sync_relay_servers(self) -> None:
        for s in self.relay.expected_servers:
            self.disco.expect_relay_server(s)
        for s in self.relay.finished_servers:
            self.disco.forget_relay_server(s)
        self.relay.expected_servers.clear()
        self.relay.finished_servers.clear()

    def _relay_results(self, out: list[tuple[bytes, AddrPort]], ready: list[RelayReady], now: float) -> None:
        for data, to in out:
            self._udp_out.append((data, to))
            self._count("udp_sent_relay")
        for r in ready:
            st = self.peers.get(r.peer)
            if st is not None:
                res = r.result
                self._do(st, st.ep.handle_relay_path_ready(UDPPath(res.relay_addr, res.vni), res.server_disco,
                                                           res.latency, now), now)
        self._sync_relay_servers()

    def _answer_allocate(self, src: NodePublic, region: int, msg: disco.AllocateUDPRelayEndpointRequest,
                         now: float) -> None:
        server = self.relay_server
        st = self.peers.get(src)
        if server is None or st is None:
            self._count("relay_allocate_no_server")
            return
        if not self.relay_server_enabled:
            self._count("relay_allocate_server_disabled")
            return
        if not node_has_cap(self.packet_filter, CAP_RELAY, self._host_ips(st.config), self.self_ips):
            self._count("relay_allocate_not_granted")
            return
        try:
            ep = server.allocate(msg.client_disco[0], msg.client_disco[1], now)
        except RelayError as exc:
            log.info("magicsock: relay allocation for %s refused: %s", src.short(), exc)
            self._count("relay_allocate_refused")
            return
        self._count("relay_allocate_answered")
        self._send_disco_to_node(src, disco.AllocateUDPRelayEndpointResponse(msg.generation, ep), region)

    def _path_changed(self, st: _Peer, a: BestPathChanged, now: float) -> None:
        old = str(a.old.path) if a.old else None
        new = str(a.new.path) if a.new else None
        st.last_change = now
        self._count("path_changes")
        if a.new is not None and len(st.sources) < _PEER_SOURCES_MAX:
            st.sources.add(a.new.path)
            if st.held_initiation is not None:
                self._release_held(st, now)
        lat = f" latency={a.new.latency * 1000:.2f}ms" if a.new else ""
        log.info("magicsock: peer %s (%s) now using %s (was %s; %s)%s", st.config.node_key.short(),
                 st.config.name or "-", new or "DERP", old or "DERP", a.reason, lat)
        self._events.append(PathChanged(st.config.node_key, old, new, a.reason))

    def _endpoints_fresh(self, now: float) -> bool:
        return self.endpoints_at is not None and now - self.endpoints_at <= ENDPOINTS_FRESH_ENOUGH

    def _call_me_maybe(self, st: _Peer, region: int, now: float) -> None:
        if not self._endpoints_fresh(now) and self.derp_map is not None and self._stun_targets():
            # Stale endpoints would send the peer to dead NAT mappings: re-STUN first.
            self._pending_cmm[(st.config.node_key, region)] = now
            if self._prober is None:
                self.restun(now)
            return
        self._send_cmm_now(st, region)

    def _send_cmm_now(self, st: _Peer, region: int) -> None:
        eps = tuple(e.addr for e in self.endpoints)
        self._send_disco(st, DerpPath(region), disco.CallMeMaybe(eps))

    def _flush_pending_cmm(self) -> None:
        pending, self._pending_cmm = self._pending_cmm, {}
        for (key, region) in pending:
            st = self.peers.get(key)
            if st is not None:
                self._send_cmm_now(st, region)

    # --- receiving ------------------------------------------------------------

    def receive_udp(self, data: bytes | bytearray | memoryview, src: AddrPort, now: float) -> None:
        """One datagram from the UDP socket. Never raises."""
        self.receive_udp_batch([(data, src)], now)

    def receive_udp_batch(self, batch: Iterable[tuple[bytes | bytearray | memoryview, AddrPort]], now: float) -> None:
        """A drained batch of ``(datagram, source)``. WireGuard runs go to the core in one call."""
        wg_batch: list[tuple[Any, Any]] = []
        append = wg_batch.append
        hook = self.drop_direct_udp
        relay_paths = self._relay_paths
        for item in batch:
            data = item[0]
            # Fast path, naked WireGuard (types 1-4, bytes 1..3 zero), as demux.classify decides it.
            if not hook and len(data) >= 4 and 0 < data[0] < 5 and not data[1] and not data[2] and not data[3]:
                append(item)  # the (datagram, source) pair as it came: no new tuple per packet
                continue
            src = item[1]
            # Fast path, WireGuard from a peer relay: a plain Geneve data header (no control flag, no
            # options, protocol 0x7A12, byte 7 zero) in front of a WireGuard message, as classify decides it.
            if len(data) >= 12 and not data[0] and not data[1] and data[2] == 0x7A and data[3] == 0x12 \
                    and not data[7] and 0 < data[8] < 5:
                vni = (data[4] << 16) | (data[5] << 8) | data[6]
                path = relay_paths.get((src, vni))
                if path is None:
                    if len(relay_paths) >= _RELAY_PATH_CACHE_MAX:
                        relay_paths.clear()
                    path = relay_paths[(src, vni)] = UDPPath(src, vni)
                append(((data if data.__class__ is memoryview else memoryview(data))[8:], path))
                continue
            try:
                c = classify(data)
                kind = c.kind
                if kind is PacketKind.WIREGUARD:
                    if self.drop_direct_udp:
                        self._count("udp_dropped_by_hook")
                        continue
                    wg_batch.append((c.payload, src))
                    continue
                if wg_batch:
                    self.wg.receive_datagrams(wg_batch, now)
                    wg_batch = []
                    append = wg_batch.append
                if kind is PacketKind.STUN_BINDING:
                    self._receive_stun(c.payload, src, now)
                elif kind is PacketKind.DISCO:
                    if self.drop_direct_udp:
                        self._count("udp_dropped_by_hook")
                        continue
                    self._receive_disco(c.payload, UDPPath(src), now)
                elif kind is PacketKind.GENEVE_DISCO:
                    self._receive_disco(c.payload, UDPPath(src, c.vni), now, geneve_control=c.control)
                elif kind is PacketKind.GENEVE_WIREGUARD:
                    self.wg.receive_datagram(c.payload, UDPPath(src, c.vni), now)
                else:
                    self._count("udp_unknown")
            except Exception:  # the safety net: junk must never take the node down
                log.debug("magicsock: error handling datagram from %s", src, exc_info=True)
                self._count("udp_internal_error")
        if wg_batch:
            self.wg.receive_datagrams(wg_batch, now)
        self._after_wg_receive(now)

    def receive_derp(self, region: int, src: NodePublic, data: bytes | bytearray | memoryview, now: float) -> None:
        """A packet that DERP region ``region`` delivered from node ``src``. Never raises."""
        self.receive_derp_batch(((region, src, data),), now)

    def receive_derp_batch(self, items: Iterable[tuple[int, NodePublic, bytes | bytearray | memoryview]],
                           now: float) -> None:
        """Packets from DERP as ``(region, sender, packet)``, e.g. all of one DERP socket read. Never raises.

        Same effect as :meth:`receive_derp` per item in order, but runs of WireGuard
        datagrams go to the WireGuard core in one call (sharing its per-run bookkeeping)
        and the decrypted packets are collected once per batch. Before a disco message the
        pending run is processed and its output routed, so disco sees the state that
        per-item processing would have left.
        """
        peers_get = self.peers.get
        sources = self._derp_sources
        wg_run: list[tuple[Any, Any]] = []
        append = wg_run.append
        n_wg = 0
        # The sender and region of the latest item that joined wg_run, and its _DerpSource.
        last_src: NodePublic | None = None
        last_region = 0
        source: Any = None
        for region, src, data in items:
            try:
                if len(data) >= _DISCO_HEADER_LEN and data[0] == 0x54 and data[:_DISCO_MAGIC_LEN] == _DISCO_MAGIC:
                    # Disco: the WireGuard run before it first (and its output routed), as if one by one.
                    last_src = None
                    if wg_run:
                        self.wg.receive_datagrams(wg_run, now)
                        wg_run = []
                        append = wg_run.append
                        self._flush_wg(now)
                    st = peers_get(src)
                    if st is not None:
                        st.ep.last_derp_region_heard = region
                        if st.held_initiation is not None:
                            self._release_held(st, now)  # it reached us over DERP: that is a path back
                    self._receive_disco(memoryview(data), DerpPath(region), now, derp_src=src)
                    continue
                if src is last_src and region == last_region:
                    # More WireGuard from the same sender: its peer, region and source are known already,
                    # and its held initiation was dealt with at the run's first item (only _flush_wg holds
                    # one, and it does not run inside a run).
                    append((data, source))
                    n_wg += 1
                    continue
                st = peers_get(src)
                if st is None:
                    self._count("derp_from_unknown_peer")
                    if len(data) == _INITIATION_SIZE and data[0] == 1:
                        self._keep_unknown_initiation(region, src, bytes(data), now)
                    continue
                st.ep.last_derp_region_heard = region
                if st.held_initiation is not None:
                    self._release_held(st, now)
                source = sources.get((region, src))
                if source is None:
                    if len(sources) >= _DERP_SOURCE_CACHE_MAX:
                        sources.clear()
                    source = sources[(region, src)] = _DerpSource(region, src)
                append((data, source))
                n_wg += 1
                last_src, last_region = src, region
            except Exception:  # the safety net: junk must never take the node down
                log.debug("magicsock: error handling DERP packet from %s", src, exc_info=True)
                self._count("derp_internal_error")
        if not n_wg:
            return
        try:
            self._count("wg_received_derp", n_wg)
            if wg_run:
                self.wg.receive_datagrams(wg_run, now)
            self._after_wg_receive(now)
        except Exception:
            log.debug("magicsock: error handling a DERP batch", exc_info=True)
            self._count("derp_internal_error")

    def _keep_unknown_initiation(self, region: int, src: NodePublic, data: bytes, now: float) -> None:
        """Keep the newest initiation per unknown DERP sender (bounded) for :meth:`_replay_unknown_initiation`."""
        held = self._unknown_initiations
        held.pop(src, None)
        held[src] = (region, data, now)
        while len(held) > UNKNOWN_INITIATIONS_MAX:
            del held[next(iter(held))]
        self._count("wg_initiation_unknown_kept")

    def _maybe_retry_handshake(self, st: _Peer, now: float) -> None:
        """Disco from a peer proves it knows us now: re-send our unanswered initiation at once.

        Our first initiation may have been dropped because the peer's netmap did not
        list us yet; WireGuard alone would retry only after REKEY_TIMEOUT (5 s).
        """
        key = st.config.node_key
        try:
            retried = self.wg.retry_handshake_now(key, now, unanswered_for=HANDSHAKE_RETRY_AFTER)
        except KeyError:
            return
        if retried:
            self._count("wg_handshake_retried_on_disco")
            self._flush_wg(now)

    def _after_wg_receive(self, now: float) -> None:
        # Cryptokey routing on receive, as WireGuard requires: a decrypted packet is only accepted if
        # its inner source address routes back (longest prefix over every peer's AllowedIPs) to the
        # peer whose key sealed it. Otherwise any peer could speak with another node's address and
        # be judged by that node's rights in the packet filter.
        routes = self._src_routes
        received = self._received
        ok_peer: NodePublic | None = None  # the last (peer, source) pair that passed: runs skip the lookup
        ok_src = b""
        for item in self.wg.packets_received():
            peer, packet = item
            # WireGuard delivers only IPv4 (>= 20 bytes) or IPv6 (>= 40 bytes) packets.
            v4 = packet[0] >> 4 == 4
            src = packet[12:16] if v4 else packet[8:24]
            if peer is not ok_peer or src != ok_src:
                owner = routes.get(src)
                if owner is None:
                    owner = self._src_owner_by_prefix(src)
                if owner is not peer and owner != peer:
                    self._count("wg_source_not_allowed")
                    continue
                ok_peer, ok_src = peer, src
            if v4 and packet[9] == IPPROTO_TSMP:
                # TSMP (disco key adverts): 1.96.4 ignores them unless TS_USE_CACHED_NETMAP.
                self._count("tsmp_dropped")
                continue
            received.append(item)
        self._flush_wg(now)  # handshake responses, keepalives

    def _src_owner_by_prefix(self, src: bytes) -> NodePublic | None:
        """The peer whose AllowedIPs prefix (longest first) holds the packed address ``src``, if any."""
        cache = self._src_prefix_cache
        if src in cache:
            return cache[src]
        ip = ipaddress.ip_address(src)
        owner = None
        for net, key in self._prefix_routes:
            if ip.version == net.version and ip in net:
                owner = key
                break
        if len(cache) >= _SRC_PREFIX_CACHE_MAX:
            cache.clear()
        cache[bytes(src)] = owner
        return owner

    def take_packets(self) -> list[tuple[NodePublic, bytes]]:
        """Decrypted inner IP packets as ``(peer, packet)``."""
        out, self._received = self._received, []
        return out

    def _receive_disco(self, packet: memoryview, path: UDPPath | DerpPath, now: float, *,
                       derp_src: NodePublic | None = None, geneve_control: bool = False) -> None:
        r = self.disco.receive(packet, path, derp_src=derp_src, geneve_control=geneve_control)
        if r is None:
            self._count("disco_dropped")
            return
        msg = r.message
        self._count(f"disco_recv_{type(msg).__name__.lower()}")
        if isinstance(path, UDPPath) and path.vni is not None:
            handled = self.relay.handle_disco(path.vni, r.sender, msg, path.addr, geneve_control, now)
            if handled is not None:
                self._relay_results(handled[0], handled[1], now)
                return
            if geneve_control:
                self._count("relay_challenge_unmatched")
                return
        if isinstance(msg, disco.Ping):
            nodes = r.nodes
            key = msg.node_key if msg.node_key in nodes else nodes[0]
            st = self.peers.get(key)
            if st is None:
                return
            if isinstance(path, UDPPath) and len(st.sources) < _PEER_SOURCES_MAX:
                st.sources.add(path)
            self._do(st, st.ep.handle_ping(msg, path, now), now)
            self._maybe_retry_handshake(st, now)
            # Other peers sharing this disco key learn the candidate too (no pong from them).
            for other in nodes:
                if other != key and isinstance(path, UDPPath) and (o := self.peers.get(other)) is not None:
                    o.ep.handle_ping(msg, path, now)
        elif isinstance(msg, disco.Pong):
            for key in r.nodes:
                st = self.peers.get(key)
                if st is not None:
                    self._do(st, st.ep.handle_pong(msg, path, now), now)
                    self._maybe_retry_handshake(st, now)
        elif isinstance(msg, disco.CallMeMaybe):
            st = self.peers.get(r.nodes[0])
            if st is not None:
                self._do(st, st.ep.handle_call_me_maybe(msg, now), now)
                self._maybe_retry_handshake(st, now)
        elif isinstance(msg, disco.CallMeMaybeVia):
            st = self.peers.get(r.nodes[0])
            if st is not None:
                best = st.ep.best
                # As tailscaled: skip only when our trusted path already goes through this relay server
                # (a new bind could move our side and blackhole it). On a trusted direct path we still
                # bind, so the peer (which asked) can get the relay path it is missing.
                if st.ep.is_trusted(now) and best is not None and best.relay_server_disco == msg.endpoint.server_disco:
                    self._count("relay_cmmvia_skipped")
                    return
                out = self.relay.handle_call_me_maybe_via(r.nodes[0], r.sender, msg, now)
                self._relay_results(out, [], now)
        elif isinstance(msg, disco.AllocateUDPRelayEndpointResponse):
            derp_msgs, out = self.relay.handle_allocate_response(r.nodes[0], msg, now)
            for node, m in derp_msgs:
                self._send_disco_to_node(node, m)
            self._relay_results(out, [], now)
        elif isinstance(msg, disco.AllocateUDPRelayEndpointRequest):
            assert isinstance(path, DerpPath)
            self._answer_allocate(r.nodes[0], path.region, msg, now)
        else:
            self._count("disco_unhandled")

    # --- STUN / endpoints -------------------------------------------------------

    def _stun_targets(self) -> list[Any]:
        if self.derp_map is None:
            return []
        families = set(self.ports) or {4}
        return [t for t in stun_targets(self.derp_map) if _sockaddr_family(t.addr) in families]

    def restun(self, now: float) -> None:
        """Start a netcheck round now (unless one is running)."""
        if self._prober is not None:
            return
        targets = self._stun_targets()
        if not targets:
            self._next_stun = None
            return
        self._prober = StunProber(targets, now)
        self._next_stun = None
        self._drain_prober()

    def _drain_prober(self) -> None:
        if self._prober is None:
            return
        for data, addr in self._prober.datagrams_to_send():
            self._udp_out.append((data, addr))
            self._count("stun_sent")

    def _receive_stun(self, data: memoryview, src: AddrPort, now: float) -> None:
        if self._prober is None or not self._prober.receive(data, src, now):
            self._count("stun_unexpected")
            return
        if self._prober.done:
            self._finish_netcheck(now)

    def _finish_netcheck(self, now: float) -> None:
        assert self._prober is not None
        report = self._prober.report()
        self._prober = None
        self._next_stun = now + self._rng.uniform(RESTUN_MIN, RESTUN_MAX)
        self.last_report = report
        self._stun_mapped = report.mapped
        log.debug("magicsock: netcheck %s", report.as_dict())
        if report.preferred_derp and report.preferred_derp != self.home_derp:
            self._set_home(report.preferred_derp, report)
        self._update_endpoints(now)
        if report.udp:
            self.endpoints_at = now
        self._flush_pending_cmm()

    def _set_home(self, region: int, report: NetcheckReport | None) -> None:
        log.info("magicsock: home DERP region %d (was %d)", region, self.home_derp)
        self.home_derp = region
        self._events.append(HomeDerpChanged(region, report))

    def _update_endpoints(self, now: float) -> None:
        eps: list[Endpoint] = []
        seen: set[AddrPort] = set()

        def add(addr: AddrPort, typ: EndpointType) -> None:
            if addr not in seen:
                seen.add(addr)
                eps.append(Endpoint(addr, typ))

        for m in self._stun_mapped:
            add(m, EndpointType.STUN)
        report = self.last_report
        if report is not None and report.hard_nat and report.global_v4 and self.configured_port:
            add(AddrPort(report.global_v4.ip, self.configured_port), EndpointType.STUN4_LOCAL_PORT)
        locals_ = [ip for ip in self.local_addresses if not (ip.version == 6 and ip.is_link_local)]
        non_loop = [ip for ip in locals_ if not ip.is_loopback]
        for ip in non_loop or locals_:
            port = self.ports.get(ip.version)
            if port:
                add(AddrPort(ip, port), EndpointType.LOCAL)
        new = tuple(eps)
        if new != self.endpoints:
            self.endpoints = new
            log.info("magicsock: endpoints %s", " ".join(f"{e.addr}({e.type.name.lower()})" for e in new))
            self._events.append(EndpointsChanged(new))

    # --- output -----------------------------------------------------------------

    def take_udp(self) -> list[tuple[bytes | bytearray, AddrPort]]:
        """Datagrams for the UDP socket(s): ``(payload, destination)``."""
        out, self._udp_out = self._udp_out, []
        return out

    def take_derp(self) -> list[tuple[int, NodePublic, bytes | bytearray]]:
        """Packets for DERP: ``(region, destination node key, payload)``."""
        out, self._derp_out = self._derp_out, []
        return out

    def take_events(self) -> list[MagicSockEvent]:
        out, self._events = self._events, []
        return out

    def note_udp_unreachable(self, dest: AddrPort, now: float) -> None:
        """The driver's ``sendto`` said unreachable: drop that path as best for every peer using it."""
        path = UDPPath(dest)
        for st in self.peers.values():
            if st.ep.best is not None and st.ep.best.path == path:
                self._do(st, st.ep.note_send_error(path), now)

    # --- timers -----------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has work (None: nothing scheduled)."""
        times = []
        t = self.wg.get_timer()
        if t is not None:
            times.append(t)
        for st in self.peers.values():
            t = st.ep.get_timer()
            if t is not None:
                times.append(t)
        if self._prober is not None:
            t = self._prober.get_timer()
            times.append(t if t is not None else self._prober.started + self._prober.timeout)
        if self._next_stun is not None:
            times.append(self._next_stun)
        if self._pending_cmm:
            times.append(min(self._pending_cmm.values()) + CMM_MAX_WAIT)
        t = self.relay.get_timer()
        if t is not None:
            times.append(t)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        self._flush_wg(now)
        for st in list(self.peers.values()):
            t = st.ep.get_timer()
            if t is not None and t <= now:
                self._do(st, st.ep.handle_timer(now), now)
        if self._prober is not None:
            self._prober.handle_timer(now)
            self._drain_prober()
            if self._prober.expired(now):
                self._finish_netcheck(now)
        if self._next_stun is not None and self._next_stun <= now:
            self.restun(now)
        if self._pending_cmm and min(self._pending_cmm.values()) + CMM_MAX_WAIT <= now:
            self._flush_pending_cmm()  # STUN is not answering: go with what we have
        t = self.relay.get_timer()
        if t is not None and t <= now:
            for server, req in self.relay.handle_timer(now):
                self._send_disco_to_node(server, req)
            self._sync_relay_servers()

    # --- status -----------------------------------------------------------------

    def peer_status(self, key: NodePublic, now: float) -> PathStatus:
        """The current path of one peer. Raises KeyError for an unknown peer."""
        st = self.peers[key]
        ep = st.ep
        plan = ep.addr_for_send(now)
        best = ep.best
        trusted = ep.is_trusted(now)
        if best is not None and trusted:
            kind = "direct" if best.path.is_direct else "peer-relay"
            addr: str | None = str(best.path)
        else:
            kind = "derp" if plan.derp_region else ("none" if best is None else
                                                     ("direct" if best.path.is_direct else "peer-relay"))
            addr = str(best.path) if best is not None else None
        try:
            handshake = self.wg.peer_status(key, now).has_session
        except KeyError:
            handshake = False
        return PathStatus(key, st.config.name, kind, addr, plan.derp_region, best.latency if best else None,
                          st.last_change, trusted, handshake)

    def status(self, now: float) -> list[PathStatus]:
        """Every peer's current path."""
        return [self.peer_status(k, now) for k in self.peers]

