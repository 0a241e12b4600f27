"""Per-packet costs of the disco codec, the demux and the peer relay, plus relay throughput on loopback.

Core rows time the sans-IO calls alone (best of several runs, microseconds per
call). The loopback row pushes 1280-byte Geneve/WireGuard datagrams from one
client socket through the trio relay driver to another client socket on
127.0.0.1, in bursts, and counts what arrives (UDP: overruns are dropped, the
table reports both sent and received). It runs twice: with plain clients (one
``sendto``/``recv`` per datagram) and with clients that batch like our
WireGuard drivers (:mod:`tsnet.udpio`: UDP_SEGMENT bursts, UDP_GRO receives),
and shows the relay's own syscalls per forwarded datagram. The relay runs in
its own thread (own trio loop), so its CPU time per forwarded datagram
(``thread_time``, syscalls included, GIL waits excluded) is reported apart
from the clients'.

The run rows time the relay's handling of one UDP_GRO buffer of 50 x 1288-byte
datagrams: the per-datagram path (split into slices, ``receive_datagram`` each,
regroup per destination: what the driver did before the run path) against
``RelayServer.forward_run`` (one lookup and strided header checks per run).

The latency rows bounce one datagram at a time A -> relay -> B -> relay -> A
with blocking clients (in a separate process) and compare with A -> B -> A without the relay: half the
difference is what one traversal of the relay (wakeup, core, send) costs.

Run: .venv/bin/python benchmarks/relay_bench.py [--packets N]
"""

from __future__ import annotations

