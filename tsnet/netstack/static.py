"""Low-level static-peer mode: the netstack over plain WireGuard with one fixed peer.

No control plane, no magicsock, no DERP: one :class:`tsnet.wg.WireGuard` device
on one UDP socket, every inner packet routed to the single peer (all allowed
IPs). Tests and benchmarks use it to run our TCP/IP stack against another
WireGuard peer (ours, wireguard-go or a kernel interface in a lab namespace).
Applications normally want :class:`tsnet.Server` instead.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from tsnet.key import NodePrivate, NodePublic
from tsnet.wg.device import WireGuard
from tsnet.wg.driver import WireGuardUDP

from .sockets import NetStack
from .stack import Stack
from .tcp import TCPOptions

__all__ = ["open_static_peer"]


@asynccontextmanager
async def open_static_peer(
    private_key: NodePrivate,
    peer_public: NodePublic,
    *,
    addresses: Sequence[str],
    sock: socket.socket,
    peer_endpoint: tuple[str, int] | None = None,
    persistent_keepalive: float | None = None,
    tcp_options: TCPOptions | None = None,
) -> AsyncIterator[NetStack]:
    """Run a netstack with ``addresses`` over WireGuard to one peer; yields the :class:`NetStack`.

    Args:
        private_key: our WireGuard (node) key.
        peer_public: the only peer; every packet we send goes to it.
        addresses: our tunnel addresses (e.g. ``["100.64.0.1", "fd7a:115c:a1e0::1"]``).
        sock: a bound UDP socket; the driver takes it over (non-blocking) and closes it on exit.
        peer_endpoint: where the peer listens, if known; otherwise it is learnt from the
            peer's first authenticated handshake (roaming), so one side must know the other.
        persistent_keepalive: WireGuard keepalive interval in seconds (None: off).
        tcp_options: defaults for TCP connections of this stack.

    When the block exits, open connections are reset (the peer gets RSTs), then everything
    (driver task, timers, socket) is stopped and closed.
    """
    now = trio.current_time()
    device = WireGuard(private_key, now=now, packet_events=False)
    device.add_peer(peer_public, endpoint=peer_endpoint, persistent_keepalive=persistent_keepalive)
    # Every packet the stack gets was decrypted (and so authenticated) by the WireGuard device.
    stack = Stack(addresses, now=now, tcp_options=tcp_options if tcp_options is not None else TCPOptions(),
                  verify_checksums=False)
    driver: WireGuardUDP

    def send_packets(packets: list[bytes | bytearray]) -> None:
        driver.send_packets(peer_public, packets)

    net = NetStack(stack, send_packets)

    def on_packets(batch: list[tuple[NodePublic, bytes]]) -> None:
        # A single peer: every decrypted packet is ours to process.
        net.deliver([packet for _peer, packet in batch])

    driver = WireGuardUDP(device, sock, on_packets=on_packets)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await nursery.start(net.run)
        try:
            yield net
        finally:
            try:
                net.abort_all()  # peers get RSTs rather than silence
            finally:
                nursery.cancel_scope.cancel()
