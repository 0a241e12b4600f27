"""``/debug/vars`` on the control listener: counters for operators and tests, loopback clients only."""

import json

import trio

from tsnet.control.httpd import HTTPRequest
from tsnet.derp.server import DerpServer


async def _get(port: int, target: str) -> tuple[bytes, bytes]:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    out = b""
    with trio.fail_after(5):
        while chunk := await s.receive_some(65536):
            out += chunk
    await s.aclose()
    head, _, body = out.partition(b"\r\n\r\n")
    return head, body


async def test_debug_vars_shows_control_and_derp_counters(control):
    control.server.attach_derp(DerpServer())
    head, body = await _get(control.port, "/debug/vars")
    assert head.startswith(b"HTTP/1.1 200"), head
    stats = json.loads(body)
    assert set(stats["control"]) >= {"registers", "map_polls", "lite_updates"} and stats["map_sessions"] == 0
    assert stats["derp"]["packets_relayed"] == 0 and "bytes_relayed" in stats["derp"]


async def test_debug_vars_refused_to_remote_clients(control):
    for remote in ("10.0.0.5:4000", "", "[fd00::1]:80"):
        reply = await control.server.http_app(HTTPRequest("GET", "/debug/vars", [], b"", remote=remote))
        assert reply.status == 403, remote
    reply = await control.server.http_app(HTTPRequest("GET", "/debug/vars", [], b"", remote="::1:5555"))
    assert reply.status == 200 and "derp" not in json.loads(reply.body)
