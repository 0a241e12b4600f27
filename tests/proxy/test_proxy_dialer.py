"""Dial helpers: routing by address, resolution order, error mapping."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
import trio
import trio.testing
from proxytest_helpers import closed_port

from tsnet.proxy import dialer
from tsnet.proxy.dialer import connect, describe_error, route_by_address, route_udp_by_address, socks_reply_code


async def test_route_by_address_splits_tailnet_and_other() -> None:
    calls: list[tuple[str, str, int]] = []

    def fake(label: str):  # type: ignore[no-untyped-def]
        async def dial(host: str, port: int):  # type: ignore[no-untyped-def]
            calls.append((label, host, port))
            return trio.testing.memory_stream_pair()[0]

        return dial

    in_tailnet = ipaddress.ip_network("100.64.0.0/10")
    dial = route_by_address(lambda ip: ip in in_tailnet, fake("netstack"), fake("os"))
    await dial("100.64.0.5", 80)
    await dial("192.0.2.1", 80)
    await dial("some.name", 80)
    udp = route_udp_by_address(lambda ip: ip in in_tailnet, fake("netstack"), fake("os"))  # type: ignore[arg-type]
    await udp("100.100.100.100", 53)
    assert calls == [
        ("netstack", "100.64.0.5", 80),
        ("os", "192.0.2.1", 80),
        ("os", "some.name", 80),
        ("netstack", "100.100.100.100", 53),
    ]


async def test_connect_tries_each_address_in_order() -> None:
    tried: list[str] = []

    async def resolve(name: str) -> list:
        return [ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")]

    async def dial(host: str, port: int):  # type: ignore[no-untyped-def]
        tried.append(host)
        if host == "127.0.0.2":
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        return trio.testing.memory_stream_pair()[0]

    await connect("name.example", 1, dial, resolve, timeout=5)
    assert tried == ["127.0.0.2", "127.0.0.3"]
    with pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.2", 1, dial, resolve, timeout=5)  # literals skip the resolver


async def test_connect_timeout(autojump_clock: trio.abc.Clock) -> None:
    async def hang(host: str, port: int):  # type: ignore[no-untyped-def]
        await trio.sleep_forever()

    with pytest.raises(trio.TooSlowError) as info:
        await connect("127.0.0.1", 1, hang, None, timeout=3)
    assert socks_reply_code(info.value) == 0x06 and describe_error(info.value) == "connection timed out"


async def test_direct_dial_errors_keep_errno() -> None:
    with pytest.raises(ConnectionRefusedError) as info:
        await dialer.direct_dial("127.0.0.1", closed_port())
    assert socks_reply_code(info.value) == 0x05


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (socket.gaierror(socket.EAI_NONAME, "x"), 0x04),
        (PermissionError(errno.EACCES, "no"), 0x02),
        (OSError(errno.ENETUNREACH, "net"), 0x03),
        (OSError(errno.EHOSTUNREACH, "host"), 0x04),
        (OSError(errno.ETIMEDOUT, "slow"), 0x06),
        (OSError("other"), 0x01),
    ],
)
def test_reply_codes(exc: BaseException, code: int) -> None:
    assert socks_reply_code(exc) == code


def test_describe_error_is_header_safe() -> None:
    text = describe_error(OSError("line one\r\nline two \u2603"))
    assert "\r" not in text and "\n" not in text and text.isascii()
