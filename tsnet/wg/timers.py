"""A deadline queue over peers: at most one live heap entry per peer, cancellation is lazy.

Each peer keeps its own timer deadlines (``Peer.timer_*``); the queue only
needs to wake the device at the earliest of them. ``Peer.scheduled_at`` is
the deadline of the peer's live entry: arming a later timer needs no push
(the earlier entry fires first and reschedules), and cancelling a timer
leaves a stale entry that fires harmlessly.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Protocol

__all__ = ["Schedulable", "TimerQueue"]


class Schedulable(Protocol):
    scheduled_at: float | None
    removed: bool


class TimerQueue:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Schedulable]] = []
        self._seq = itertools.count()  # tie-breaker: peers themselves are not orderable

    def schedule(self, peer: Schedulable, deadline: float) -> None:
        """Make sure ``peer`` is woken at ``deadline`` or earlier."""
        scheduled = peer.scheduled_at
        if scheduled is None or deadline < scheduled:
            peer.scheduled_at = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), peer))

    def next_deadline(self) -> float | None:
        """The earliest live deadline (stale entries are discarded on the way)."""
        heap = self._heap
        while heap:
            deadline, _, peer = heap[0]
            if peer.removed or peer.scheduled_at != deadline:
                heapq.heappop(heap)
                continue
            return deadline
        return None

    def pop_due(self, now: float) -> Iterator[Schedulable]:
        """Yield each peer whose live entry is due at ``now``, with its ``scheduled_at`` cleared.

        The caller fires the peer's timers and reschedules it; entries pushed
        meanwhile for a time <= ``now`` are yielded too.
        """
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, peer = heapq.heappop(heap)
            if peer.removed or peer.scheduled_at != deadline:
                continue
            peer.scheduled_at = None
            yield peer

    def __len__(self) -> int:
        return len(self._heap)
