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
import struct
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tsnet.key import NodePrivate, NodePublic, clamp
from tsnet.wg.cookie import CookieChecker
from tsnet.wg.events import Event, HandshakeCompleted, HandshakeFailed, PeerEndpointChanged, packet_received
from tsnet.wg.limits import Limits
from tsnet.wg.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    KEEPALIVE_SIZE,
    NONCE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TYPE_COOKIE_REPLY,
    TYPE_INITIATION,
    TYPE_RESPONSE,
    TYPE_TRANSPORT,
)
from tsnet.wg.noise import (
    HandshakeError,
    UnknownPeerError,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_transport_keys,
    dh,
    tai64n,
)
from tsnet.wg.ratelimit import LoadMonitor, RateLimiter
from tsnet.wg.session import Keypair, Peer
from tsnet.wg.stats import Counters, PeerStatus
from tsnet.wg.timers import TimerQueue

__all__ = ["Addr", "Counters", "PeerStatus", "WireGuard"]

#: A datagram source/destination; any hashable value, treated as opaque.
Addr = Hashable

_U32 = struct.Struct("<I")
_HEADER_U32X3 = struct.Struct("<III")
_BE16 = struct.Struct(">H")
_TAI64N = struct.Struct(">QI")
_unpack_header = TRANSPORT_HEADER.unpack_from
_pack_nonce = NONCE.pack
_NONCE_PREFIX = bytes(4)


