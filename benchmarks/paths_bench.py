"""magicsock paths: per-packet cost of the core, and echo round trips over real sockets.

Part 1 (sans-IO, process CPU time, best of N): two MagicSock cores; one 1280-byte
packet goes through ``send_packet`` (WireGuard seal + path choice) and the
receiving core (demux + open), on each path kind:

* direct: naked WireGuard over UDP (trusted path: no DERP copy);
* peer relay: Geneve-wrapped WireGuard (the relay's forwarding is not counted);
* DERP: WireGuard handed to DERP (the peers have no endpoints, so no UDP path at
  all), received one ``receive_derp`` call per packet;
* DERP batch: the same, received in one ``receive_derp_batch`` call per batch (what the
  driver does with one DERP socket read).

Part 2 (trio, wall clock): two MagicSockDrivers on loopback with our DERP
server; ICMP echo round trips (raw IPv4 packets, echoed by the peer's
on_packet) on the direct path and, with direct UDP blocked, over DERP.

Part 3 (``--lab``, needs root): the lab benchmark of :mod:`lab_paths_bench` -- TCP throughput and RTT
over the direct, peer-relay and DERP paths for Python<->Python, Python<->tailscaled and
tailscaled<->tailscaled in network namespaces, with the ratios. Arguments after ``--lab`` go to it
(e.g. ``--lab --seconds 3 --directions down``).

Run: .venv/bin/python benchmarks/paths_bench.py [--packets N] [--pings N] [--lab [LAB ARGS ...]]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from tsnet.control.server import default_derp_map  # noqa: E402
from tsnet.derp.server import DerpServer  # noqa: E402
from tsnet.key import DiscoPrivate, NodePrivate  # noqa: E402
from tsnet.magicsock.addrport import AddrPort  # noqa: E402
from tsnet.magicsock.conn import MagicSock, PeerConfig  # noqa: E402
from tsnet.magicsock.driver import MagicSockDriver  # noqa: E402
from tsnet.magicsock.endpoint import AddrQuality, UDPPath  # noqa: E402

SIZE = 1280
_cpu = time.process_time


def ipv4_packet(size: int, src: str, dst: str) -> bytes:
    header = bytes([0x45, 0]) + struct.pack(">H", size) + bytes(8)
    header += ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    body = bytes(range(256)) * (size // 256 + 1)
    return header + body[: size - len(header)]


def core_pair(kind: str) -> tuple[MagicSock, MagicSock, AddrPort, AddrPort]:
    a = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0)
    b = MagicSock(NodePrivate.generate(), DiscoPrivate.generate(), now=0.0)
    aa, ba = AddrPort.parse("192.0.2.1:41641"), AddrPort.parse("192.0.2.2:41641")
    # DERP kinds: no endpoints at all, else disco would find the direct path during the handshake.
    derp = kind.startswith("derp")
    a_eps, b_eps = ((), ()) if derp else ((aa,), (ba,))
    a.set_peers([PeerConfig(b.node_key, b.disco_key, b_eps, 1, 133, (ipaddress.ip_network("100.64.0.2/32"),))], 0.0)
    b.set_peers([PeerConfig(a.node_key, a.disco_key, a_eps, 1, 133, (ipaddress.ip_network("100.64.0.1/32"),))], 0.0)
    if not derp:
        vni = 7 if kind == "relay" else None
        for m, dest in ((a, ba), (b, aa)):
            ep = m.peers[b.node_key if m is a else a.node_key].ep
            ep.best = AddrQuality(UDPPath(dest, vni), 0.001)
            ep.trust_until = float("inf")  # a trusted path for the whole run
    # Handshake (any path) so that the measured loop is transport data only.
    a.send_packet(b.node_key, ipv4_packet(100, "100.64.0.1", "100.64.0.2"), 0.0)
    for _ in range(4):
        move(a, b, aa, ba)
        move(b, a, ba, aa)
    a.take_packets(), b.take_packets()
    return a, b, aa, ba


def move(src: MagicSock, dst: MagicSock, src_addr: AddrPort, dst_addr: AddrPort) -> None:
    udp = src.take_udp()
    if udp:
        dst.receive_udp_batch([(d, src_addr) for d, _ in udp], 0.0)
    for region, _, data in src.take_derp():
        dst.receive_derp(region, src.node_key, data, 0.0)


def bench_core(kind: str, packets: int, rounds: int, batch: int) -> tuple[float, float]:
    a, b, aa, ba = core_pair(kind)
    pkt = ipv4_packet(SIZE, "100.64.0.1", "100.64.0.2")
    via_derp = kind.startswith("derp")
    send_best = recv_best = float("inf")
    for _ in range(rounds):
        gc.collect()
        send_t = recv_t = 0.0
        for _ in range(packets // batch):
            t0 = _cpu()
            a.send_packets(b.node_key, [pkt] * batch, 1.0)
            udp, derp = a.take_udp(), a.take_derp()
            t1 = _cpu()
            if udp:
                b.receive_udp_batch([(d, aa) for d, _ in udp], 1.0)
            if kind == "derp-batch":
                b.receive_derp_batch([(region, a.node_key, data) for region, _, data in derp], 1.0)
            else:
                for region, _, data in derp:
                    b.receive_derp(region, a.node_key, data, 1.0)
            got = b.take_packets()
            t2 = _cpu()
            assert len(got) == batch, (kind, len(got))
            assert (not udp and len(derp) == batch) if via_derp else (len(udp) == batch and not derp), kind
            b.take_udp()
            b.take_derp()
            send_t += t1 - t0
            recv_t += t2 - t1
        send_best = min(send_best, send_t / packets)
        recv_best = min(recv_best, recv_t / packets)
    return send_best * 1e6, recv_best * 1e6


async def echo_rtts(pings: int, block_direct: bool) -> tuple[list[float], str]:
    async with trio.open_nursery() as nursery:
        derp = DerpServer()
        port = await nursery.start(derp.serve_tcp, "127.0.0.1", 0)
        stun_port = await nursery.start(derp.serve_stun, "127.0.0.1", 0)
        dm = default_derp_map("127.0.0.1", port, stun_port=stun_port)
        replies: dict[int, trio.Event] = {}
        drivers: list[MagicSockDriver] = []

        def responder(i: int):
            def on_packet(peer, pkt: bytes) -> None:
                if pkt[20] == 8:  # echo request: answer in place
                    reply = bytearray(pkt)
                    reply[12:16], reply[16:20] = pkt[16:20], pkt[12:16]
                    reply[20] = 0
                    drivers[i].send_ip_packet(bytes(reply))
                else:
                    seq = struct.unpack_from("!H", pkt, 26)[0]
                    ev = replies.get(seq)
                    if ev is not None:
                        ev.set()
            return on_packet

        for i in range(2):
            d = MagicSockDriver(NodePrivate.generate(), bind_v4="127.0.0.1", bind_v6=None,
                                local_addresses=[ipaddress.ip_address("127.0.0.1")], derp_plain_http=True,
                                drop_direct_udp=block_direct, on_packet=responder(i))
            drivers.append(d)
            await nursery.start(d.run)
            d.set_derp_map(dm)
        a, b = drivers
        for x, y, ip in ((a, b, "100.64.0.2"), (b, a, "100.64.0.1")):
            x.set_peers([PeerConfig(y.node_key, y.disco_key, tuple(e.addr for e in y.core.endpoints), 900, 133,
                                    (ipaddress.ip_network(ip + "/32"),))])

        def echo(seq: int) -> bytes:
            body = struct.pack("!BBHHH", 8, 0, 0, 1, seq) + bytes(56)
            return ipv4_packet(20 + len(body), "100.64.0.1", "100.64.0.2")[:20] + body

        async def one(seq: int, timeout: float = 5.0) -> float:
            replies[seq] = trio.Event()
            t0 = time.perf_counter()
            a.send_ip_packet(echo(seq))
            with trio.fail_after(timeout):
                await replies[seq].wait()
            return time.perf_counter() - t0

        seq = 0
        # Warm up: handshake (the first initiation may reach DERP before the peer
        # has connected, so retry), and (unless blocked) until the path is direct.
        with trio.fail_after(15):
            while True:
                seq += 1
                try:
                    await one(seq, 0.5)
                except trio.TooSlowError:
                    continue
                if block_direct or a.peer_status(b.node_key).kind == "direct":
                    break
                await trio.sleep(0.02)
        rtts = []
        for _ in range(pings):
            seq += 1
            rtts.append(await one(seq))
        kind = a.peer_status(b.node_key).kind
        nursery.cancel_scope.cancel()
    return rtts, kind


def main() -> None:
    lab_args: list[str] | None = None
    if "--lab" in sys.argv:
        at = sys.argv.index("--lab")
        lab_args, sys.argv[at:] = sys.argv[at + 1:], []
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pings", type=int, default=300)
    args = ap.parse_args()

    print(f"magicsock core, {SIZE}-byte packets, batches of {args.batch}, "
          f"process CPU us/packet (best of {args.rounds})")
    print(f"{'path':<12}{'send':>10}{'receive':>10}{'total':>10}{'Mpps':>10}")
    for kind in ("direct", "relay", "derp", "derp-batch"):
        s, r = bench_core(kind, args.packets, args.rounds, args.batch)
        print(f"{kind:<12}{s:>10.2f}{r:>10.2f}{s + r:>10.2f}{1 / (s + r):>10.3f}")
    print()
    print(f"loopback echo round trip through two MagicSockDrivers, {args.pings} pings (wall clock, ms)")
    print(f"{'path':<12}{'median':>10}{'p90':>10}{'max':>10}")
    for block in (False, True):
        rtts, kind = trio.run(echo_rtts, args.pings, block)
        rtts.sort()
        ms = [x * 1000 for x in rtts]
        print(f"{kind:<12}{statistics.median(ms):>10.3f}{ms[int(len(ms) * 0.9)]:>10.3f}{ms[-1]:>10.3f}")
    if lab_args is not None:
        import lab_paths_bench

        print(flush=True)
        code = lab_paths_bench.main(lab_args)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
