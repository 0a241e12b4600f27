"""Named counters and per-peer status snapshots."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tsnet.key import NodePublic

__all__ = ["Counters", "PeerStatus"]


@dataclass(slots=True)
class Counters:
    """Device-wide counters. Every dropped datagram increments exactly one ``drop_*`` or error field."""

    # Received, accepted.
    data_received: int = 0
    keepalives_received: int = 0
    initiations_received: int = 0
    responses_received: int = 0
    cookie_replies_received: int = 0
    # Sent.
    data_sent: int = 0
    keepalives_sent: int = 0
    initiations_sent: int = 0
    responses_sent: int = 0
    cookie_replies_sent: int = 0
    handshakes_completed: int = 0
    handshakes_failed: int = 0
    # Dropped on receive.
    drop_malformed: int = 0  # wrong size, unknown type, non-zero reserved bytes
    drop_bad_mac1: int = 0
    drop_needs_cookie: int = 0  # under load without a valid mac2 (a cookie reply was sent)
    drop_rate_limited: int = 0  # under load, source over its handshake budget
    drop_handshake_invalid: int = 0  # AEAD/DH failure inside a handshake message
    drop_unknown_peer: int = 0  # initiation from a static key we do not know
    drop_replayed_initiation: int = 0  # timestamp not newer than the newest seen
    drop_initiation_flood: int = 0  # initiations from one peer closer than 20 ms
    drop_unknown_index: int = 0  # type 2/3/4 for an index we do not hold
    drop_cookie_invalid: int = 0
    drop_data_invalid: int = 0  # transport AEAD failure (forged or corrupted)
    drop_replayed: int = 0  # counter already seen, too old for the window, or at/above REJECT_AFTER_MESSAGES
    drop_expired_keypair: int = 0  # keypair past REJECT_AFTER_TIME / REJECT_AFTER_MESSAGES
    drop_bad_inner_packet: int = 0  # decrypted plaintext is not a well-formed IPv4/IPv6 packet
    drop_internal_error: int = 0  # a bug caught by the receive path's safety net
    # Dropped on send.
    drop_staged_overflow: int = 0
    drop_staged_handshake_failed: int = 0  # staged packets discarded when a handshake gave up (REKEY_ATTEMPT_TIME)
    drop_no_endpoint: int = 0
    send_unknown_peer: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def total_dropped(self) -> int:
        """Sum of every receive-side drop counter."""
        return sum(v for k, v in asdict(self).items() if k.startswith("drop_") and k not in _SEND_DROPS)


_SEND_DROPS = frozenset({"drop_staged_overflow", "drop_staged_handshake_failed", "drop_no_endpoint"})


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A snapshot of one peer, as ``wg show`` would print it."""

    public_key: NodePublic
    endpoint: Any
    last_handshake: float | None  # on the driver's ``now`` clock; None if never
    rx_bytes: int  # datagram bytes received and authenticated
    tx_bytes: int  # datagram bytes sent
    has_session: bool  # a current keypair usable for sending
    persistent_keepalive: float | None
    staged_packets: int
