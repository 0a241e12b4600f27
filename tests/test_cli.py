"""``tsnet up`` / ``status`` / ``ping`` / ``netcheck`` / ``whois``: flags, env, and a node run in-process.

The node here is the fake from cli_fakes (loopback TCP stands in for the tailnet); test_cli_e2e.py runs the
real command against the embedded control server.
"""

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cli_fakes import FakeServer, Tailnet, serve_http_once_per_conn
from tsnet import cli, cli_node

ROOT = Path(__file__).resolve().parents[1]


def parse_up(argv, env=None):
    args = cli.build_parser().parse_args(["up", *argv])
    return cli_node.settings_from(args, env or {})


# -- flags and environment ---------------------------------------------------------------------------


def test_flags_and_env_equivalents(tmp_path):
    env = {
        "TS_CONTROL_URL": "http://127.0.0.1:9/", "TS_AUTHKEY": "tskey-x", "TS_HOSTNAME": "web-1",
        "TS_STATE_DIR": str(tmp_path), "TS_EPHEMERAL": "true", "TS_ADVERTISE_TAGS": "tag:a,tag:b",
        "TS_SOCKS5_SERVER": "127.0.0.1:1055", "TS_OUTBOUND_HTTP_PROXY_LISTEN": ":1056",
        "TS_FORWARD": "80=127.0.0.1:8080, 443=[::1]:8443", "TS_RELAY_SERVER_PORT": "40000", "TS_PORT": "41641",
        "TS_METRICS_LISTEN": "127.0.0.1:9100", "TS_HEALTH_LISTEN": "[::1]:9101", "TS_JSON_LOGS": "1",
        "TS_TIMEOUT": "ignored", "TS_UP_TIMEOUT": "12", "TS_UDP_BIND": "127.0.0.1",
    }
    s = parse_up([], env)
    assert s.control_url == "http://127.0.0.1:9" and s.authkey == "tskey-x" and s.hostname == "web-1"
    assert s.state_dir == tmp_path and s.ephemeral and s.advertise_tags == ("tag:a", "tag:b")
    assert s.socks5 == ("127.0.0.1", 1055) and s.http_proxy == ("127.0.0.1", 1056)
    assert [(f.port, f.target) for f in s.forwards] == [(80, "127.0.0.1:8080"), (443, "[::1]:8443")]
    assert s.relay_server_port == 40000 and s.port == 41641
    assert s.metrics_listen == ("127.0.0.1", 9100) and s.health_listen == ("::1", 9101)
    assert s.json_logs and s.timeout == 12 and s.udp_bind == "127.0.0.1"
    # Flags win over the environment.
    s = parse_up(["--hostname", "flag-wins", "--port", "1", "--forward", "22=127.0.0.1:2222"], env)
    assert s.hostname == "flag-wins" and s.port == 1 and [f.port for f in s.forwards] == [22]
    # Every flag is documented with its variables in --help.
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["up"].format_help()
    for flag, names in cli_node.ENV_VARS.items():
        assert flag in help_text and all(f"${n}" in help_text for n in names)


def test_mem_state():
    s = parse_up(["--state", "mem:", "--ephemeral"])
    assert s.in_memory and s.state_dir is None


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--port", "abc"], {}, "--port"),
    ([], {"TS_PORT": "70000"}, "--port (from $TS_PORT)"),
    (["--control-url", "ftp://x"], {}, "--control-url"),
    ([], {"TS_EPHEMERAL": "maybe"}, "--ephemeral (from $TS_EPHEMERAL)"),
    (["--advertise-tags", "web"], {}, "--advertise-tags"),
    (["--forward", "80:127.0.0.1:80"], {}, "--forward"),
    ([], {"TS_FORWARD": "80=127.0.0.1:0"}, "--forward (from $TS_FORWARD)"),
    (["--socks5", "localhost"], {}, "--socks5"),
    (["--metrics-listen", "x:y"], {}, "--metrics-listen"),
    (["--hostname", "bad_name!"], {}, "--hostname"),
    (["--state", "/tmp/x"], {}, "--state"),
    (["--state", "mem:"], {}, "--state"),  # memory state without --ephemeral
    (["--state", "mem:", "--ephemeral", "--state-dir", "/tmp/x"], {}, "--state"),
    (["--timeout", "-1"], {}, "--timeout"),
    (["--udp-bind", "nope"], {}, "--udp-bind"),
    ([], {"TS_AUTHKEY": "file:/nonexistent/key"}, "--authkey (from $TS_AUTHKEY)"),
])
def test_bad_values_name_the_flag(argv, env, named):
    with pytest.raises(cli_node.UsageError) as info:
        parse_up(argv, env)
    assert f"bad {named}" in str(info.value)


