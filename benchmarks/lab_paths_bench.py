"""Lab benchmark: TCP throughput and RTT over the direct, peer-relay and DERP paths, side by side.

Three node pairs, measured the same way in the same run:

* ``py-py``: two ``tsnet up`` processes (this project);
* ``py-ts``: a ``tsnet up`` process and a real tailscaled 1.96.4;
* ``ts-ts``: two tailscaled 1.96.4.

For each path kind the script builds a fresh lab (tests/lab: network namespaces, our control server
with DERP and STUN on the "internet" namespace) and removes it afterwards, also on failure or Ctrl-C:

* ``direct``: every host on the internet, no NAT;
* ``derp``: the same, with UDP between hosts dropped by the internet router (STUN and DERP still work);
* ``relay``: every host behind its own hard NAT (no hole punching), plus a public ``tsnet up`` node
  offering a peer relay (``--relay-server-port``) granted to everyone by the policy;
* ``relay-ts``: the same with tailscaled as the peer relay server (``tailscale set --relay-server-port``).

Each host runs a tiny sink/source server on its own ``127.0.0.1:5201``. tailscaled nodes run in
userspace-networking mode (inbound tailnet TCP goes to the namespace's 127.0.0.1) with
``--socks5-server``; Python nodes run ``tsnet up --socks5 ... --forward 5201=127.0.0.1:5201``. A client
process in the client's namespace goes through its node's SOCKS5 proxy to the server's tailnet IP:

* throughput: ``down`` = server sends, client reads for N seconds (after 0.5 s of warm-up);
  ``up`` = client sends zeros for N seconds (after the warm-up), then an end marker; the server replies
  with the byte count once everything has arrived, and the time includes that drain;
* RTT: 1-byte request/response round trips on one connection (TCP_NODELAY), median;
* each measurement runs ``--repeat`` times and the best run is kept (the machine may be shared).

Before measuring, both ends must report the expected path (tsnet status / tailscale status).

Needs root (network namespaces). Traffic stays inside the lab's namespaces; tailscaled only through
the lab helpers (``--no-logs-no-support``, our control URL and DERP map, no route out).

Run: ``.venv/bin/python benchmarks/lab_paths_bench.py [--seconds 5] [--pings 200] [--repeat 2]
[--paths direct,relay,relay-ts,derp] [--pairs py-py,py-ts,ts-ts] [--directions down,up] [--json results.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SINK_PORT = 5201
SOCKS_PORT = 1080
RELAY_PORT = 40000
WG_PORT = 41641
CHUNK = 256 * 1024
WARMUP = 0.5

PAIRS = {"py-py": ("py", "py"), "py-ts": ("py", "ts"), "ts-ts": ("ts", "ts")}
#: Path kinds; ``relay`` uses a tsnet peer relay, ``relay-ts`` a tailscaled one (``tailscale set --relay-server-port``).
PATHS = ("direct", "relay", "relay-ts", "derp")


# --- the sink/source server and the client (run as subprocesses inside a namespace) ------------------


def _serve_conn(conn: socket.socket) -> None:
    """One connection: ``D`` = send until the peer goes away; ``U`` = read zeros up to a 0xFF, then report the count;
    ``P`` = echo single bytes (round trips)."""
    try:
        cmd = conn.recv(1)
        if cmd == b"D":
            buf = memoryview(bytes(CHUNK))
            while True:
                conn.sendall(buf)
        elif cmd == b"U":
            buf = bytearray(CHUNK)
            total = 0
            # The data is zeros and ends with one 0xFF byte (not a FIN: tailscaled's SOCKS5 proxy closes both
            # directions on a half-close): then everything the client sent has arrived.
            while n := conn.recv_into(buf):
                end = buf.find(b"\xff", 0, n)
                if end >= 0:
                    conn.sendall(struct.pack(">Q", total + end))
                    break
                total += n
        elif cmd == b"P":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while b := conn.recv(1):
                conn.sendall(b)
    except OSError:
        pass
    finally:
        conn.close()


def run_sink(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def recv_exact(s: socket.socket, n: int, closed: str) -> bytes:
    """Exactly ``n`` bytes from ``s``; OSError(``closed``) if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise OSError(closed)
        data += chunk
    return data


