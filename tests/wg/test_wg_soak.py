"""A simulated lossy, duplicating, reordering network over several rekey cycles.

Invariants: nothing raises, no inner packet is ever delivered twice or
invented, and once the network heals traffic flows both ways again.
"""

from __future__ import annotations

import random

import pytest

from tests.wg.wgutil import Clock, CountingRng, ipv4, key
from tsnet.wg import Limits, PacketReceived, WireGuard

LIMITS = Limits(
    rekey_after_messages=40,
    rekey_after_time=12.0,
    reject_after_time=20.0,
    rekey_attempt_time=6.0,
    rekey_timeout=1.0,
    rekey_timeout_jitter=0.2,
    keepalive_timeout=2.0,
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lossy_network_soak(seed: int) -> None:
    rnd = random.Random(seed)
    clock = Clock(0.0)
    addrs = [("10.2.0.1", 1), ("10.2.0.2", 2)]
    devs = [
        WireGuard(key(1), now=0.0, limits=LIMITS, rng=CountingRng(seed * 10 + 1), wall_clock=lambda: 1e9 + clock.now),
        WireGuard(key(2), now=0.0, limits=LIMITS, rng=CountingRng(seed * 10 + 2), wall_clock=lambda: 1e9 + clock.now),
    ]
    devs[0].add_peer(devs[1].public_key, endpoint=addrs[1])
    devs[1].add_peer(devs[0].public_key, endpoint=addrs[0])
    in_flight: list[tuple[float, int, bytes]] = []  # (deliver at, destination index, payload)
    sent: list[set[bytes]] = [set(), set()]  # inner packets sent by side i
    delivered: list[list[bytes]] = [[], []]  # inner packets received by side i
    loss = 0.15
    seq = 0

    def step(dt: float, traffic: float) -> None:
        nonlocal seq
        clock.now += dt
        for i, dev in enumerate(devs):
            t = dev.get_timer()
            if t is not None and t <= clock.now:
                dev.handle_timer(clock.now)
            if rnd.random() < traffic:
                seq += 1
                pkt = ipv4(b"%d:%d" % (i, seq))
                sent[i].add(pkt)
                dev.send_packet(devs[1 - i].public_key, pkt, clock.now)
            for payload, dst in dev.datagrams_to_send(clock.now):
                j = addrs.index(dst)
                copies = 0 if rnd.random() < loss else (2 if rnd.random() < 0.05 else 1)
                for _ in range(copies):
                    in_flight.append((clock.now + rnd.uniform(0.0, 0.3), j, bytes(payload)))
        due = [m for m in in_flight if m[0] <= clock.now]
        in_flight[:] = [m for m in in_flight if m[0] > clock.now]
        rnd.shuffle(due)
        for _t, j, payload in due:
            devs[j].receive_datagram(payload, addrs[1 - j], clock.now)
            for ev in devs[j].drain_events():
                if isinstance(ev, PacketReceived):
                    delivered[j].append(ev.packet)

    for _ in range(1500):  # 150 simulated seconds: several rekeys and expiries
        step(0.1, traffic=0.3)
    loss = 0.0
    for _ in range(100):  # the network heals
        step(0.1, traffic=0.3)
    marks = [len(delivered[0]), len(delivered[1])]
    for _ in range(50):
        step(0.1, traffic=0.5)

    for i in (0, 1):
        c = devs[i].counters
        assert c.drop_internal_error == 0
        assert c.drop_data_invalid == 0 and c.drop_handshake_invalid == 0  # nothing is corrupted in flight
        assert len(delivered[i]) == len(set(delivered[i])), "a packet was delivered twice"
        assert set(delivered[i]) <= sent[1 - i], "a packet was invented"
        assert len(delivered[i]) > marks[i] + 10, "traffic did not resume after the network healed"
        assert c.handshakes_completed >= 3  # rekeys happened
    assert sum(d.counters.drop_replayed for d in devs) > 0  # the duplicates were caught
