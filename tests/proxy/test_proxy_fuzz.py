"""Random client bytes never crash the proxy: every connection ends cleanly and nothing is dialled wrongly."""

from __future__ import annotations

import errno

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnet.proxy import ProxyServer
from tsnet.proxy.socks5 import Credentials

_PREFIXES = [b"", b"\x05", b"\x05\x01\x00", b"\x05\x02\x00\x02\x01\x01u\x01p", b"\x04", b"GET ", b"CONNECT "]


async def _refuse(host: str, port: int) -> trio.abc.Stream:
    raise ConnectionRefusedError(errno.ECONNREFUSED, "refused by test dialer")


async def _run_one(data: bytes, with_auth: bool) -> tuple[bytes, dict[str, int]]:
    server = ProxyServer(
        _refuse, dial_udp=None, credentials=Credentials("u", "p") if with_auth else None, handshake_timeout=5
    )
    client, served = trio.testing.memory_stream_pair()
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, served)
        await client.send_all(data)
        await client.send_eof()
        with trio.fail_after(60):
            while chunk := await client.receive_some(65536):
                received += chunk
    return received, server.stats


@settings(max_examples=250, deadline=None)
@given(st.sampled_from(_PREFIXES), st.binary(max_size=120), st.booleans())
def test_random_input_ends_cleanly(prefix: bytes, tail: bytes, with_auth: bool) -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    received, stats = trio.run(_run_one, prefix + tail, with_auth, clock=clock)
    assert "internal_error" not in stats
    if received.startswith(b"HTTP/1.1 "):
        assert int(received[9:12]) in (400, 407, 501, 502)
