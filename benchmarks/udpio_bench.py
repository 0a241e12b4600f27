"""UDP syscall batching (tsnet.udpio): UDP_SEGMENT sends and UDP_GRO receives against one syscall per datagram.

Run: ``.venv/bin/python benchmarks/udpio_bench.py [--datagrams N] [--repeats R] [--mb M]``. Prints a table.

Loopback only (127.0.0.1).

* **send**: ``N`` datagrams of 1312 bytes (a WireGuard transport message of a 1280-byte packet)
  to one destination, in bursts of 40: a plain ``sendto`` loop, :class:`UDPSender` with GSO off,
  and :class:`UDPSender` with GSO on. Microseconds of process CPU time per datagram, best of ``R``
  interleaved runs (the machine is shared, so interleaving lets load disturb all alike).
* **receive**: draining the same burst: ``recvfrom`` loop, :class:`UDPReceiver` without GRO,
  with GRO on datagrams sent one by one (nothing to coalesce: the cost of ``recvmsg``), and
  with GRO on datagrams sent with GSO (coalesced buffers).
* **Python<->Python TCP**: two ``open_static_peer`` netstacks (our WireGuard driver) over
  loopback in this process, ``--mb`` MiB one way, offload on vs off (``udpio.ENABLE_GSO`` /
  ``ENABLE_GRO``), interleaved, best of ``R`` (at most 5): wall-clock rate and process CPU time
  (user + system, both ends) per MiB, with the drivers' datagram and syscall counters.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trio  # noqa: E402

from tsnet import udpio  # noqa: E402
from tsnet.key import NodePrivate  # noqa: E402
from tsnet.udpio import UDPReceiver, UDPSender  # noqa: E402

SIZE = 1312
BURST = 40
# Process CPU time (user + system): other processes on the shared machine do not inflate it.
_clock = time.process_time


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 64 * 1024 * 1024)  # root: above rmem_max
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024 * 1024)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            if not select.select([sock], [], [], 0.05)[0]:
                return


def micro(n: int, repeats: int) -> list[tuple[str, str]]:
    tx = _socket()
    payloads = [bytes([i % 256]) * SIZE for i in range(n)]
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds / n * 1e6)

    for _ in range(repeats):
        # -- send ------------------------------------------------------------------------------------------------
        rx = _socket()
        dest = rx.getsockname()
        bursts = [[(p, dest) for p in payloads[i:i + BURST]] for i in range(0, n, BURST)]
        t = _clock()
        sendto = tx.sendto
        for burst in bursts:
            for p, a in burst:
                sendto(p, a)
        keep("send: sendto per datagram", _clock() - t)
        _drain(rx)
        for label, gso in (("send: UDPSender, GSO off", False), ("send: UDPSender, GSO on", True)):
            sender = UDPSender(tx, gso=gso)
            t = _clock()
            for burst in bursts:
                sender.send(burst)
            keep(label, _clock() - t)
            assert sender.datagrams_sent == n
            _drain(rx)
        rx.close()

        # -- receive ---------------------------------------------------------------------------------------------
        for label, how, gro in (("receive: recvfrom per datagram", "plain", False),
                                ("receive: UDPReceiver, GRO off", "udpio", False),
                                ("receive: UDPReceiver, GRO on, nothing coalesced", "udpio", True),
                                ("receive: UDPReceiver, GRO on, GSO-sent", "udpio-gso", True)):
            rx = _socket()
            receiver = UDPReceiver(rx, gro=gro)
            dest = rx.getsockname()
            UDPSender(tx, gso=how == "udpio-gso").send([(p, dest) for p in payloads])
            t = _clock()
            got = 0
            if how == "plain":
                recvfrom = rx.recvfrom
                out_plain = []
                try:
                    while True:
                        out_plain.append(recvfrom(65535))
                except BlockingIOError:
                    got = len(out_plain)
            else:
                out: list[tuple[Any, Any]] = []
                while not receiver.receive(out, 128):
                    pass
                got = len(out)
            keep(label, _clock() - t)
            assert got == n, (label, got)
            rx.close()
    tx.close()
    return [(name, f"{us:.2f} us/datagram") for name, us in best.items()]


async def _tcp_once(mb: int, offload: bool) -> tuple[float, dict[str, int]]:
    from tsnet.netstack.static import open_static_peer

    udpio.ENABLE_GSO = udpio.ENABLE_GRO = offload
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    sa, sb = _socket(), _socket()
    ea, eb = sa.getsockname(), sb.getsockname()
    nbytes = mb * 2**20
    from tsnet.wg import driver as wg_driver

    made: list[Any] = []
    orig_init = wg_driver.WireGuardUDP.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        orig_init(self, *a, **k)
        made.append(self)

    wg_driver.WireGuardUDP.__init__ = init  # type: ignore[method-assign]
    try:
        async with open_static_peer(ka, kb.public, addresses=["10.9.0.1"], sock=sa, peer_endpoint=eb) as na, \
                open_static_peer(kb, ka.public, addresses=["10.9.0.2"], sock=sb, peer_endpoint=ea) as nb:
            listener = await nb.open_tcp_listener(9)
            result: dict[str, float] = {}

            async def sink() -> None:
                stream = await listener.accept()
                total = 0
                while data := await stream.receive_some(262144):
                    total += len(data)
                result["received"] = total
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink)
                stream = await na.open_tcp_stream("10.9.0.2", 9, timeout=10)
                chunk = b"\0" * 65536
                t, cpu = time.perf_counter(), time.process_time()
                for _ in range(nbytes // len(chunk)):
                    await stream.send_all(chunk)
                await stream.send_eof()
            seconds = time.perf_counter() - t
            cpu = time.process_time() - cpu
            assert result["received"] == nbytes
            await stream.aclose()
            await listener.aclose()
            counters = [d.counters for d in made]
    finally:
        wg_driver.WireGuardUDP.__init__ = orig_init  # type: ignore[method-assign]
        udpio.ENABLE_GSO = udpio.ENABLE_GRO = True
    total = {k: sum(getattr(c, k) for c in counters)
             for k in ("datagrams_sent", "send_syscalls", "datagrams_received", "receive_syscalls")}
    return nbytes * 8 / seconds / 1e6, cpu / mb, total


def tcp(mb: int, repeats: int) -> list[tuple[str, str]]:
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    counters: dict[bool, dict[str, int]] = {}
    for _ in range(max(1, min(repeats, 5))):
        for offload in (False, True):
            rate, cpu, counters[offload] = trio.run(_tcp_once, mb, offload)
            rates[offload].append(rate)
            cpus[offload].append(cpu)
    rows = []
    for offload in (False, True):
        c = counters[offload]
        per_send = c["datagrams_sent"] / max(1, c["send_syscalls"])
        per_recv = c["datagrams_received"] / max(1, c["receive_syscalls"])
        rows.append((f"Python<->Python TCP over loopback, offload {'on' if offload else 'off'}",
                     f"{max(rates[offload]):.0f} Mbit/s best, {min(cpus[offload]) * 1000:.0f} ms CPU/MiB best "
                     f"({per_send:.1f} dgrams/send, {per_recv:.1f} dgrams/recv syscall)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datagrams", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mb", type=int, default=32, help="MiB per Python<->Python TCP run (0: skip)")
    args = ap.parse_args()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    support = f"UDP_SEGMENT {'yes' if udpio.gso_supported(probe) else 'no'}, " \
              f"UDP_GRO {'yes' if udpio.gro_supported(probe) else 'no'}"
    probe.close()
    rows = micro(args.datagrams, args.repeats)
    if args.mb:
        rows += tcp(args.mb, args.repeats)
    width = max(len(r[0]) for r in rows)
    print(f"udpio_bench: {support}; {args.datagrams} datagrams of {SIZE} bytes, bursts of {BURST}, "
          f"best of {args.repeats}")
    print(f"{'what':<{width}}  result")
    print("-" * (width + 50))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
