"""Sliding-window replay filter for transport counters (RFC 6479 style, as wireguard-go).

A ring of 128 blocks of 64 bits; one block is always the "future" block, so
the usable window is (128 - 1) * 64 = 8128 counters behind the highest seen.
"""

from __future__ import annotations

__all__ = ["BLOCK_BITS", "RING_BLOCKS", "WINDOW_SIZE", "ReplayWindow"]

BLOCK_BITS = 64
RING_BLOCKS = 128
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128
_BLOCK_SHIFT = 6
_RING_MASK = RING_BLOCKS - 1
_BIT_MASK = BLOCK_BITS - 1


class ReplayWindow:
    """Accepts each counter at most once, and none more than WINDOW_SIZE behind the highest."""

    # Attributes are public because the device inlines the in-order fast path of check().
    __slots__ = ("blocks", "last", "limit")

    def __init__(self, limit: int = 2**64 - 2**13 - 1) -> None:
        self.blocks = [0] * RING_BLOCKS
        self.last = 0
        # Counters at or above the limit are never valid (REJECT_AFTER_MESSAGES).
        self.limit = limit

    def reset(self) -> None:
        self.blocks = [0] * RING_BLOCKS
        self.last = 0

    @property
    def highest(self) -> int:
        """The highest counter accepted so far."""
        return self.last

    def check(self, counter: int) -> bool:
        """Record ``counter``; False if it is a replay, too old, or at/above the limit.

        Call only after the packet authenticated: a forged packet must not move the window.
        """
        last = self.last
        if counter > last:
            # The common case, in-order arrival: a new highest counter, whose bit cannot be set yet.
            if counter >= self.limit:
                return False
            index = counter >> _BLOCK_SHIFT
            current = last >> _BLOCK_SHIFT
            if index != current:
                # Clear the blocks the window slides over (they now stand for new counters).
                blocks = self.blocks
                for i in range(current + 1, current + min(index - current, RING_BLOCKS) + 1):
                    blocks[i & _RING_MASK] = 0
            self.last = counter
            self.blocks[index & _RING_MASK] |= 1 << (counter & _BIT_MASK)
            return True
        if last - counter > WINDOW_SIZE:
            return False
        slot = (counter >> _BLOCK_SHIFT) & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        blocks = self.blocks
        old = blocks[slot]
        if old & bit:
            return False
        blocks[slot] = old | bit
        return True
