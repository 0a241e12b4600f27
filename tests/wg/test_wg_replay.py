"""The sliding replay window: duplicates, the window's edge, slides and jumps, the counter limit."""

from __future__ import annotations

import random

from tsnet.wg.replay import RING_BLOCKS, WINDOW_SIZE, ReplayWindow


def test_window_size_matches_wireguard_go() -> None:
    assert WINDOW_SIZE == 8128 == (RING_BLOCKS - 1) * 64


def test_in_order_and_duplicates() -> None:
    w = ReplayWindow()
    for c in range(300):
        assert w.check(c)
    for c in (0, 1, 63, 64, 299):
        assert not w.check(c)
    assert w.highest == 299


def test_first_counter_zero_accepted_once() -> None:
    w = ReplayWindow()
    assert w.check(0)
    assert not w.check(0)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    assert w.check(1000)
    assert w.check(999)
    assert w.check(5)
    assert not w.check(999)
    assert not w.check(5)
    assert w.check(1001)


def test_edge_of_window() -> None:
    w = ReplayWindow()
    top = 20_000
    assert w.check(top)
    assert w.check(top - WINDOW_SIZE)  # exactly at the edge: still inside
    assert not w.check(top - WINDOW_SIZE - 1)  # one more: too old
    assert not w.check(top - WINDOW_SIZE)  # and the edge one is now a duplicate


def test_slide_clears_reused_blocks() -> None:
    w = ReplayWindow()
    for c in range(0, 200):
        assert w.check(c)
    # Jump far ahead: every old block is recycled for new counters, which must be accepted.
    far = 200 + 10 * WINDOW_SIZE
    assert w.check(far)
    for c in range(far - 100, far):
        assert w.check(c)
    assert not w.check(150)  # ancient
    # A moderate jump (a few blocks) clears exactly the skipped blocks.
    assert w.check(far + 3 * 64 + 5)
    for c in range(far + 1, far + 3 * 64 + 5):
        assert w.check(c), c


def test_jump_of_exactly_the_ring_size() -> None:
    w = ReplayWindow()
    assert w.check(64)
    assert w.check(64 + RING_BLOCKS * 64)  # lands in the same ring slot as 64
    assert w.check(64 + RING_BLOCKS * 64 - 1)


def test_limit_rejects_counters_at_or_above() -> None:
    w = ReplayWindow(limit=100)
    assert w.check(99)
    assert not w.check(100)
    assert not w.check(2**64 - 1)
    assert w.highest == 99


def test_reset() -> None:
    w = ReplayWindow()
    w.check(5)
    w.reset()
    assert w.check(5)


def test_matches_a_naive_model_on_random_sequences() -> None:
    rnd = random.Random(1234)
    for _ in range(20):
        w = ReplayWindow()
        seen: set[int] = set()
        highest = -1
        base = 0
        for _ in range(2000):
            r = rnd.random()
            if r < 0.6:
                base += rnd.randint(0, 3)
            elif r < 0.65:
                base += rnd.randint(1, 3 * WINDOW_SIZE)
            c = max(0, base - rnd.randint(0, WINDOW_SIZE + 200)) if rnd.random() < 0.3 else base
            expected = c not in seen and (highest < 0 or highest - c <= WINDOW_SIZE)
            assert w.check(c) == expected, (c, highest)
            if expected:
                seen.add(c)
                highest = max(highest, c)
