"""tsnet.Server benchmarks: cold start to first byte, proxy throughput against direct dial, idle RSS.

Run: ``.venv/bin/python benchmarks/server_bench.py [--mb 32] [--runs 3]``. Prints a table.

Everything is on loopback: an embedded control server (with DERP and STUN) and a peer node "sink"
run in this process; magicsock binds 127.0.0.1.

* **Cold start to first byte**: a fresh ``python`` subprocess imports tsnet (and the layer modules
  the node imports on first use), runs ``up()`` as an ephemeral node and fetches one HTTP response
  from "sink" by MagicDNS name. We report the time from process spawn to the response, and (from
  inside the child) import, ``up()`` and first-byte times; plus ``up()`` of a second node in the
  already warm benchmark process. Target: join (``up()``) <= 1 s.
* **Throughput**: ``--mb`` MiB from a client node to a discard server on "sink", through
  (a) ``Server.dial`` directly, (b) the loopback SOCKS5 proxy, (c) the loopback HTTP proxy
  (CONNECT). Client, proxy, both nodes and the control server share this one process (and its
  core), so absolute numbers are lower than two processes would get; the ratio is the point.
  Target: a proxy within 80% of direct.
* **Idle RSS**: VmRSS of the subprocess node after ``up()`` and 2 s idle. Target: <= 60 MB.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_helpers import start_tailnet  # noqa: E402

CHILD = r"""
import os, sys, time
t0 = time.monotonic()
import trio, tsnet
# The node's layers are imported on first use; import them here so up() measures the join alone.
import tsnet.control.client, tsnet.magicsock.driver, tsnet.netstack.sockets, tsnet.netstack.stack
import tsnet.dns, tsnet.proxy
t_import = time.monotonic()

async def main():
    srv = tsnet.Server(hostname="cold", ephemeral=True, udp_bind="127.0.0.1")
    await srv.up(timeout=20)
    t_up = time.monotonic()
    await srv.wait_for_peer("sink", timeout=10)
    stream = await srv.dial("tcp", "sink:80", timeout=10)
    await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    data = await stream.receive_some(1000)
    assert data.startswith(b"HTTP/1.0 200"), data
    t_first = time.monotonic()
    await trio.sleep(2.0)  # idle, then measure memory
    rss = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    print(f"RESULT {t_import - t0:.4f} {t_up - t_import:.4f} {t_first - t_up:.4f} {t_first:.6f} {rss}", flush=True)
    await srv.close()

trio.run(main)
"""


async def _serve_sink(node, nursery):
    async def http(stream):
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def discard(stream):
        async with stream:
            total = 0
            while data := await stream.receive_some(262144):
                total += len(data)
            await stream.send_all(str(total).encode())

    async def serve(handler, listener):
        try:
            await trio.serve_listeners(handler, [listener])
        except* trio.ClosedResourceError:
            pass  # the node closed at the end

    nursery.start_soon(serve, http, await node.listen("tcp", ":80"))
    nursery.start_soon(serve, discard, await node.listen("tcp", ":9"))


async def _push(stream, nbytes: int) -> float:
    chunk = b"\0" * 65536
    start = time.perf_counter()
    sent = 0
    while sent < nbytes:
        await stream.send_all(chunk)
        sent += len(chunk)
    await stream.send_eof()
    reply = b""
    while data := await stream.receive_some(100):
        reply += data
    elapsed = time.perf_counter() - start
    assert int(reply) == nbytes, reply
    return nbytes / elapsed / 1e6


async def _socks_connect(proxy, host: str, port: int) -> trio.SocketStream:
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    user, pw = proxy.credentials.username.encode(), proxy.credentials.password.encode()
    await s.send_all(b"\x05\x01\x02")
    assert await _exact(s, 2) == b"\x05\x02"
    await s.send_all(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
    assert (await _exact(s, 2))[1] == 0
    await s.send_all(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + port.to_bytes(2, "big"))
    reply = await _exact(s, 4)
    assert reply[1] == 0, reply
    await _exact(s, {1: 4, 4: 16}.get(reply[3], 0) + 2 if reply[3] != 3 else (await _exact(s, 1))[0] + 2)
    return s


async def _http_connect(proxy, host: str, port: int) -> trio.SocketStream:
    s = await trio.open_tcp_stream(proxy.host, proxy.port)
    auth = base64.b64encode(f"{proxy.credentials.username}:{proxy.credentials.password}".encode()).decode()
    await s.send_all(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await s.receive_some(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


async def _exact(s, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = await s.receive_some(n - len(out))
        if not data:
            raise EOFError
        out += data
    return out


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            tailnet = await start_tailnet(nursery, Path(tmp))
            sink = tailnet.node("sink")
            await sink.up(timeout=10)
            await _serve_sink(sink, nursery)

            # Cold start to first byte (subprocesses).
            spawn, imp, up, first, rss = [], [], [], [], []
            for _ in range(args.runs):
                env = dict(os.environ, TS_CONTROL_URL=tailnet.url, TS_AUTHKEY=tailnet.authkey(ephemeral=True),
                           PYTHONPATH=str(Path(__file__).resolve().parent.parent))
                t0 = time.monotonic()
                proc = await trio.run_process([sys.executable, "-c", CHILD], env=env, capture_stdout=True)
                line = next(ln for ln in proc.stdout.decode().splitlines() if ln.startswith("RESULT"))
                _, a, b, c, t_first, r = line.split()
                spawn.append(float(t_first) - t0)
                imp.append(float(a))
                up.append(float(b))
                first.append(float(c))
                rss.append(int(r))
            med = statistics.median
            rows.append(("cold start: process spawn -> first response", f"{med(spawn) * 1000:.0f} ms", "-"))
            rows.append(("  import tsnet and its layers", f"{med(imp) * 1000:.0f} ms", "-"))
            rows.append(("  up() (join: login, netmap, DERP, endpoints)", f"{med(up) * 1000:.0f} ms", "<= 1000 ms"))
            rows.append(("  up() -> first response from peer", f"{med(first) * 1000:.0f} ms", "-"))
            rows.append(("idle node RSS (after up + 2 s)", f"{med(rss) / 2**20:.1f} MB", "<= 60 MB"))

            # Throughput.
            client = tailnet.node("client")
            t0 = trio.current_time()
            await client.up(timeout=10)
            rows.append(("up() of another node in a warm process", f"{(trio.current_time() - t0) * 1000:.0f} ms",
                         "<= 1000 ms"))
            await client.wait_for_peer("sink")
            proxy = await client.loopback()
            nbytes = args.mb * 2**20
            results: dict[str, list[float]] = {"direct": [], "socks5": [], "http": []}
            for _ in range(args.runs):
                results["direct"].append(await _push(await client.dial("tcp", "sink:9", timeout=10), nbytes))
                results["socks5"].append(await _push(await _socks_connect(proxy, "sink", 9), nbytes))
                results["http"].append(await _push(await _http_connect(proxy, "sink", 9), nbytes))
            direct = med(results["direct"])
            rows.append((f"throughput Server.dial ({args.mb} MiB)", f"{direct:.1f} MB/s", "-"))
            for name in ("socks5", "http"):
                v = med(results[name])
                rows.append((f"throughput via loopback {name} proxy", f"{v:.1f} MB/s ({v / direct:.0%} of direct)",
                             ">= 80% of direct"))
            await client.close()
            await sink.close()
            nursery.cancel_scope.cancel()
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'result':<28}  target")
    print("-" * (width + 45))
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<28}  {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    trio.run(main, parser.parse_args())
