"""Control-plane benchmarks: Noise records, handshakes, map encoding/decoding, loopback end to end,
and fan-out of one change to 1,000 map streams of a ``tsnet control serve`` subprocess.

Run: ``.venv/bin/python benchmarks/control_bench.py [--peers 200] [--rounds 50] [--nodes 1000]``.
Prints a table. The fan-out scenario only runs with ``--nodes N`` (``--only-fanout`` skips the rest):
bringing up 1,000 streams costs minutes of CPU (mostly clients decoding 1,000 full netmaps of 999
peers each), too slow for the default run. ``--nodes 1000`` is the issue's scenario.

Fan-out scenario (``--nodes N``):

* ``tsnet control serve`` runs as a subprocess on 127.0.0.1 (fresh temporary state directory,
  allow-all policy, embedded DERP); the auth key comes from ``tsnet control authkey create --reusable``.
* N real :class:`ControlClient` nodes (own machine key, ts2021 Noise connection, HTTP/2,
  register with the auth key) run in ``--fanout-procs`` worker processes (default 2, each one
  trio process holding N/2 clients), so client-side decoding is not serialised on one core.
  Registration runs 32 logins at a time per worker.
* Map long polls are brought up in batches (``--fanout-batch``, default 100; nodes are dealt
  round-robin to the workers). A batch is done when its streams have their first netmap and
  every open stream shows all other open nodes online; only then does the next batch start.
  Every first netmap lists N-1 peers and costs a client tens of milliseconds to decode, and each
  stream opening changes every other stream's view (online), so opening all N at once on a busy
  machine would starve the clients until the server drops them for not reading. After the last
  batch nothing is in flight: every stream shows all N-1 peers online.
* One node sends a lite map update with a new endpoint; we measure until every one of the N
  map streams has delivered it to ``on_netmap`` (N-1 peers see the new endpoint, the sender
  sees it on its self node). Times come from CLOCK_MONOTONIC, which all processes share.
  Repeated ``--fanout-rounds`` times (median and max reported). Target: <= 2 s for 1,000.
  Also reported: the CPU time the server and the busiest client process spent per fan-out
  (from /proc and process_time), which shows the cost independent of machine load.
* Server RSS is read from /proc/<pid>/status (VmRSS) after registration and with all streams up.
* Profiling: ``TSNET_FANOUT_PROFILE=FILE`` runs the server under cProfile,
  ``TSNET_FANOUT_WORKER_PROFILE=PREFIX`` each worker (``PREFIX.<worker>``).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import ipaddress
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from tsnet.control.client import ClientConfig, ControlClient  # noqa: E402
from tsnet.control.netmap import MapFrameDecoder, MapSession  # noqa: E402
from tsnet.control.noise import Initiator, respond  # noqa: E402
from tsnet.control.server import ControlServer, ServerConfig, _Session  # noqa: E402
from tsnet.control.store import Store  # noqa: E402
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, note: str = "") -> None:
    ROWS.append((name, value, note))


def timeit(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_noise() -> None:
    server = MachinePrivate.generate()
    machine = MachinePrivate.generate()

    def handshake() -> None:
        init = Initiator(machine, server.public, 133)
        init.finish(respond(server, init.initiation).response)

    row("noise handshake (both sides)", f"{timeit(handshake, 300) * 1e6:.0f} us")
    init = Initiator(machine, server.public, 133)
    c = init.finish((r := respond(server, init.initiation)).response)
    s = r.transport
    for size in (100, 4077):
        data = bytes(size)
        recs = [c.seal(data) for _ in range(2000)]
        t0 = time.perf_counter()
        for _ in range(2000):
            c.seal(data)
        seal = (time.perf_counter() - t0) / 2000
        # re-sync the receiver with a fresh pair for opening
        init2 = Initiator(machine, server.public, 133)
        c2 = init2.finish((r2 := respond(server, init2.initiation)).response)
        recs = [c2.seal(data) for _ in range(2000)]
        t0 = time.perf_counter()
        for rec in recs:
            r2.transport.receive(rec)
        open_ = (time.perf_counter() - t0) / 2000
        row(f"noise seal {size} B", f"{seal * 1e6:.1f} us", f"{size / seal / 1e6:.0f} MB/s")
        row(f"noise open {size} B", f"{open_ * 1e6:.1f} us", f"{size / open_ / 1e6:.0f} MB/s")
    bulk = bytes(1 << 20)
    t0 = time.perf_counter()
    wire = c.seal(bulk)
    s2 = s  # noqa: F841
    dt_ = time.perf_counter() - t0
    row("noise seal 1 MiB (split)", f"{dt_ * 1e3:.2f} ms", f"{len(bulk) / dt_ / 1e6:.0f} MB/s, {len(wire)} B wire")


def bench_map(peers: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        server = ControlServer(store, ServerConfig())
        now = server.now()
        user = store.ensure_user("u@x", "u", now)
        for i in range(peers + 1):
            n = store.create_node(now, machine_key=str(MachinePrivate.generate().public),
                                  node_key=str(NodePrivate.generate().public), name=f"n{i}", user_id=user.id,
                                  ephemeral=False, tags=(), key_expiry=None, hostinfo={"Hostname": f"n{i}", "OS": "linux"},
                                  authkey_id=None)
            store.update_node(n.id, disco_key=str(DiscoPrivate.generate().public), endpoints=("192.0.2.1:41641",),
                              home_derp=900, cap=133)
        session = _Session(1)
        t0 = time.perf_counter()
        first = server._session_delta(session, first=True)
        full_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        frame = server._frame(first, True)
        comp = time.perf_counter() - t0
        row(f"server full netmap build ({peers} peers)", f"{full_build * 1e3:.1f} ms")
        row(f"server zstd frame ({peers} peers)", f"{comp * 1e3:.2f} ms", f"{len(frame)} B on the wire")
        store.update_node(2, endpoints=("192.0.2.9:41641",))
        server.notify()
        t0 = time.perf_counter()
        delta = server._session_delta(session, first=False)
        row(f"server delta build ({peers} peers, 1 changed)", f"{(time.perf_counter() - t0) * 1e3:.1f} ms",
            f"{len(server._frame(delta, True))} B")
        dec = MapFrameDecoder()
        t0 = time.perf_counter()
        (msg,) = dec.feed(frame)
        ms = MapSession()
        ms.apply(msg, dt.datetime.now(dt.timezone.utc))
        row(f"client decode+apply full ({peers} peers)", f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
        dframe = server._frame(delta, True)
        t0 = time.perf_counter()
        for m in dec.feed(dframe):
            ms.apply(m, dt.datetime.now(dt.timezone.utc))
        row(f"client decode+apply delta ({peers} peers)", f"{(time.perf_counter() - t0) * 1e3:.2f} ms")
        store.close()


async def bench_e2e(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        server = ControlServer(store, ServerConfig())
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{port}"
            key = store.create_authkey(server.now(), reusable=True).key

            def cfg(name: str) -> ClientConfig:
                return ClientConfig(control_url=url, machine_key=MachinePrivate.generate(),
                                    node_key=NodePrivate.generate(), disco_key=DiscoPrivate.generate().public,
                                    hostname=name, auth_key=key)

            # login + first netmap
            times = []
            for i in range(10):
                got = trio.Event()
                t0 = time.perf_counter()
                client = ControlClient(cfg(f"j{i}"))

                async def runner(client=client, got=got) -> None:
                    async with client:
                        await client.run(lambda nm: got.set())

                nursery.start_soon(runner)
                await got.wait()
                times.append(time.perf_counter() - t0)
            row("join: /key + ts2021 + register + first netmap", f"{statistics.median(times) * 1e3:.1f} ms", "median of 10")

            # delta propagation: b's lite update -> a's new netmap
            seen = {"ep": None}
            changed = trio.Event()

            def on_a(nm) -> None:
                for p in nm.peers:
                    if p.name.startswith("sender.") and p.endpoints:
                        ep = p.endpoints[0][1]
                        if ep != seen["ep"]:
                            seen["ep"] = ep
                            changed.set()

            a = ControlClient(cfg("watcher"))
            b = ControlClient(cfg("sender"))
            ready = trio.Event()

            async def run_a() -> None:
                async with a:
                    await a.run(lambda nm: (on_a(nm), ready.set()))

            async def run_b() -> None:
                async with b:
                    await b.run(lambda nm: None)

            nursery.start_soon(run_a)
            nursery.start_soon(run_b)
            await ready.wait()
            while not b.logged_in:
                await trio.sleep(0.01)
            lat = []
            for i in range(rounds):
                changed = trio.Event()
                t0 = time.perf_counter()
                await b.send_update(endpoints=(f"192.0.2.1:{10000 + i}",))
                await changed.wait()
                lat.append(time.perf_counter() - t0)
            row("delta: lite update -> peer's netmap", f"{statistics.median(lat) * 1e3:.1f} ms",
                f"median of {rounds}, p90 {sorted(lat)[int(rounds * 0.9) - 1] * 1e3:.1f} ms, 12 nodes online")
            nursery.cancel_scope.cancel()
        store.close()


# -- fan-out to N map streams of a `tsnet control serve` subprocess ------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
FANOUT_ENDPOINT_HOST = "192.0.2.77"  # documentation range; only ever data in a netmap, never dialled


def _raise_nofile() -> None:
    """N clients and the server each hold N sockets: lift the soft fd limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class _FanoutWatcher:
    """One client of a fan-out worker and what its map stream has shown so far."""

    def __init__(self, worker: _FanoutWorker, index: int) -> None:
        self.worker = worker
        self.index = index  # global node index
        self.client: ControlClient | None = None
        self.gate = trio.Event()  # set when this node's map stream may open
        self.first = trio.Event()
        self.nm = None
        self.online_ok = True
        self.seen_at: float | None = None

    def check_online(self) -> None:
        w = self.worker
        if not self.online_ok and self.nm is not None and sum(1 for p in self.nm.peers if p.online) >= w.online_target:
            self.online_ok = True
            w.not_online_ok -= 1
            if w.not_online_ok == 0:
                w.all_online_ok.set()

    def on_netmap(self, nm) -> None:
        w = self.worker
        self.nm = nm
        if not self.first.is_set():
            self.first.set()
        if not self.online_ok:
            self.check_online()
        if w.expect is not None and self.seen_at is None and w.sees_change(self, nm):
            self.seen_at = time.monotonic()
            w.pending -= 1
            if w.pending == 0:
                w.all_seen.set()