def run_cli(argv, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tsnet", *argv], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["up", "--port", "abc"], {}, "--port"),
    (["up", "--bogus-flag"], {}, "--bogus-flag"),
    (["up"], {"TS_METRICS_LISTEN": "nonsense"}, "$TS_METRICS_LISTEN"),
    (["ping", "x", "-c", "many"], {}, "-c/--count"),
])
def test_bad_flags_exit_2_with_one_line(argv, env, named):
    proc = run_cli(argv, env)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert proc.stdout == ""


def test_clients_without_a_node_fail_clearly(tmp_path):
    for argv in (["status"], ["ping", "peer", "-c", "1"], ["netcheck"], ["whois", "100.64.0.1"]):
        proc = run_cli([*argv, "--state-dir", str(tmp_path)])
        assert proc.returncode == 1
        assert "no node is running" in proc.stderr and str(tmp_path) in proc.stderr


# -- output formatting -------------------------------------------------------------------------------


def test_status_table():
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    st = {
        "backend_state": "Running", "health": ["DERP region 900: reconnecting"],
        "self_node": {"name": "me", "addresses": ["fd7a::1", "100.64.0.1"], "os": "linux"},
        "peers": [
            {"name": "web", "addresses": ["100.64.0.2"], "os": "linux", "path": "direct 127.0.0.1:41641",
             "last_handshake": "2026-01-01T11:59:50+00:00", "online": True},
            {"name": "db", "addresses": ["100.64.0.3"], "os": "", "path": "derp region 900",
             "last_handshake": None, "online": False},
        ],
    }
    lines = cli_node.format_status(st, now=now).splitlines()
    assert lines[0].split() == ["PEER", "ADDRESS", "OS", "PATH", "LAST", "HANDSHAKE"]
    assert lines[1].split()[:4] == ["me", "(this", "node)", "100.64.0.1"]
    assert lines[2].split()[0] == "db"  # peers sorted by name
    lines[2], lines[3] = lines[3], lines[2]
    assert lines[2].split() == ["web", "100.64.0.2", "linux", "direct", "127.0.0.1:41641", "10s", "ago"]
    assert lines[3].split() == ["db", "(offline)", "100.64.0.3", "-", "derp", "region", "900", "-"]
    assert lines[4] == "# health: DERP region 900: reconnecting"
    st.update(backend_state="NeedsLogin", auth_url="http://127.0.0.1:9/register/x", peers=[], health=[])
    lines = cli_node.format_status(st, now=now).splitlines()
    assert lines[:2] == ["# backend state: NeedsLogin", "# to log in, visit: http://127.0.0.1:9/register/x"]


def test_netcheck_format():
    text = cli_node.format_netcheck({"udp": True, "region_latency": {"900": 0.0123}, "ipv6": None, "hairpin": []})
    assert "* udp: True" in text and "* region latency:" in text and "* 900: 12ms" in text
    assert "* ipv6: -" in text


# -- tsnet up in-process with a fake node -----------------------------------------------------------


