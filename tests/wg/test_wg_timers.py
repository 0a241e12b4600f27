"""The peer deadline queue: one live entry per peer, lazy cancellation, removed peers skipped."""

from __future__ import annotations

from dataclasses import dataclass

from tsnet.wg.timers import TimerQueue


@dataclass(eq=False)
class P:
    name: str
    scheduled_at: float | None = None
    removed: bool = False


def test_earliest_first_and_later_arming_needs_no_push() -> None:
    q = TimerQueue()
    a, b = P("a"), P("b")
    q.schedule(a, 10.0)
    q.schedule(b, 5.0)
    q.schedule(a, 20.0)  # later than its live entry: nothing pushed
    assert len(q) == 2
    assert q.next_deadline() == 5.0
    assert [p.name for p in q.pop_due(9.0)] == ["b"]
    assert b.scheduled_at is None
    assert q.next_deadline() == 10.0


def test_earlier_arming_supersedes_and_stale_entries_are_skipped() -> None:
    q = TimerQueue()
    a = P("a")
    q.schedule(a, 10.0)
    q.schedule(a, 3.0)
    assert q.next_deadline() == 3.0
    assert [p.name for p in q.pop_due(100.0)] == ["a"]  # the 10.0 entry is stale and skipped
    assert q.next_deadline() is None


def test_removed_peers_are_skipped() -> None:
    q = TimerQueue()
    a = P("a")
    q.schedule(a, 1.0)
    a.removed = True
    assert q.next_deadline() is None
    assert list(q.pop_due(5.0)) == []


def test_rescheduling_while_popping() -> None:
    q = TimerQueue()
    a = P("a")
    q.schedule(a, 1.0)
    fired = []
    for p in q.pop_due(2.0):
        fired.append(p.name)
        if len(fired) < 3:
            q.schedule(p, 1.5 + len(fired) * 0.1)  # still due: yielded again
    assert fired == ["a", "a", "a"]
    assert q.next_deadline() is None