def _ip_length(packet: bytes, n: int) -> int:
    """Length claimed by the IPv4/IPv6 header of ``packet`` (``n`` bytes), or -1 if it is not well-formed."""
    version = packet[0] >> 4
    if version == 4:
        if n < 20:
            return -1
        length = _BE16.unpack_from(packet, 2)[0]
        return length if 20 <= length <= n else -1
    if version == 6:
        if n < 40:
            return -1
        length = _BE16.unpack_from(packet, 4)[0] + 40
        return length if length <= n else -1
    return -1


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
        packet_events: when True, each decrypted packet is a ``PacketReceived``
            event; when False (faster: no object per packet), packets are
            collected as ``(peer, packet)`` tuples for ``packets_received()``.
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
        packet_events: bool = True,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        self.counters = Counters()
        self._rng = rng
        self._wall_clock = wall_clock
        self._roaming = roaming
        self._packet_events = packet_events
        self._received: list[tuple[NodePublic, bytes]] = []
        self._mtu = self.limits.mtu
        self._keepalive_timeout = self.limits.keepalive_timeout
        self._private = private_key
        self._static = X25519PrivateKey.from_private_bytes(private_key.raw)
        self._public = private_key.public
        self._public_raw = self._public.raw
        self._cookie_checker = CookieChecker(self._public_raw, rng=rng, refresh_time=self.limits.cookie_refresh_time)

        self._peers: dict[NodePublic, Peer] = {}
        self._peers_by_raw: dict[bytes, Peer] = {}
        # The index table: our local indices -> session, or -> peer with an initiation in flight.
        self._keypairs: dict[int, Keypair] = {}
        self._handshakes: dict[int, Peer] = {}

        self._outgoing: list[tuple[bytes | bytearray, Addr]] = []
        self._events: deque[Event] = deque()
        self._timers = TimerQueue()

        self._load = LoadMonitor(
            threshold=self.limits.under_load_handshakes_per_second, hold=self.limits.under_load_duration, now=now
        )
        self._rate_limiter = RateLimiter(rate=self.limits.handshake_rate_per_second, burst=self.limits.handshake_rate_burst)
        self._wall_floor = b""  # highest TAI64N label the wall clock has given (never bumped)

    @property
    def public_key(self) -> NodePublic:
        """Our static public key."""
        return self._public

    # -- configuration -------------------------------------------------------

    def add_peer(
        self,
        public_key: NodePublic,
        *,
        endpoint: Addr | None = None,
        preshared_key: bytes | None = None,
        persistent_keepalive: float | None = None,
    ) -> None:
        """Add a peer, or update an existing one (its sessions are kept).

        ``preshared_key`` is 32 bytes (Tailscale uses none: 32 zero bytes).
        ``persistent_keepalive`` is an interval in seconds (0 = off).
        For a new peer, None means: no endpoint yet, zero PSK, keepalive off.
        For an existing peer, None leaves that setting as it is.
        Raises ValueError for our own key, a PSK of the wrong length, or a negative interval.
        """
        if public_key == self._public:
            raise ValueError("cannot add our own public key as a peer")
        if preshared_key is not None and len(preshared_key) != 32:
            raise ValueError(f"preshared key must be 32 bytes, got {len(preshared_key)}")
        if persistent_keepalive is not None and persistent_keepalive < 0:
            raise ValueError("persistent_keepalive must be >= 0")
        peer = self._peers.get(public_key)
        if peer is not None:
            if endpoint is not None:
                peer.endpoint = endpoint
            if preshared_key is not None:
                peer.preshared_key = bytes(preshared_key)
            if persistent_keepalive is not None:
                peer.persistent_keepalive = persistent_keepalive or None
                if peer.persistent_keepalive is None:
                    peer.timer_persistent_keepalive = None
            return
        psk = bytes(32) if preshared_key is None else bytes(preshared_key)
        try:
            ss: bytes | None = dh(self._static, public_key.raw)
        except HandshakeError:
            ss = None  # low-order point: keep the peer, but no handshake can ever succeed
        peer = Peer(
            public_key,
            static_static=ss,
            preshared_key=psk,
            endpoint=endpoint,
            persistent_keepalive=persistent_keepalive,
            cookie_refresh_time=self.limits.cookie_refresh_time,
        )
        self._peers[public_key] = peer
        self._peers_by_raw[public_key.raw] = peer

    def remove_peer(self, public_key: NodePublic) -> None:
        """Forget a peer: its sessions, handshake, staged packets and timers. Unknown keys are ignored."""
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        del self._peers_by_raw[peer.raw]
        self._zero_key_material(peer)
        peer.staged.clear()
        peer.removed = True  # its heap entries are skipped from now on

    def set_endpoint(self, public_key: NodePublic, endpoint: Addr | None) -> None:
        """Set where datagrams for this peer go. Raises KeyError for an unknown peer."""
        self._peers[public_key].endpoint = endpoint

    def peers(self) -> list[NodePublic]:
        """Public keys of all configured peers."""
        return list(self._peers)

    def peer_status(self, public_key: NodePublic, now: float | None = None) -> PeerStatus:
        """A snapshot of one peer (endpoint, last handshake, byte counters). Raises KeyError if unknown.

        With ``now``, ``has_session`` also accounts for the session's age.
        """
        peer = self._peers[public_key]
        kp = peer.current
        return PeerStatus(
            public_key=peer.public_key,
            endpoint=peer.endpoint,
            last_handshake=peer.last_handshake,
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            has_session=self._usable(kp, float("-inf") if now is None else now),
            persistent_keepalive=peer.persistent_keepalive,
            staged_packets=len(peer.staged),
        )

    def set_under_load(self, under_load: bool | None) -> None:
        """Force the cookie/under-load mode on (True) or off (False); None returns to automatic.

        Automatic: under load while at least ``limits.under_load_handshakes_per_second``
        handshake messages arrived within a second, and ``limits.under_load_duration`` after.
        Under load, handshake messages without a valid mac2 get a cookie reply and are dropped.
        """
        self._load.forced = under_load

    def is_under_load(self, now: float) -> bool:
        """Whether handshake messages currently need a valid mac2."""
        return self._load.under_load(now)

    # -- datagrams in --------------------------------------------------------

    def receive_datagram(self, data: bytes | bytearray | memoryview, addr: Addr, now: float) -> None:
        """Process one UDP payload that arrived from ``addr``. Never raises.

        Handshake messages may queue responses (``datagrams_to_send``) and
        ``HandshakeCompleted`` events; transport data yields ``PacketReceived``
        events, or entries in ``packets_received()`` when the device was made
        with ``packet_events=False`` (keepalives yield nothing). Anything
        invalid is counted and dropped. ``data`` is not retained, so a
        buffer reused for ``recv_into`` is fine.
        """
        try:
            if len(data) >= KEEPALIVE_SIZE:
                msg_type, receiver, counter = _unpack_header(data)
                if msg_type == TYPE_TRANSPORT:
                    # The hot path, kept inline: index lookup, age, AEAD, replay, IP length.
                    kp = self._keypairs.get(receiver)
                    if kp is None:
                        self.counters.drop_unknown_index += 1
                        return
                    if now >= kp.expires:
                        self.counters.drop_expired_keypair += 1
                        return
                    try:
                        plaintext = kp.open(_pack_nonce(counter), data[16:], None)
                    except InvalidTag:
                        self.counters.drop_data_invalid += 1
                        return
                    # Only now, authenticated, may the counter move the replay window.
                    replay = kp.replay
                    last = replay.last
                    if last < counter < replay.limit and counter >> 6 == last >> 6:
                        # Inlined common case of ReplayWindow.check: next counter in the same block.
                        replay.last = counter
                        replay.blocks[(counter >> 6) & 127] |= 1 << (counter & 63)
                    elif not replay.check(counter):
                        self.counters.drop_replayed += 1
                        return
                    peer = kp.peer
                    if peer.next is kp:
                        self._confirm_next(peer, now)
                    n = len(plaintext)
                    if n:
                        if plaintext[0] == 0x45 and n >= 20:
                            # Inlined common case of _ip_length: IPv4 without options.
                            length = _BE16.unpack_from(plaintext, 2)[0]
                            if length > n or length < 20:
                                length = -1
                        else:
                            length = _ip_length(plaintext, n)
                        if length < 0:
                            self.counters.drop_bad_inner_packet += 1
                            # Still authenticated: it counts for liveness, like wireguard-go.
                            self._transport_received(peer, addr, len(data), 0, now)
                            return
                        if length != n:
                            plaintext = plaintext[:length]  # strip the padding
                        if self._packet_events:
                            self._events.append(packet_received(peer.public_key, plaintext))
                        else:
                            self._received.append((peer.public_key, plaintext))
                        self._transport_received(peer, addr, len(data), 1, now)
                    else:
                        self.counters.keepalives_received += 1
                        self._transport_received(peer, addr, len(data), 0, now)
                    return
            elif len(data) < 4:
                self.counters.drop_malformed += 1
                return
            else:
                msg_type = _U32.unpack_from(data)[0]
            size = len(data)
            if msg_type == TYPE_INITIATION and size == INITIATION_SIZE:
                self._receive_initiation(data, addr, now)
            elif msg_type == TYPE_RESPONSE and size == RESPONSE_SIZE:
                self._receive_response(data, addr, now)
            elif msg_type == TYPE_COOKIE_REPLY and size == COOKIE_REPLY_SIZE:
                self._receive_cookie_reply(data, now)
            else:
                self.counters.drop_malformed += 1
        except Exception:  # the safety net: a bug must not take the node down with it
            self.counters.drop_internal_error += 1

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes | bytearray | memoryview, Addr]], now: float) -> None:
        """``receive_datagram`` for a batch of ``(payload, source)`` pairs, e.g. one socket drain. Never raises.

        Cheaper per packet than single calls: transport data in a run of
        consecutive datagrams from one peer shares its timer/roaming bookkeeping.
        """
        get_keypair = self._keypairs.get
        counters = self.counters
        events = self._packet_events
        deliver = self._events.append if events else self._received.append
        unpack_header, pack_nonce, unpack_be16 = _unpack_header, _pack_nonce, _BE16.unpack_from  # locals: faster
        run_peer: Peer | None = None  # peer of the current run of transport datagrams
        run_addr: Addr = None
        run_bytes = run_data = 0
        for data, addr in datagrams:
            try:
                size = len(data)
                if size >= KEEPALIVE_SIZE:
                    msg_type, receiver, counter = unpack_header(data)
                    kp = get_keypair(receiver) if msg_type == TYPE_TRANSPORT else None
                    # Unknown, expired or unconfirmed sessions take the general path below.
                    if kp is not None and now < kp.expires and kp.peer.next is not kp:
                        try:
                            plaintext = kp.open(pack_nonce(counter), data[16:], None)
                        except InvalidTag:
                            counters.drop_data_invalid += 1
                            continue
                        replay = kp.replay
                        last = replay.last
                        if last < counter < replay.limit and counter >> 6 == last >> 6:
                            # Inlined common case of ReplayWindow.check: next counter in the same block.
                            replay.last = counter
                            replay.blocks[(counter >> 6) & 127] |= 1 << (counter & 63)
                        elif not replay.check(counter):
                            counters.drop_replayed += 1
                            continue
                        peer = kp.peer
                        if peer is not run_peer:
                            if run_peer is not None:
                                self._transport_received(run_peer, run_addr, run_bytes, run_data, now)
                            run_peer = peer
                            run_bytes = run_data = 0
                        run_addr = addr
                        run_bytes += size
                        n = len(plaintext)
                        if not n:
                            counters.keepalives_received += 1
                            continue
                        if plaintext[0] == 0x45 and n >= 20:
                            # Inlined common case of _ip_length: IPv4 without options.
                            length = unpack_be16(plaintext, 2)[0]
                            if length > n or length < 20:
                                length = -1
                        else:
                            length = _ip_length(plaintext, n)
                        if length < 0:
                            counters.drop_bad_inner_packet += 1
                            continue
                        if length != n:
                            plaintext = plaintext[:length]
                        run_data += 1
                        if events:
                            deliver(packet_received(peer.public_key, plaintext))
                        else:
                            deliver((peer.public_key, plaintext))
                        continue
                # Anything else: close the run first so that bookkeeping stays in order.
                if run_peer is not None:
                    self._transport_received(run_peer, run_addr, run_bytes, run_data, now)
                    run_peer = None
                self.receive_datagram(data, addr, now)
            except Exception:  # the safety net, as in receive_datagram
                counters.drop_internal_error += 1
        if run_peer is not None:
            try:
                self._transport_received(run_peer, run_addr, run_bytes, run_data, now)
            except Exception:
                counters.drop_internal_error += 1

    def _transport_received(self, peer: Peer, addr: Addr, size: int, data_packets: int, now: float) -> None:
        """Bookkeeping after authenticated transport datagrams (``data_packets`` of them non-empty)."""
        peer.rx_bytes += size
        if self._roaming and addr != peer.endpoint:
            self._roam(peer, addr)
        # Any authenticated packet received: the peer is alive.
        peer.timer_new_handshake = None
        if peer.persistent_keepalive is not None:
            self._arm_persistent_keepalive(peer, now)
        cur = peer.current
        if cur is not None and now > cur.last_minute_at and not peer.want_last_minute_handshake:
            # Our session is about to expire and we initiated it: one last-minute rekey.
            peer.want_last_minute_handshake = True
            self._initiate(peer, now, retry=False)
        if data_packets:
            self.counters.data_received += data_packets
            # Data received: we owe the peer a keepalive unless we answer first.
            if peer.timer_passive_keepalive is None:
                peer.timer_passive_keepalive = t = now + self._keepalive_timeout
                self._schedule(peer, t)
            else:
                peer.keepalive_again = True

    def packets_received(self) -> list[tuple[NodePublic, bytes]]:
        """Take the decrypted inner packets as ``(peer, packet)`` pairs (only with ``packet_events=False``)."""
        out = self._received
        self._received = []
        return out

    def _handshake_allowed(self, data: bytes | bytearray | memoryview, addr: Addr, now: float) -> bool:
        """mac1, load accounting, and under load mac2 (else cookie reply) plus the per-source rate limit."""
        self._load.note_handshake(now)
        if not self._cookie_checker.check_mac1(data):
            self.counters.drop_bad_mac1 += 1
            return False
        if not self.is_under_load(now):
            return True
        source = repr(addr).encode()
        if not self._cookie_checker.check_mac2(data, source, now):
            sender = _U32.unpack_from(data, 4)[0]
            self._outgoing.append((self._cookie_checker.make_reply(data, sender, source, now), addr))
            self.counters.cookie_replies_sent += 1
            self.counters.drop_needs_cookie += 1
            return False
        if not self._rate_limiter.allow(addr, now):
            self.counters.drop_rate_limited += 1
            return False
        return True

    def _receive_initiation(self, data: bytes | bytearray | memoryview, addr: Addr, now: float) -> None:
        if not self._handshake_allowed(data, addr, now):
            return
        try:
            init = consume_initiation(
                data, static=self._static, static_public=self._public_raw, static_static=self._static_static_for
            )
        except UnknownPeerError:
            self.counters.drop_unknown_peer += 1
            return
        except HandshakeError:
            self.counters.drop_handshake_invalid += 1
            return
        peer = self._peers_by_raw[init.remote_static]
        if init.timestamp <= peer.greatest_timestamp:
            self.counters.drop_replayed_initiation += 1
            return
        last = peer.last_initiation_consumed
        if last is not None and now - last <= self.limits.handshake_initiation_min_interval:
            self.counters.drop_initiation_flood += 1
            return
        peer.greatest_timestamp = init.timestamp
        peer.last_initiation_consumed = now
        self.counters.initiations_received += 1
        self._authenticated_handshake_from(peer, addr, len(data), now)

        local_index = self._new_index()
        try:
            msg, chaining_key = create_response(
                init, ephemeral=self._new_ephemeral(), sender_index=local_index, preshared_key=peer.preshared_key
            )
        except HandshakeError:
            self.counters.drop_handshake_invalid += 1
            return
        peer.cookies.add_macs(msg, now)
        receive_key, send_key = derive_transport_keys(chaining_key)
        kp = self._new_keypair(peer, send_key, receive_key, local_index, init.sender_index, False, now)
        # Responder: the new session waits as "next" until the initiator's first transport message.
        self._drop_keypair(peer.next)
        self._drop_keypair(peer.previous)
        peer.previous = None
        peer.next = kp
        peer.last_handshake_sent = now
        self._session_derived(peer, now)
        self.counters.responses_sent += 1
        self._send_authenticated(peer, msg, now, fallback=addr)

    def _static_static_for(self, remote_static: bytes) -> bytes | None:
        peer = self._peers_by_raw.get(remote_static)
        return None if peer is None else peer.static_static

    def _receive_response(self, data: bytes | bytearray | memoryview, addr: Addr, now: float) -> None:
        if not self._handshake_allowed(data, addr, now):
            return
        _type, sender, receiver = _HEADER_U32X3.unpack_from(data)
        peer = self._handshakes.get(receiver)
        if peer is None or peer.handshake is None:
            self.counters.drop_unknown_index += 1
            return
        try:
            chaining_key = consume_response(
                peer.handshake, data, static=self._static, preshared_key=peer.preshared_key
            )
        except HandshakeError:
            self.counters.drop_handshake_invalid += 1
            return
        del self._handshakes[receiver]
        peer.handshake = None
        send_key, receive_key = derive_transport_keys(chaining_key)
        kp = self._new_keypair(peer, send_key, receive_key, receiver, sender, True, now)
        # Initiator: the new session is confirmed at once and becomes current.
        if peer.next is not None:
            self._drop_keypair(peer.previous)
            self._drop_keypair(peer.current)
            peer.previous = peer.next
            peer.next = None
        else:
            self._drop_keypair(peer.previous)
            peer.previous = peer.current
        peer.current = kp
        self.counters.responses_received += 1
        self._authenticated_handshake_from(peer, addr, len(data), now)
        self._session_derived(peer, now)
        self._handshake_complete(peer, now, initiator=True)
        # The responder cannot send before it hears from us under the new keys: send now.
        if not peer.staged:
            peer.staged.append(b"")
        self._flush_staged(peer, now)

    def _receive_cookie_reply(self, data: bytes | bytearray | memoryview, now: float) -> None:
        receiver = _U32.unpack_from(data, 4)[0]
        peer = self._handshakes.get(receiver)
        if peer is None:
            kp = self._keypairs.get(receiver)
            peer = kp.peer if kp is not None else None
        if peer is None:
            self.counters.drop_unknown_index += 1
            return
        if not peer.cookies.consume_reply(data, now):
            self.counters.drop_cookie_invalid += 1
            return
        # Like wireguard-go, do not resend now: the next retransmission carries mac2.
        self.counters.cookie_replies_received += 1

    # -- packets out ---------------------------------------------------------

    def send_packet(self, public_key: NodePublic, packet: bytes | bytearray | memoryview, now: float) -> None:
        """Encrypt one inner IP packet for a peer, or stage it and start a handshake.

        Encrypted datagrams appear in ``datagrams_to_send``. Without a usable
        session the packet is staged (at most ``limits.max_staged_packets``,
        the oldest dropped) and sent once a handshake completes. A packet for
        an unknown peer is dropped and counted (``counters.send_unknown_peer``).
        The packet is not retained after the call (staging copies it).
        """
        peer = self._peers_by_raw.get(public_key.raw)
        if peer is None:
            self.counters.send_unknown_peer += 1
            return
        kp = peer.current
        if kp is None or peer.staged or now >= kp.expires or kp.send_counter >= kp.send_limit:
            self._stage(peer, bytes(packet))
            self._flush_staged(peer, now)
            return
        # The per-packet hot path, inlined: the single-packet twin of _seal_many.
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(packet)
        if n & 15 and n < self._mtu:
            # Zero-pad to a multiple of 16, but never beyond the MTU.
            pad = min(-n & 15, self._mtu - n)
            packet = bytes(packet) + bytes(pad)
            n += pad
        # The counter is both the header field and the nonce; encode it once.
        counter_bytes = counter.to_bytes(8, "little")
        endpoint = peer.endpoint
        if endpoint is not None:
            self._outgoing.append(
                (kp.header + counter_bytes + kp.seal(_NONCE_PREFIX + counter_bytes, packet, None), endpoint)
            )
        else:
            self.counters.drop_no_endpoint += 1
        peer.tx_bytes += n + 32
        # Any authenticated packet sent: no passive keepalive owed any more.
        peer.timer_passive_keepalive = None
        if peer.persistent_keepalive is not None:
            self._arm_persistent_keepalive(peer, now)
        if n:
            self.counters.data_sent += 1
            if peer.timer_new_handshake is None:
                # Data sent: expect to hear back within KEEPALIVE + REKEY_TIMEOUT, else rehandshake.
                peer.timer_new_handshake = t = now + self.limits.new_handshake_after + self._jitter()
                self._schedule(peer, t)
        else:
            self.counters.keepalives_sent += 1
        # Keep the key fresh: rekey well before the hard limits.
        if counter >= kp.rekey_after or now > kp.rekey_at:
            self._initiate(peer, now, retry=False)

    def send_packets(self, public_key: NodePublic, packets: Iterable[bytes | bytearray | memoryview], now: float) -> None:
        """``send_packet`` for several packets to one peer, in order; cheaper per packet for batches."""
        peer = self._peers_by_raw.get(public_key.raw)
        if peer is None:
            self.counters.send_unknown_peer += len(packets) if isinstance(packets, list | tuple) else 1
            return
        kp = peer.current
        if kp is None or peer.staged or now >= kp.expires:
            for packet in packets:
                self._stage(peer, bytes(packet))
            self._flush_staged(peer, now)
            return
        rest = self._seal_many(peer, kp, packets, now)
        if rest:  # the session ran out of counters mid-batch
            for packet in rest:
                self._stage(peer, bytes(packet))
            self._flush_staged(peer, now)

    def send_keepalive(self, public_key: NodePublic, now: float) -> None:
        """Send an empty transport message (starting a handshake first if needed)."""
        peer = self._peers.get(public_key)
        if peer is None:
            self.counters.send_unknown_peer += 1
            return
        self._send_keepalive(peer, now)

    def initiate_handshake(self, public_key: NodePublic, now: float) -> None:
        """Start a handshake with a peer now, unless one was sent less than REKEY_TIMEOUT ago.

        Raises KeyError for an unknown peer.
        """
        self._initiate(self._peers[public_key], now, retry=False)

    def handshake_pending(self, public_key: NodePublic, now: float) -> bool:
        """Whether our initiation to this peer is unanswered and no usable session exists.

        Raises KeyError for an unknown peer.
        """
        peer = self._peers[public_key]
        return peer.handshake is not None and peer.next is None and not self._usable(peer.current, now)

    def retry_handshake_now(self, public_key: NodePublic, now: float, *, unanswered_for: float = 0.0) -> bool:
        """Re-send a pending handshake at once, skipping the REKEY_TIMEOUT wait.

        For callers with fresh evidence that the peer can now answer (e.g. it just
        learned our key). Does nothing and returns False unless
        :meth:`handshake_pending` and the last initiation went out at least
        ``unanswered_for`` seconds ago (which also bounds how often this sends).
        Raises KeyError for an unknown peer.
        """
        if not self.handshake_pending(public_key, now):
            return False
        peer = self._peers[public_key]
        last = peer.last_handshake_sent
        if last is not None and now - last < unanswered_for:
            return False
        peer.last_handshake_sent = None
        self._initiate(peer, now, retry=True)
        return True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes | bytearray, Addr]]:
        """Take all pending outgoing datagrams as ``(payload, destination)`` pairs.

        Payloads may be ``bytearray`` (bytes-like, ready for ``sendto``).
        Datagrams for peers without an endpoint are dropped and counted
        (``counters.drop_no_endpoint``) when they are produced.
        """
        out = self._outgoing
        self._outgoing = []
        return out

    def _stage(self, peer: Peer, packet: bytes) -> None:
        staged = peer.staged
        if len(staged) >= self.limits.max_staged_packets:
            staged.popleft()
            self.counters.drop_staged_overflow += 1
        staged.append(packet)

    @staticmethod
    def _usable(kp: Keypair | None, now: float) -> bool:
        return kp is not None and kp.send_counter < kp.send_limit and now < kp.expires

    def _flush_staged(self, peer: Peer, now: float) -> None:
        staged = peer.staged
        while staged:
            kp = peer.current
            if not self._usable(kp, now):
                self._initiate(peer, now, retry=False)
                return
            batch = list(staged)
            staged.clear()
            rest = self._seal_many(peer, kp, batch, now)  # type: ignore[arg-type]
            if rest:  # the session ran out of counters: keep the rest, in order, for the next session
                staged.extendleft(reversed(rest))

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._flush_staged(peer, now)

    def _seal_many(
        self, peer: Peer, kp: Keypair, packets: Iterable[bytes | bytearray | memoryview], now: float
    ) -> list[bytes | bytearray | memoryview]:
        """Encrypt packets under ``kp`` (fresh enough, checked by the caller) and queue the datagrams.

        Returns the packets left over when the session's counter limit is reached.
        Timer and rekey bookkeeping runs once per call, not per packet.
        """
        counter = kp.send_counter
        limit = kp.send_limit
        header = kp.header
        encrypt = kp.seal
        mtu = self._mtu
        endpoint = peer.endpoint
        append = self._outgoing.append
        sent_bytes = 0
        data_packets = 0
        first = counter
        rest: list[bytes | bytearray | memoryview] = []
        for packet in packets:
            if counter >= limit:
                rest.append(packet)
                continue
            n = len(packet)
            if n & 15 and n < mtu:
                # Zero-pad to a multiple of 16, but never beyond the MTU.
                pad = min(-n & 15, mtu - n)
                packet = bytes(packet) + bytes(pad)
                n += pad
            if n:
                data_packets += 1
            # The counter is both the header field and the nonce; encode it once.
            counter_bytes = counter.to_bytes(8, "little")
            counter += 1
            sent_bytes += n + 32
            if endpoint is not None:
                append((header + counter_bytes + encrypt(_NONCE_PREFIX + counter_bytes, packet, None), endpoint))
        sent = counter - first
        if not sent:
            return rest
        kp.send_counter = counter
        counters = self.counters
        if endpoint is None:
            counters.drop_no_endpoint += sent
        peer.tx_bytes += sent_bytes
        counters.data_sent += data_packets
        counters.keepalives_sent += sent - data_packets
        # Any authenticated packet sent: no passive keepalive owed any more.
        peer.timer_passive_keepalive = None
        if peer.persistent_keepalive is not None:
            self._arm_persistent_keepalive(peer, now)
        if data_packets and peer.timer_new_handshake is None:
            # Data sent: expect to hear back within KEEPALIVE + REKEY_TIMEOUT, else rehandshake.
            peer.timer_new_handshake = t = now + self.limits.new_handshake_after + self._jitter()
            self._schedule(peer, t)
        # Keep the key fresh: rekey well before the hard limits.
        if counter > kp.rekey_after or now > kp.rekey_at:
            self._initiate(peer, now, retry=False)
        return rest

    def _send_authenticated(self, peer: Peer, msg: bytes | bytearray, now: float, fallback: Addr | None = None) -> None:
        """Queue a handshake message to the peer and note it for the keepalive timers."""
        endpoint = peer.endpoint if peer.endpoint is not None else fallback
        if endpoint is None:
            self.counters.drop_no_endpoint += 1
        else:
            self._outgoing.append((msg, endpoint))
        peer.tx_bytes += len(msg)
        peer.timer_passive_keepalive = None
        if peer.persistent_keepalive is not None:
            self._arm_persistent_keepalive(peer, now)

    # -- handshakes and sessions -----------------------------------------------

    def _initiate(self, peer: Peer, now: float, *, retry: bool) -> None:
        if not retry:
            peer.handshake_attempts = 0
        last = peer.last_handshake_sent
        if last is not None and now - last < self.limits.rekey_timeout:
            return
        if peer.static_static is None:
            return  # the peer's key is a low-order point: no handshake can succeed
        peer.last_handshake_sent = now
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
        local_index = self._new_index()
        msg, state = create_initiation(
            static=self._static,
            static_public=self._public_raw,
            remote_static=peer.raw,
            ephemeral=self._new_ephemeral(),
            sender_index=local_index,
            timestamp=self._timestamp(peer),
            static_static=peer.static_static,
        )
        peer.cookies.add_macs(msg, now)
        peer.handshake = state
        self._handshakes[local_index] = peer
        self.counters.initiations_sent += 1
        self._send_authenticated(peer, msg, now)
        peer.timer_retransmit = t = now + self.limits.rekey_timeout + self._jitter()
        self._schedule(peer, t)

    def _new_keypair(
        self, peer: Peer, send_key: bytes, receive_key: bytes, local: int, remote: int, initiator: bool, now: float
    ) -> Keypair:
        kp = Keypair(
            peer=peer,
            send_key=send_key,
            receive_key=receive_key,
            local_index=local,
            remote_index=remote,
            is_initiator=initiator,
            created=now,
            limits=self.limits,
        )
        self._keypairs[local] = kp
        return kp

    def _drop_keypair(self, kp: Keypair | None) -> None:
        if kp is not None and self._keypairs.get(kp.local_index) is kp:
            del self._keypairs[kp.local_index]

    def _confirm_next(self, peer: Peer, now: float) -> None:
        """The first authenticated transport message on "next": it becomes current."""
        if peer.handshake is not None:
            # A fresh session now exists, so our own unanswered initiation is superseded: erase its
            # ephemeral secret now rather than keep it (and its index) until the next attempt or key wipe.
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None
        self._drop_keypair(peer.previous)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        self._handshake_complete(peer, now, initiator=False)
        self._flush_staged(peer, now)

    def _handshake_complete(self, peer: Peer, now: float, *, initiator: bool) -> None:
        peer.timer_retransmit = None
        peer.handshake_attempts = 0
        peer.want_last_minute_handshake = False
        peer.last_handshake = now
        self.counters.handshakes_completed += 1
        self._events.append(HandshakeCompleted(peer.public_key, initiator))

    def _session_derived(self, peer: Peer, now: float) -> None:
        peer.timer_zero_keys = t = now + self.limits.zero_keys_after
        self._schedule(peer, t)

    def _authenticated_handshake_from(self, peer: Peer, addr: Addr, size: int, now: float) -> None:
        peer.rx_bytes += size
        if self._roaming and addr != peer.endpoint:
            self._roam(peer, addr)
        peer.timer_new_handshake = None
        if peer.persistent_keepalive is not None:
            self._arm_persistent_keepalive(peer, now)

    def _roam(self, peer: Peer, addr: Addr) -> None:
        peer.endpoint = addr
        self._events.append(PeerEndpointChanged(peer.public_key, addr))

    def _zero_key_material(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._drop_keypair(kp)
        peer.previous = peer.current = peer.next = None
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None

    # -- randomness and time -----------------------------------------------------

    def _new_index(self) -> int:
        index = _U32.unpack(self._rng(4))[0]
        # Probe linearly on collision so that even a poor rng cannot loop forever.
        while index in self._keypairs or index in self._handshakes:
            index = (index + 1) & 0xFFFFFFFF
        return index

    def _new_ephemeral(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(clamp(self._rng(32)))

    def _jitter(self) -> float:
        return _U32.unpack(self._rng(4))[0] / 2**32 * self.limits.rekey_timeout_jitter

    def _timestamp(self, peer: Peer) -> bytes:
        """TAI64N of the wall clock for an initiation to ``peer``, strictly above the last one it got from us.

        The bump is per peer: a device-wide one would push every timestamp ahead of the wall clock
        by one 2^24 ns step per peer initiated within the same step, and a restart of the node key
        inside that lead would then see its initiations dropped as replays. A wall clock stepping
        back is covered by never going below the highest wall-clock label seen.
        """
        ts = tai64n(self._wall_clock())
        if ts < self._wall_floor:
            ts = self._wall_floor
        else:
            self._wall_floor = ts
        last = peer.last_timestamp_sent
        if ts <= last:
            seconds, nanos = _TAI64N.unpack(last)
            nanos += 1 << 24
            if nanos >= 1_000_000_000:
                seconds, nanos = seconds + 1, 0
            ts = _TAI64N.pack(seconds, nanos)
        peer.last_timestamp_sent = ts
        return ts

    # -- events and timers ---------------------------------------------------

    def next_event(self) -> Event | None:
        """The oldest pending event, or None."""
        events = self._events
        return events.popleft() if events else None

    def drain_events(self) -> list[Event]:
        """All pending events, oldest first (cheaper than calling next_event in a loop)."""
        events = list(self._events)
        self._events.clear()
        return events

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called (absolute, same clock as ``now``), or None.

        It may return a time at which nothing turns out to be due; calling
        ``handle_timer`` then is harmless.
        """
        return self._timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``: retransmissions, keepalives, rekeys, key erasure."""
        for peer in self._timers.pop_due(now):
            self._fire_timers(peer, now)  # type: ignore[arg-type]
            nxt = peer.next_deadline()  # type: ignore[attr-defined]
            if nxt is not None:
                self._timers.schedule(peer, nxt)

    def _schedule(self, peer: Peer, deadline: float) -> None:
        self._timers.schedule(peer, deadline)

    def _arm_persistent_keepalive(self, peer: Peer, now: float) -> None:
        peer.timer_persistent_keepalive = t = now + peer.persistent_keepalive  # type: ignore[operator]
        self._schedule(peer, t)

    def _fire_timers(self, peer: Peer, now: float) -> None:
        limits = self.limits
        t = peer.timer_retransmit
        if t is not None and t <= now:
            peer.timer_retransmit = None
            if peer.handshake_attempts > limits.max_handshake_retries:
                # Give up: drop what waited for this handshake; wipe keys eventually.
                peer.timer_passive_keepalive = None
                self.counters.drop_staged_handshake_failed += sum(1 for p in peer.staged if p)  # not keepalives
                peer.staged.clear()
                if peer.handshake is not None:
                    self._handshakes.pop(peer.handshake.local_index, None)
                    peer.handshake = None
                if peer.timer_zero_keys is None:
                    peer.timer_zero_keys = now + limits.zero_keys_after
                self.counters.handshakes_failed += 1
                self._events.append(HandshakeFailed(peer.public_key))
            else:
                peer.handshake_attempts += 1
                self._initiate(peer, now, retry=True)
        t = peer.timer_new_handshake
        if t is not None and t <= now:
            # We sent data and heard nothing back for KEEPALIVE + REKEY_TIMEOUT.
            peer.timer_new_handshake = None
            self._initiate(peer, now, retry=False)
        t = peer.timer_passive_keepalive
        if t is not None and t <= now:
            peer.timer_passive_keepalive = None
            self._send_keepalive(peer, now)
            if peer.keepalive_again:
                peer.keepalive_again = False
                peer.timer_passive_keepalive = now + limits.keepalive_timeout
        t = peer.timer_persistent_keepalive
        if t is not None and t <= now:
            peer.timer_persistent_keepalive = None
            if peer.persistent_keepalive is not None:
                self._send_keepalive(peer, now)
        t = peer.timer_zero_keys
        if t is not None and t <= now:
            peer.timer_zero_keys = None
            self._zero_key_material(peer)
