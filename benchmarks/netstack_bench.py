"""Userspace TCP/IP stack benchmark: our NetStack against the Linux kernel, through wireguard-go.

Needs root: builds its own lab namespaces (tests/lab) and removes them, pass or fail.

    .venv/bin/python benchmarks/netstack_bench.py              # everything, prints one table
    .venv/bin/python benchmarks/netstack_bench.py --size 64    # MiB per throughput run
    .venv/bin/python benchmarks/netstack_bench.py --profile    # + cProfile of the Python->kernel transfer
    .venv/bin/python benchmarks/netstack_bench.py --profile-rx # + cProfile of the kernel->Python transfer

Rows:

* kernel<->kernel: two namespaces, each with Debian wireguard-go on a TUN (MTU 1280), peered
  over a veth; a plain-socket sender/receiver process in each (the reference).
* Python->kernel and kernel->Python: our stack (``open_static_peer``: our WireGuard over one
  UDP socket) against the kernel behind wireguard-go, single TCP stream.
* 1-byte request/response round trip: Python client, kernel echo server (and kernel<->kernel).
* Memory per idle connection: 1,000 connections between two in-memory NetStacks (tracemalloc).

Throughput is measured by the receiver, from its first byte to EOF. Ratios are Python/kernel.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import ipaddress
import os
import pstats
import socket
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trio  # noqa: E402

from tests.interop.netstack_helpers import (  # noqa: E402
    NetstackSetup,
    make_netstack_setup,
    receive_all,
    receive_exactly,
    run_kernel_peer,
)
from tests.lab import Lab, PeerConfig, start_wireguard_go  # noqa: E402
from tsnet.key import NodePrivate  # noqa: E402

MiB = 1024 * 1024
TARGET_IDLE_BYTES = 64 * 1024


def mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- kernel<->kernel reference ------------------------------------------------------------------------------------


def kernel_reference(size: int, rtt_count: int, repeat: int = 1, loss: float = 0.0) -> dict[str, float]:
    """Two wireguard-go namespaces over a veth; kernel TCP through both tunnels."""
    results: dict[str, float] = {}
    with Lab() as lab:
        a, b = lab.namespace("ka"), lab.namespace("kb")
        link = lab.link(a, b)
        overlay = lab.subnet()
        ka, kb = NodePrivate.generate(), NodePrivate.generate()
        wga = start_wireguard_go(
            a, private_key=ka.raw, address=f"{overlay[1]}/24", listen_port=51820,
            peers=[PeerConfig(kb.public.raw, allowed_ips=[f"{overlay[2]}/32"], endpoint=f"{link.b_addr}:51820")],
        )
        wgb = start_wireguard_go(
            b, private_key=kb.raw, address=f"{overlay[2]}/24", listen_port=51820,
            peers=[PeerConfig(ka.public.raw, allowed_ips=[f"{overlay[1]}/32"], endpoint=f"{link.a_addr}:51820")],
        )
        del wga, wgb
        if loss:
            # Both directions of the tunnel's UDP on the veth, as NetstackSetup.add_loss does for the Python rows.
            a.random_loss(loss, chain="INPUT", iface=link.a_if, proto="udp")
            a.random_loss(loss, chain="OUTPUT", iface=link.a_if, proto="udp")

        def listener(ns: Any, addr: ipaddress.IPv4Address) -> tuple[socket.socket, int]:
            sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((str(addr), 0))
            sock.listen(16)
            sock.set_inheritable(True)
            return sock, sock.getsockname()[1]

        async def main() -> None:
            for label, src, dst, dst_addr in (("a->b", a, b, overlay[2]), ("b->a", b, a, overlay[1])) * repeat:
                lsock, port = listener(dst, dst_addr)
                async with trio.open_nursery() as nursery:
                    box: dict[str, Any] = {}

                    async def recv() -> None:
                        box["r"] = await run_kernel_peer(dst, "recv", lsock.fileno(), pass_fds=[lsock.fileno()])

                    nursery.start_soon(recv)
                    await run_kernel_peer(src, "connect-send", dst_addr, port, size)
                lsock.close()
                r = box["r"]
                assert r.nbytes == size, r.data
                rate = mbit(r.nbytes, r.data["seconds"])
                results[f"mbit {label}"] = max(rate, results.get(f"mbit {label}", 0.0))  # best of repeat
            lsock, port = listener(b, overlay[2])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_kernel_peer(b, "echo", lsock.fileno(), pass_fds=[lsock.fileno()]))
                r = await run_kernel_peer(a, "rtt", overlay[2], port, rtt_count)
            lsock.close()
            rtts = r.data["rtts"][min(100, rtt_count // 10):]  # skip warm-up
            results["rtt median"] = statistics.median(rtts)
            results["rtt p99"] = percentile(rtts, 0.99)

        trio.run(main)
    return results


# -- Python <-> kernel ------------------------------------------------------------------------------------------


POOL = os.urandom(4 * MiB + 1)  # random bytes sent in rotating slices: no urandom cost inside the timed transfer


async def send_pool(stream: Any, size: int, chunk: int = 64 * 1024) -> tuple[int, str]:
    """Send ``size`` bytes cut from :data:`POOL` (offset shifts by one byte per lap); return (size, SHA-256)."""
    import hashlib

    digest = hashlib.sha256()
    view = memoryview(POOL)
    left, offset, lap = size, 0, 0
    while left:
        n = min(chunk, left, len(POOL) - offset)
        piece = view[offset:offset + n]
        digest.update(piece)
        await stream.send_all(piece)
        left -= n
        offset += n
        if offset == len(POOL):
            lap += 1
            offset = lap % 1024
    return size, digest.hexdigest()


async def python_to_kernel(s: NetstackSetup, net: Any, size: int, profile: cProfile.Profile | None) -> float:
    lsock, port = s.kernel_listener(4)
    box: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:

        async def recv() -> None:
            box["r"] = await run_kernel_peer(s.kernel_ns, "recv", lsock.fileno(), pass_fds=[lsock.fileno()])

        nursery.start_soon(recv)
        stream = await net.open_tcp_stream(s.kernel_addr(4), port, timeout=10)
        if profile is not None:
            profile.enable()
        sent = await send_pool(stream, size)
        await stream.send_eof()
        assert (await receive_all(stream)).nbytes == 0  # the kernel closes once it has read everything
        if profile is not None:
            profile.disable()
        await stream.aclose()
    lsock.close()
    r = box["r"]
    assert (r.nbytes, r.sha256) == sent, "data corrupted Python->kernel"
    return mbit(r.nbytes, r.data["seconds"])


async def kernel_to_python(s: NetstackSetup, net: Any, size: int, profile: cProfile.Profile | None = None) -> float:
    listener = await net.open_tcp_listener(5201)
    box: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            box["k"] = await run_kernel_peer(s.kernel_ns, "connect-send", s.our_addr(4), 5201, size)

        nursery.start_soon(send)
        stream = await listener.accept()
        if profile is not None:
            profile.enable()
        got = await receive_all(stream)
        if profile is not None:
            profile.disable()
        await stream.aclose()
    await listener.aclose()
    k = box["k"]
    assert (got.nbytes, got.sha256) == (k.nbytes, k.sha256), "data corrupted kernel->Python"
    return got.mbit_per_s


async def python_rtt(s: NetstackSetup, net: Any, count: int) -> list[float]:
    lsock, port = s.kernel_listener(4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_kernel_peer(s.kernel_ns, "echo", lsock.fileno(), pass_fds=[lsock.fileno()]))
        stream = await net.open_tcp_stream(s.kernel_addr(4), port, timeout=10)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            await stream.send_all(b"x")
            await receive_exactly(stream, 1)
            times.append(time.perf_counter() - t0)
        await stream.send_eof()
        await receive_all(stream)
        await stream.aclose()
    lsock.close()
    return times[min(100, count // 10):]


def python_vs_kernel(
    size: int, rtt_count: int, profile: cProfile.Profile | None, repeat: int = 1, loss: float = 0.0,
    profile_rx: cProfile.Profile | None = None,
) -> dict[str, float]:
    results: dict[str, float] = {}
    with Lab() as lab:
        s = make_netstack_setup(lab)
        if loss:
            s.add_loss(loss)

        async def main() -> None:
            async with s.our_stack() as net:
                for _ in range(repeat):  # best of repeat, like the reference
                    rate = await python_to_kernel(s, net, size, None)
                    results["mbit py->k"] = max(rate, results.get("mbit py->k", 0.0))
                    rate = await kernel_to_python(s, net, size)
                    results["mbit k->py"] = max(rate, results.get("mbit k->py", 0.0))
                rtts = await python_rtt(s, net, rtt_count)
                results["rtt median"] = statistics.median(rtts)
                results["rtt p99"] = percentile(rtts, 0.99)
                if profile is not None:
                    # A separate run: the profiler's own overhead must not distort the timed transfers.
                    await python_to_kernel(s, net, size, profile)
                if profile_rx is not None:
                    await kernel_to_python(s, net, size, profile_rx)

        trio.run(main)
    return results


# -- memory per idle connection -----------------------------------------------------------------------------------


async def _idle_connection_memory(n: int) -> float:
    """Bytes per established idle connection: tracemalloc growth over ``n`` connections, both ends counted."""
    from tsnet.netstack.sockets import NetStack
    from tsnet.netstack.stack import Stack

    queues: dict[str, list[bytes]] = {"a": [], "b": []}
    wake = trio.Event()
    stacks: dict[str, Any] = {}

    def sender(dest: str) -> Callable[[list[bytes]], None]:
        def send_packets(packets: Any) -> None:
            nonlocal wake
            queues[dest].extend(bytes(p) for p in packets)
            wake.set()

        return send_packets

    now = trio.current_time()
    stacks["a"] = NetStack(Stack(["10.0.0.1"], now=now), sender("b"))
    stacks["b"] = NetStack(Stack(["10.0.0.2"], now=now), sender("a"))

    async def pump() -> None:
        # Delivery in a separate task: one side's output never re-enters the other synchronously.
        nonlocal wake
        while True:
            await wake.wait()
            wake = trio.Event()
            for name in ("a", "b"):
                if queues[name]:
                    batch, queues[name] = queues[name], []
                    stacks[name].deliver(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stacks["a"].run)
        nursery.start_soon(stacks["b"].run)
        nursery.start_soon(pump)
        listener = await stacks["b"].open_tcp_listener(80, backlog=n)
        # Warm up allocator caches and lazily built structures with a few connections first.
        warm = []
        for _ in range(8):
            c = await stacks["a"].open_tcp_stream("10.0.0.2", 80, timeout=10)
            warm.append((c, await listener.accept()))
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        pairs = []
        for _ in range(n):
            c = await stacks["a"].open_tcp_stream("10.0.0.2", 80, timeout=10)
            pairs.append((c, await listener.accept()))
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_conn = (after - before) / n
        del warm, pairs  # kept referenced until here, so every connection was alive when measured
        nursery.cancel_scope.cancel()
    return per_conn


def idle_memory(n: int) -> float:
    import trio.testing  # noqa: F401 - wait_all_tasks_blocked

    return trio.run(_idle_connection_memory, n)


# -- table --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="MiB per throughput run (default 256)")
    p.add_argument("--rtt-count", type=int, default=2000, help="1-byte round trips (default 2000)")
    p.add_argument("--conns", type=int, default=1000, help="idle connections for the memory row (default 1000)")
    p.add_argument("--repeat", type=int, default=1, help="throughput runs per row; the best counts (default 1)")
    p.add_argument("--loss", type=float, default=0.0,
                   help="random loss of the tunnel's UDP on the veth, each direction, for every row (e.g. 0.03)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile one extra Python->kernel transfer (not the timed one), print top by tottime")
    p.add_argument("--profile-rx", action="store_true",
                   help="print a cProfile of a separate (untimed) kernel->Python transfer")
    p.add_argument("--only", choices=["kernel", "python", "memory"], action="append", help="run only these parts")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("netstack_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    parts = set(args.only or ["kernel", "python", "memory"])
    size = args.size * MiB
    ref: dict[str, float] = {}
    py: dict[str, float] = {}
    mem: float | None = None
    profile = cProfile.Profile() if args.profile else None
    profile_rx = cProfile.Profile() if args.profile_rx else None
    if "kernel" in parts:
        ref = kernel_reference(size, args.rtt_count, args.repeat, args.loss)
    if "python" in parts:
        py = python_vs_kernel(size, args.rtt_count, profile, args.repeat, args.loss, profile_rx)
    if "memory" in parts:
        mem = idle_memory(args.conns)

    ref_mbit = statistics.mean([ref["mbit a->b"], ref["mbit b->a"]]) if ref else float("nan")

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}x" if ref and y == y and y > 0 else "-"

    rows: list[tuple[str, str, str, str]] = []
    if ref:
        rows.append(("kernel<->kernel TCP a->b (2x wireguard-go)", f"{ref['mbit a->b']:.0f} Mbit/s", "", "reference"))
        rows.append(("kernel<->kernel TCP b->a (2x wireguard-go)", f"{ref['mbit b->a']:.0f} Mbit/s", "", "reference"))
    if py:
        rows.append(("Python->kernel TCP (1 stream)", f"{py['mbit py->k']:.0f} Mbit/s", ratio(py["mbit py->k"], ref_mbit), ">= 1.0x"))
        rows.append(("kernel->Python TCP (1 stream)", f"{py['mbit k->py']:.0f} Mbit/s", ratio(py["mbit k->py"], ref_mbit), ">= 1.0x"))
    if ref:
        rows.append(("kernel<->kernel 1-byte RTT median", f"{ref['rtt median'] * 1e6:.0f} us", "", "reference"))
        rows.append(("kernel<->kernel 1-byte RTT p99", f"{ref['rtt p99'] * 1e6:.0f} us", "", "reference"))
    if py:
        # For latency the ratio is kernel/Python, so that >= 1.0x also means "as good as the kernel".
        rows.append(("Python<->kernel 1-byte RTT median", f"{py['rtt median'] * 1e6:.0f} us", ratio(ref.get("rtt median", 0), py["rtt median"]), ""))
        rows.append(("Python<->kernel 1-byte RTT p99", f"{py['rtt p99'] * 1e6:.0f} us", ratio(ref.get("rtt p99", 0), py["rtt p99"]), ""))
    if mem is not None:
        rows.append((f"memory per idle connection ({args.conns} pairs, both ends)", f"{mem / 1024:.1f} KiB",
                     "", f"<= {TARGET_IDLE_BYTES // 1024} KiB {'ok' if mem <= TARGET_IDLE_BYTES else 'OVER'}"))
    loss_note = f", {args.loss:.1%} loss each way" if args.loss else ""
    print(f"\nnetstack_bench: {args.size} MiB per transfer (best of {args.repeat}){loss_note}, {args.rtt_count} round trips, "
          f"MTU 1280, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}")
    widths = [max(len(r[i]) for r in rows + [("what", "value", "ratio", "target")]) for i in range(4)]
    header = ("what", "value", "ratio", "target")
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if py or ref:
        print("ratios: throughput Python/kernel<->kernel mean; RTT kernel<->kernel/Python (>= 1.0x means as fast)")
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print("\ncProfile of the Python->kernel transfer (top 25 by tottime):")
        print(out.getvalue())
    if profile_rx is not None:
        out = io.StringIO()
        pstats.Stats(profile_rx, stream=out).sort_stats("tottime").print_stats(25)
        print("\ncProfile of the kernel->Python transfer (top 25 by tottime):")
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
