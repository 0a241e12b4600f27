"""Netstack host-layer benchmark (no root needed): the sans-IO Stack and the trio NetStack in memory
and in static-peer mode over loopback WireGuard. Prints one table.

    .venv/bin/python benchmarks/stack_bench.py            # defaults
    .venv/bin/python benchmarks/stack_bench.py --size 64  # MiB per throughput run

Rows:

* Stack.receive_packets per packet: ICMP echo (reply built), UDP to a bound port, TCP segment
  to a closed port (RST built), and SYNs into a full listener (dropped), batches of 1000.
* In-memory TCP: two NetStacks in one process joined by memory channels (both stacks' CPU
  on one core), one stream; 1-byte request/response round trip.
* Static peer TCP: ``open_static_peer`` twice on 127.0.0.1 (WireGuard encryption included).
* 1,000 concurrent connections: handshake + 1 byte each way + close, in memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trio  # noqa: E402

from tests.netstack.netutil import A4, B4, SYN, echo_request, netstack_pair, tcp, udp  # noqa: E402
from tsnet.key import NodePrivate  # noqa: E402
from tsnet.netstack.stack import Stack  # noqa: E402
from tsnet.netstack.static import open_static_peer  # noqa: E402
from tsnet.wg.driver import open_udp_socket  # noqa: E402

MiB = 1024 * 1024
rows: list[tuple[str, str]] = []


def per_packet(name: str, packets: list[bytes], setup) -> None:
    best = float("inf")
    for _ in range(5):
        s = Stack([A4], now=0.0, icmp_rate=1e12, icmp_burst=10**9, udp_queue_limit=10**9)
        setup(s)
        t = time.perf_counter()
        s.receive_packets(packets, 1.0)
        s.packets_to_send()
        best = min(best, time.perf_counter() - t)
    rows.append((f"Stack: {name}", f"{best / len(packets) * 1e6:.2f} µs/packet"))


def sans_io_rows() -> None:
    n = 1000
    per_packet("ICMP echo -> reply", [echo_request(B4, A4, 1, i, b"x" * 56) for i in range(n)], lambda s: None)
    per_packet("UDP 1200 B -> queue", [udp(B4, A4, 1000, 53, b"q" * 1200)] * n, lambda s: s.udp_bind(port=53))
    per_packet("TCP to closed port -> RST", [tcp(B4, A4, 1000 + i, 80, 1, 0, SYN) for i in range(n)],
               lambda s: None)
    per_packet("SYN to full listener -> drop", [tcp(B4, A4, 1000 + i, 80, 1, 0, SYN) for i in range(n)],
               lambda s: s.tcp_listen(80, backlog=1) and s.receive_packet(tcp(B4, A4, 9, 80, 1, 0, SYN), 0.0))


async def transfer(a, b, host: str, size: int) -> float:
    listener = await b.open_tcp_listener(5001)
    elapsed: list[float] = []

    async def sink() -> None:
        s = await listener.accept()
        t0 = None
        while d := await s.receive_some(1 << 20):
            if t0 is None:
                t0 = time.perf_counter()
        elapsed.append(time.perf_counter() - t0)
        await s.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink)
        s = await a.open_tcp_stream(host, 5001, timeout=10)
        chunk = bytes(256 * 1024)
        for _ in range(size // len(chunk)):
            await s.send_all(chunk)
        await s.send_eof()
        await s.aclose()
    await listener.aclose()
    return size * 8 / elapsed[0] / 1e6


async def rtt(a, b, host: str, n: int = 500) -> float:
    listener = await b.open_tcp_listener(5002)

    async def echo() -> None:
        s = await listener.accept()
        while d := await s.receive_some():
            await s.send_all(d)
        await s.aclose()

    samples = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        s = await a.open_tcp_stream(host, 5002, timeout=10)
        for _ in range(n):
            t = time.perf_counter()
            await s.send_all(b"x")
            await s.receive_some()
            samples.append(time.perf_counter() - t)
        await s.aclose()
    await listener.aclose()
    return statistics.median(samples) * 1e6


async def many(a, b, host: str, n: int = 1000) -> float:
    listener = await b.open_tcp_listener(5003, backlog=n)

    async def handler(s) -> None:
        await s.send_all(await s.receive_some())
        await s.aclose()

    async def client() -> None:
        s = await a.open_tcp_stream(host, 5003, timeout=60)
        await s.send_all(b"x")
        await s.receive_some()
        await s.aclose()

    async with trio.open_nursery() as server:
        server.start_soon(trio.serve_listeners, handler, [listener])
        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(client)
        dt = time.perf_counter() - t
        server.cancel_scope.cancel()
    return n / dt


async def async_rows(size: int) -> None:
    async with netstack_pair() as (a, b, _link):
        rows.append(("in-memory TCP throughput", f"{await transfer(a, b, B4, size):.0f} Mbit/s"))
        rows.append(("in-memory 1-byte RTT (median)", f"{await rtt(a, b, B4):.0f} µs"))
        rows.append(("in-memory 1,000 concurrent connections", f"{await many(a, b, B4):.0f} conn/s"))
    ak, bk = NodePrivate.generate(), NodePrivate.generate()
    asock, bsock = open_udp_socket("127.0.0.1", 0), open_udp_socket("127.0.0.1", 0)
    async with (
        open_static_peer(bk, ak.public, addresses=["10.9.0.2"], sock=bsock) as b,
        open_static_peer(ak, bk.public, addresses=["10.9.0.1"], sock=asock, peer_endpoint=bsock.getsockname()) as a,
    ):
        rows.append(("static peer (WireGuard, loopback) TCP throughput",
                     f"{await transfer(a, b, '10.9.0.2', size):.0f} Mbit/s"))
        rows.append(("static peer 1-byte RTT (median)", f"{await rtt(a, b, '10.9.0.2'):.0f} µs"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="MiB per throughput run")
    args = ap.parse_args()
    sans_io_rows()
    trio.run(async_rows, args.size * MiB)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  result")
    print("-" * (width + 20))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
