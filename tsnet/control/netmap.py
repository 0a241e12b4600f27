"""The client's view of the tailnet: map-frame decoding, delta application, snapshots (sans-IO).

* :class:`MapFrameDecoder` turns the long-poll body (``[u32 LE length][zstd frame]``…)
  into :class:`~tsnet.control.tailcfg.MapResponse` objects.
* :class:`MapSession` applies full and delta messages of one poll and returns an
  immutable :class:`NetworkMap` after every message that changed something.

Like tailscaled, the session decides which peers the data plane may use: a peer whose node key
has expired (by control's ``Expired`` flag, or by its ``KeyExpiry`` against control's clock) or
that offers neither a disco key nor a home DERP region is listed in
:attr:`NetworkMap.skipped_peers`, not in :attr:`NetworkMap.peers`. When our own key has
expired, ``peers`` is empty: the node must stop using that key until it logs in again.
A peer's allowed IPs are its own addresses only: subnet and exit-node routes (which tsnet does
not use yet) are kept apart in :attr:`Peer.unused_routes`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import struct
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

import zstandard

from ..key import DiscoPublic, NodePublic
from . import tailcfg

__all__ = ["MapFrameDecoder", "MapSession", "MapSessionError", "NetworkMap", "Peer", "parse_endpoint"]

_MAX_FRAME = 64 << 20

# tailscaled trusts control's clock (ControlTime) for expiry checks when ours is off by more than
# this; smaller differences are noise.
_MIN_CLOCK_DELTA = _dt.timedelta(minutes=1)
# A control-adjusted "now" before this (early 2023) means a broken clock: judge no peer expired
# by time then (control's own Expired flag still counts).
_EXPIRY_EPOCH = _dt.datetime.fromtimestamp(1673373066, _dt.timezone.utc)
# Go's zero time.Time, which control sends as KeyExpiry for keys that never expire.
_ZERO_YEAR = 1


_MAX_TIME = _dt.datetime.max.replace(tzinfo=_dt.timezone.utc)
_MIN_TIME = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def _shift(when: _dt.datetime, delta: _dt.timedelta) -> _dt.datetime:
    """``when + delta``, saturating at the ends of the calendar (a control clock in year 9999 must
    not crash the session)."""
    try:
        return when + delta
    except OverflowError:
        return _MAX_TIME if delta > _dt.timedelta(0) else _MIN_TIME


def _expiry(value: _dt.datetime | None) -> _dt.datetime | None:
    """A key expiry time, or None for "never" (absent or Go's zero time)."""
    return value if value is not None and value.year > _ZERO_YEAR else None


class MapSessionError(ValueError):
    """The server sent a map message that cannot be applied (the poll must restart)."""


def parse_endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse ``1.2.3.4:41641`` or ``[2001:db8::1]:41641``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host), int(port)


# A peer's addresses rarely change, yet every full map, reconnect and patched peer repeats them,
# and ipaddress parsing costs microseconds per string: parse each distinct string once. The
# results are immutable, so sharing them is safe; errors (ValueError) are not cached.
_endpoint = functools.lru_cache(maxsize=1 << 16)(parse_endpoint)


@functools.lru_cache(maxsize=1 << 16)
def _interface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(text)


@functools.lru_cache(maxsize=1 << 16)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=True)


_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_CHROMEOS_VM_RANGE = ipaddress.ip_network("100.115.92.0/23")  # inside CGNAT, never a tailnet address
_TAILSCALE_ULA = ipaddress.ip_network("fd7a:115c:a1e0::/48")


@functools.lru_cache(maxsize=1 << 16)
def _allowed_ip(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, bool, bool]:
    """An AllowedIP parsed once: (prefix, is it a single address, is that a tailnet address)."""
    net = _network(text)
    if net.prefixlen != net.max_prefixlen:
        return net, False, False
    ip = net.network_address
    if ip.version == 4:
        return net, True, ip in _CGNAT and ip not in _CHROMEOS_VM_RANGE
    return net, True, ip in _TAILSCALE_ULA


