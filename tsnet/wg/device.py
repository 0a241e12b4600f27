"""The sans-IO WireGuard device: many peers, one static key, no sockets, no clocks.

The driver feeds datagrams in (``receive_datagram``), inner packets in
(``send_packet``), and the current time in everywhere (``now``, seconds on any
monotonic clock, e.g. ``trio.current_time()``). It takes datagrams out
(``datagrams_to_send``), events out (``next_event`` / ``drain_events``) and
sleeps until ``get_timer()``, then calls ``handle_timer(now)``.

Addresses (``Addr``) are opaque hashable values — normally the ``(host, port)``
tuple that ``recvfrom`` returned — handed back unchanged as destinations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable

from tsnet.key import NodePrivate, NodePublic
from tsnet.wg.events import Event
from tsnet.wg.limits import Limits
from tsnet.wg.stats import Counters, PeerStatus

__all__ = ["Addr", "Counters", "PeerStatus", "WireGuard"]

#: A datagram source/destination; any hashable value, treated as opaque.
Addr = Hashable


class WireGuard:
    """One WireGuard interface (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s) as a sans-IO state machine.

    Nothing in the receive path raises: forged, replayed, stale or malformed
    datagrams are dropped and counted in ``self.counters``.

    Args:
        private_key: our static (node) key.
        now: the current time on the driver's monotonic clock.
        limits: protocol limits and timers; defaults are wireguard-go's.
        rng: source of randomness (ephemeral keys, indices, jitter, cookie secret);
            inject a deterministic one in tests.
        wall_clock: UNIX time source used only for the TAI64N timestamp inside
            initiations (it must increase across restarts of a node key).
        roaming: when True (plain WireGuard), a peer's endpoint follows the
            source address of its latest authenticated datagram. Tailscale's
            magicsock turns this off and picks paths itself.
    """

    counters: Counters
    limits: Limits

    def __init__(
        self,
        private_key: NodePrivate,
        *,
        now: float,
        limits: Limits | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        roaming: bool = True,
    ) -> None:
        raise NotImplementedError

    @property
    def public_key(self) -> NodePublic:
        """Our static public key."""
        raise NotImplementedError

    # -- configuration -------------------------------------------------------

    def add_peer(
        self,
        public_key: NodePublic,
        *,
        endpoint: Addr | None = None,
        preshared_key: bytes | None = None,
        persistent_keepalive: float | None = None,
    ) -> None:
        """Add a peer, or update endpoint/PSK/keepalive of an existing one (sessions are kept).

        ``preshared_key`` is 32 bytes (None = 32 zero bytes, as Tailscale uses).
        ``persistent_keepalive`` is an interval in seconds (None or 0 = off).
        Raises ValueError for our own key or a PSK of the wrong length.
        """
        raise NotImplementedError

    def remove_peer(self, public_key: NodePublic) -> None:
        """Forget a peer: its sessions, handshake, staged packets and timers. Unknown keys are ignored."""
        raise NotImplementedError

    def set_endpoint(self, public_key: NodePublic, endpoint: Addr | None) -> None:
        """Set where datagrams for this peer go. Raises KeyError for an unknown peer."""
        raise NotImplementedError

    def peers(self) -> list[NodePublic]:
        """Public keys of all configured peers."""
        raise NotImplementedError

    def peer_status(self, public_key: NodePublic) -> PeerStatus:
        """A snapshot of one peer (endpoint, last handshake, byte counters). Raises KeyError if unknown."""
        raise NotImplementedError

    def set_under_load(self, under_load: bool | None) -> None:
        """Force the cookie/under-load mode on (True) or off (False); None returns to automatic.

        Automatic: under load while at least ``limits.under_load_handshakes_per_second``
        handshake messages arrived within a second, and ``limits.under_load_duration`` after.
        Under load, handshake messages without a valid mac2 get a cookie reply and are dropped.
        """
        raise NotImplementedError

    def is_under_load(self, now: float) -> bool:
        """Whether handshake messages currently need a valid mac2."""
        raise NotImplementedError

    # -- datagrams in --------------------------------------------------------

    def receive_datagram(self, data: bytes | bytearray | memoryview, addr: Addr, now: float) -> None:
        """Process one UDP payload that arrived from ``addr``. Never raises.

        Handshake messages may queue responses (``datagrams_to_send``) and
        ``HandshakeCompleted`` events; transport data yields ``PacketReceived``
        events (keepalives yield nothing). Anything invalid is counted and dropped.
        """
        raise NotImplementedError

    # -- packets out ---------------------------------------------------------

    def send_packet(self, public_key: NodePublic, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Encrypt one inner IP packet for a peer, or stage it and start a handshake.

        Encrypted datagrams appear in ``datagrams_to_send``. Without a usable
        session the packet is staged (at most ``limits.max_staged_packets``,
        the oldest dropped) and sent once a handshake completes. A packet for
        an unknown peer is dropped and counted (``counters.send_unknown_peer``).
        """
        raise NotImplementedError

    def send_keepalive(self, public_key: NodePublic, now: float) -> None:
        """Send an empty transport message (starting a handshake first if needed)."""
        raise NotImplementedError

    def initiate_handshake(self, public_key: NodePublic, now: float) -> None:
        """Start a handshake with a peer now, unless one was sent less than REKEY_TIMEOUT ago."""
        raise NotImplementedError

    def datagrams_to_send(self, now: float) -> list[tuple[bytes | bytearray, Addr]]:
        """Take all pending outgoing datagrams as ``(payload, destination)`` pairs.

        Payloads may be ``bytearray`` (bytes-like, ready for ``sendto``).
        Datagrams for peers without an endpoint are dropped and counted
        (``counters.no_endpoint``) when they are produced.
        """
        raise NotImplementedError

    # -- events and timers ---------------------------------------------------

    def next_event(self) -> Event | None:
        """The oldest pending event, or None."""
        raise NotImplementedError

    def drain_events(self) -> list[Event]:
        """All pending events, oldest first (cheaper than calling next_event in a loop)."""
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called (absolute, same clock as ``now``), or None.

        It may return a time at which nothing turns out to be due; calling
        ``handle_timer`` then is harmless.
        """
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``: retransmissions, keepalives, rekeys, key erasure, cookie rotation."""
        raise NotImplementedError