def socks_connect(proxy: tuple[str, int], host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port`` through a SOCKS5 proxy (no authentication)."""
    s = socket.create_connection(proxy, timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise OSError("SOCKS5: no acceptable method")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
    head = recv_exact(s, 10, "SOCKS5: proxy closed during CONNECT")
    if head[1] != 0:
        raise OSError(f"SOCKS5: CONNECT failed, reply code {head[1]}")
    return s


def run_client(proxy: tuple[str, int], host: str, port: int, mode: str, seconds: float, pings: int) -> dict[str, Any]:
    """Measure one thing and return it as a dict: mode ``down``/``up`` (Mbit/s) or ``rtt`` (ms)."""
    s = socks_connect(proxy, host, port, timeout=15)
    s.settimeout(max(15.0, seconds * 3))
    try:
        if mode == "rtt":
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"P")
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                s.sendall(b"x")
                if s.recv(1) != b"x":
                    raise OSError("round trip: connection closed")
                rtts.append((time.perf_counter() - t0) * 1000)
            rtts.sort()
            return {"rtt_ms": statistics.median(rtts), "rtt_p90_ms": rtts[int(len(rtts) * 0.9)]}
        if mode == "down":
            s.sendall(b"D")
            buf = bytearray(CHUNK)
            start = time.perf_counter()
            counted = warm = 0
            measuring_from = None
            while True:
                n = s.recv_into(buf)
                if not n:
                    raise OSError("download: connection closed early")
                now = time.perf_counter()
                if measuring_from is None:
                    warm += n
                    if now - start >= WARMUP:
                        measuring_from = now
                    continue
                counted += n
                if now - measuring_from >= seconds:
                    return {"mbit_s": counted * 8 / (now - measuring_from) / 1e6, "bytes": counted,
                            "total_bytes": counted + warm}
        if mode == "up":
            s.sendall(b"U")
            buf = memoryview(bytes(CHUNK))
            start = time.perf_counter()
            measuring_from = None
            warm = 1  # bytes sent before the measured window (the command byte included)
            while True:
                s.sendall(buf)
                now = time.perf_counter()
                if measuring_from is None:
                    warm += CHUNK
                    if now - start >= WARMUP:
                        measuring_from = now
                    continue
                if now - measuring_from >= seconds:
                    break
            # End marker, then wait for the server's byte count: bytes still buffered along the way (our
            # socket, the proxy, the nodes) are counted only once they have arrived.
            s.sendall(b"\xff")
            reply = recv_exact(s, 8, "upload: no byte count from the server")
            end = time.perf_counter()
            got = struct.unpack(">Q", reply)[0] - warm
            return {"mbit_s": got * 8 / (end - measuring_from) / 1e6, "bytes": got, "total_bytes": got + warm}
        raise ValueError(f"unknown mode {mode!r}")
    finally:
        s.close()


# --- lab orchestration (host side) ---------------------------------------------------------------------


@dataclass
class Result:
    """One measured (path, pair, metric)."""

    path: str
    pair: str
    metric: str  # "down", "up" (Mbit/s) or "rtt" (ms)
    value: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class BenchNode:
    """A Python (``tsnet up``) or tailscaled node on one lab host, with a sink server beside it."""

    def __init__(self, kind: str, host: Any, topo: Any, bins: Any, tmp: Path, relay: bool = False) -> None:
        from tests.lab.nat_topology import start_tailscaled_node
        from tests.lab.netns import wait_until

        self.kind, self.host, self.name = kind, host, host.name
        host.ns.popen([sys.executable, str(Path(__file__).resolve()), "_sink", str(SINK_PORT)], cwd=str(ROOT))
        if kind == "py":
            self.sock = tmp / f"{self.name}.sock"
            args = [sys.executable, "-m", "tsnet", "up", "--control-url", topo.control_url, "--authkey", topo.authkey,
                    "--hostname", self.name, "--state", "mem:", "--ephemeral", "--port", str(WG_PORT),
                    "--socket", str(self.sock), "--socks5", f"127.0.0.1:{SOCKS_PORT}",
                    "--forward", f"{SINK_PORT}=127.0.0.1:{SINK_PORT}"]
            if relay:
                args += ["--relay-server-port", str(RELAY_PORT)]
            self.proc = host.ns.popen(args, env={"PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
            wait_until(lambda: self._py_running() or self.proc.poll() is not None, 60, f"{self.name} running")
            if self.proc.poll() is not None:
                raise RuntimeError(f"tsnet up on {self.name} exited:\n{self.proc.log()[-3000:]}")
        else:
            self.ts = start_tailscaled_node(topo, host, bins, port=WG_PORT,
                                            extra_args=(f"--socks5-server=127.0.0.1:{SOCKS_PORT}",))
            self.proc = self.ts.proc

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the node process has used so far."""
        return process_cpu_seconds(self.proc.pid)

    def _py_running(self) -> bool:
        st = self.status()
        return st.get("backend_state") == "Running" and bool((st.get("self_node") or {}).get("addresses"))

    def status(self) -> dict[str, Any]:
        if self.kind == "py":
            from tsnet.localapi import LocalClient

            try:
                return LocalClient(self.sock, timeout=5).status()
            except Exception:  # noqa: BLE001 - not up yet
                return {}
        return self.ts.status()

    def ipv4(self) -> str:
        if self.kind == "py":
            return next(a for a in self.status()["self_node"]["addresses"] if "." in a)
        return self.ts.ipv4()

    def path_to(self, peer: str) -> str:
        """``direct``, ``relay``, ``derp`` or ``idle``/``unknown``, as this node reports it."""
        if self.kind == "py":
            p = next((p for p in self.status().get("peers") or () if p.get("name") == peer), None)
            path = (p or {}).get("path") or "idle"
            for prefix, kind in (("direct", "direct"), ("relay", "relay"), ("derp", "derp")):
                if path.startswith(prefix):
                    return kind
            return path
        p = self.ts.peer(peer)
        if p is None:
            return "unknown"
        if p.get("CurAddr"):
            return "direct"
        if p.get("PeerRelay"):
            return "relay"
        if p.get("Relay") and p.get("RxBytes", 0) > 0:
            return "derp"
        return "idle"


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (clock ticks, usually 10 ms: fine over seconds of transfer)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces; fields from state on
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _transfer(client: BenchNode, server: BenchNode, mode: str, seconds: float, pings: int,
              relay: BenchNode | None = None) -> dict[str, Any]:
    """One throughput run, with the CPU the node processes (and the peer relay's) spent on it per GB moved
    (warm-up included)."""
    nodes = {"client": client, "server": server, **({"relay": relay} if relay is not None else {})}
    before = {k: n.cpu_seconds() for k, n in nodes.items()}
    out = _client(client, server, mode, seconds, pings)
    gb = out["total_bytes"] / 1e9
    out["cpu_s_per_gb"] = {k: (n.cpu_seconds() - before[k]) / gb for k, n in nodes.items()}
    # The path may change under load (e.g. a relay path given up for DERP): what both ends report right after.
    out["path_after"] = f"{client.path_to(server.name)}/{server.path_to(client.name)}"
    return out


def _client(node: BenchNode, server: BenchNode, mode: str, seconds: float, pings: int) -> dict[str, Any]:
    out = node.host.ns.run([sys.executable, str(Path(__file__).resolve()), "_client", f"127.0.0.1:{SOCKS_PORT}",
                            f"{server.ipv4()}:{SINK_PORT}", mode, str(seconds), str(pings)],
                           timeout=seconds * 4 + 60)
    return json.loads(out.strip().splitlines()[-1])


def _wait_path(a: BenchNode, b: BenchNode, want: str, timeout: float) -> tuple[str, str]:
    """Poke the pair with short round trips until both ends report ``want`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    seen = ("?", "?")
    while time.monotonic() < deadline:
        try:
            _client(a, b, "rtt", 1, 5)
        except Exception:  # noqa: BLE001 - the first attempts may time out while the path comes up
            pass
        seen = (a.path_to(b.name), b.path_to(a.name))
        if seen == (want, want):
            return seen
    return seen


def run_path(path: str, pairs: list[str], directions: list[str], seconds: float, pings: int, repeat: int,
             bins: Any, log: Any) -> list[Result]:
    """Build the lab for one path kind, measure every pair, tear it down."""
    from tests.lab.nat_topology import RELAY_POLICY, NatTopology
    from tests.lab.netns import Lab

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix=f"tsnet-bench-{path}-") as tmpdir, Lab() as lab:
        tmp = Path(tmpdir)
        topo = NatTopology(lab, tmp)
        relayed = path.startswith("relay")
        topo.start_control(policy=RELAY_POLICY if relayed else None)
        nat = "hard" if relayed else "public"
        relay_node: BenchNode | None = None
        if path == "relay":
            log(f"[{path}] starting the tsnet peer relay")
            relay_node = BenchNode("py", topo.add_host("relay", "public"), topo, bins, tmp, relay=True)
        elif path == "relay-ts":
            log(f"[{path}] starting the tailscaled peer relay")
            relay_node = BenchNode("ts", topo.add_host("relay", "public"), topo, bins, tmp)
            relay_node.ts.cli("set", f"--relay-server-port={RELAY_PORT}")
        # Clients are "<kind>a", servers "<kind>b": py-ts is the Python client with the tailscaled server.
        needed = sorted({f"{PAIRS[p][0]}a" for p in pairs} | {f"{PAIRS[p][1]}b" for p in pairs})
        nodes: dict[str, BenchNode] = {}
        for name in needed:
            log(f"[{path}] starting {name}")
            nodes[name] = BenchNode(name[:2], topo.add_host(name, nat), topo, bins, tmp)
        if path == "derp":
            # Drop host<->host UDP in the internet router: STUN and DERP (to the router itself) still work.
            topo.inet.iptables("-I", "FORWARD", "-p", "udp", "-j", "DROP")
        for pair in pairs:
            ck, sk = PAIRS[pair]
            client, server = nodes[f"{ck}a"], nodes[f"{sk}b"]
            log(f"[{path}] {pair}: waiting for the {path} path ({client.name} -> {server.name})")
            want = "relay" if relayed else path
            seen = _wait_path(client, server, want, 45)
            if seen != (want, want):
                err = f"path is {seen[0]}/{seen[1]}, not {path}"
                log(f"[{path}] {pair}: {err}")
                results += [Result(path, pair, m, None, error=err) for m in (*directions, "rtt")]
                continue
            for metric in (*directions, "rtt"):
                try:
                    # Best of ``repeat``: the machine is shared, so the fastest run is the least disturbed one.
                    if metric == "rtt":
                        runs = [_client(client, server, metric, seconds, pings) for _ in range(repeat)]
                    else:
                        runs = [_transfer(client, server, metric, seconds, pings, relay_node) for _ in range(repeat)]
                    values = [r.get("mbit_s", r.get("rtt_ms")) for r in runs]
                    value = min(values) if metric == "rtt" else max(values)
                    extra: dict[str, Any] = {"runs": values}
                    if metric != "rtt":
                        best = runs[values.index(value)]
                        extra["cpu_s_per_gb"] = best["cpu_s_per_gb"]
                        extra["path_after_run"] = best["path_after"]
                        extra["path_moved"] = best["path_after"] != f"{want}/{want}"
                        if extra["path_moved"]:
                            log(f"[{path}] {pair} {metric}: path right after the best run: {best['path_after']}")
                    results.append(Result(path, pair, metric, value, extra))
                    log(f"[{path}] {pair} {metric}: {value:.2f} (runs {', '.join(f'{x:.2f}' for x in values)})")
                except Exception as exc:  # noqa: BLE001 - record it and go on
                    results.append(Result(path, pair, metric, None, error=str(exc).strip().splitlines()[-1][:200]))
                    log(f"[{path}] {pair} {metric}: failed: {results[-1].error}")
            after = (client.path_to(server.name), server.path_to(client.name))
            if after != (want, want):
                for r in results:
                    if r.path == path and r.pair == pair:
                        r.extra["path_after"] = "/".join(after)
    return results


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.0%}" if a and b else "-"


def table(results: list[Result], directions: list[str]) -> str:
    """The markdown table: one row per (path, pair), then the ratios the targets speak of."""
    get = {(r.path, r.pair, r.metric): r.value for r in results}
    pairs = list(dict.fromkeys(r.pair for r in results))
    paths = list(dict.fromkeys(r.path for r in results))
    names = {"py-py": "Python ↔ Python", "py-ts": "Python ↔ tailscaled", "ts-ts": "tailscaled ↔ tailscaled"}
    cpu = {(r.path, r.pair, r.metric): r.extra.get("cpu_s_per_gb") for r in results}
    moved = {(r.path, r.pair, r.metric) for r in results if r.extra.get("path_moved")}
    head = ("| path | pair | " + " | ".join(f"{d} Mbit/s" for d in directions) + " | RTT ms (median) | "
            + " | ".join(f"{d}: node CPU s/GB, client / server" for d in directions) + " |")
    lines = [head, "|" + "---|" * (3 + 2 * len(directions))]
    for path in paths:
        for pair in pairs:
            cells = []
            for m in (*directions, "rtt"):
                v = get.get((path, pair, m))
                cells.append("failed" if v is None else (f"{v:.2f}" if m == "rtt" else f"{v:.0f}"))
                if (path, pair, m) in moved:
                    cells[-1] += " ‡"
            for m in directions:
                c = cpu.get((path, pair, m))
                cells.append((f"{c['client']:.1f} / {c['server']:.1f}"
                              + (f" (relay {c['relay']:.1f})" if "relay" in c else "")) if c else "-")
            lines.append(f"| {path} | {names.get(pair, pair)} | " + " | ".join(cells) + " |")
    lines += ["", "Node CPU s/GB: CPU time (user + system, all threads) each node process spent per GB of "
              "payload moved, warm-up included. It varies less than Mbit/s with what else the shared machine "
              "runs, and it shows where the cores go."]
    if moved:
        lines += ["", "‡ right after that run, the nodes did not both report the path being measured (see the log "
                  "above): the transfer may have run partly over another path, DERP most likely."]
    d0 = directions[0]
    lines += ["", f"Ratios ({d0}):", ""]
    for pair in pairs:
        direct = get.get(("direct", pair, d0))
        for path in ("relay", "relay-ts", "derp"):
            if (path, pair, d0) in get:
                lines.append(f"* {names.get(pair, pair)}: {path} / direct = {ratio(get.get((path, pair, d0)), direct)}"
                             + (" (target ≥ 80%)" if path.startswith("relay") else ""))
    for path in paths:
        ts = get.get((path, "ts-ts", d0))
        for pair in ("py-ts", "py-py"):
            if (path, pair, d0) in get and ts:
                target = " (target ≥ 50%)" if path == "direct" and pair == "py-ts" else ""
                share = ratio(get.get((path, pair, d0)), ts)
                lines.append(f"* {path}: {names[pair]} / tailscaled ↔ tailscaled = {share}"
                             + target)
    pyts = get.get(("direct", "py-ts", d0))
    if pyts is not None:
        lines.append(f"* Python ↔ tailscaled direct: {pyts:.0f} Mbit/s (target ≥ 500 Mbit/s: "
                     f"{'met' if pyts >= 500 else 'not met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_sink":
        run_sink(int(argv[1]))
        return 0
    if argv and argv[0] == "_client":
        host, port = argv[1].rsplit(":", 1)
        thost, tport = argv[2].rsplit(":", 1)
        print(json.dumps(run_client((host, int(port)), thost, int(tport), argv[3], float(argv[4]), int(argv[5]))))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per transfer (default 5)")
    ap.add_argument("--pings", type=int, default=200, help="round trips for the RTT (default 200)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement, best kept (default 2)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--directions", default="down,up", help="down (server sends), up (client sends)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("lab_paths_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    paths = [p for p in args.paths.split(",") if p]
    pairs = [p for p in args.pairs.split(",") if p]
    directions = [d for d in args.directions.split(",") if d]
    if set(paths) - set(PATHS) or set(pairs) - set(PAIRS) or set(directions) - {"down", "up"}:
        ap.error("unknown path, pair or direction")

    # Ctrl-C and SIGTERM unwind through the labs' context managers, which remove everything.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bins = None
    if any("ts" in PAIRS[p] for p in pairs):
        from tests.lab.tailscaled import ensure_tailscale_binaries

        bins = ensure_tailscale_binaries()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: list[Result] = []
    for path in paths:
        try:
            results += run_path(path, pairs, directions, args.seconds, args.pings, args.repeat, bins, log)
        except Exception as exc:  # noqa: BLE001 - one broken lab must not lose the others
            log(f"[{path}] lab failed: {exc!r}")
            results += [Result(path, p, m, None, error=repr(exc)[:200]) for p in pairs for m in (*directions, "rtt")]

    load = os.getloadavg()
    print(f"TCP through SOCKS5 -> node -> tailnet -> node -> 127.0.0.1 sink; {args.seconds:g} s per transfer "
          f"(after {WARMUP} s warm-up), {args.pings} 1-byte round trips, best of {args.repeat}; "
          "tailscaled 1.96.4 userspace-networking; "
          f"peer relay = tsnet up --relay-server-port (relay) / tailscaled (relay-ts) on a public host")
    print()
    print(table(results, directions))
    errors = [r for r in results if r.error]
    if errors:
        print()
        for r in errors:
            print(f"* {r.path} {r.pair} {r.metric}: {r.error}")
    print()
    print(f"(load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": [asdict(r) for r in results], "seconds": args.seconds,
                                               "pings": args.pings, "directions": directions}, indent=1))
    # Partial failures are in the table and listed above; exit 1 only when nothing could be measured.
    return 0 if len(errors) < len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