class _FanoutWorker:
    """A worker process holding nodes ``worker, worker+procs, ...`` of ``total``, driven by JSON-line
    commands on stdin, answering on stdout."""

    def __init__(self, url: str, authkey: str, worker: int, procs: int, total: int) -> None:
        self.url, self.authkey, self.total = url, authkey, total
        self.watchers = [_FanoutWatcher(self, g) for g in range(worker, total, procs)]
        self.count = len(self.watchers)
        self.registered = 0
        self.all_registered = trio.Event()
        self.online_target = 0
        self.not_online_ok = 0
        self.all_online_ok = trio.Event()
        self.expect: tuple[int, str, tuple] | None = None  # (changer node id, "ip:port", (ip, port))
        self.pending = 0
        self.all_seen = trio.Event()

    def sees_change(self, watcher: _FanoutWatcher, nm) -> bool:
        changer_id, text, parsed = self.expect  # type: ignore[misc]
        if nm.self_node.id == changer_id:
            return text in (nm.self_node.endpoints or ())
        peers = nm.peers  # sorted by node id
        i = bisect.bisect_left(peers, changer_id, key=lambda p: p.id)
        return i < len(peers) and peers[i].id == changer_id and parsed in peers[i].endpoints

    async def run_client(self, watcher: _FanoutWatcher, limit: trio.Semaphore) -> None:
        n = watcher.index
        cfg = ClientConfig(control_url=self.url, machine_key=MachinePrivate.generate(),
                           node_key=NodePrivate.generate(), disco_key=DiscoPrivate.generate().public,
                           hostname=f"fan{n}", auth_key=self.authkey, on_auth_url=lambda url: None)
        async with ControlClient(cfg) as client:
            watcher.client = client
            client.endpoints = (f"192.0.2.1:{10000 + n}",)
            async with limit:
                await client.login()
            self.registered += 1
            if self.registered == self.count:
                self.all_registered.set()
            await watcher.gate.wait()
            await client.run(watcher.on_netmap)

    async def open_upto(self, upto: int) -> None:
        """Open the map streams of our nodes below global index ``upto``; return once each has its
        first netmap and every open stream shows the ``upto - 1`` other open nodes online."""
        opened = [w for w in self.watchers if w.index < upto]
        for w in opened:
            w.gate.set()
        for w in opened:
            await w.first.wait()
        self.online_target = upto - 1
        self.all_online_ok = trio.Event()
        self.not_online_ok = len(opened)
        for w in opened:
            w.online_ok = False
        for w in opened:
            w.check_online()
        if self.not_online_ok:
            await self.all_online_ok.wait()

    async def main(self) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = bytearray()

        async def command() -> dict:
            while b"\n" not in buf:
                data = await stdin.receive_some(4096)
                if not data:
                    raise SystemExit(0)  # the benchmark went away
                buf.extend(data)
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            return json.loads(line)

        def reply(**obj) -> None:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

        cpu0 = 0.0
        async with trio.open_nursery() as nursery:
            reply(ready=True)
            while True:
                cmd = await command()
                what = cmd["cmd"]
                if what == "register":
                    limit = trio.Semaphore(32)
                    for watcher in self.watchers:
                        nursery.start_soon(self.run_client, watcher, limit)
                    with trio.fail_after(900):
                        await self.all_registered.wait()
                    reply(t=time.monotonic())
                elif what == "open":
                    with trio.fail_after(900):
                        await self.open_upto(cmd["upto"])
                    first = self.watchers[0]
                    reply(t=time.monotonic(), first_id=first.nm.self_node.id if first.index == 0 else None)
                elif what == "expect":
                    host, _, port = cmd["endpoint"].rpartition(":")
                    self.expect = (cmd["id"], cmd["endpoint"], (ipaddress.ip_address(host), int(port)))
                    self.pending = self.count
                    self.all_seen = trio.Event()
                    for watcher in self.watchers:
                        watcher.seen_at = None
                    cpu0 = time.process_time()
                    reply(ok=True)
                elif what == "change":  # only sent to the worker owning node 0, which changes its endpoint
                    t0 = time.monotonic()
                    await self.watchers[0].client.send_update(endpoints=(cmd["endpoint"],))
                    reply(t0=t0)
                elif what == "collect":
                    with trio.fail_after(300):
                        await self.all_seen.wait()
                    seen = [w.seen_at for w in self.watchers]
                    reply(first=min(seen), last=max(seen), cpu=time.process_time() - cpu0)
                elif what == "quit":
                    nursery.cancel_scope.cancel()
                    return