@dataclass(frozen=True, slots=True)
class Peer:
    """One peer as the data plane needs it, parsed from a ``tailcfg.Node``."""

    id: int
    stable_id: str
    name: str
    key: NodePublic
    disco_key: DiscoPublic | None
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    allowed_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    endpoints: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...]
    home_derp: int
    cap: int
    online: bool | None
    last_seen: _dt.datetime | None
    key_expiry: _dt.datetime | None
    expired: bool
    tags: tuple[str, ...]
    cap_map: Mapping[str, Any]
    user: int
    node: tailcfg.Node
    #: AllowedIPs not routed to this peer: subnet routes and exit-node default routes.
    unused_routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_node(cls, node: tailcfg.Node) -> Peer:
        if node.key is None or node.id is None:
            raise MapSessionError("peer node lacks ID or Key")
        addrs = []
        for a in node.addresses or ():
            try:
                addrs.append(_interface(a))
            except ValueError:
                continue  # an unparsable entry is skipped, like Go does
        allowed, routes = [], []
        own = None
        for a in node.allowed_ips if node.allowed_ips is not None else node.addresses or ():
            try:
                net, single, tailnet_host = _allowed_ip(a)
            except ValueError:
                continue
            # Like tailscaled without --accept-routes and without an exit node (tsnet supports
            # neither yet): only the peer's own single addresses are routed to it. A default route
            # (exit-node offer) or a subnet route would send other destinations to this peer and
            # let it source packets from addresses it does not own.
            if single:
                if tailnet_host:
                    allowed.append(net)
                    continue
                if own is None:
                    own = {i.network for i in addrs}
                if net in own:
                    allowed.append(net)
                    continue
            routes.append(net)
        endpoints = []
        for e in node.endpoints or ():
            try:
                endpoints.append(_endpoint(e))
            except ValueError:
                continue
        home = node.home_derp or 0
        if not home and node.legacy_derp_string and node.legacy_derp_string.startswith("127.3.3.40:"):
            try:
                home = int(node.legacy_derp_string.rsplit(":", 1)[1])
            except ValueError:
                home = 0
        return cls(
            id=node.id,
            stable_id=node.stable_id or "",
            name=node.name or "",
            key=node.key,
            disco_key=node.disco_key if node.disco_key is not None and not node.disco_key.is_zero() else None,
            addresses=tuple(addrs),
            allowed_ips=tuple(allowed),
            endpoints=tuple(endpoints),
            home_derp=home,
            cap=node.cap or 0,
            online=node.online,
            last_seen=node.last_seen,
            key_expiry=node.key_expiry,
            expired=bool(node.expired),
            tags=tuple(node.tags or ()),
            cap_map=MappingProxyType(dict(node.cap_map or {})),
            user=node.user or 0,
            node=node,
            unused_routes=tuple(routes),
        )


@dataclass(frozen=True, slots=True)
class NetworkMap:
    """An immutable snapshot of everything control told this node.

    ``peers`` are the peers the data plane may use; ``skipped_peers`` the ones control listed
    that it must not (expired keys, neither disco key nor DERP home), kept for status.
    ``self_expired`` is set when our own node key has expired: then ``peers`` is empty.
    """

    self_node: tailcfg.Node
    peers: tuple[Peer, ...]
    derp_map: tailcfg.DERPMap | None
    dns_config: tailcfg.DNSConfig | None
    packet_filter: tuple[tailcfg.FilterRule, ...]
    cap_map: Mapping[str, Any]
    user_profiles: Mapping[int, tailcfg.UserProfile]
    domain: str
    collect_services: bool
    control_time: _dt.datetime | None
    skipped_peers: tuple[Peer, ...] = ()
    self_expired: bool = False

    @property
    def name(self) -> str:
        return self.self_node.name or ""

    @property
    def addresses(self) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
        return tuple(ipaddress.ip_interface(a) for a in self.self_node.addresses or ())

    @property
    def node_key(self) -> NodePublic | None:
        return self.self_node.key

    def peer_by_key(self, key: NodePublic) -> Peer | None:
        for p in self.peers:
            if p.key == key:
                return p
        return None

    def peer_by_name(self, name: str) -> Peer | None:
        for p in self.peers:
            if p.name == name or p.name.split(".")[0] == name:
                return p
        return None


class MapFrameDecoder:
    """Splits a map long-poll body into messages and decodes them (zstd or plain JSON)."""

    def __init__(self, *, compressed: bool = True) -> None:
        self.compressed = compressed
        self._buf = bytearray()
        self._dctx = zstandard.ZstdDecompressor()
        self._last_keepalive: bytes | None = None

    def feed(self, data: bytes) -> list[tailcfg.MapResponse]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from("<I", self._buf)
            if length > _MAX_FRAME:
                raise MapSessionError(f"map message of {length} bytes is too large")
            if len(self._buf) < 4 + length:
                break
            raw = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            if raw == self._last_keepalive:
                out.append(tailcfg.MapResponse(keep_alive=True))
                continue
            body = raw
            if self.compressed:
                try:
                    body = self._dctx.decompressobj().decompress(raw)
                except zstandard.ZstdError as exc:
                    raise MapSessionError(f"bad zstd frame: {exc}") from None
            try:
                msg = tailcfg.decode(tailcfg.MapResponse, body)
            except tailcfg.DecodeError as exc:
                raise MapSessionError(str(exc)) from None
            if msg.keep_alive and body.strip() == b'{"KeepAlive":true}':
                self._last_keepalive = raw
            out.append(msg)
        return out


