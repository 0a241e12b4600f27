"""Prometheus exposition and health checks (tsnet.metrics)."""

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from cli_fakes import FakeServer, Tailnet
from tsnet import metrics


def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_render_types_labels_and_escaping():
    text = metrics.render({
        "a_total": 3, 'b{path="derp",x="q\\"uote"}': 1.5, "bad name!": 2, "not_a_number": "zz",
        "nan_gauge": float("nan"), "9starts_with_digit": 1,
    })
    fams = _families(text)
    assert fams["a"].type == "counter" and fams["a"].samples[0].value == 3
    sample = fams["b"].samples[0]
    assert sample.labels == {"path": "derp", "x": 'q"uote'} and sample.value == 1.5
    assert fams["bad_name_"].samples[0].value == 2
    assert "not_a_number" not in text  # non-numeric values are skipped, never break the page
    assert "_9starts_with_digit 1" in text
    assert "nan_gauge NaN" in text


def test_later_sources_win():
    text = metrics.render({"x": 1}, {"x": 2})
    assert _families(text)["x"].samples[0].value == 2


async def test_node_metrics_parse_and_cover_paths_process_and_relay():
    net = Tailnet()
    a, b = FakeServer(net, hostname="a"), FakeServer(net, hostname="b")
    await a.up()
    await b.up()

    class Relay:  # what a RelayServer exposes
        forwarded_packets = {("udp4", "udp4"): 7}
        forwarded_bytes = {("udp4", "udp4"): 700}

        def endpoint_gauge(self):
            return {"connecting": 1, "open": 2}

    from tsnet.wg.stats import Counters

    wg = Counters()
    wg.handshakes_completed = 3
    core = type("Core", (), {"wg": type("WG", (), {"counters": wg})()})()
    a._driver = type("D", (), {"relay_server": Relay(), "core": core})()
    fams = _families(metrics.render(metrics.node_metrics(a)))
    by_path = {s.labels["path"]: s.value for s in fams["tsnet_peer_rx_bytes"].samples}
    assert by_path["direct"] == 100 and by_path["derp"] == 0
    assert fams["tsnet_peers"].samples[0].value == 1
    assert fams["tsnet_backend_running"].samples[0].value == 1
    assert fams["tsnet_packets_in"].samples[0].value == 10  # the node's own counters pass through
    relay = {s.labels["state"]: s.value for s in fams["tailscaled_peer_relay_endpoints"].samples}
    assert relay == {"connecting": 1, "open": 2}
    fwd = [s for s in fams["tailscaled_peer_relay_forwarded_packets"].samples
           if s.labels == {"transport_in": "udp4", "transport_out": "udp4"}]
    assert fwd[0].value == 7
    assert fams["tsnet_wireguard_handshakes_completed"].samples[0].value == 3
    assert fams["tsnet_wireguard_drop_replayed"].type == "counter"
    assert fams["process_cpu_seconds"].type == "counter"
    assert fams["process_resident_memory_bytes"].samples[0].value > 0
    assert fams["process_start_time_seconds"].samples[0].value > 1e9
    assert fams["tsnet_metrics_errors"].samples[0].value == 0


def test_node_metrics_survive_a_broken_node():
    class Broken:
        def metrics(self):
            raise RuntimeError("boom")

        def status(self):
            raise RuntimeError("boom")

    values = metrics.node_metrics(Broken())
    assert values["tsnet_metrics_errors"] == 2
    assert "process_cpu_seconds_total" in values
    assert metrics.health_problems(Broken()) == ["status unavailable: RuntimeError: boom"]


async def test_health_problems_follow_state_and_health():
    node = FakeServer(Tailnet(), hostname="a")
    assert metrics.health_problems(node) == ["backend state is NoState"]
    await node.up()
    assert metrics.health_problems(node) == []
    node.health += ["control server unreachable", "control server unreachable"]
    assert metrics.health_problems(node) == ["control server unreachable"]  # duplicates collapse


def test_parse_listen():
    assert metrics.parse_listen(":9100") == ("127.0.0.1", 9100)
    assert metrics.parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("nope", "1.2.3.4:x", "h:70000"):
        try:
            metrics.parse_listen(bad, flag="--metrics-listen")
        except ValueError as exc:
            assert "--metrics-listen" in str(exc)
        else:
            raise AssertionError(bad)


async def test_http_metrics_and_healthz_flip(nursery):
    node = FakeServer(Tailnet(), hostname="a")
    await node.up()
    port = await nursery.start(metrics.serve, node, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "tsnet_peers" in _families(r.text)
        assert (await http.get("/healthz")).status_code == 200
        node.health.append("not connected to the control server")
        r = await http.get("/healthz")
        assert r.status_code == 503 and "not connected to the control server" in r.text
        node.health.clear()
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/nope")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405


async def test_health_only_listener_has_no_metrics(nursery):
    node = FakeServer(Tailnet(), hostname="a")
    port = await nursery.start(lambda task_status: metrics.serve(node, "127.0.0.1", 0, metrics=False,
                                                                 task_status=task_status))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        assert (await http.get("/metrics")).status_code == 404
        r = await http.get("/healthz")
        assert r.status_code == 503 and "backend state is NoState" in r.text


async def test_garbage_request_does_not_stop_the_listener(nursery):
    node = FakeServer(Tailnet(), hostname="a")
    await node.up()
    port = await nursery.start(metrics.serve, node, "127.0.0.1", 0)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"\x00\xff garbage\r\n\r\n")
    with trio.fail_after(5):
        while await stream.receive_some(4096):
            pass
    await stream.aclose()
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
