"""Handshake load detection and the per-source token bucket used while under load."""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["LoadMonitor", "RateLimiter"]


class LoadMonitor:
    """Under load once ``threshold`` handshake messages arrive within one second, and ``hold`` seconds after.

    A sans-IO stand-in for wireguard-go's "handshake queue at least 1/8 full" signal.
    ``forced`` overrides the measurement (True/False), None measures.
    """

    __slots__ = ("_count", "_hold", "_threshold", "_until", "_window_start", "forced")

    def __init__(self, *, threshold: int, hold: float, now: float) -> None:
        self._threshold = threshold
        self._hold = hold
        self._window_start = now
        self._count = 0
        self._until = float("-inf")
        self.forced: bool | None = None

    def note_handshake(self, now: float) -> None:
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count >= self._threshold:
            self._until = now + self._hold

    def under_load(self, now: float) -> bool:
        if self.forced is not None:
            return self.forced
        return now < self._until


class RateLimiter:
    """Token bucket per source host: ``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_buckets", "_burst", "_max_sources", "_rate")

    def __init__(self, *, rate: float, burst: int, max_sources: int = 4096) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_sources = max_sources
        self._buckets: dict[Hashable, list[float]] = {}  # host -> [tokens, last update]

    @staticmethod
    def host_of(addr: Hashable) -> Hashable:
        """The port is ignored: a (host, port, ...) tuple is limited by its host."""
        return addr[0] if isinstance(addr, tuple) and addr else addr

    def allow(self, addr: Hashable, now: float) -> bool:
        key = self.host_of(addr)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self._max_sources:
                self._forget_idle(now)
            bucket = buckets[key] = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_idle(self, now: float) -> None:
        # A source quiet long enough to have refilled completely is indistinguishable from a new one.
        idle = self._burst / self._rate if self._rate > 0 else float("inf")
        for k in [k for k, (_, last) in self._buckets.items() if now - last > idle]:
            del self._buckets[k]
        if len(self._buckets) >= self._max_sources:
            self._buckets.clear()  # still full: everyone starts over rather than growing without bound

    def __len__(self) -> int:
        return len(self._buckets)
