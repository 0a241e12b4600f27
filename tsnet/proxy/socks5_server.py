"""Trio driver for SOCKS5: runs :class:`~tsnet.proxy.socks5.Socks5Handshake`, dials, relays TCP and UDP."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import trio

from .common import ProxySettings, send_or_false, socket_names
from .dialer import (
    SOCKS_GENERAL_FAILURE,
    SOCKS_SUCCEEDED,
    UDPConnection,
    connect,
    resolve_host,
    socks_reply_code,
)
from .socks5 import (
    ATYP_DOMAIN,
    CMD_CONNECT,
    Rejected,
    Request,
    Socks5Error,
    Socks5Handshake,
    build_udp_datagram,
    parse_udp_datagram,
)
from .splice import splice

log = logging.getLogger(__name__)


async def handle_socks5(stream: trio.abc.Stream, initial: bytes, settings: ProxySettings) -> None:
    """Serve one SOCKS5 client whose first bytes (``initial``) were already read. Closes ``stream``."""
    handshake = Socks5Handshake(settings.credentials)
    async with stream:
        event = handshake.receive_data(initial)
        with trio.move_on_after(settings.handshake_timeout) as deadline:
            while event is None:
                if not await send_or_false(stream, handshake.data_to_send()):
                    return
                try:
                    data = await stream.receive_some(4096)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    settings.count("socks5_eof_in_handshake")
                    return
                event = handshake.receive_data(data)
        if deadline.cancelled_caught:
            settings.count("socks5_handshake_timeout")
            return
        if isinstance(event, Rejected):
            settings.count("socks5_rejected")
            log.debug("SOCKS5 rejected: %s", event.reason)
            await send_or_false(stream, handshake.data_to_send())
            return
        await send_or_false(stream, handshake.data_to_send())
        if event.command == CMD_CONNECT:
            await _connect(stream, handshake, event, settings)
        else:
            await _udp_associate(stream, handshake, event, settings)


async def _connect(
    stream: trio.abc.Stream, handshake: Socks5Handshake, request: Request, settings: ProxySettings
) -> None:
    try:
        upstream = await connect(
            request.host, request.port, settings.dial, settings.resolve, settings.connect_timeout
        )
    except (OSError, trio.TooSlowError) as exc:
        settings.count("socks5_dial_failed")
        log.debug("SOCKS5 dial %s:%d failed: %r", request.host, request.port, exc)
        handshake.reply(socks_reply_code(exc))
        await send_or_false(stream, handshake.data_to_send())
        return
    names = socket_names(upstream)
    bind_host, bind_port = (names[0][0], names[0][1]) if names else ("0.0.0.0", 0)
    handshake.reply(SOCKS_SUCCEEDED, bind_host, bind_port)
    settings.count("socks5_connect")
    sent = await send_or_false(stream, handshake.data_to_send())
    if not sent or not await send_or_false(upstream, handshake.trailing_data):
        await trio.aclose_forcefully(upstream)
        return
    await splice(stream, upstream)


async def _udp_associate(
    stream: trio.abc.Stream, handshake: Socks5Handshake, request: Request, settings: ProxySettings
) -> None:
    """RFC 1928 §7: relay datagrams for this client until its TCP control connection ends.

    The client-facing relay is an OS UDP socket on the control connection's local address (loopback for
    the default listener); only the destinations are reached through ``dial_udp``.
    """
    if settings.dial_udp is None:
        handshake.reply(SOCKS_GENERAL_FAILURE)
        await send_or_false(stream, handshake.data_to_send())
        return
    names = socket_names(stream)
    local_ip = names[0][0] if names else "127.0.0.1"
    client_ip = ipaddress.ip_address(names[1][0]) if names else None
    family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    relay = trio.socket.socket(family, socket.SOCK_DGRAM)
    with relay:
        await relay.bind((local_ip, 0))
        bound = relay.getsockname()
        handshake.reply(SOCKS_SUCCEEDED, bound[0], bound[1])
        if not await send_or_false(stream, handshake.data_to_send()):
            return
        settings.count("socks5_udp_associate")
        association = _UDPAssociation(relay, settings, client_ip, request)
        async with trio.open_nursery() as nursery:
            association.nursery = nursery
            nursery.start_soon(association.run)
            # The association lives exactly as long as the control connection (RFC 1928 §7).
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            for conn in association.targets.values():
                await trio.aclose_forcefully(conn)  # type: ignore[arg-type]


class _UDPAssociation:
    """The relay state of one UDP ASSOCIATE: the client's UDP address and one flow per destination."""

    def __init__(self, relay: Any, settings: ProxySettings, client_ip: Any, request: Request) -> None:
        self.relay = relay
        self.settings = settings
        self.client_ip = client_ip
        # The client may announce its UDP source (RFC 1928: "the address ... expected to send from").
        announced = ipaddress.ip_address(request.host) if request.address_type != ATYP_DOMAIN else None
        self.client_port = request.port or None
        if announced is not None and not announced.is_unspecified:
            self.client_ip = announced
        self.client_address: Any = None
        self.targets: dict[tuple[str, int], UDPConnection] = {}
        self.nursery: trio.Nursery | None = None

    def _from_client(self, source: Any) -> bool:
        ip = ipaddress.ip_address(source[0].split("%", 1)[0])
        if self.client_ip is not None and ip != self.client_ip:
            return False
        if self.client_port is not None and source[1] != self.client_port:
            return False
        if self.client_address is None:
            self.client_address = source  # lock onto the first sender that matches
        return source == self.client_address

    async def run(self) -> None:
        while True:
            try:
                data, source = await self.relay.recvfrom(65535)
            except (ConnectionRefusedError, ConnectionResetError):
                continue  # ICMP error for an earlier reply to the client; the relay socket is fine
            if not self._from_client(source):
                self.settings.count("socks5_udp_foreign_source")
                continue
            try:
                datagram = parse_udp_datagram(data)
            except Socks5Error:
                self.settings.count("socks5_udp_bad_datagram")
                continue
            key = (datagram.host, datagram.port)
            conn = self.targets.get(key)
            if conn is None:
                if len(self.targets) >= self.settings.max_udp_targets:
                    self.settings.count("socks5_udp_too_many_targets")
                    continue
                # Dial in the background: a slow name lookup must not hold up other destinations.
                assert self.nursery is not None
                self.targets[key] = _PendingFlow()  # type: ignore[assignment]
                self.nursery.start_soon(self._open_flow, key, datagram.payload)
                continue
            if isinstance(conn, _PendingFlow):
                if len(conn.queue) < 32:
                    conn.queue.append(datagram.payload)
                continue
            await self._send_to_target(key, conn, datagram.payload)

    async def _send_to_target(self, key: tuple[str, int], conn: UDPConnection, payload: bytes) -> None:
        try:
            await conn.send(payload)
        except OSError as exc:
            log.debug("SOCKS5 UDP send to %s failed: %r", key, exc)
            self.settings.count("socks5_udp_send_failed")

    async def _open_flow(self, key: tuple[str, int], first: bytes) -> None:
        pending = self.targets[key]
        assert isinstance(pending, _PendingFlow)
        assert self.settings.dial_udp is not None
        try:
            with trio.fail_after(self.settings.connect_timeout):
                hosts = await resolve_host(key[0], self.settings.resolve)
                conn = await self.settings.dial_udp(hosts[0], key[1])
        except (OSError, trio.TooSlowError) as exc:
            log.debug("SOCKS5 UDP dial %s failed: %r", key, exc)
            self.settings.count("socks5_udp_dial_failed")
            del self.targets[key]  # a later datagram retries
            return
        self.targets[key] = conn
        for payload in (first, *pending.queue):
            await self._send_to_target(key, conn, payload)
        await self._pump_replies(key, conn)

    async def _pump_replies(self, key: tuple[str, int], conn: UDPConnection) -> None:
        while True:
            with trio.move_on_after(self.settings.udp_idle_timeout) as idle:
                try:
                    payload = await conn.receive()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            if idle.cancelled_caught:
                break
            # Reply headers carry the destination as the client named it, so it can match replies.
            try:
                await self.relay.sendto(build_udp_datagram(key[0], key[1], payload), self.client_address)
            except OSError as exc:
                log.debug("SOCKS5 UDP reply to client failed: %r", exc)
        self.targets.pop(key, None)
        await trio.aclose_forcefully(conn)  # type: ignore[arg-type]


class _PendingFlow:
    """Placeholder while a destination is being dialled; buffers datagrams sent meanwhile (bounded)."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