def _patch_node(node: tailcfg.Node, change: tailcfg.PeerChange) -> tailcfg.Node:
    updates: dict[str, Any] = {}
    # Zero DERPRegion / Cap mean "unchanged" (Go's omitempty zero values), not "no DERP home".
    if change.derp_region:
        updates["home_derp"] = change.derp_region
    if change.cap:
        updates["cap"] = change.cap
    if change.cap_map is not None:
        updates["cap_map"] = change.cap_map
    if change.endpoints is not None:
        updates["endpoints"] = change.endpoints
    if change.key is not None:
        updates["key"] = change.key
    if change.key_signature is not None:
        updates["key_signature"] = change.key_signature
    if change.disco_key is not None:
        updates["disco_key"] = change.disco_key
    if change.online is not None:
        updates["online"] = change.online
    if change.last_seen is not None:
        updates["last_seen"] = change.last_seen
    if change.key_expiry is not None:
        updates["key_expiry"] = change.key_expiry
    return replace(node, **updates) if updates else node


@dataclass(slots=True)
class MapSession:
    """State of one long poll on the client. Create a new one for every poll.

    Time only enters through the ``now`` arguments (local wall-clock time, timezone-aware).
    Keys expire with no message from control, so a driver asks :meth:`next_expiry` when to
    call :meth:`refresh` next.
    """

    self_node: tailcfg.Node | None = None
    peers: dict[int, tailcfg.Node] = field(default_factory=dict)
    derp_map: tailcfg.DERPMap | None = None
    dns_config: tailcfg.DNSConfig | None = None
    packet_filters: dict[str, tuple[tailcfg.FilterRule, ...]] = field(default_factory=dict)
    user_profiles: dict[int, tailcfg.UserProfile] = field(default_factory=dict)
    domain: str = ""
    collect_services: bool = False
    control_time: _dt.datetime | None = None
    #: Control's clock minus ours, when they differ by more than a minute (else zero).
    clock_delta: _dt.timedelta = _dt.timedelta(0)
    messages: int = 0
    _peer_cache: dict[int, tuple[tailcfg.Node, Peer]] = field(default_factory=dict)
    # The last snapshot's peers (usable ones, by id) and where each sits, so a delta touching a few
    # peers costs O(changed) plus one tuple copy instead of re-walking every peer. ``_dirty`` holds
    # ids changed since; ``_rebuild`` is set when the set of peers changed.
    _peer_list: list[Peer] = field(default_factory=list)
    _index: dict[int, int] = field(default_factory=dict)
    _dirty: set[int] = field(default_factory=set)
    _rebuild: bool = True
    # Peers listed but unusable (expired, unreachable), by id; the time used for expiry checks
    # (control's clock); and the earliest future KeyExpiry among usable peers (may be early, never late).
    _skipped: dict[int, Peer] = field(default_factory=dict)
    _control_now: _dt.datetime | None = None
    _next_peer_expiry: _dt.datetime | None = None
    _self_expired: bool = False

    def apply(self, msg: tailcfg.MapResponse, now: _dt.datetime) -> NetworkMap | None:
        """Apply one message; return the new snapshot, or None for a keep-alive."""
        if msg.control_time is not None and _expiry(msg.control_time) is not None:
            self.control_time = msg.control_time
            delta = msg.control_time - now
            self.clock_delta = delta if abs(delta) > _MIN_CLOCK_DELTA else _dt.timedelta(0)
        if _is_keepalive(msg):
            return None
        if self.self_node is None and msg.node is None:
            raise MapSessionError("initial MapResponse lacked node")
        self.messages += 1
        self._set_now(now)
        if msg.node is not None:
            self.self_node = msg.node
        if msg.derp_map is not None:
            self.derp_map = self._merge_derp_map(msg.derp_map)
        if msg.peers:
            self.peers = {p.id: p for p in msg.peers if p.id is not None}
            self._rebuild = True
        else:
            dirty = self._dirty
            for node_id in msg.peers_removed or ():
                if self.peers.pop(node_id, None) is not None:
                    self._rebuild = True
            for p in msg.peers_changed or ():
                if p.id is not None:
                    if p.id not in self.peers:
                        self._rebuild = True
                    self.peers[p.id] = p
                    dirty.add(p.id)
            for node_id, seen in (msg.peer_seen_change or {}).items():
                if node_id in self.peers:
                    self.peers[node_id] = replace(self.peers[node_id], last_seen=now if seen else None)
                    dirty.add(node_id)
            for node_id, online in (msg.online_change or {}).items():
                if node_id in self.peers:
                    self.peers[node_id] = replace(self.peers[node_id], online=online)
                    dirty.add(node_id)
            for change in msg.peers_changed_patch or ():
                if change.node_id in self.peers:
                    self.peers[change.node_id] = _patch_node(self.peers[change.node_id], change)
                    dirty.add(change.node_id)
        if msg.dns_config is not None:
            self.dns_config = msg.dns_config
        if msg.domain:
            self.domain = msg.domain
        if msg.collect_services is not None:
            self.collect_services = msg.collect_services
        if msg.packet_filter is not None:
            self.packet_filters["base"] = msg.packet_filter
        if msg.packet_filters is not None:
            # "*": null resets every named filter before this message's others apply, wherever it
            # sits in the object; "*" never names a filter itself.
            if "*" in msg.packet_filters and msg.packet_filters["*"] is None:
                self.packet_filters.clear()
            for name, rules in msg.packet_filters.items():
                if name == "*":
                    continue
                if rules is None:
                    self.packet_filters.pop(name, None)
                else:
                    self.packet_filters[name] = rules
        for profile in msg.user_profiles or ():
            if profile.id is not None:
                self.user_profiles[profile.id] = profile
        return self.snapshot()

    def _merge_derp_map(self, new: tailcfg.DERPMap) -> tailcfg.DERPMap:
        """Fields a DERPMap omits keep their previous values; null regions are dropped."""
        if new.regions is not None and any(r is None for r in new.regions.values()):
            new = replace(new, regions={rid: r for rid, r in new.regions.items() if r is not None})
        old = self.derp_map
        if old is None:
            return new
        if new.regions is None:
            new = replace(new, regions=old.regions, omit_default_regions=old.omit_default_regions)
        if new.home_params is None:
            new = replace(new, home_params=old.home_params)
        elif new.home_params.region_score is None and old.home_params is not None:
            new = replace(new, home_params=replace(new.home_params, region_score=old.home_params.region_score))
        return new

    # -- expiry ---------------------------------------------------------------------------------

    def _set_now(self, now: _dt.datetime) -> None:
        """Take a new time; mark peers whose key expired since as changed."""
        control_now = _shift(now, self.clock_delta)
        self._control_now = control_now
        nxt = self._next_peer_expiry
        if nxt is None or control_now < nxt or self._rebuild:
            return
        # Some peer's key may have expired: find which (rare, O(peers)), and the next deadline.
        soonest = None
        for node_id, node in self.peers.items():
            exp = _expiry(node.key_expiry)
            if exp is None:
                continue
            if exp <= control_now:
                skipped = self._skipped.get(node_id)
                if node_id in self._index or (skipped is not None and not skipped.expired):
                    self._dirty.add(node_id)
            elif soonest is None or exp < soonest:
                soonest = exp
        self._next_peer_expiry = soonest

    def _time_judged(self) -> bool:
        now = self._control_now
        return now is not None and now >= _EXPIRY_EPOCH

    def _node_expired(self, node: tailcfg.Node) -> bool:
        if node.expired:
            return True
        exp = _expiry(node.key_expiry)
        return exp is not None and self._time_judged() and exp <= self._control_now  # type: ignore[operator]

    def _note_expiry(self, node: tailcfg.Node) -> None:
        exp = _expiry(node.key_expiry)
        if exp is not None and (self._next_peer_expiry is None or exp < self._next_peer_expiry):
            self._next_peer_expiry = exp

    def next_expiry(self, now: _dt.datetime) -> _dt.datetime | None:
        """The local time at which a key (ours or a usable peer's) next expires, or None.

        At that time call :meth:`refresh`. The answer may be early, never late.
        """
        control_now = _shift(now, self.clock_delta)
        if control_now < _EXPIRY_EPOCH:
            return None  # a broken clock judges nothing expired (see _set_now)
        times = []
        if self.self_node is not None and not self._self_expired:
            exp = _expiry(self.self_node.key_expiry)
            if exp is not None:
                times.append(exp)
        if self._next_peer_expiry is not None:
            times.append(self._next_peer_expiry)
        if not times:
            return None
        return _shift(max(min(times), control_now), -self.clock_delta)

    def refresh(self, now: _dt.datetime) -> NetworkMap | None:
        """Re-judge key expiry at ``now``; return a new snapshot if it changed anything, else None."""
        if self.self_node is None:
            return None
        self._set_now(now)
        if not self._dirty and not self._rebuild and self._self_key_expired() == self._self_expired:
            return None
        return self.snapshot()

    def _self_key_expired(self) -> bool:
        assert self.self_node is not None
        return self._node_expired(self.self_node)

    # -- snapshots ------------------------------------------------------------------------------

    def _peer(self, node: tailcfg.Node) -> Peer:
        cached = self._peer_cache.get(node.id)  # type: ignore[arg-type]
        if cached is not None and cached[0] is node:
            return cached[1]
        peer = Peer.from_node(node)
        self._peer_cache[node.id] = (node, peer)  # type: ignore[index]
        return peer

    def _judge(self, node: tailcfg.Node) -> tuple[Peer | None, Peer | None]:
        """(usable peer, None), (None, skipped peer) or (None, None) for a peer without key or ID."""
        try:
            peer = self._peer(node)
        except MapSessionError:
            return None, None
        if self._node_expired(node):
            # As tailscaled: an expired peer keeps no endpoints or DERP home, and is not used.
            return None, replace(peer, expired=True, endpoints=(), home_derp=0)
        self._note_expiry(node)
        if peer.disco_key is None and not peer.home_derp and not node.is_wireguard_only:
            return None, peer  # neither disco nor DERP: no way to reach it
        return peer, None

    def _update_peer_list(self) -> None:
        """Bring ``_peer_list`` up to date: patch the dirty entries in place, or rebuild it."""
        if not self._rebuild:
            for node_id in self._dirty:
                pos = self._index.get(node_id)
                node = self.peers.get(node_id)
                peer, skipped = self._judge(node) if node is not None else (None, None)
                if skipped is not None:
                    self._skipped[node_id] = skipped
                else:
                    self._skipped.pop(node_id, None)
                if pos is not None and peer is not None:
                    self._peer_list[pos] = peer
                elif pos is not None or peer is not None:
                    self._rebuild = True  # a peer became (un)usable: the list changes shape
                    break
        self._dirty.clear()
        if not self._rebuild:
            return
        peers = []
        self._skipped = {}
        self._next_peer_expiry = None
        for node_id in sorted(self.peers):
            peer, skipped = self._judge(self.peers[node_id])
            if peer is not None:
                peers.append(peer)
            elif skipped is not None:
                self._skipped[node_id] = skipped
        for stale in set(self._peer_cache) - set(self.peers):
            del self._peer_cache[stale]
        self._peer_list = peers
        self._index = {p.id: i for i, p in enumerate(peers)}
        self._rebuild = False

    def snapshot(self) -> NetworkMap:
        assert self.self_node is not None
        self._update_peer_list()
        self._self_expired = self._self_key_expired()
        skipped = tuple(self._skipped[i] for i in sorted(self._skipped))
        if self._self_expired:
            # Our key is dead: like tailscaled, use no peer until we log in again.
            peers: tuple[Peer, ...] = ()
            skipped = tuple(sorted((*self._peer_list, *skipped), key=lambda p: p.id))
        else:
            peers = tuple(self._peer_list)
        rules: list[tailcfg.FilterRule] = []
        for name in sorted(self.packet_filters):
            rules.extend(self.packet_filters[name])
        cap_map = dict(self.self_node.cap_map or {})
        for cap in self.self_node.capabilities or ():
            cap_map.setdefault(cap, None)  # old servers send a list; it means the same as a CapMap key
        return NetworkMap(
            self_node=self.self_node,
            peers=peers,
            derp_map=self.derp_map,
            dns_config=self.dns_config,
            packet_filter=tuple(rules),
            cap_map=MappingProxyType(cap_map),
            user_profiles=MappingProxyType(dict(self.user_profiles)),
            domain=self.domain,
            collect_services=self.collect_services,
            control_time=self.control_time,
            skipped_peers=skipped,
            self_expired=self._self_expired,
        )


def _is_keepalive(msg: tailcfg.MapResponse) -> bool:
    return bool(msg.keep_alive)
