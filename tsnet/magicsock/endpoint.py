"""Per-peer path selection (sans-IO), following tailscaled 1.96.4's magicsock ``endpoint``.

A :class:`PeerEndpoint` holds one peer's candidate direct addresses, the disco
pings in flight, and the current best UDP path (direct, or a peer relay as
``UDPPath(addr, vni)``). It decides where WireGuard goes:

* a *trusted* best path (a pong within the last 6.5 s) gets the traffic alone;
* otherwise the best path (if any) **and** DERP; with no path, DERP only.
* a relay best path is dropped at once when control reports the relay's node
  offline (:meth:`PeerEndpoint.relay_server_gone`), not only when trust lapses.

Every method takes ``now`` (seconds, monotonic) and returns actions for the
caller to carry out: :class:`SendPing` / :class:`SendPong` (seal with the
peer's disco key; Geneve-wrap when the path has a VNI; DERP paths go over
DERP), :class:`SendCallMeMaybe` (the caller fills in our endpoints, after a
re-STUN if they are older than 27 s), :class:`StartRelayDiscovery`, and the
informational :class:`BestPathChanged`. :meth:`PeerEndpoint.get_timer` /
:meth:`PeerEndpoint.handle_timer` drive heartbeats and ping timeouts.

Ranking (:func:`better_addr`): direct beats relay; otherwise latency points with
~1 % hysteresis plus bonuses for loopback, link-local, private and IPv6.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from tsnet.key import DiscoPublic, NodePublic
from tsnet.magicsock import disco
from tsnet.magicsock.addrport import AddrPort, is_private

__all__ = [
    "HEARTBEAT_INTERVAL",
    "TRUST_UDP_ADDR_DURATION",
    "SESSION_ACTIVE_TIMEOUT",
    "PING_TIMEOUT",
    "DISCO_PING_INTERVAL",
    "UPGRADE_UDP_DIRECT_INTERVAL",
    "GOOD_ENOUGH_LATENCY",
    "DISCOVER_UDP_RELAY_PATHS_INTERVAL",
    "UPGRADE_UDP_RELAY_INTERVAL",
    "SAFE_WIRE_MTU",
    "DERP_MAGIC_IP",
    "UDPPath",
    "DerpPath",
    "Path",
    "AddrQuality",
    "better_addr",
    "PingPurpose",
    "SendPing",
    "SendPong",
    "SendCallMeMaybe",
    "StartRelayDiscovery",
    "BestPathChanged",
    "CliPongReceived",
    "Action",
    "SendPlan",
    "PeerEndpoint",
]

HEARTBEAT_INTERVAL = 3.0
TRUST_UDP_ADDR_DURATION = 6.5
SESSION_ACTIVE_TIMEOUT = 45.0
PING_TIMEOUT = 5.0
DISCO_PING_INTERVAL = 5.0
UPGRADE_UDP_DIRECT_INTERVAL = 60.0
GOOD_ENOUGH_LATENCY = 0.005
DISCOVER_UDP_RELAY_PATHS_INTERVAL = 30.0
UPGRADE_UDP_RELAY_INTERVAL = 60.0
PONG_HISTORY = 64
MAX_CANDIDATES_BEFORE_PRUNE = 100
#: 1280-byte TUN MTU plus WireGuard/IP/UDP overhead (tstun.SafeWireMTU).
SAFE_WIRE_MTU = 1360
#: The IP tailscaled uses to write a DERP region as an address (port = region id).
DERP_MAGIC_IP = ipaddress.IPv4Address("127.3.3.40")
GENEVE_OVERHEAD = 8


@dataclass(frozen=True, slots=True)
class UDPPath:
    """A UDP destination: direct when ``vni`` is None, else via a peer relay with that VNI."""

    addr: AddrPort
    vni: int | None = None

    @property
    def is_direct(self) -> bool:
        return self.vni is None

    def __str__(self) -> str:
        return str(self.addr) if self.vni is None else f"{self.addr}:vni:{self.vni}"


@dataclass(frozen=True, slots=True)
class DerpPath:
    """A DERP region (home region of the peer, or the one it reached us on)."""

    region: int

    @property
    def as_addrport(self) -> AddrPort:
        return AddrPort(DERP_MAGIC_IP, self.region)


Path = UDPPath | DerpPath


@dataclass(frozen=True, slots=True)
class AddrQuality:
    """A path with what we measured about it. ``relay_server_disco`` only for relay paths."""

    path: UDPPath
    latency: float
    wire_mtu: int = SAFE_WIRE_MTU
    relay_server_disco: DiscoPublic | None = None


def _points(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    pts = 0
    if ip.is_loopback:
        pts += 50
    elif ip.is_link_local and not ip.is_multicast:
        pts += 30
    elif is_private(ip):
        pts += 20
    if ip.version == 6:
        pts += 10
    return pts


def better_addr(a: AddrQuality | None, b: AddrQuality | None) -> bool:
    """Whether candidate ``a`` should replace current ``b`` (tailscaled's ``betterAddr``)."""
    if a is not None and b is not None and a.path == b.path:
        return a.wire_mtu > b.wire_mtu
    if b is None:
        return a is not None
    if a is None:
        return False
    if a.path.is_direct != b.path.is_direct:
        return a.path.is_direct
    # Integer nanoseconds and integer division, as Go does with time.Duration.
    a_lat, b_lat = round(a.latency * 1e9), round(b.latency * 1e9)
    a_pts = b_pts = 0
    if a_lat > b_lat and a_lat > 0:
        b_pts = 100 - (b_lat * 100) // a_lat
    elif b_lat > 0:
        a_pts = 100 - (a_lat * 100) // b_lat
    a_pts += _points(a.path.addr.ip)
    b_pts += _points(b.path.addr.ip)
    if a_pts <= 1 and b_pts == 0:
        return False  # < ~1 % better: stay put (hysteresis)
    return a_pts > b_pts


class PingPurpose(enum.Enum):
    DISCOVERY = "discovery"
    HEARTBEAT = "heartbeat"
    CLI = "cli"


@dataclass(frozen=True, slots=True)
class SendPing:
    path: Path
    ping: disco.Ping
    purpose: PingPurpose


@dataclass(frozen=True, slots=True)
class SendPong:
    path: Path
    pong: disco.Pong


@dataclass(frozen=True, slots=True)
class SendCallMeMaybe:
    """Send our current endpoints to the peer over DERP in this region."""

    region: int


@dataclass(frozen=True, slots=True)
class StartRelayDiscovery:
    """Allocate on every candidate relay server for this peer (relay manager's job)."""

    peer: NodePublic


@dataclass(frozen=True, slots=True)
class BestPathChanged:
    old: AddrQuality | None
    new: AddrQuality | None
    reason: str


@dataclass(frozen=True, slots=True)
class CliPongReceived:
    """The pong to a user-requested ping (:meth:`PeerEndpoint.cli_ping`) arrived.

    ``path`` is where the ping went (the path being measured); ``pong_src`` is
    our address as the peer saw it.
    """

    tx_id: bytes
    path: Path
    latency: float
    pong_src: AddrPort


Action = SendPing | SendPong | SendCallMeMaybe | StartRelayDiscovery | BestPathChanged | CliPongReceived


@dataclass(frozen=True, slots=True)
class SendPlan:
    """Where one WireGuard send goes: ``udp`` and/or DERP ``derp_region`` (both None: no route)."""

    udp: UDPPath | None
    derp_region: int | None
    actions: tuple[Action, ...] = ()

    @property
    def has_route(self) -> bool:
        return self.udp is not None or self.derp_region is not None


@dataclass(slots=True)
class _Pong:
    latency: float
    at: float
    src: AddrPort
    reported_src: AddrPort


@dataclass(slots=True)
class _Candidate:
    in_netmap: bool = False
    last_ping: float | None = None
    last_got_ping: float | None = None  # None: came from netmap or CMM
    last_got_ping_tx: bytes | None = None
    call_me_maybe_at: float | None = None
    pongs: deque[_Pong] = field(default_factory=lambda: deque(maxlen=PONG_HISTORY))

    def should_delete(self, now: float) -> bool:
        if self.call_me_maybe_at is not None:
            return False
        if self.last_got_ping is None:
            return not self.in_netmap
        return now - self.last_got_ping > SESSION_ACTIVE_TIMEOUT

    def latency(self) -> float | None:
        return self.pongs[-1].latency if self.pongs else None


@dataclass(slots=True)
class _SentPing:
    to: Path
    at: float
    purpose: PingPurpose
    size: int
    timeout_at: float
    relay_server_disco: DiscoPublic | None = None


def _wire_mtu(size: int, path: Path) -> int:
    if size == 0 or not isinstance(path, UDPPath):
        return SAFE_WIRE_MTU
    header = (40 if path.addr.is_v6 else 20) + 8
    if path.vni is not None:
        header += GENEVE_OVERHEAD
    return size + header


class PeerEndpoint:
    """Path state for one peer. Not thread-safe; one owner drives it."""

    def __init__(
        self,
        node_key: NodePublic,
        disco_key: DiscoPublic | None,
        *,
        my_node_key: NodePublic,
        home_derp: int = 0,
        relay_capable: bool = False,
        heartbeat_disabled: bool = False,
    ) -> None:
        self.node_key = node_key
        self.disco_key = disco_key
        self.my_node_key = my_node_key
        self.home_derp = home_derp
        self.relay_capable = relay_capable
        self.heartbeat_disabled = heartbeat_disabled
        #: set by the owner when at least one candidate relay server exists
        self.relay_servers_available = False
        #: the DERP region the peer last reached us on (fallback for ``home_derp``)
        self.last_derp_region_heard = 0
        self.candidates: dict[AddrPort, _Candidate] = {}
        self.best: AddrQuality | None = None
        self.best_at: float | None = None
        self.trust_until: float = float("-inf")
        self._cmm_endpoints: set[AddrPort] = set()
        self._sent_pings: dict[bytes, _SentPing] = {}
        self._heartbeat_at: float | None = None
        self._last_send_ext: float | None = None
        self._last_full_ping: float | None = None
        self._last_relay_discovery: float | None = None

    # --- netmap -------------------------------------------------------------

    def update_from_netmap(
        self,
        endpoints: Iterable[AddrPort],
        now: float,
        *,
        disco_key: DiscoPublic | None = None,
        home_derp: int | None = None,
        relay_capable: bool | None = None,
    ) -> list[Action]:
        """Apply a netmap update. A changed disco key resets all path state."""
        actions: list[Action] = []
        if disco_key is not None and disco_key != self.disco_key:
            self.disco_key = disco_key
            actions += self.reset("disco key changed")
        if home_derp is not None:
            self.home_derp = home_derp
        if relay_capable is not None:
            self.relay_capable = relay_capable
        for st in self.candidates.values():
            st.in_netmap = False
        for ep in endpoints:
            st = self.candidates.get(ep)
            if st is None:
                self.candidates[ep] = _Candidate(in_netmap=True)
            else:
                st.in_netmap = True
        for ep in [ep for ep, st in self.candidates.items() if st.should_delete(now)]:
            actions += self._delete_candidate(ep, "netmap")
        return actions

    def reset(self, reason: str = "reset") -> list[Action]:
        """Forget the best path, pings in flight and candidate history (link change, rebind, key change)."""
        actions = self._set_best(None, reason)
        self.trust_until = float("-inf")
        self._sent_pings.clear()
        for st in self.candidates.values():
            st.last_ping = None
            st.pongs.clear()
        self._last_full_ping = None
        self._last_relay_discovery = None
        return actions

    # --- sending ------------------------------------------------------------

    def _derp_region(self) -> int | None:
        return self.home_derp or self.last_derp_region_heard or None

    def is_trusted(self, now: float) -> bool:
        return self.best is not None and now <= self.trust_until

    def addr_for_send(self, now: float) -> SendPlan:
        """Where WireGuard would go right now, without side effects."""
        if self.best is not None and now <= self.trust_until:
            return SendPlan(self.best.path, None)
        return SendPlan(self.best.path if self.best else None, self._derp_region())

    def send_plan(self, now: float) -> SendPlan:
        """Call for each outbound WireGuard send: the destinations plus discovery work.

        Off a trusted direct path this pings due candidates (and asks for a
        CallMeMaybe) and maybe starts relay discovery; it always arms heartbeats.
        """
        plan = self.addr_for_send(now)
        actions: list[Action] = []
        udp = plan.udp
        if udp is None or not udp.is_direct or now > self.trust_until:
            actions += self._send_disco_pings(now, send_call_me_maybe=True)
            if self.want_relay_discovery(now):
                actions += self._discover_relay_paths(now)
        self._last_send_ext = now
        if self._heartbeat_at is None and not self.heartbeat_disabled:
            self._heartbeat_at = now + HEARTBEAT_INTERVAL
        return SendPlan(plan.udp, plan.derp_region, tuple(actions))

    def note_send_error(self, path: UDPPath) -> list[Action]:
        """A send to ``path`` failed as unreachable: drop it as best and forget its history."""
        actions: list[Action] = []
        if self.best is not None and self.best.path == path:
            actions += self._set_best(None, "send error")
            self.trust_until = float("-inf")
        st = self.candidates.get(path.addr) if path.is_direct else None
        if st is not None:
            st.last_ping = None
            st.pongs.clear()
        return actions

    def note_recv_activity(self, path: UDPPath, now: float) -> None:
        """WireGuard arrived over ``path``. With heartbeats off, that alone keeps the path trusted."""
        if self.heartbeat_disabled and self.best is not None and self.best.path == path:
            self.trust_until = now + TRUST_UDP_ADDR_DURATION

    # --- discovery ------------------------------------------------------------

    def _delete_candidate(self, ep: AddrPort, why: str) -> list[Action]:
        del self.candidates[ep]
        self._cmm_endpoints.discard(ep)
        if self.best is not None and self.best.path == UDPPath(ep):
            return self._set_best(None, f"candidate removed ({why})")
        return []

    def _start_ping(self, path: Path, now: float, purpose: PingPurpose, size: int = 0) -> list[Action]:
        if isinstance(path, UDPPath) and path.is_direct and purpose is not PingPurpose.CLI:
            st = self.candidates.get(path.addr)
            if st is None:
                return []  # not a live candidate
            st.last_ping = now
        server = None
        if isinstance(path, UDPPath) and not path.is_direct and self.best is not None and self.best.path == path:
            server = self.best.relay_server_disco  # so a late pong can restore the full path
        tx = disco.new_tx_id()
        self._sent_pings[tx] = _SentPing(path, now, purpose, size, now + PING_TIMEOUT, server)
        return [SendPing(path, disco.Ping(tx, self.my_node_key, size), purpose)]

    def ping(self, path: Path, now: float, size: int = 0) -> list[Action]:
        """A user-requested ("tailscale ping") disco ping on ``path``."""
        return self._start_ping(path, now, PingPurpose.CLI, size)

    def cli_ping(self, now: float, size: int = 0) -> list[Action]:
        """A user-requested ping on every path WireGuard could use now (like ``tailscale ping``).

        A trusted UDP path is pinged alone; otherwise DERP (when a region is known)
        plus the untrusted best path and every candidate, so the answer also
        discovers paths. Each answer comes back as :class:`CliPongReceived`
        from :meth:`handle_pong`; an empty list means there is no path at all.
        """
        plan = self.addr_for_send(now)
        paths: list[Path] = []
        if plan.udp is not None:
            paths.append(plan.udp)
        if plan.derp_region is not None:
            paths.append(DerpPath(plan.derp_region))
            for ep in self.candidates:
                if UDPPath(ep) not in paths:
                    paths.append(UDPPath(ep))
        actions: list[Action] = []
        for path in paths:
            actions += self._start_ping(path, now, PingPurpose.CLI, size)
        return actions

    def _send_disco_pings(self, now: float, send_call_me_maybe: bool) -> list[Action]:
        self._last_full_ping = now
        actions: list[Action] = []
        sent_any = False
        for ep in list(self.candidates):
            st = self.candidates[ep]
            if st.should_delete(now):
                actions += self._delete_candidate(ep, "expired")
                continue
            if st.last_ping is not None and now - st.last_ping < DISCO_PING_INTERVAL:
                continue
            sent_any = True
            actions += self._start_ping(UDPPath(ep), now, PingPurpose.DISCOVERY)
        region = self.home_derp
        if sent_any and send_call_me_maybe and region:
            actions.append(SendCallMeMaybe(region))
        return actions

    def want_full_ping(self, now: float) -> bool:
        """Whether a heartbeat should also ping every candidate."""
        if self.best is None or not self.best.path.is_direct or self._last_full_ping is None:
            return True
        if now > self.trust_until:
            return True
        if self.best.latency <= GOOD_ENOUGH_LATENCY:
            return False
        return now - self._last_full_ping >= UPGRADE_UDP_DIRECT_INTERVAL

    def want_relay_discovery(self, now: float) -> bool:
        """tailscaled's ``wantUDPRelayPathDiscoveryLocked``."""
        if not self.relay_servers_available or not self.relay_capable:
            return False
        if self.best is not None and self.best.path.is_direct and now < self.trust_until:
            return False
        last = self._last_relay_discovery
        if last is not None and now - last < DISCOVER_UDP_RELAY_PATHS_INTERVAL:
            return False
        if now > self.trust_until:
            return True
        return last is not None and now - last >= UPGRADE_UDP_RELAY_INTERVAL

    def _discover_relay_paths(self, now: float) -> list[Action]:
        self._last_relay_discovery = now
        return [StartRelayDiscovery(self.node_key)]

    # --- receiving disco -----------------------------------------------------------

    def handle_ping(self, ping: disco.Ping, src: Path, now: float) -> list[Action]:
        """A ping from this peer arrived over ``src``; returns the pong (if any) to send.

        Relay pings (VNI set) are always answered and add no candidate. A UDP ping
        from a new address adds it as a runtime candidate; a repeat of the last
        TxID from that address is a duplicate and gets no pong.
        """
        if isinstance(src, DerpPath):
            self.last_derp_region_heard = src.region
            return [SendPong(src, disco.Pong(ping.tx_id, src.as_addrport))]
        if src.is_direct and self._add_candidate(src.addr, ping.tx_id, now):
            return []
        return [SendPong(src, disco.Pong(ping.tx_id, src.addr))]

    def _add_candidate(self, ep: AddrPort, tx_id: bytes, now: float) -> bool:
        """Record a ping's source as a candidate; returns True for a duplicate ping."""
        st = self.candidates.get(ep)
        if st is not None:
            dup = tx_id == st.last_got_ping_tx
            if not dup:
                st.last_got_ping_tx = tx_id
            if st.last_got_ping is not None:
                st.last_got_ping = now
            return dup
        self.candidates[ep] = _Candidate(last_got_ping=now, last_got_ping_tx=tx_id)
        if len(self.candidates) > MAX_CANDIDATES_BEFORE_PRUNE:
            for old in [e for e, s in self.candidates.items() if s.should_delete(now)]:
                self._delete_candidate(old, "prune")
        return False

    def handle_pong(self, pong: disco.Pong, src: Path, now: float) -> list[Action]:
        """A pong arrived over ``src``. Unknown TxIDs are ignored (returns [])."""
        sp = self._sent_pings.pop(pong.tx_id, None)
        if sp is None:
            return []
        latency = now - sp.at
        actions: list[Action] = []
        if sp.purpose is PingPurpose.CLI:
            actions.append(CliPongReceived(pong.tx_id, sp.to, latency, pong.src))
        if isinstance(src, DerpPath):
            return actions  # DERP pongs never pick a UDP path
        if not isinstance(sp.to, UDPPath):
            return actions
        if sp.to.is_direct:
            st = self.candidates.get(sp.to.addr)
            if st is None:
                return actions  # candidate removed since we pinged it
            if src.is_direct:
                st.pongs.append(_Pong(latency, now, src.addr, pong.src))
        if not sp.to.is_direct and sp.relay_server_disco is None:
            return actions  # a relay path we never installed (e.g. a CLI ping): nothing to rank
        this = AddrQuality(sp.to, latency, _wire_mtu(sp.size, sp.to), sp.relay_server_disco)
        if better_addr(this, self.best):
            actions += self._set_best(this, "pong")
        if self.best is not None and self.best.path == this.path:
            self.best = replace(self.best, latency=latency)
            self.best_at = now
            self.trust_until = now + TRUST_UDP_ADDR_DURATION
        return actions

    def handle_call_me_maybe(self, cmm: disco.CallMeMaybe, now: float) -> list[Action]:
        """The peer (over DERP) listed its endpoints: replace the CMM set and ping them all now."""
        new = set()
        for ep in cmm.endpoints:
            if ep.ip.version == 6 and ep.ip.is_link_local:
                continue
            new.add(ep)
            st = self.candidates.get(ep)
            if st is None:
                self.candidates[ep] = _Candidate(call_me_maybe_at=now)
            else:
                st.call_me_maybe_at = now
        actions: list[Action] = []
        for ep in self._cmm_endpoints - new:
            if ep in self.candidates:
                actions += self._delete_candidate(ep, "call-me-maybe")
        self._cmm_endpoints = new
        for st in self.candidates.values():
            st.last_ping = None
        actions += self._send_disco_pings(now, send_call_me_maybe=False)
        if self.want_relay_discovery(now):
            actions += self._discover_relay_paths(now)
        return actions

    def handle_relay_path_ready(
        self, path: UDPPath, server_disco: DiscoPublic, latency: float, now: float, wire_mtu: int = SAFE_WIRE_MTU
    ) -> list[Action]:
        """A relay handshake proved ``path`` (tailscaled's ``udpRelayEndpointReady``)."""
        if path.vni is None:
            raise ValueError("a relay path needs a VNI")
        cand = AddrQuality(path, latency, wire_mtu, server_disco)
        same_server = (
            self.best is not None and not self.best.path.is_direct and self.best.relay_server_disco == server_disco
        )
        if not self.is_trusted(now) or same_server or better_addr(cand, self.best):
            actions = self._set_best(cand, "relay path ready")
            self.best_at = now
            self.trust_until = now + TRUST_UDP_ADDR_DURATION
            return actions
        return []

    def relay_server_gone(self, ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], now: float) -> list[Action]:
        """Control says the node behind a relay server at one of ``ips`` went offline or left the tailnet.

        A relay best path through it is dropped at once (WireGuard goes back to DERP), instead
        of waiting for trust to lapse and a heartbeat ping to time out: 5 to 8 s in which a
        trusted path to a dead relay would swallow everything. Rediscovery finds it again
        once it is back.
        """
        best = self.best
        if best is None or best.path.is_direct or best.path.addr.ip not in set(ips):
            return []
        self.trust_until = float("-inf")
        return self._set_best(None, "relay server offline")

    def relay_servers_changed(self) -> None:
        """A relay server appeared or came back online: the next heartbeat or send may discover relay
        paths again without waiting out the 30 s discovery interval."""
        self._last_relay_discovery = None

    def _set_best(self, new: AddrQuality | None, reason: str) -> list[Action]:
        old = self.best
        self.best = new
        if new is None:
            self.best_at = None
        if (old.path if old else None) == (new.path if new else None):
            return []
        return [BestPathChanged(old, new, reason)]

    # --- timers ---------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` has work (heartbeat or ping timeout), or None."""
        times = [sp.timeout_at for sp in self._sent_pings.values()]
        if self._heartbeat_at is not None:
            times.append(self._heartbeat_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for tx, sp in list(self._sent_pings.items()):
            if sp.timeout_at <= now:
                actions += self._ping_timed_out(tx, sp, now)
        if self._heartbeat_at is not None and self._heartbeat_at <= now:
            self._heartbeat_at = None
            actions += self._heartbeat(now)
        return actions

    def _ping_timed_out(self, tx: bytes, sp: _SentPing, now: float) -> list[Action]:
        del self._sent_pings[tx]
        # 1.96.4: only an already-untrusted *relay* best path is dropped on timeout;
        # a silent direct path just stays untrusted (used together with DERP).
        if (
            self.best is not None
            and sp.to == self.best.path
            and isinstance(sp.to, UDPPath)
            and not sp.to.is_direct
            and now > self.trust_until
        ):
            return self._set_best(None, "relay ping timeout")
        return []

    def _heartbeat(self, now: float) -> list[Action]:
        if self.heartbeat_disabled or self._last_send_ext is None:
            return []
        if now - self._last_send_ext > SESSION_ACTIVE_TIMEOUT:
            return []  # idle session: heartbeats stop until the next send
        actions: list[Action] = []
        plan = self.addr_for_send(now)
        if plan.udp is not None:
            actions += self._start_ping(plan.udp, now, PingPurpose.HEARTBEAT)
        if self.want_full_ping(now):
            actions += self._send_disco_pings(now, send_call_me_maybe=True)
        if self.want_relay_discovery(now):
            actions += self._discover_relay_paths(now)
        self._heartbeat_at = now + HEARTBEAT_INTERVAL
        return actions

    # --- introspection --------------------------------------------------------------

    def candidate_latency(self, ep: AddrPort) -> float | None:
        st = self.candidates.get(ep)
        return st.latency() if st else None

    @property
    def pings_in_flight(self) -> int:
        return len(self._sent_pings)
