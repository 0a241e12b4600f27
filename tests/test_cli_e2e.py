"""``tsnet up`` as a real process against the embedded control server (loopback only).

The control server (with DERP and STUN) and a peer node run in this test's trio loop; ``tsnet up`` runs as a
subprocess with SOCKS5 and HTTP proxies, metrics/health listeners and its local API. We curl through both
proxies to the peer, read ``status --json``, ``ping``, ``/metrics`` and ``/healthz`` (which must follow the
control server going away and coming back), and stop it with SIGTERM.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

import tsnet
from tsnet.control.server import ControlServer, ServerConfig, default_derp_map
from tsnet.control.store import Store
from tsnet.demo import _serve_http
from tsnet.derp.server import DerpServer

ROOT = Path(__file__).resolve().parents[1]


class Control:
    """The embedded control server; stop() and start() again on the same port with the same state."""

    def __init__(self, nursery, state_dir):
        self.nursery = nursery
        self.store = Store.open(state_dir)
        self.config = ServerConfig(interactive_login=False, ephemeral_timeout=3600)
        self.port = 0
        self.scope = None

    async def start(self):
        async def run(task_status):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as n:
                    server = ControlServer(self.store, self.config)
                    port = await n.start(server.serve, "127.0.0.1", self.port)
                    derp = DerpServer()
                    server.attach_derp(derp)
                    stun = await n.start(derp.serve_stun, "127.0.0.1", 0)
                    self.config.derp_map = default_derp_map("127.0.0.1", port, stun_port=stun)
                    self.server = server
                    task_status.started((scope, port))
        self.scope, self.port = await self.nursery.start(run)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.scope.cancel()


async def read_events(stream, events, changed):
    """Collect ``tsnet up --json-logs`` records from its stderr."""
    buf = b""
    async for chunk in stream:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"msg": line.decode(errors="replace"), "raw": True})
            changed[0].set()
            changed[0] = trio.Event()


async def wait_event(events, changed, pred, timeout=20):
    with trio.fail_after(timeout):
        while True:
            for e in events:
                if pred(e):
                    return e
            await changed[0].wait()


async def run_cli(*argv, timeout=30):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    proc = await trio.run_process([sys.executable, "-m", "tsnet", *argv], capture_stdout=True, capture_stderr=True,
                                  check=False, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def curl(*args):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await trio.run_process(["curl", "-sS", "--max-time", "15", *args], capture_stdout=True,
                                  capture_stderr=True, env=env, check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def wait_health(url, want, timeout=30):
    async with httpx.AsyncClient(trust_env=False) as http:
        with trio.fail_after(timeout):
            while True:
                r = await http.get(url)
                if r.status_code == want:
                    return r
                await trio.sleep(0.1)  # polling an external process's endpoint; bounded by fail_after


async def test_tsnet_up_process_end_to_end(nursery, tmp_path):
    control = Control(nursery, tmp_path / "control")
    await control.start()
    key = control.store.create_authkey(control.server.now(), reusable=True).key

    peer = tsnet.Server(hostname="peer", state_dir=tmp_path / "peer", auth_key=key, control_url=control.url,
                        udp_bind="127.0.0.1")
    await peer.up(timeout=20)
    nursery.start_soon(_serve_http, await peer.listen("tcp", ":80"), "peer")

    sock = tmp_path / "up.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    env.update({"TS_AUTHKEY": key, "TS_HOSTNAME": "sidecar"})  # some settings through the environment
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tsnet", "up", "--control-url", control.url, "--state", "mem:", "--ephemeral",
         "--socks5", "127.0.0.1:0", "--http-proxy", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--health-listen", "127.0.0.1:0", "--udp-bind", "127.0.0.1", "--socket", str(sock), "--json-logs"],
        stderr=subprocess.PIPE, env=env, cwd=ROOT)
    events, changed = [], [trio.Event()]
    nursery.start_soon(read_events, proc.stderr, events, changed)
    try:
        await wait_event(events, changed, lambda e: e.get("step") == "running", timeout=30)
        assert any(e.get("step") == "join" for e in events)
        joined = next(e for e in events if e.get("step") == "joined")  # progress: control, netmap, DERP
        assert "control login" in joined["msg"] and "DERP" in joined["msg"]
        up = next(e for e in events if e.get("step") == "up")
        assert up["addresses"] and up["peers"] == 1
        addr = {e["msg"].split()[0]: e["msg"].rsplit(" ", 1)[1] for e in events if e.get("step") == "proxy"}
        metrics_url = next(e["msg"].split(" on ")[1] for e in events if e.get("step") == "metrics")
        health_url = next(e["msg"].split(" on ")[1] for e in events if e.get("step") == "health")

        # curl through both proxies reaches the peer by its MagicDNS name.
        code, out, err = await curl("--socks5-hostname", addr["SOCKS5"], "http://peer.tailnet.test/")
        assert code == 0 and out.startswith("hello from peer"), err
        code, out, err = await curl("--proxy", f"http://{addr['HTTP']}", "http://peer/")
        assert code == 0 and out.startswith("hello from peer"), err

        # status --json lists the peer with a path.
        code, out, err = await run_cli("status", "--json", "--socket", str(sock))
        assert code == 0, err
        st = json.loads(out)
        assert st["backend_state"] == "Running"
        (p,) = st["peers"]
        assert p["name"] == "peer" and re.match(r"(direct|relay via|derp region) ", p["path"]), p
        code, out, err = await run_cli("status", "--socket", str(sock))
        assert code == 0 and "peer" in out and "PATH" in out

        # ping prints one line per ping with path and latency.
        code, out, err = await run_cli("ping", "peer", "-c", "3", "--interval", "0", "--socket", str(sock))
        lines = out.strip().splitlines()
        assert code == 0 and len(lines) == 3, (out, err)
        assert all(re.match(r"pong from peer \(100\.\S+\) via \S.* in [\d.]+ms$", line) for line in lines), lines

        code, out, err = await run_cli("netcheck", "--socket", str(sock))
        assert code == 0 and "* udp: True" in out and "* preferred derp: 900" in out, (out, err)

        code, out, err = await run_cli("whois", str(peer.tailscale_ips()[0]), "--socket", str(sock))
        assert code == 0 and "Name: peer" in out, err

        # /metrics parses as Prometheus text.
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.get(metrics_url)
        fams = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"tsnet_peers", "tsnet_peer_rx_bytes", "process_cpu_seconds", "tsnet_running"} <= fams

        # /healthz: 200, 503 while the control server is gone, 200 when it is back.
        await wait_health(health_url, 200)
        control.stop()
        r = await wait_health(health_url, 503)
        assert "control" in r.text
        await control.start()
        await wait_health(health_url, 200)

        # SIGTERM: a bounded, clean stop, and the ephemeral node is gone from the control server.
        assert any(n.name == "sidecar" for n in control.store.nodes())
        started = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            code = await proc.wait()
        assert code == 0 and trio.current_time() - started < 5
        assert not any(n.name == "sidecar" for n in control.store.nodes())
        assert not sock.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await peer.close()
        control.stop()
