"""Per-packet costs of the disco codec, the demux and the peer relay, plus relay throughput on loopback.

Core rows time the sans-IO calls alone (best of several runs, microseconds per
call). The loopback row pushes 1280-byte Geneve/WireGuard datagrams from one
client socket through the trio relay driver to another client socket on
127.0.0.1, in bursts, and counts what arrives (UDP: overruns are dropped, the
table reports both sent and received). It runs twice: with plain clients (one
``sendto``/``recv`` per datagram) and with clients that batch like our
WireGuard drivers (:mod:`tsnet.udpio`: UDP_SEGMENT bursts, UDP_GRO receives),
and shows the relay's own syscalls per forwarded datagram.

Run: .venv/bin/python benchmarks/relay_bench.py [--packets N]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.lab

from tests.lab.relay import bound_relay_pair  # noqa: E402
from tsnet.key import DiscoPrivate, NodePrivate
from tsnet.magicsock import disco as d
from tsnet.magicsock.addrport import AddrPort
from tsnet.magicsock.demux import classify
from tsnet.relay.driver import RelayIOCounters, open_udp_socket, serve_relay
from tsnet.udpio import UDPReceiver, UDPSender

SIZE = 1280
A_ADDR = AddrPort.parse("198.51.100.1:1")
B_ADDR = AddrPort.parse("198.51.100.2:2")


def best_of(fn, n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def core_rows(n: int) -> list[tuple[str, float]]:
    a, b = d.DiscoBoxes(DiscoPrivate.generate()), d.DiscoBoxes(DiscoPrivate.generate())
    ping = d.Ping(d.new_tx_id(), NodePrivate.generate().public)
    pkt = a.seal(b.public_key, ping)
    srv, ep, ha, _hb = bound_relay_pair(AddrPort.parse("192.0.2.1:7000"), A_ADDR, B_ADDR, 0.0)
    wg = ha.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(SIZE - 4))
    view = memoryview(bytearray(wg))

    def seal(k):
        for _ in range(k):
            a.seal(b.public_key, ping)

    def open_(k):
        for _ in range(k):
            b.open_message(pkt)

    def demux(k):
        for _ in range(k):
            classify(view)

    def forward(k):
        recv = srv.receive_datagram
        for _ in range(k):
            recv(view, A_ADDR, 1.0)

    return [
        ("disco seal ping (124 B)", best_of(seal, n // 10)),
        ("disco open+parse ping", best_of(open_, n // 10)),
        ("demux classify Geneve WG (1288 B)", best_of(demux, n)),
        ("relay core forward (1288 B)", best_of(forward, n)),
    ]


async def loopback(n: int, burst: int = 32, batched_clients: bool = False) -> tuple[int, int, float, RelayIOCounters]:
    relay_sock = open_udp_socket("127.0.0.1", 0)
    relay_addr = AddrPort.from_sockaddr(relay_sock.getsockname())
    ca, cb = open_udp_socket("127.0.0.1", 0), open_udp_socket("127.0.0.1", 0)
    a_addr, b_addr = AddrPort.from_sockaddr(ca.getsockname()), AddrPort.from_sockaddr(cb.getsockname())
    srv, ep, ha, _hb = bound_relay_pair(relay_addr, a_addr, b_addr, trio.current_time())
    wg = ha.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(SIZE - 4))
    counters = RelayIOCounters()
    received = 0
    sent = 0
    done = trio.Event()

    async def receiver():
        nonlocal received
        buf = bytearray(2048)
        batch_rx = UDPReceiver(cb) if batched_clients else None  # (it turns UDP_GRO on)
        got: list = []
        while True:
            await trio.lowlevel.wait_readable(cb)
            if batched_clients:
                batch_rx.receive(got, 1 << 30)  # type: ignore[union-attr]
                received += len(got)
                got.clear()
            else:
                while True:
                    try:
                        cb.recv_into(buf)
                    except BlockingIOError:
                        break
                    received += 1
            if received >= n:
                done.set()
                return

    async def sender():
        nonlocal sent
        dst = relay_addr.to_sockaddr()
        batch_tx = UDPSender(ca) if batched_clients else None
        items = [(wg, dst)] * burst
        while sent < n:
            if batched_clients:
                stop, _ = batch_tx.send(items[: min(burst, n - sent)])  # type: ignore[union-attr]
                sent += stop
            else:
                for _ in range(burst):
                    try:
                        ca.sendto(wg, dst)
                        sent += 1
                    except BlockingIOError:
                        break
            await trio.sleep(0)  # let the relay and receiver drain

    with relay_sock, ca, cb:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, srv, relay_sock, counters=counters))
            nursery.start_soon(receiver)
            t0 = time.perf_counter()
            nursery.start_soon(sender)
            with trio.move_on_after(30):
                await done.wait()
            elapsed = time.perf_counter() - t0
            # let in-flight packets land, then stop
            nursery.cancel_scope.cancel()
    return sent, received, elapsed, counters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=100_000)
    args = ap.parse_args()
    rows = core_rows(args.packets)
    print(f"{'operation':40} {'us/op':>8}")
    for name, us in rows:
        print(f"{name:40} {us:8.2f}")
    print()
    print(f"{'relay over loopback UDP (1288 B)':34} {'sent':>7} {'recv':>7} {'pkt/s':>8} {'Mbit/s':>7}"
          f" {'rx sys/dg':>9} {'tx sys/dg':>9}")
    for label, batched in (("plain clients", False), ("batched clients (GSO/GRO)", True)):
        sent, received, elapsed, io = trio.run(loopback, args.packets, 32, batched)
        pps = received / elapsed
        rx = io.receive_syscalls / max(1, io.datagrams_received)
        tx = io.send_syscalls / max(1, io.datagrams_sent)
        print(f"{label:34} {sent:7d} {received:7d} {pps:8.0f} {pps * (SIZE + 8) * 8 / 1e6:7.1f} {rx:9.3f} {tx:9.3f}")


if __name__ == "__main__":
    main()
