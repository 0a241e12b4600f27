"""Pluggable congestion control: Reno (RFC 5681 + RFC 3465) and CUBIC (RFC 9438).

The connection owns loss detection and recovery; a controller only decides
``cwnd`` and ``ssthresh`` (both in bytes) when told about ACKs and losses.
"""

from __future__ import annotations

from typing import Protocol


class CongestionControl(Protocol):
    """What a connection needs from a congestion controller."""

    cwnd: int
    ssthresh: int

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        """``acked`` new bytes were cumulatively acknowledged outside recovery."""

    def on_congestion(self, flight_size: int, now: float) -> None:
        """Loss detected by duplicate ACKs / SACK: set ssthresh (the caller sets cwnd for recovery)."""

    def on_timeout(self, flight_size: int, now: float) -> None:
        """Retransmission timeout: collapse the window."""


class Reno:
    """Slow start with appropriate byte counting (L = 2 SMSS) and AIMD congestion avoidance."""

    name = "reno"

    def __init__(self, mss: int, initial_window: int = 10) -> None:
        self.mss = mss
        self.cwnd = initial_window * mss
        self.ssthresh = 1 << 30
        self._acked_in_ca = 0

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, 2 * self.mss)
            return
        self._acked_in_ca += acked
        if self._acked_in_ca >= self.cwnd:
            self._acked_in_ca -= self.cwnd
            self.cwnd += self.mss

    def on_congestion(self, flight_size: int, now: float) -> None:
        self.ssthresh = max(flight_size // 2, 2 * self.mss)
        self._acked_in_ca = 0

    def on_timeout(self, flight_size: int, now: float) -> None:
        self.ssthresh = max(flight_size // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acked_in_ca = 0


class Cubic:
    """CUBIC (RFC 9438) with fast convergence and the Reno-friendly region; windows kept in segments."""

    name = "cubic"
    C = 0.4
    BETA = 0.7
    ALPHA = 3 * (1 - BETA) / (1 + BETA)

    def __init__(self, mss: int, initial_window: int = 10) -> None:
        self.mss = mss
        self._cwnd = float(initial_window)
        self._ssthresh = float(1 << 20)
        self._w_max = 0.0
        self._k = 0.0
        self._epoch: float | None = None
        self._w_est = 0.0

    @property
    def cwnd(self) -> int:
        return int(self._cwnd * self.mss)

    @cwnd.setter
    def cwnd(self, value: int) -> None:
        self._cwnd = max(value / self.mss, 1.0)

    @property
    def ssthresh(self) -> int:
        return int(self._ssthresh * self.mss)

    @ssthresh.setter
    def ssthresh(self, value: int) -> None:
        self._ssthresh = value / self.mss

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        segs = acked / self.mss
        if self._cwnd < self._ssthresh:
            self._cwnd += min(segs, 2.0)
            return
        if self._epoch is None:
            self._epoch = now
            if self._cwnd < self._w_max:
                self._k = ((self._w_max - self._cwnd) / self.C) ** (1 / 3)
            else:
                self._k = 0.0
                self._w_max = self._cwnd
            self._w_est = self._cwnd
        t = now - self._epoch
        rtt = srtt if srtt is not None else 0.1
        target = self.C * (t + rtt - self._k) ** 3 + self._w_max
        target = min(max(target, self._cwnd), 1.5 * self._cwnd)
        self._w_est += self.ALPHA * segs / self._cwnd
        w_cubic_now = self.C * (t - self._k) ** 3 + self._w_max
        if w_cubic_now < self._w_est:
            self._cwnd = max(self._cwnd, self._w_est)
        else:
            self._cwnd += (target - self._cwnd) / self._cwnd * segs

    def _reduce(self) -> None:
        if self._cwnd < self._w_max:
            self._w_max = self._cwnd * (1 + self.BETA) / 2  # fast convergence
        else:
            self._w_max = self._cwnd
        self._ssthresh = max(self._cwnd * self.BETA, 2.0)
        self._epoch = None

    def on_congestion(self, flight_size: int, now: float) -> None:
        self._reduce()

    def on_timeout(self, flight_size: int, now: float) -> None:
        self._reduce()
        self._cwnd = 1.0


def make_controller(name: str, mss: int, initial_window: int = 10) -> CongestionControl:
    """A controller by name ("cubic" or "reno")."""
    if name == "cubic":
        return Cubic(mss, initial_window)
    if name == "reno":
        return Reno(mss, initial_window)
    raise ValueError(f"unknown congestion control {name!r}")
