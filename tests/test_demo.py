"""``tsnet demo``: the step runner with stand-in nodes (fast), and the real command end to end."""

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cli_fakes import FakeServer, Tailnet
from tsnet.demo import DemoFailed, run_demo

ROOT = Path(__file__).resolve().parents[1]


def fake_factory(net, cls=FakeServer):
    made = []

    def factory(*, hostname, state_dir, auth_key, control_url):
        assert auth_key.startswith("tskey-") and control_url.startswith("http://127.0.0.1:")
        node = cls(net, hostname=hostname, state_dir=state_dir)
        made.append(node)
        return node

    factory.made = made
    return factory


async def test_demo_steps_with_stand_in_nodes():
    out = io.StringIO()
    factory = fake_factory(Tailnet())
    result = await run_demo(out=out, size=4 << 20, server_factory=factory)
    text = out.getvalue()
    assert result.path == "direct 127.0.0.1:41641" and result.rtt == 0.0015 and result.throughput > 0
    assert result.fetched == "hello from demo-web, served over the tailnet by tsnet"
    assert re.search(r"path: direct 127\.0\.0\.1:41641", text)
    assert re.search(r"4 MiB in [\d.]+s: [\d.]+ MiB/s", text)
    assert "[7/7] Summary" in text
    assert all(node.closed for node in factory.made)
    state_line = re.search(r"state in (\S+)\)", text).group(1)
    assert not Path(state_line).exists()  # the temporary directory is gone


async def test_demo_names_the_failing_step_and_cleans_up():
    class NoDial(FakeServer):
        async def dial(self, network, address, *, timeout=None):
            raise ConnectionRefusedError("nothing there")

    out = io.StringIO()
    factory = fake_factory(Tailnet(), NoDial)
    with pytest.raises(DemoFailed) as info:
        await run_demo(out=out, size=1 << 20, server_factory=factory)
    assert info.value.step.startswith("Fetching http://demo-web.tailnet.test/")
    assert "ConnectionRefusedError: nothing there" in str(info.value)
    assert all(node.closed for node in factory.made)


async def test_demo_keep_prints_how_to_join_and_stops_on_request():
    out = io.StringIO()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        control_url, auth_key = await nursery.start(
            lambda task_status: run_demo(out=out, size=1 << 20, keep=True, stop=stop,
                                         server_factory=fake_factory(Tailnet()), task_status=task_status))
        text = out.getvalue()
        assert f"tsnet up --control-url {control_url} --authkey {auth_key}" in text
        assert f"tailscale up --login-server={control_url} --authkey={auth_key}" in text
        # The demo nodes serve the local API while kept.
        sock = re.search(r"tsnet status --state-dir (\S+)", text).group(1) + "/tsnet.sock"
        assert Path(sock).exists()
        stop.set()
    assert not Path(sock).exists()


def test_tsnet_demo_end_to_end():
    """The real command: embedded control+DERP+STUN, two real nodes, HTTP by MagicDNS name, path, RTT, rate."""
    proc = subprocess.run([sys.executable, "-m", "tsnet", "demo", "--size", "8"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "HTTP 200: hello from demo-web" in out
    assert re.search(r"path: (direct \S+|relay via \S+|derp region \d+)", out), out
    assert re.search(r"RTT: median [\d.]+ ms", out), out
    assert re.search(r"8 MiB in [\d.]+s: [\d.]+ MiB/s", out), out
    assert "all steps passed" in out
    tmp = re.search(r"state in (\S+)\)", out).group(1)
    assert not Path(tmp).exists()