class _WorkerProc:
    def __init__(self, spec: dict) -> None:
        # TSNET_FANOUT_WORKER_PROFILE=PREFIX: profile each worker into PREFIX.<first node index>.
        profile = os.environ.get("TSNET_FANOUT_WORKER_PROFILE")
        prefix = ["-m", "cProfile", "-o", f"{profile}.{spec['worker']}"] if profile else []
        self.proc = subprocess.Popen([sys.executable, *prefix, __file__, "--fanout-worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def send(self, **cmd) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fan-out worker exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.send(**cmd)
        return self.read()


def _tsnet_cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "tsnet", *args], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=env, check=True)
    return out.stdout


def bench_fanout(nodes: int, procs: int, batch: int, rounds: int) -> None:
    _raise_nofile()
    with tempfile.TemporaryDirectory(prefix="tsnet-fanout-") as d:
        state = Path(d) / "state"
        key = _tsnet_cli("control", "authkey", "create", "--state-dir", str(state), "--reusable").strip()
        log_path = Path(d) / "server.log"
        log = open(log_path, "wb")
        # TSNET_FANOUT_PROFILE=FILE: run the server under cProfile (stopped with SIGINT so the profile is written).
        profile = os.environ.get("TSNET_FANOUT_PROFILE")
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        server = subprocess.Popen([sys.executable, *prefix, "-m", "tsnet", "control", "serve", "--listen",
                                   "127.0.0.1:0", "--state-dir", str(state)], stdout=log, stderr=log, cwd=REPO,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
        workers: list[_WorkerProc] = []
        try:
            deadline = time.monotonic() + 30
            while not (m := re.search(r"serving http://127\.0\.0\.1:(\d+)", log_path.read_text())):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"control server did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)  # waiting for another process's log line; no event to block on
            url = f"http://127.0.0.1:{m.group(1)}"
            rss_idle = _rss_mib(server.pid)
            for i in range(procs):
                workers.append(_WorkerProc({"url": url, "authkey": key, "worker": i, "procs": procs, "total": nodes}))
            for w in workers:
                assert w.read()["ready"]

            t0 = time.monotonic()
            for w in workers:
                w.send(cmd="register")
            reg = max(w.read()["t"] for w in workers) - t0
            rss_reg = _rss_mib(server.pid)
            row(f"fan-out: register {nodes} ControlClients", f"{reg:.1f} s",
                f"{nodes / reg:.0f}/s; {procs} client procs, 32 logins in flight each")
            row("fan-out: server RSS after registration", f"{rss_reg:.0f} MiB", f"{rss_idle:.0f} MiB idle")

            t0 = time.monotonic()
            changer_id = None
            for upto in range(batch, nodes + batch, batch):
                upto = min(upto, nodes)
                for w in workers:
                    w.send(cmd="open", upto=upto)
                answers = [w.read() for w in workers]
                changer_id = changer_id or answers[0]["first_id"]
            up = time.monotonic() - t0
            rss_streams = _rss_mib(server.pid)
            row(f"fan-out: {nodes} map streams up", f"{up:.1f} s",
                f"batches of {batch}, each until all open streams see each other online")
            row(f"fan-out: server RSS with {nodes} streams", f"{rss_streams:.0f} MiB")

            lat, firsts, server_cpu, client_cpu = [], [], [], []
            for r in range(rounds):
                endpoint = f"{FANOUT_ENDPOINT_HOST}:{20000 + r}"
                for w in workers:
                    assert w.ask(cmd="expect", id=changer_id, endpoint=endpoint)["ok"]
                cpu0 = _cpu_seconds(server.pid)
                change_t0 = workers[0].ask(cmd="change", endpoint=endpoint)["t0"]
                seen = [w.ask(cmd="collect") for w in workers]
                server_cpu.append(_cpu_seconds(server.pid) - cpu0)
                client_cpu.append(max(s["cpu"] for s in seen))
                lat.append(max(s["last"] for s in seen) - change_t0)
                firsts.append(min(s["first"] for s in seen) - change_t0)
            row(f"fan-out: lite update -> all {nodes} streams", f"{statistics.median(lat) * 1e3:.0f} ms",
                f"median of {rounds}, max {max(lat) * 1e3:.0f} ms, first stream after "
                f"{statistics.median(firsts) * 1e3:.0f} ms (target <= 2000 ms)")
            row("fan-out: CPU per fan-out, server", f"{statistics.median(server_cpu) * 1e3:.0f} ms",
                "median; the server's share of the critical path")
            row("fan-out: CPU per fan-out, busiest client proc", f"{statistics.median(client_cpu) * 1e3:.0f} ms",
                f"median; {nodes // procs} clients decoding the delta; load avg {os.getloadavg()[0]:.1f} "
                f"on {os.cpu_count()} cores")
        finally:
            for w in workers:
                if w.proc.poll() is None:
                    try:
                        w.send(cmd="quit")
                    except (BrokenPipeError, OSError):
                        pass
            for w in workers:
                try:
                    w.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
            server.send_signal(signal.SIGINT if profile else signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--fanout-worker":
        spec = json.loads(sys.argv[2])
        worker = _FanoutWorker(spec["url"], spec["authkey"], spec["worker"], spec["procs"], spec["total"])
        trio.run(worker.main)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--nodes", type=int, default=0, help="run the fan-out scenario with N nodes (e.g. 1000)")
    ap.add_argument("--fanout-procs", type=int, default=2, help="client worker processes for the fan-out")
    ap.add_argument("--fanout-batch", type=int, default=100, help="map streams opened per batch")
    ap.add_argument("--fanout-rounds", type=int, default=5, help="endpoint changes measured")
    ap.add_argument("--only-fanout", action="store_true", help="run just the fan-out scenario")
    args = ap.parse_args()
    if not args.only_fanout:
        bench_noise()
        bench_map(args.peers)
        trio.run(bench_e2e, args.rounds)
    if args.nodes:
        bench_fanout(args.nodes, args.fanout_procs, args.fanout_batch, args.fanout_rounds)
    w = max(len(r[0]) for r in ROWS)
    print(f"{'benchmark':{w}}  {'result':>12}  notes")
    print("-" * (w + 40))
    for name, value, note in ROWS:
        print(f"{name:{w}}  {value:>12}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
