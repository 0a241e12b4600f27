"""WireGuardUDP raises the kernel buffers of a socket it is handed (bursts must not overflow them)."""

from __future__ import annotations

import socket
from pathlib import Path

from tsnet.key import NodePrivate
from tsnet.wg.device import WireGuard
from tsnet.wg.driver import SOCKET_BUFFER_BYTES, WireGuardUDP


def _limit(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


def test_handed_socket_buffers_are_raised_not_shrunk() -> None:
    small = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    small.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    small.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    small.bind(("127.0.0.1", 0))
    before = small.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    drv = WireGuardUDP(WireGuard(NodePrivate.generate(), now=0.0), small)
    try:
        got = drv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # The kernel caps the request at rmem_max and reports twice the value it kept.
        assert got == 2 * min(SOCKET_BUFFER_BYTES, _limit("rmem_max"))
        assert got >= before
        sent = drv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert sent == 2 * min(SOCKET_BUFFER_BYTES, _limit("wmem_max"))
    finally:
        drv.socket.close()

    big = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big.bind(("127.0.0.1", 0))
    try:
        big.setsockopt(socket.SOL_SOCKET, 33, 3 * SOCKET_BUFFER_BYTES)  # SO_RCVBUFFORCE (needs CAP_NET_ADMIN)
    except PermissionError:
        big.close()
        return  # unprivileged: nothing larger than rmem_max can be set, so nothing to preserve
    kept = big.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    drv = WireGuardUDP(WireGuard(NodePrivate.generate(), now=0.0), big)
    try:
        assert drv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == kept
    finally:
        drv.socket.close()
