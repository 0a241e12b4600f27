"""Load detection and the per-host handshake token bucket."""

from __future__ import annotations

from tsnet.wg.ratelimit import LoadMonitor, RateLimiter


def test_token_bucket_burst_and_refill() -> None:
    rl = RateLimiter(rate=20.0, burst=5)
    assert [rl.allow(("192.0.2.1", 1), 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert rl.allow(("192.0.2.1", 2), 0.0) is False  # same host, other port: same bucket
    assert rl.allow(("192.0.2.2", 1), 0.0) is True  # another host has its own
    assert rl.allow(("192.0.2.1", 1), 0.05) is True  # one token per 50 ms
    assert rl.allow(("192.0.2.1", 1), 0.05) is False
    assert [rl.allow(("192.0.2.1", 1), 10.0) for _ in range(6)] == [True] * 5 + [False]  # capped at the burst


def test_bucket_table_is_bounded() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_sources=10)
    for i in range(100):
        rl.allow(("198.51.100.%d" % i, 1), float(i) * 0.01)
    assert len(rl) <= 10


def test_opaque_addresses() -> None:
    rl = RateLimiter(rate=1.0, burst=1)
    assert rl.allow("derp-peer-token", 0.0)
    assert not rl.allow("derp-peer-token", 0.0)


def test_load_monitor_threshold_hold_and_override() -> None:
    lm = LoadMonitor(threshold=3, hold=1.0, now=0.0)
    lm.note_handshake(0.1)
    lm.note_handshake(0.2)
    assert not lm.under_load(0.2)
    lm.note_handshake(0.3)
    assert lm.under_load(0.3) and lm.under_load(1.29) and not lm.under_load(1.31)
    # A new one-second window starts counting from zero.
    lm.note_handshake(2.0)
    assert not lm.under_load(2.0)
    lm.forced = True
    assert lm.under_load(100.0)
    lm.forced = False
    lm.note_handshake(2.1)
    lm.note_handshake(2.2)
    assert not lm.under_load(2.2)


def test_limits_validation() -> None:
    import pytest

    from tsnet.wg import Limits

    assert Limits(rekey_after_messages=10).max_handshake_retries == 18
    for bad in ({"rekey_timeout": 0}, {"rekey_after_messages": 0}, {"mtu": -1}, {"reject_after_messages": 2**64}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_fast_packet_received_constructor_matches_the_dataclass() -> None:
    import dataclasses

    import pytest

    from tests.wg.wgutil import key
    from tsnet.wg.events import PacketReceived, packet_received

    pk = key(1).public
    fast = packet_received(pk, b"\x45abc")
    assert fast == PacketReceived(pk, b"\x45abc") and type(fast) is PacketReceived
    assert hash(fast) == hash(PacketReceived(pk, b"\x45abc"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.packet = b""  # type: ignore[misc]
