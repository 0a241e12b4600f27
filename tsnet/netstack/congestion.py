"""Pluggable congestion control: Reno (RFC 5681 + RFC 3465) and CUBIC (RFC 9438),
both with HyStart++ (RFC 9406) to leave slow start before it overshoots.

The connection owns loss detection and recovery; a controller only decides
``cwnd`` and ``ssthresh`` (both in bytes) when told about ACKs and losses. The
connection also feeds ``hystart`` (round boundaries and RTT samples) while in slow start.
"""

from __future__ import annotations

import math
from typing import Protocol

# RFC 9406 constants.
_HS_MIN_RTT_THRESH = 0.004
_HS_MAX_RTT_THRESH = 0.016
_HS_MIN_RTT_DIVISOR = 8
_HS_N_RTT_SAMPLE = 8
_HS_CSS_GROWTH_DIVISOR = 4
_HS_CSS_ROUNDS = 5


class HyStartPP:
    """HyStart++ (RFC 9406): watch the minimum RTT of each round in slow start; when it
    rises by a threshold, grow 4x slower (conservative slow start) for a few rounds,
    then hand over to congestion avoidance. A round ends when the ACK passes the
    SND.NXT recorded when it began."""

    __slots__ = ("window_end", "last_round_min", "cur_round_min", "samples", "css_baseline", "css_rounds",
                 "exit_to_ca")

    def __init__(self) -> None:
        self.window_end: int | None = None
        self.last_round_min = math.inf
        self.cur_round_min = math.inf
        self.samples = 0
        self.css_baseline: float | None = None  # set while in conservative slow start
        self.css_rounds = 0
        self.exit_to_ca = False  # the connection sets ssthresh = cwnd when this turns True

    @property
    def growth_divisor(self) -> int:
        """Slow-start increase is divided by this (4 in conservative slow start)."""
        return _HS_CSS_GROWTH_DIVISOR if self.css_baseline is not None else 1

    def on_ack(self, ack: int, snd_nxt: int, rtt: float | None) -> None:
        """One ACK in slow start: ``ack``/``snd_nxt`` are (unwrapped) sequence numbers,
        ``rtt`` this ACK's RTT sample if it produced one."""
        if self.window_end is None or ack >= self.window_end:
            # Round boundary.
            if self.css_baseline is not None:
                if self.cur_round_min < self.css_baseline:
                    self.css_baseline = None  # the RTT rise was spurious: back to slow start
                    self.css_rounds = 0
                else:
                    self.css_rounds += 1
                    if self.css_rounds >= _HS_CSS_ROUNDS:
                        self.exit_to_ca = True
            self.window_end = snd_nxt
            self.last_round_min = self.cur_round_min
            self.cur_round_min = math.inf
            self.samples = 0
        if rtt is not None:
            if rtt < self.cur_round_min:
                self.cur_round_min = rtt
            self.samples += 1
        if self.css_baseline is None and self.samples >= _HS_N_RTT_SAMPLE \
                and self.cur_round_min != math.inf and self.last_round_min != math.inf:
            thresh = max(_HS_MIN_RTT_THRESH, min(self.last_round_min / _HS_MIN_RTT_DIVISOR, _HS_MAX_RTT_THRESH))
            if self.cur_round_min >= self.last_round_min + thresh:
                self.css_baseline = self.cur_round_min
                self.css_rounds = 0

    def reset(self) -> None:
        """After a loss: start over (slow start after an RTO uses it again)."""
        self.__init__()


class CongestionControl(Protocol):
    """What a connection needs from a congestion controller."""

    cwnd: int
    ssthresh: int
    hystart: HyStartPP | None

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        """``acked`` new bytes were cumulatively acknowledged outside recovery."""

    def on_congestion(self, flight_size: int, now: float) -> None:
        """Loss detected by duplicate ACKs / SACK: set ssthresh (the caller sets cwnd for recovery)."""

    def on_timeout(self, flight_size: int, now: float) -> None:
        """Retransmission timeout: collapse the window."""


class Reno:
    """Slow start with byte counting and AIMD congestion avoidance.

    Slow start grows by the bytes each ACK covers, without RFC 3465's L = 2 SMSS cap
    (Linux does the same): peers that ACK a whole batch at once (gVisor, receivers
    with GRO) send stretch ACKs, and capping each at 2 SMSS would stall slow start.
    """

    name = "reno"

    def __init__(self, mss: int, initial_window: int = 10, hystart: bool = True) -> None:
        self.mss = mss
        self.cwnd = initial_window * mss
        self.ssthresh = 1 << 30
        self._acked_in_ca = 0
        self.hystart = HyStartPP() if hystart else None

    def on_ack(self, acked: int, now: float, srtt: float | None) -> None:
        if self.cwnd < self.ssthresh:
            inc = acked
            if self.hystart is not None:
                inc //= self.hystart.growth_divisor
            self.cwnd = min(self.cwnd + inc, max(self.ssthresh, self.cwnd))
            return
        self._acked_in_ca += acked
        if self._acked_in_ca >= self.cwnd:
            self._acked_in_ca -= self.cwnd
            self.cwnd += self.mss

    def on_congestion(self, flight_size: int, now: float) -> None:
        self.ssthresh = max(flight_size // 2, 2 * self.mss)
        self._acked_in_ca = 0
        if self.hystart is not None:
            self.hystart.reset()

    def on_timeout(self, flight_size: int, now: float) -> None:
        self.ssthresh = max(flight_size // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acked_in_ca = 0
        if self.hystart is not None:
            self.hystart.reset()


class Cubic:
    """CUBIC (RFC 9438) with fast convergence and the Reno-friendly region; windows kept in segments."""

    name = "cubic"
    C = 0.4
    BETA = 0.7
    ALPHA = 3 * (1 - BETA) / (1 + BETA)

    def __init__(self, mss: int, initial_window: int = 10, hystart: bool = True) -> None:
        self.mss = mss
        self.hystart = HyStartPP() if hystart else None
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
            inc = segs  # stretch ACKs count in full (see Reno)
            if self.hystart is not None:
                inc /= self.hystart.growth_divisor
            self._cwnd = min(self._cwnd + inc, max(self._ssthresh, self._cwnd))
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
        if self.hystart is not None:
            self.hystart.reset()

    def on_timeout(self, flight_size: int, now: float) -> None:
        self._reduce()
        self._cwnd = 1.0
        if self.hystart is not None:
            self.hystart.reset()


def make_controller(name: str, mss: int, initial_window: int = 10, hystart: bool = True) -> CongestionControl:
    """A controller by name ("cubic" or "reno"), with HyStart++ unless ``hystart`` is False."""
    if name == "cubic":
        return Cubic(mss, initial_window, hystart)
    if name == "reno":
        return Reno(mss, initial_window, hystart)
    raise ValueError(f"unknown congestion control {name!r}")