async def curl(*args):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await trio.run_process(["curl", "-sS", "--max-time", "10", *args], capture_stdout=True,
                                  capture_stderr=True, env=env, check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_up_serves_proxies_local_api_metrics_and_stops_on_sigterm(tmp_path, nursery, capsys):
    net = Tailnet()
    peer = FakeServer(net, hostname="beta")
    await peer.up()
    nursery.start_soon(serve_http_once_per_conn, await peer.listen("tcp", ":80"), b"hello from beta\n")
    # A local service that --forward exposes on the node's tailnet port 8080.
    local = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    nursery.start_soon(serve_http_once_per_conn, local, b"forwarded\n")
    local_port = local.socket.getsockname()[1]

    settings = parse_up([
        "--hostname", "alpha", "--state-dir", str(tmp_path / "st"), "--socks5", "127.0.0.1:0",
        "--http-proxy", "127.0.0.1:0", "--forward", f"8080=127.0.0.1:{local_port}",
        "--metrics-listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0", "--ephemeral",
    ])
    node = FakeServer(net, hostname="alpha")
    ready = trio.Event()
    bound = {}
    result = {}

    def on_ready(b):
        bound.update(b)
        ready.set()

    async def run():
        result["code"] = await cli_node.run_up(settings, cli_node._Out(False), node, ready=on_ready)

    done = trio.Event()

    async def run_and_flag():
        await run()
        done.set()

    nursery.start_soon(run_and_flag)
    with trio.fail_after(10):
        await ready.wait()

    # SOCKS5 (remote names) and the HTTP proxy both reach the peer by its MagicDNS name.
    code, out, err = await curl("--socks5-hostname", bound["socks5"], "http://beta.tailnet.test/")
    assert code == 0 and out == "hello from beta\n", err
    code, out, err = await curl("--proxy", f"http://{bound['http']}", "http://beta.tailnet.test/")
    assert code == 0 and out == "hello from beta\n", err
    # --forward: a peer dialling alpha:8080 lands on the local service.
    stream = await peer.dial("tcp", "alpha.tailnet.test:8080")
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            reply += chunk
    assert reply.endswith(b"forwarded\n")

    # The CLI clients talk to the local API in the state dir.
    sock = tmp_path / "st" / "tsnet.sock"
    assert Path(bound["socket"]) == sock and oct(sock.stat().st_mode & 0o777) == "0o600"

    def cli_run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    code, out = await trio.to_thread.run_sync(cli_run, "status", "--json", "--state-dir", str(tmp_path / "st"))
    st = json.loads(out)
    assert code == 0 and st["peers"][0]["name"] == "beta" and st["peers"][0]["path"].startswith("direct ")
    code, out = await trio.to_thread.run_sync(cli_run, "status", "--socket", str(sock))
    assert code == 0 and "beta" in out and "direct 127.0.0.1:41641" in out
    code, out = await trio.to_thread.run_sync(cli_run, "ping", "beta", "-c", "3", "--interval", "0",
                                              "--socket", str(sock))
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3
    assert all(line == f"pong from beta ({peer.ip}) via direct 127.0.0.1:41641 in 1.50ms" for line in lines)
    code, out = await trio.to_thread.run_sync(cli_run, "netcheck", "--socket", str(sock))
    assert code == 0 and "* udp: True" in out
    code, out = await trio.to_thread.run_sync(cli_run, "whois", str(peer.ip), "--socket", str(sock))
    assert code == 0 and "Name: beta" in out
    code, _ = await trio.to_thread.run_sync(cli_run, "ping", "nobody", "-c", "2", "--socket", str(sock))
    assert code == 1

    # /metrics and /healthz (on one listener when both flags give... different ports here: two listeners).
    async with httpx.AsyncClient(trust_env=False) as http:
        host, port = bound["metrics"]
        r = await http.get(f"http://{host}:{port}/metrics")
        assert {f.name for f in text_string_to_metric_families(r.text)} >= {"tsnet_peers", "process_cpu_seconds"}
        host, port = bound["health"]
        assert (await http.get(f"http://{host}:{port}/healthz")).status_code == 200
        node.health.append("not connected to the control server")
        r = await http.get(f"http://{host}:{port}/healthz")
        assert r.status_code == 503 and "control server" in r.text
        node.health.clear()
        assert (await http.get(f"http://{host}:{port}/healthz")).status_code == 200

    # SIGTERM: clean, bounded shutdown; the node is closed and the socket removed.
    os.kill(os.getpid(), signal.SIGTERM)
    with trio.fail_after(5):
        await done.wait()
    assert result["code"] == 0 and node.closed and node.close_calls == 1
    assert not sock.exists()
    assert "alpha" not in net.nodes
    err = capsys.readouterr().err
    assert "SIGTERM: shutting down" in err and "stopped in" in err


async def test_up_reports_a_failed_join_and_exits_1(tmp_path, capsys):
    class Refused(FakeServer):
        async def up(self, *, timeout=60.0):
            raise RuntimeError("auth key refused")

    node = Refused(Tailnet(), hostname="a")
    settings = parse_up(["--state-dir", str(tmp_path)])
    with trio.fail_after(5):
        code = await cli_node.run_up(settings, cli_node._Out(True), node)
    assert code == 1 and node.closed
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert any(r["level"] == "error" and "auth key refused" in r["msg"] for r in records)
    assert all({"time", "level", "msg"} <= set(r) for r in records)


async def test_up_prints_the_login_url_and_keeps_waiting(tmp_path, capsys):
    class NeedsLogin(Exception):
        login_url = "http://127.0.0.1:9/a/abc"

    class Interactive(FakeServer):
        attempts = 0

        async def up(self, *, timeout=60.0):
            self.attempts += 1
            if self.attempts < 3:
                raise NeedsLogin("visit the URL")
            return await super().up()

    node = Interactive(Tailnet(), hostname="a")
    ready = trio.Event()
    settings = parse_up(["--state-dir", str(tmp_path), "--health-listen", "127.0.0.1:0"])
    clock_scope = trio.CancelScope()

    async def run():
        with clock_scope:
            await cli_node.run_up(settings, cli_node._Out(False), node, ready=lambda b: ready.set())

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(10):
            await ready.wait()
        clock_scope.cancel()
    err = capsys.readouterr().err
    assert err.count("to authenticate, visit: http://127.0.0.1:9/a/abc") == 1  # shown once, not per retry
    assert node.attempts == 3


def test_settings_namespace_defaults_are_unset():
    # argparse defaults must stay None/False so the environment can fill them in.
    args = cli.build_parser().parse_args(["up"])
    for flag in cli_node.ENV_VARS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        assert value in (None, [], False), flag
    assert isinstance(args, argparse.Namespace)


async def test_up_with_memory_state_keeps_its_socket_in_a_private_temp_dir(nursery):
    node = FakeServer(Tailnet(), hostname="a")
    settings = parse_up(["--state", "mem:", "--ephemeral"])
    ready = trio.Event()
    bound = {}
    scope = trio.CancelScope()

    def on_ready(b):
        bound.update(b)
        ready.set()

    async def run():
        with scope:
            await cli_node.run_up(settings, cli_node._Out(False), node, ready=on_ready)

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(5):
            await ready.wait()
        sock = Path(bound["socket"])
        assert sock.name == "tsnet.sock" and oct(sock.parent.stat().st_mode & 0o777) == "0o700"
        scope.cancel()
    assert node.closed and not sock.parent.exists()


async def test_up_names_the_flag_whose_listener_fails(tmp_path, capsys):
    busy = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = busy.socket.getsockname()[1]
    node = FakeServer(Tailnet(), hostname="a")
    settings = parse_up(["--state-dir", str(tmp_path), "--socks5", f"127.0.0.1:{port}"])
    with trio.fail_after(5):
        code = await cli_node.run_up(settings, cli_node._Out(False), node)
    await busy.aclose()
    assert code == 1 and node.closed
    assert f"failed: --socks5 127.0.0.1:{port}: OSError" in capsys.readouterr().err


class LineSink:
    """A text stream that lets a test wait for a line (no polling)."""

    def __init__(self):
        self.text = ""
        self.changed = trio.Event()

    def write(self, s):
        self.text += s
        self.changed.set()
        self.changed = trio.Event()

    def flush(self):
        pass

    async def wait_for(self, pattern, timeout=5):
        with trio.fail_after(timeout):
            while (m := re.search(pattern, self.text)) is None:
                await self.changed.wait()
        return m


async def test_health_and_local_api_answer_while_joining(tmp_path):
    class SlowJoin(FakeServer):
        release = trio.Event()

        async def up(self, *, timeout=60.0):
            self.state = "Starting"
            await self.release.wait()
            return await super().up()

    node = SlowJoin(Tailnet(), hostname="a")
    settings = parse_up(["--state-dir", str(tmp_path), "--health-listen", "127.0.0.1:0"])
    sink = LineSink()
    ready = trio.Event()
    scope = trio.CancelScope()

    async def run():
        with scope:
            await cli_node.run_up(settings, cli_node._Out(False, sink), node, ready=lambda b: ready.set())

    async with trio.open_nursery() as n:
        n.start_soon(run)
        url = (await sink.wait_for(r"health on (http://\S+)")).group(1)
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.get(url)
            assert r.status_code == 503 and "backend state is Starting" in r.text
            st = await trio.to_thread.run_sync(lambda: cli_node._client(
                argparse.Namespace(socket=None, state_dir=str(tmp_path))).status())
            assert st["backend_state"] == "Starting"
            node.release.set()
            with trio.fail_after(5):
                await ready.wait()
            assert (await http.get(url)).status_code == 200
        scope.cancel()


async def test_join_progress_shows_state_and_health_changes(tmp_path, autojump_clock):
    class Stuck(FakeServer):
        release = trio.Event()

        async def up(self, *, timeout=60.0):
            self.state = "Starting"
            self.health = ["home DERP region not connected"]
            await trio.sleep(2)
            self.health = []
            await self.release.wait()
            return await super().up()

    node = Stuck(Tailnet(), hostname="a")
    sink = LineSink()
    scope = trio.CancelScope()

    async def run():
        with scope:
            await cli_node.run_up(parse_up(["--state-dir", str(tmp_path)]), cli_node._Out(False, sink), node)

    async with trio.open_nursery() as n:
        n.start_soon(run)
        await sink.wait_for(r"state Starting; home DERP region not connected")
        await sink.wait_for(r"state Starting\n")
        node.release.set()
        await sink.wait_for(r"running;")
        scope.cancel()
