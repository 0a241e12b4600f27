"""Protocol limits and timer constants, configurable per device.

Defaults are wireguard-go's (``device/constants.go``). Tests and interop runs
shrink them (e.g. ``rekey_after_messages=10``) to force rekeys quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit and timeout the core uses; times are seconds, counts are messages."""

    #: After a send with a counter above this, start a new handshake.
    rekey_after_messages: int = 2**60
    #: Never send with, nor accept, a counter at or above this.
    reject_after_messages: int = 2**64 - 2**13 - 1
    #: The initiator of the current keypair rekeys after a send once the keypair is older than this.
    rekey_after_time: float = 120.0
    #: A keypair older than this is unusable for sending and receiving.
    reject_after_time: float = 180.0
    #: Total budget for retrying one handshake; attempts = rekey_attempt_time / rekey_timeout (+2).
    rekey_attempt_time: float = 90.0
    #: Retransmit interval for initiations, and the minimum spacing between two initiations to one peer.
    rekey_timeout: float = 5.0
    #: Upper bound of the random jitter added to rekey_timeout-based timers.
    rekey_timeout_jitter: float = 0.333
    #: Passive keepalive delay after receiving data we did not answer.
    keepalive_timeout: float = 10.0
    #: Lifetime of our cookie secret and of a cookie received from a peer.
    cookie_refresh_time: float = 120.0
    #: Initiations from one peer closer together than this are a flood and dropped.
    handshake_initiation_min_interval: float = 0.020
    #: Packets staged per peer while waiting for a handshake (oldest dropped when full).
    max_staged_packets: int = 128
    #: Inner MTU: plaintext is zero-padded to a multiple of 16, but never beyond this.
    mtu: int = 1280
    #: Handshake messages (types 1 and 2) received within one second that put the device under load.
    under_load_handshakes_per_second: int = 128
    #: How long the device stays under load after the threshold was last reached.
    under_load_duration: float = 1.0
    #: Per source-host token bucket for handshakes while under load: refill rate (per second) and burst.
    handshake_rate_per_second: float = 20.0
    handshake_rate_burst: int = 5

    def __post_init__(self) -> None:
        for name in ("rekey_after_time", "reject_after_time", "rekey_attempt_time", "rekey_timeout",
                     "keepalive_timeout", "cookie_refresh_time", "under_load_duration", "handshake_rate_per_second"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("rekey_after_messages", "reject_after_messages", "max_staged_packets",
                     "under_load_handshakes_per_second", "handshake_rate_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.rekey_timeout_jitter < 0 or self.handshake_initiation_min_interval < 0 or self.mtu < 0:
            raise ValueError("Limits: rekey_timeout_jitter, handshake_initiation_min_interval and mtu must be >= 0")
        if self.reject_after_messages > 2**64 - 2**13 - 1:
            raise ValueError("Limits.reject_after_messages cannot exceed 2**64 - 2**13 - 1 (nonce space)")

    @property
    def max_handshake_retries(self) -> int:
        """Retransmissions before giving up (wireguard-go: REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)."""
        return int(self.rekey_attempt_time / self.rekey_timeout)

    @property
    def zero_keys_after(self) -> float:
        """Idle time after which all key material of a peer is wiped (3 x REJECT_AFTER_TIME)."""
        return 3 * self.reject_after_time

    @property
    def new_handshake_after(self) -> float:
        """Silence after our data send that triggers a handshake (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)."""
        return self.keepalive_timeout + self.rekey_timeout
