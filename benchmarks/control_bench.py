"""Control-plane benchmarks: Noise records, handshakes, map encoding/decoding, loopback end to end.

Run: ``.venv/bin/python benchmarks/control_bench.py [--peers 200] [--rounds 50]``. Prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from tsnet.control import tailcfg  # noqa: E402
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    bench_noise()
    bench_map(args.peers)
    trio.run(bench_e2e, args.rounds)
    w = max(len(r[0]) for r in ROWS)
    print(f"{'benchmark':{w}}  {'result':>12}  notes")
    print("-" * (w + 40))
    for name, value, note in ROWS:
        print(f"{name:{w}}  {value:>12}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
