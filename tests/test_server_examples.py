"""Every example in ``examples/``, run in a simulated form against the in-process control server."""

from __future__ import annotations

import importlib.util
import json
import sys
import wsgiref.util
from pathlib import Path

import pytest
import trio

from tests.server_helpers import start_tailnet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(relative: str):
    path = EXAMPLES / relative
    name = "example_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def tailnet(nursery, tmp_path):
    return await start_tailnet(nursery, tmp_path)


@pytest.fixture
async def private_service(tailnet, nursery):
    """A peer node "private" serving HTTP on the tailnet (what serverless functions want to reach)."""
    http_client = _load("http_client.py")
    node = tailnet.node("private")
    await node.up(timeout=10)
    await nursery.start(http_client.serve_hello, node)
    yield node
    await node.close()


def _settings(tailnet):
    return dict(control_url=tailnet.url, auth_key=tailnet.authkey(ephemeral=True, reusable=True),
                udp_bind="127.0.0.1")


async def test_two_nodes(tailnet):
    two_nodes = _load("two_nodes.py")
    reply = await two_nodes.talk(**_settings(tailnet))
    assert reply == b"echo to ping: hello over the tailnet"
    assert not {"ping", "pong"} & set(tailnet.node_names())  # ephemeral nodes gone


async def test_http_client(tailnet, private_service):
    http_client = _load("http_client.py")
    assert await http_client.fetch("http://private/", **_settings(tailnet)) == "hello from the tailnet\n"


async def test_wrap_existing_server(tailnet):
    wrap = _load("wrap_existing_server.py")
    results = await wrap.demo(_settings(tailnet))
    assert results == ["hello visitor, you asked for /asgi\n", "from localhost :)\n",
                       "http.server on the tailnet says hi to " + results[2].rsplit(" ", 1)[1]]
    assert results[2].rsplit(" ", 1)[1].startswith("100.")


async def test_lambda_handler_twice_in_one_container(tailnet, private_service, monkeypatch):
    lam = _load("lambda_handler.py")
    settings = _settings(tailnet)
    monkeypatch.setenv("TS_AUTHKEY", settings["auth_key"])
    monkeypatch.setenv("TS_CONTROL_URL", settings["control_url"])
    monkeypatch.setenv("TS_HOSTNAME", "fn")
    monkeypatch.setenv("TARGET_URL", "http://private/")
    monkeypatch.setattr(lam, "NODE_SETTINGS", {"udp_bind": "127.0.0.1"})

    def invoke_twice():
        first = lam.handler({}, None)
        second = lam.handler({"url": "http://private.tailnet.test/"}, None)
        return first, second

    first, second = await trio.to_thread.run_sync(invoke_twice)
    assert first["statusCode"] == 200 and first["body"] == "hello from the tailnet\n"
    assert second["statusCode"] == 200
    assert lam.starts == 1 and tailnet.node_names().count("fn") == 1  # one node per container, reused
    await trio.to_thread.run_sync(lam.shutdown)
    assert "fn" not in tailnet.node_names()  # ephemeral: gone at once, not after a timeout


async def test_azure_function(tailnet, private_service, monkeypatch):
    az = _load("azure_function/function_app.py")
    settings = _settings(tailnet)
    monkeypatch.setenv("TS_AUTHKEY", settings["auth_key"])
    monkeypatch.setenv("TS_CONTROL_URL", settings["control_url"])
    monkeypatch.delenv("TS_HOSTNAME", raising=False)
    monkeypatch.setenv("WEBSITE_SITE_NAME", "inventory-fn")
    monkeypatch.setenv("TARGET_URL", "http://private/")
    monkeypatch.setattr(az, "NODE_SETTINGS", {"udp_bind": "127.0.0.1"})
    assert az.settings_from_environment()["hostname"] == "inventory-fn"
    status, ctype, body = await trio.to_thread.run_sync(az.fetch, None)
    assert (status, body) == (200, "hello from the tailnet\n")
    assert "inventory-fn" in tailnet.node_names()
    await trio.to_thread.run_sync(az.shutdown)
    assert "inventory-fn" not in tailnet.node_names()


async def test_app_service(tailnet, private_service, monkeypatch, nursery, tmp_path):
    app = _load("app_service/app.py")
    settings = _settings(tailnet)
    # A local "app" port that the tailnet reaches through serve_forward (TS_SERVE_PORT).
    local = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def local_app(stream):
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nlocal\n")

    nursery.start_soon(trio.serve_listeners, local_app, local)
    monkeypatch.setenv("TS_AUTHKEY", settings["auth_key"])
    monkeypatch.setenv("TS_CONTROL_URL", settings["control_url"])
    monkeypatch.setenv("TS_HOSTNAME", "webapp")
    monkeypatch.setenv("TS_STATE_DIR", str(tmp_path / "home-tsnet"))
    monkeypatch.setenv("TS_SERVE_PORT", str(local[0].socket.getsockname()[1]))
    monkeypatch.setattr(app, "NODE_SETTINGS", {"udp_bind": "127.0.0.1"})

    def call(path, query=""):
        environ = {"PATH_INFO": path, "QUERY_STRING": query}
        wsgiref.util.setup_testing_defaults(environ)
        seen = {}
        body = b"".join(app.application(environ, lambda status, headers: seen.update(status=status)))
        return seen["status"], body

    status, body = await trio.to_thread.run_sync(call, "/")
    assert status == "200 OK" and json.loads(body)["state"] == "Running"
    status, body = await trio.to_thread.run_sync(call, "/fetch", "url=http://private/")
    assert status == "200 OK" and body == b"hello from the tailnet\n"
    # The app is also on the tailnet at webapp:80 (forwarded to its local port).
    await private_service.wait_for_peer("webapp")
    stream = await private_service.dial("tcp", "webapp:80", timeout=10)
    await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(4096):
            data += chunk
    assert data.endswith(b"local\n")
    assert (tmp_path / "home-tsnet" / "tsnet-state.json").exists()  # persistent identity on /home
    await trio.to_thread.run_sync(app.shutdown)
    assert "webapp" in tailnet.node_names()  # not ephemeral: it stays, and comes back with the same key
