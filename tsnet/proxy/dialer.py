"""What the proxies dial through: pluggable TCP/UDP dialers, name resolution, and error classification.

Tests and a node-less setup use :func:`direct_dial` / :func:`direct_dial_udp` (plain OS sockets); the node
plugs in its netstack's dial functions with the same signatures.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UDPConnection(Protocol):
    """A connected UDP flow to one remote address (what UDP ASSOCIATE relays through)."""

    async def send(self, data: bytes) -> None:
        """Send one datagram to the remote address."""

    async def receive(self) -> bytes:
        """Wait for the next datagram from the remote address."""

    async def aclose(self) -> None:
        """Release the flow."""


#: ``await dial(host, port)``: host is an IP literal when a resolver is configured, else whatever the client sent.
Dial = Callable[[str, int], Awaitable[trio.abc.Stream]]
#: ``await dial_udp(host, port)``: same addressing rules as :data:`Dial`.
DialUDP = Callable[[str, int], Awaitable[UDPConnection]]
#: ``await resolve(name)`` -> addresses in preference order; raises OSError (e.g. socket.gaierror) if none.
Resolve = Callable[[str], Awaitable[list[IPAddress]]]


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one (``[v6]`` brackets accepted), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


async def direct_dial(host: str, port: int) -> trio.SocketStream:
    """Connect with an OS socket. IP literals connect directly so errors keep their errno."""
    ip = parse_ip(host)
    if ip is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect((str(ip), port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class SocketUDPConnection:
    """:class:`UDPConnection` over a connected OS UDP socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock

    async def send(self, data: bytes) -> None:
        await self.socket.send(data)

    async def receive(self) -> bytes:
        while True:
            try:
                return await self.socket.recv(65535)
            except ConnectionRefusedError:  # ICMP port unreachable for an earlier datagram: keep listening
                continue

    async def aclose(self) -> None:
        self.socket.close()
        await trio.lowlevel.checkpoint()


async def direct_dial_udp(host: str, port: int) -> SocketUDPConnection:
    """A connected OS UDP socket to ``host:port`` (an IP literal)."""
    ip = parse_ip(host)
    if ip is None:
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: UDP dial needs an IP address")
    sock = trio.socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await sock.connect((str(ip), port))
    except BaseException:
        sock.close()
        raise
    return SocketUDPConnection(sock)


class DestinationNotAllowed(PermissionError):
    """The proxy's policy refuses this destination (SOCKS5 reply 0x02, HTTP 403)."""


async def deny_dial(host: str, port: int) -> trio.abc.Stream:
    """A :data:`Dial` that refuses everything: pass it as ``other`` to :func:`route_by_address` for a
    proxy that only reaches the tailnet."""
    await trio.lowlevel.checkpoint()
    raise DestinationNotAllowed(f"{host}:{port} is not on the tailnet and this proxy only dials the tailnet")


async def deny_dial_udp(host: str, port: int) -> UDPConnection:
    """The UDP counterpart of :func:`deny_dial`."""
    await trio.lowlevel.checkpoint()
    raise DestinationNotAllowed(f"{host}:{port} is not on the tailnet and this proxy only dials the tailnet")


def route_by_address(
    is_tailnet: Callable[[IPAddress], bool], tailnet: Dial, other: Dial = direct_dial
) -> Dial:
    """A :data:`Dial` that sends tailnet destinations one way and the rest another.

    This mirrors tailscaled's user dial: addresses inside a peer's AllowedIPs go through the netstack,
    everything else through the OS. Names (no resolver configured) go to ``other``. With
    ``other=deny_dial`` the proxy reaches the tailnet only (no open proxy to the internet).
    """

    async def dial(host: str, port: int) -> trio.abc.Stream:
        ip = parse_ip(host)
        if ip is not None and is_tailnet(ip):
            return await tailnet(host, port)
        return await other(host, port)

    return dial


def route_udp_by_address(
    is_tailnet: Callable[[IPAddress], bool], tailnet: DialUDP, other: DialUDP = direct_dial_udp
) -> DialUDP:
    """The UDP counterpart of :func:`route_by_address`."""

    async def dial_udp(host: str, port: int) -> UDPConnection:
        ip = parse_ip(host)
        if ip is not None and is_tailnet(ip):
            return await tailnet(host, port)
        return await other(host, port)

    return dial_udp


async def resolve_host(host: str, resolve: Resolve | None) -> list[str]:
    """Candidate hosts to dial: the literal itself, the resolver's addresses, or the name unchanged."""
    ip = parse_ip(host)
    if ip is not None:
        return [str(ip)]
    if resolve is None:
        return [host]
    addresses = await resolve(host)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: no addresses")
    return [str(a) for a in addresses]


async def connect(host: str, port: int, dial: Dial, resolve: Resolve | None, timeout: float) -> trio.abc.Stream:
    """Resolve ``host`` and dial each address in turn until one connects; raise the last error.

    Raises ``TimeoutError`` if the whole attempt takes longer than ``timeout`` seconds.
    """
    with trio.fail_after(timeout) if timeout else _no_deadline():
        candidates = await resolve_host(host, resolve)
        error: BaseException | None = None
        for candidate in candidates:
            try:
                return await dial(candidate, port)
            except OSError as exc:
                error = exc
        assert error is not None
        raise error


def _no_deadline() -> trio.CancelScope:
    return trio.CancelScope()


def describe_error(exc: BaseException) -> str:
    """A short one-line reason for a failed dial, safe to put in an HTTP header."""
    if isinstance(exc, trio.TooSlowError | TimeoutError):
        text = "connection timed out"
    elif isinstance(exc, socket.gaierror):
        text = f"name resolution failed: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200].encode("ascii", "replace").decode("ascii")


# SOCKS5 reply codes (RFC 1928 §6).
SOCKS_SUCCEEDED = 0x00
SOCKS_GENERAL_FAILURE = 0x01
SOCKS_NOT_ALLOWED = 0x02
SOCKS_NETWORK_UNREACHABLE = 0x03
SOCKS_HOST_UNREACHABLE = 0x04
SOCKS_CONNECTION_REFUSED = 0x05
SOCKS_TTL_EXPIRED = 0x06
SOCKS_COMMAND_NOT_SUPPORTED = 0x07
SOCKS_ADDRESS_TYPE_NOT_SUPPORTED = 0x08


def socks_reply_code(exc: BaseException) -> int:
    """The SOCKS5 reply code that best describes a failed dial."""
    if isinstance(exc, trio.TooSlowError | TimeoutError):
        return SOCKS_TTL_EXPIRED
    if isinstance(exc, socket.gaierror):
        return SOCKS_HOST_UNREACHABLE
    if isinstance(exc, ConnectionRefusedError):
        return SOCKS_CONNECTION_REFUSED
    if isinstance(exc, PermissionError):
        return SOCKS_NOT_ALLOWED
    if isinstance(exc, OSError):
        if exc.errno == errno.ENETUNREACH:
            return SOCKS_NETWORK_UNREACHABLE
        if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
            return SOCKS_HOST_UNREACHABLE
        if exc.errno == errno.ETIMEDOUT:
            return SOCKS_TTL_EXPIRED
    return SOCKS_GENERAL_FAILURE