import argparse
import functools
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

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
# Client datagrams in flight (plain clients: one skb each, a smaller window keeps socket buffers from overflowing).
WINDOW = {False: 512, True: 4096}
RUN_SEGMENTS = 50  # 1288-byte datagrams per 64 KiB GRO buffer
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
    srv, _ep, ha, _hb = bound_relay_pair(AddrPort.parse("192.0.2.1:7000"), A_ADDR, B_ADDR, 0.0)
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

    run = bytes(wg) * RUN_SEGMENTS  # one GRO buffer: RUN_SEGMENTS datagrams of one flow
    seg = len(wg)

    def run_per_datagram(k):
        # What the driver did per GRO buffer before forward_run: slice, per-datagram core call, regroup.
        recv = srv.receive_datagram
        for _ in range(k // RUN_SEGMENTS):
            mv = memoryview(run)
            pending: dict = {}
            for off in range(0, len(run), seg):
                out = recv(mv[off:off + seg], A_ADDR, 1.0)
                if out is not None:
                    fwd, dst = out
                    group = pending.get(dst)
                    if group is None:
                        group = pending[dst] = []
                    group.append((fwd, dst))

    def run_whole(k):
        fr = srv.forward_run
        for _ in range(k // RUN_SEGMENTS):
            fr(run, seg, A_ADDR, 1.0)

    per = (n // RUN_SEGMENTS) * RUN_SEGMENTS
    rows = [
        ("disco seal ping (124 B)", best_of(seal, n // 10)),
        ("disco open+parse ping", best_of(open_, n // 10)),
        ("demux classify Geneve WG (1288 B)", best_of(demux, n)),
        ("relay core forward (1288 B)", best_of(forward, n)),
        (f"run of {RUN_SEGMENTS}, per-datagram path, per dg", best_of(run_per_datagram, per)),
    ]
    if hasattr(srv, "forward_run"):  # (so this script also measures older checkouts)
        rows.append((f"run of {RUN_SEGMENTS}, forward_run, per dg", best_of(run_whole, per)))
    return rows


class RelayThread:
    """The relay driver on its own trio loop in a thread, to measure its CPU time apart from the clients'."""

    def __init__(self, make_server, sock) -> None:
        # make_server(now) -> RelayServer, called on the relay's own trio clock (its GC timer runs on it).
        self.make_server, self.sock = make_server, sock
        self.srv = None
        self.counters = RelayIOCounters()
        self.cpu = 0.0
        self.started = threading.Event()
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self.srv = self.make_server(trio.current_time())
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, self.srv, self.sock, counters=self.counters))
            t0 = time.thread_time()
            self.started.set()
            await trio.lowlevel.wait_readable(self._stop_r)
            self.cpu = time.thread_time() - t0
            nursery.cancel_scope.cancel()

    def __enter__(self) -> Self:
        self._thread.start()
        if not self.started.wait(10):
            raise RuntimeError("relay thread did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._stop_w.send(b"x")
        self._thread.join(10)
        self._stop_r.close()
        self._stop_w.close()


def loopback_sockets() -> tuple[Any, AddrPort, Any, Any, AddrPort, AddrPort]:
    """The relay's socket and two clients' sockets on 127.0.0.1, with their addresses."""
    relay_sock = open_udp_socket("127.0.0.1", 0)
    ca, cb = open_udp_socket("127.0.0.1", 0), open_udp_socket("127.0.0.1", 0)
    return (relay_sock, AddrPort.from_sockaddr(relay_sock.getsockname()), ca, cb,
            AddrPort.from_sockaddr(ca.getsockname()), AddrPort.from_sockaddr(cb.getsockname()))


async def loopback(n: int, burst: int = 32, batched_clients: bool = False
                   ) -> tuple[int, int, float, RelayIOCounters, float]:
    relay_sock, relay_addr, ca, cb, a_addr, b_addr = loopback_sockets()
    clients = []

    def make_server(now: float):
        srv, _ep, ha, _hb = bound_relay_pair(relay_addr, a_addr, b_addr, now)
        clients.append(ha)
        return srv

    received = 0
    sent = 0
    done = trio.Event()
    progress = trio.Event()  # set by the receiver whenever datagrams arrived

    async def receiver():
        nonlocal received, progress
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
            progress.set()
            if received >= n:
                done.set()
                return

    async def sender():
        nonlocal sent, progress
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
            # Flow control: at most WINDOW datagrams in flight, so the relay (in its own thread) is
            # measured forwarding, not the kernel dropping a flood. A loss shows as a stall: stop then.
            while sent - received > WINDOW[batched_clients]:
                progress = trio.Event()
                with trio.move_on_after(1):
                    await progress.wait()
                if progress.is_set():
                    continue
                done.set()
                return
            await trio.lowlevel.checkpoint()

    with relay_sock, ca, cb, RelayThread(make_server, relay_sock) as relay:
        wg = clients[0].wrap_wireguard(b"\x04\x00\x00\x00" + bytes(SIZE - 4))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            t0 = time.perf_counter()
            nursery.start_soon(sender)
            with trio.move_on_after(30):
                await done.wait()
            elapsed = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
    return sent, received, elapsed, relay.counters, relay.cpu


_LATENCY_CLIENT = """
import socket, sys, time
fa, fb, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
relay = ("127.0.0.1", int(sys.argv[4]))
a_pkt, b_pkt = bytes.fromhex(sys.argv[5]), bytes.fromhex(sys.argv[6])
ca, cb = socket.socket(fileno=fa), socket.socket(fileno=fb)
for c in (ca, cb):
    c.setblocking(True)
    c.settimeout(2.0)
def rtts(to_b, to_a):
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ca.sendto(a_pkt, to_b)
        cb.recv(4096)
        cb.sendto(b_pkt, to_a)
        ca.recv(4096)
        out.append((time.perf_counter() - t0) * 1e6)
    out.sort()
    return out
via = rtts(relay, relay)
direct = rtts(cb.getsockname(), ca.getsockname())
print(via[len(via) // 2], via[len(via) * 99 // 100], direct[len(direct) // 2])
"""


def latency(rounds: int) -> tuple[float, float, float]:
    """Median and p99 round-trip time A -> relay -> B -> relay -> A (one datagram in flight, blocking clients),
    and the same round trip without the relay (A -> B -> A) as the clients' own share, in microseconds.

    The clients run in a separate process, so they never compete with the relay thread for the GIL.
    """
    relay_sock, relay_addr, ca, cb, a_addr, b_addr = loopback_sockets()
    clients = []

    def make_server(now: float):
        srv, _ep, ha, hb = bound_relay_pair(relay_addr, a_addr, b_addr, now)
        clients.append((ha, hb))
        return srv

    with relay_sock, ca, cb, RelayThread(make_server, relay_sock):
        ha, hb = clients[0]
        a_pkt = ha.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(SIZE - 4))
        b_pkt = hb.wrap_wireguard(b"\x04\x00\x00\x00" + bytes(SIZE - 4))
        out = subprocess.run(
            [sys.executable, "-c", _LATENCY_CLIENT, str(ca.fileno()), str(cb.fileno()), str(rounds),
             str(relay_addr.port), a_pkt.hex(), b_pkt.hex()],
            pass_fds=(ca.fileno(), cb.fileno()), capture_output=True, text=True, timeout=120, check=True)
    med, p99, direct = (float(x) for x in out.stdout.split())
    return med, p99, direct


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
          f" {'rx sys/dg':>9} {'tx sys/dg':>9} {'relay us/dg':>11}")
    for label, batched in (("plain clients", False), ("batched clients (GSO/GRO)", True)):
        sent, received, elapsed, io, cpu = trio.run(loopback, args.packets, 32, batched)
        pps = received / elapsed
        rx = io.receive_syscalls / max(1, io.datagrams_received)
        tx = io.send_syscalls / max(1, io.datagrams_sent)
        us = cpu / max(1, io.datagrams_sent) * 1e6
        print(f"{label:34} {sent:7d} {received:7d} {pps:8.0f} {pps * (SIZE + 8) * 8 / 1e6:7.1f} {rx:9.3f} {tx:9.3f}"
              f" {us:11.2f}")
    print()
    med, p99, direct = latency(max(200, args.packets // 50))
    print(f"{'relay latency, one datagram in flight':40} {'us':>8}")
    print(f"{'round trip via relay (median)':40} {med:8.1f}")
    print(f"{'round trip via relay (p99)':40} {p99:8.1f}")
    print(f"{'round trip without relay (median)':40} {direct:8.1f}")
    print(f"{'relay share per traversal (median)':40} {(med - direct) / 2:8.1f}")


if __name__ == "__main__":
    main()
