"""Shared helpers for the WireGuard core tests: deterministic keys/rng, a fake network, packets."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from tsnet.key import NodePrivate, clamp
from tsnet.wg import Limits, WireGuard
from tsnet.wg.events import Event


def key(n: int) -> NodePrivate:
    """A fixed private key derived from ``n``."""
    return NodePrivate(clamp(hashlib.sha256(b"wg-test-key-%d" % n).digest()))


class CountingRng:
    """Deterministic randomness: SHA-256 in counter mode over a seed."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(b"%d/%d" % (self.seed, self.counter)).digest()
            self.counter += 1
        return out[:n]


def ipv4(payload: bytes = b"hello", src: bytes = bytes([10, 0, 0, 1]), dst: bytes = bytes([10, 0, 0, 2])) -> bytes:
    """A minimal IPv4 packet (protocol 253, checksum not filled: the core does not check it)."""
    total = 20 + len(payload)
    return bytes([0x45, 0]) + struct.pack(">H", total) + bytes(4) + bytes([64, 253, 0, 0]) + src + dst + payload


def ipv6(payload: bytes = b"hello6") -> bytes:
    return bytes([0x60, 0, 0, 0]) + struct.pack(">H", len(payload)) + bytes([253, 64]) + bytes(32) + payload


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


@dataclass
class Net:
    """Two or more devices wired together; datagrams are delivered when ``pump`` is called."""

    clock: Clock
    devices: dict[object, WireGuard] = field(default_factory=dict)  # addr -> device
    log: list[tuple[object, object, bytes]] = field(default_factory=list)  # (src, dst, payload)
    drop: object = None  # optional predicate (src, dst, payload) -> bool

    def add(self, addr: object, dev: WireGuard) -> WireGuard:
        self.devices[addr] = dev
        return dev

    def addr_of(self, dev: WireGuard) -> object:
        return next(a for a, d in self.devices.items() if d is dev)

    def pump(self, rounds: int = 10) -> int:
        """Deliver until quiet; returns the number of datagrams delivered."""
        delivered = 0
        for _ in range(rounds):
            moved = False
            for src, dev in list(self.devices.items()):
                for payload, dst in dev.datagrams_to_send(self.clock.now):
                    payload = bytes(payload)
                    self.log.append((src, dst, payload))
                    if self.drop is not None and self.drop(src, dst, payload):
                        continue
                    target = self.devices.get(dst)
                    if target is not None:
                        target.receive_datagram(payload, src, self.clock.now)
                        delivered += 1
                        moved = True
            if not moved:
                break
        return delivered

    def tick(self, until: float) -> None:
        """Advance the clock to ``until``, firing every device timer on the way, pumping in between."""
        while True:
            timers = [t for d in self.devices.values() if (t := d.get_timer()) is not None and t <= until]
            if not timers:
                break
            self.clock.now = max(self.clock.now, min(timers))
            for dev in self.devices.values():
                t = dev.get_timer()
                if t is not None and t <= self.clock.now:
                    dev.handle_timer(self.clock.now)
            self.pump()
        self.clock.now = until


def make_pair(
    limits: Limits | None = None, *, clock: Clock | None = None, roaming: bool = True, psk: bytes | None = None
) -> tuple[Net, WireGuard, WireGuard]:
    clock = clock or Clock()
    net = Net(clock)
    ka, kb = key(1), key(2)
    a = net.add(("10.1.0.1", 51820), WireGuard(ka, now=clock.now, limits=limits, rng=CountingRng(1), roaming=roaming,
                                               wall_clock=lambda: 1_700_000_000.0 + clock.now))
    b = net.add(("10.1.0.2", 51820), WireGuard(kb, now=clock.now, limits=limits, rng=CountingRng(2), roaming=roaming,
                                               wall_clock=lambda: 1_700_000_000.0 + clock.now))
    a.add_peer(kb.public, endpoint=("10.1.0.2", 51820), preshared_key=psk)
    b.add_peer(ka.public, endpoint=("10.1.0.1", 51820), preshared_key=psk)
    return net, a, b


def events_of(dev: WireGuard, kind: type) -> list[Event]:
    return [e for e in dev.drain_events() if isinstance(e, kind)]


def msg_type(payload: bytes) -> int:
    return payload[0]
