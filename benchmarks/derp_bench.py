"""DERP benchmark: server relay throughput, CPU per packet, memory with idle clients; and the
client's data path (``--client``).

The server runs in its own process pinned to one core (plain HTTP on 127.0.0.1);
senders keep a bounded number of packets in flight per pair (closed loop: 1024 for one pair, 384
each for 100 pairs; a pair whose packets were dropped resumes after 20 ms);
the load generator runs in this process on the other core with raw sockets and
pre-built frames, so client-side cost stays small. Server CPU and RSS come from
/proc. Usage: ``.venv/bin/python benchmarks/derp_bench.py [--seconds 4] [--idle 5000]``.

``--client`` measures our trio :class:`~tsnet.derp.client.DerpClient` instead (what a tsnet node
uses for DERP): a scripted server in its own process (pinned to one core; plain HTTP or TLS)
either streams RecvPacket frames as fast as the client reads them (``recv``) or counts the
SendPacket bytes the client writes (``send``). The client runs in this process on the other core
with the batch handler (``on_packets``) magicsock uses. Reported: packets/s, Mbit/s, packets per
socket read (batching) and client CPU per packet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tsnet.derp import frames as f  # noqa: E402
from tsnet.derp.info import ClientInfo, seal_to  # noqa: E402
from tsnet.key import NodePrivate  # noqa: E402

PACKET = 1280
FRAME_LEN = 5 + 32 + PACKET
HOST = "127.0.0.1"


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(want, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, hard), hard))


# -- server process ------------------------------------------------------------------------


def serve(private_hex: str) -> None:
    import trio

    from tsnet.derp.server import DerpServer

    raise_nofile(65536)
    server = DerpServer(NodePrivate(bytes.fromhex(private_hex)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve_tcp, HOST, 0)
            print(port, flush=True)

    trio.run(main)


# -- helpers -------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def debug_vars(port: int) -> dict:
    with socket.create_connection((HOST, port)) as s:
        s.sendall(b"GET /debug/vars HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def handshake_bytes(key: NodePrivate, server_pub: bytes) -> bytes:
    """Upgrade request with a pipelined ClientInfo (the server keeps bytes after the head)."""
    sealed = seal_to(key.raw, server_pub, ClientInfo().to_json())
    return (
        b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
        + f.encode_frame(f.ClientInfoFrame(key.public.raw, sealed))
    )


def connect_client(port: int, key: NodePrivate, server_pub: bytes, wait: bool = True,
                   rcvbuf: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window scale
    s.connect((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(handshake_bytes(key, server_pub))
    if wait:
        # Read the 101 head, ServerKey and ServerInfo (sealed JSON {"version":2}: 24+16+13 bytes).
        want_tail = 45 + 5 + 24 + 16 + 13
        buf = b""
        while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < want_tail:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("server closed during handshake")
            buf += chunk
    return s


# -- throughput ----------------------------------------------------------------------------


def relay_run(port: int, server_pid: int, server_pub: bytes, pairs: int, seconds: float,
              window: int = 0) -> dict:
    senders = []
    for _ in range(pairs):
        a, b = NodePrivate.generate(), NodePrivate.generate()
        senders.append((a, b))
    socks_tx, socks_rx = [], []
    for a, b in senders:
        socks_rx.append(connect_client(port, b, server_pub, rcvbuf=4 << 20))
        socks_tx.append(connect_client(port, a, server_pub))
    frames_per_write = 48
    payloads = []
    for _a, b in senders:
        one = f.encode_header(f.FrameType.SEND_PACKET, 32 + PACKET) + b.public.raw + bytes(PACKET)
        payloads.append(one * frames_per_write)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks_tx):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE, ("tx", i))
    for i, s in enumerate(socks_rx):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, ("rx", i))
    pending = [memoryview(p) for p in payloads]
    # Closed loop: each pair keeps at most `window` packets in flight, below the server's per-client
    # queue depth, so the numbers show relay capacity rather than drops from an open-loop blast.
    window = window or max(384, 1024 // pairs)  # deep enough to cover scheduling delays, below queue depth
    window_bytes = window * FRAME_LEN
    sent_bytes = [0] * pairs
    rx_bytes = [0] * pairs
    paused: set[int] = set()
    last_rx = time.perf_counter()
    received = 0
    warmup_end = time.perf_counter() + 0.5
    measuring = False
    start_bytes = 0
    t0 = cpu0 = 0.0
    end = warmup_end + seconds
    buf = bytearray(1 << 20)
    while True:
        now = time.perf_counter()
        if not measuring and now >= warmup_end:
            measuring = True
            t0, cpu0, start_bytes = now, proc_cpu(server_pid), received
        if now >= end:
            break
        if paused and now - last_rx > 0.02:
            # Dropped packets never arrive: after a stall, count what is missing as lost and resume.
            for i in list(paused):
                sent_bytes[i] = rx_bytes[i]
                paused.discard(i)
                sel.register(socks_tx[i], selectors.EVENT_WRITE, ("tx", i))
        for key, _ in sel.select(0.01):
            kind, i = key.data
            if kind == "rx":
                try:
                    n = key.fileobj.recv_into(buf)
                except BlockingIOError:
                    continue
                received += n
                rx_bytes[i] += n
                last_rx = now
                if i in paused and sent_bytes[i] - rx_bytes[i] < window_bytes // 2:
                    paused.discard(i)
                    sel.register(socks_tx[i], selectors.EVENT_WRITE, ("tx", i))
            else:
                if sent_bytes[i] - rx_bytes[i] >= window_bytes:
                    paused.add(i)
                    sel.unregister(key.fileobj)
                    continue
                try:
                    sent = key.fileobj.send(pending[i])
                except BlockingIOError:
                    continue
                sent_bytes[i] += sent
                rest = pending[i][sent:]
                pending[i] = rest if len(rest) else memoryview(payloads[i])
    t1, cpu1 = time.perf_counter(), proc_cpu(server_pid)
    stats = debug_vars(port)
    for s in socks_tx + socks_rx:
        s.close()
    sel.close()
    # Received bytes include a few handshake bytes from before the window; the window delta is clean.
    packets = (received - start_bytes) / FRAME_LEN
    elapsed = t1 - t0
    return {
        "pps": packets / elapsed,
        "mbps": packets * PACKET * 8 / elapsed / 1e6,
        "cpu_ms_per_1000": (cpu1 - cpu0) / packets * 1000 * 1000 if packets else float("nan"),
        "server_cpu_util": (cpu1 - cpu0) / elapsed,
        "drops": sum(stats["drops"].values()),
        "relayed_total": stats["packets_relayed"],
    }


def idle_run(port: int, server_pid: int, server_pub: bytes, count: int) -> dict:
    raise_nofile(count + 1024)
    base = proc_rss_mb(server_pid)
    keys = [NodePrivate.generate() for _ in range(count)]
    socks = []
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        socks.append(connect_client(port, k, server_pub, wait=False))
        if i % 500 == 499:
            time.sleep(0.05)  # let the accept loop keep up with the backlog
    deadline = time.time() + 120
    clients = 0
    while time.time() < deadline:
        clients = debug_vars(port)["clients"]
        if clients >= count:
            break
        time.sleep(0.25)
    setup = time.perf_counter() - t0
    time.sleep(0.5)
    rss = proc_rss_mb(server_pid)
    for s in socks:
        s.close()
    return {"clients": clients, "rss_mb": rss, "base_mb": base, "setup_s": setup}


# -- client data path ----------------------------------------------------------------------

CLIENT_FRAMES_PER_WRITE = 48


def scripted_server(mode: str, tls: bool) -> None:
    """One client: handshake, then stream RecvPackets (``recv``) or count what arrives (``send``).

    Prints the port, then (after the client hangs up) the payload bytes it received.
    """
    import ssl

    from tsnet.derp.info import ServerInfo
    from tsnet.derp.tls import generate_self_signed, server_ssl_context

    priv = NodePrivate.generate()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind((HOST, 0))
    lsock.listen(1)
    print(lsock.getsockname()[1], flush=True)
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = server_ssl_context(self_signed=generate_self_signed("127.0.0.1"))
        conn = ctx.wrap_socket(conn, server_side=True)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += conn.recv(65536)
    rest = buf.split(b"\r\n\r\n", 1)[1]
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                 + f.encode_frame(f.ServerKey(priv.public.raw)))
    reader = f.FrameReader()
    reader.feed(rest)
    while (item := reader.next_frame()) is None:
        reader.feed(conn.recv(65536))
    client_key = bytes(item[1][:32])
    conn.sendall(f.encode_frame(f.ServerInfoFrame(seal_to(priv.raw, client_key, ServerInfo().to_json()))))
    received = len(reader.take_rest())
    try:
        if mode == "recv":
            src = NodePrivate.generate().public.raw
            chunk = (f.encode_header(f.FrameType.RECV_PACKET, 32 + PACKET) + src + bytes(PACKET)) \
                * CLIENT_FRAMES_PER_WRITE
            while True:
                conn.sendall(chunk)
        else:
            rbuf = bytearray(1 << 20)
            while n := conn.recv_into(rbuf):
                received += n
    except (OSError, ssl.SSLError):
        pass
    print(received, flush=True)


async def client_run(port: int, tls: bool, mode: str, seconds: float) -> dict:
    import trio

    from tsnet.derp.client import DerpClient, DerpNode

    node = DerpNode("bench", 1, HOST, ipv4=HOST, ipv6="none", derp_port=port, plain_http=not tls,
                    insecure_for_tests=tls)
    got = [0, 0]  # packets, handler calls

    def on_packets(batch: list) -> None:
        got[0] += len(batch)
        got[1] += 1

    client = DerpClient(NodePrivate.generate(), node, on_packets=on_packets)
    result: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(10):
            await client.wait_connected()
        dst = NodePrivate.generate().public
        batch = [(dst, bytes(PACKET))] * 64
        sent = 0
        warm_end = time.perf_counter() + 0.5
        t0 = cpu0 = 0.0
        base = (0, 0, 0, 0)
        measuring = False
        while True:
            now = time.perf_counter()
            if not measuring and now >= warm_end:
                measuring = True
                t0, cpu0 = now, time.process_time()
                base = (got[0], got[1], client.reads, sent)
                end = t0 + seconds
            if measuring and now >= end:
                break
            if mode == "recv":
                await trio.sleep(0.05)
                continue
            proto = client._proto
            if proto is None or proto.pending_frames > 512:
                await trio.sleep(0.0005)  # the writer is behind: let it drain
                continue
            sent += client.send_many(batch)
            await trio.lowlevel.checkpoint()
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        packets = got[0] - base[0] if mode == "recv" else sent - base[3]
        result = {
            "pps": packets / elapsed,
            "mbps": packets * PACKET * 8 / elapsed / 1e6,
            "per_read": (packets / max(1, client.reads - base[2])) if mode == "recv" else float("nan"),
            "cpu_us_per_packet": cpu / packets * 1e6 if packets else float("nan"),
            "client_cpu_util": cpu / elapsed,
            "writes": client.writes,
        }
        client.close()
        nursery.cancel_scope.cancel()
    return result


def client_bench(seconds: float) -> int:
    import trio

    rows = []
    for tls in (False, True):
        for mode in ("recv", "send"):
            proc = subprocess.Popen([sys.executable, __file__, "--scripted-server", mode, "tls" if tls else "plain"],
                                    stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
            try:
                port = int(proc.stdout.readline())
                r = trio.run(client_run, port, tls, mode, seconds)
                proc.wait(timeout=30)
                server_bytes = int(proc.stdout.readline() or 0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if mode == "send":
                r["server_frames"] = server_bytes // (5 + 32 + PACKET)
            rows.append((("TLS" if tls else "plain HTTP"), mode, r))
    print()
    print("DERP client data path (DerpClient with the on_packets batch handler, 1280 B packets; scripted server "
          "in another process on the other core)")
    print()
    print("| transport | direction | packets/s | Mbit/s (payload) | packets per socket read | client CPU µs / packet "
          "| client core busy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for transport, mode, r in rows:
        per_read = "-" if mode == "send" else f"{r['per_read']:.1f}"
        print(f"| {transport} | {'receive' if mode == 'recv' else 'send'} | {r['pps']:,.0f} | {r['mbps']:,.0f} | "
              f"{per_read} | {r['cpu_us_per_packet']:.1f} | {r['client_cpu_util'] * 100:.0f}% |")
    print()
    print(f"(machine load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", metavar="PRIVHEX", help=argparse.SUPPRESS)
    ap.add_argument("--scripted-server", nargs=2, metavar=("MODE", "TLS"), help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--client", action="store_true", help="benchmark the client data path instead of the server")
    args = ap.parse_args()
    if args.serve:
        os.sched_setaffinity(0, {0})
        serve(args.serve)
        return 0
    if args.scripted_server:
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {0})
        scripted_server(args.scripted_server[0], args.scripted_server[1] == "tls")
        return 0
    if args.client:
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {1})
        return client_bench(args.seconds)
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})
    raise_nofile(65536)

    def start_server() -> tuple[subprocess.Popen, int, bytes]:
        priv = NodePrivate.generate()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", priv.raw.hex()], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": REPO})
        port = int(proc.stdout.readline())
        return proc, port, priv.public.raw

    rows = []
    for pairs in (1, 100):
        proc, port, pub = start_server()
        try:
            r = relay_run(port, proc.pid, pub, pairs, args.seconds)
        finally:
            proc.terminate()
            proc.wait()
        rows.append((f"{pairs} pair{'s' if pairs > 1 else ''}, 1280 B packets", r))
    proc, port, pub = start_server()
    try:
        idle = idle_run(port, proc.pid, pub, args.idle)
    finally:
        proc.terminate()
        proc.wait()

    print()
    print("DERP server benchmark (server: 1 process pinned to 1 core, plain HTTP on 127.0.0.1)")
    print()
    print("| scenario | packets/s relayed | Mbit/s relayed (payload) | server CPU ms / 1,000 pkts "
          "| server core busy | packets/s per full core (derived) | server drops / packets queued (whole run) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        per_core = 1e6 / r["cpu_ms_per_1000"] if r["cpu_ms_per_1000"] else float("nan")
        print(f"| {name} | {r['pps']:,.0f} | {r['mbps']:,.0f} | {r['cpu_ms_per_1000']:.2f} | "
              f"{r['server_cpu_util'] * 100:.0f}% | {per_core:,.0f} | {r['drops']:,} / {r['relayed_total']:,} |")
    print()
    print(f"(machine load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; with other work "
          "running, 'core busy' < 100% means the server was waiting for the CPU or for the load generator)")
    print()
    print("| idle clients | connected (server count) | server RSS | RSS before clients | setup time |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.idle:,} | {idle['clients']:,} | {idle['rss_mb']:.0f} MB | {idle['base_mb']:.0f} MB | "
          f"{idle['setup_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
