"""Per-peer state: keypairs (previous/current/next), the pending handshake, timers and counters."""

from __future__ import annotations

from collections import deque
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsnet.key import NodePublic
from tsnet.wg.cookie import CookieGenerator
from tsnet.wg.limits import Limits
from tsnet.wg.messages import TRANSPORT_PREFIX, TYPE_TRANSPORT
from tsnet.wg.noise import InitiatorState
from tsnet.wg.replay import ReplayWindow

__all__ = ["Keypair", "Peer"]


class Keypair:
    """One session's transport keys. ``local_index`` finds it on receive; ``remote_index`` goes on sends."""

    __slots__ = (
        "created",
        "expires",
        "header",
        "is_initiator",
        "last_minute_at",
        "local_index",
        "open",
        "peer",
        "remote_index",
        "rekey_after",
        "rekey_at",
        "replay",
        "seal",
        "send_counter",
        "send_limit",
    )

    def __init__(
        self,
        *,
        peer: Peer,
        send_key: bytes,
        receive_key: bytes,
        local_index: int,
        remote_index: int,
        is_initiator: bool,
        created: float,
        limits: Limits,
    ) -> None:
        self.peer = peer
        # Ciphers are built once per session (constructing one per packet costs as much as sealing);
        # keep their bound encrypt/decrypt methods: seal(nonce, plaintext, None), open(nonce, ciphertext, None).
        self.seal = ChaCha20Poly1305(send_key).encrypt
        self.open = ChaCha20Poly1305(receive_key).decrypt
        self.local_index = local_index
        self.remote_index = remote_index
        # Type and receiver index never change within a session: the first 8 header bytes, ready-made.
        self.header = TRANSPORT_PREFIX.pack(TYPE_TRANSPORT, remote_index)
        self.is_initiator = is_initiator
        self.created = created
        self.send_counter = 0
        self.replay = ReplayWindow(limits.reject_after_messages)
        # Limits precomputed as absolute values so the per-packet checks are single comparisons.
        self.expires = created + limits.reject_after_time  # unusable from then on, both ways
        self.send_limit = limits.reject_after_messages  # counters at or above are never sent
        self.rekey_after = limits.rekey_after_messages  # a send with a counter above this triggers a rekey
        inf = float("inf")
        # Only the initiator of a session rekeys on age (avoids both sides rekeying at once).
        self.rekey_at = created + limits.rekey_after_time if is_initiator else inf
        self.last_minute_at = (
            created + limits.reject_after_time - limits.keepalive_timeout - limits.rekey_timeout if is_initiator else inf
        )


class Peer:
    """Everything the device knows about one remote static key."""

    __slots__ = (
        "cookies",
        "current",
        "endpoint",
        "greatest_timestamp",
        "handshake",
        "handshake_attempts",
        "keepalive_again",
        "last_handshake",
        "last_initiation_consumed",
        "last_timestamp_sent",
        "last_handshake_sent",
        "next",
        "persistent_keepalive",
        "preshared_key",
        "previous",
        "public_key",
        "raw",
        "removed",
        "rx_bytes",
        "scheduled_at",
        "staged",
        "static_static",
        "timer_new_handshake",
        "timer_passive_keepalive",
        "timer_persistent_keepalive",
        "timer_retransmit",
        "timer_zero_keys",
        "tx_bytes",
        "want_last_minute_handshake",
    )

    def __init__(
        self,
        public_key: NodePublic,
        *,
        static_static: bytes | None,
        preshared_key: bytes,
        endpoint: Any,
        persistent_keepalive: float | None,
        cookie_refresh_time: float,
    ) -> None:
        self.public_key = public_key
        self.raw = public_key.raw
        self.static_static = static_static  # DH(our static, theirs); None if the point is low-order
        self.preshared_key = preshared_key
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive or None
        self.cookies = CookieGenerator(self.raw, refresh_time=cookie_refresh_time)

        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: InitiatorState | None = None  # our initiation awaiting a response

        self.handshake_attempts = 0
        self.last_handshake_sent: float | None = None  # initiation or response, for REKEY_TIMEOUT spacing
        self.greatest_timestamp = b""  # newest initiation timestamp accepted from the peer
        self.last_timestamp_sent = b""  # newest initiation timestamp we sent to the peer
        self.last_initiation_consumed: float | None = None
        self.last_handshake: float | None = None
        self.want_last_minute_handshake = False

        self.staged: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.removed = False

        # Absolute deadlines (None = disarmed), modelled on wireguard-go's per-peer timers.
        self.timer_retransmit: float | None = None
        self.timer_passive_keepalive: float | None = None
        self.keepalive_again = False
        self.timer_new_handshake: float | None = None
        self.timer_zero_keys: float | None = None
        self.timer_persistent_keepalive: float | None = None
        # The deadline this peer currently has an entry for in the device's timer heap.
        self.scheduled_at: float | None = None

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.previous, self.current, self.next) if kp is not None]

    def next_deadline(self) -> float | None:
        deadlines = [
            t
            for t in (
                self.timer_retransmit,
                self.timer_passive_keepalive,
                self.timer_new_handshake,
                self.timer_zero_keys,
                self.timer_persistent_keepalive,
            )
            if t is not None
        ]
        return min(deadlines) if deadlines else None
