"""One listening port for both proxies, like tailscaled's proxymux.

The first byte decides: 0x05 is a SOCKS5 greeting (0x04, SOCKS4, also goes to the SOCKS handler so it
gets a proper SOCKS4 rejection); anything else is parsed as HTTP.
"""

from __future__ import annotations

import logging
import secrets
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

import trio

from .common import ProxySettings
from .dialer import Dial, DialUDP, Resolve, direct_dial, direct_dial_udp
from .http_proxy import handle_http
from .socks5 import Credentials
from .socks5_server import handle_socks5

log = logging.getLogger(__name__)

#: The username of generated loopback credentials (tsnet's Loopback uses the same one).
LOOPBACK_USERNAME = "tsnet"


@dataclass(frozen=True, slots=True)
class LoopbackProxy:
    """Where the proxy listens and how to authenticate: the result of :meth:`ProxyServer.serve`."""

    host: str
    port: int
    credentials: Credentials | None

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _userinfo(self) -> str:
        if self.credentials is None:
            return ""
        quote = urllib.parse.quote
        return f"{quote(self.credentials.username, safe='')}:{quote(self.credentials.password, safe='')}@"

    @property
    def socks5_url(self) -> str:
        """``socks5h://user:pass@host:port`` (remote name resolution, as tailnet names need)."""
        return f"socks5h://{self._userinfo()}{self.address}"

    @property
    def http_url(self) -> str:
        """``http://user:pass@host:port`` for HTTP proxy settings."""
        return f"http://{self._userinfo()}{self.address}"


class ProxyServer:
    """SOCKS5 and HTTP proxy on one port, dialling through pluggable functions.

    ``dial`` / ``dial_udp`` default to OS sockets; the node passes its netstack's. ``resolve`` (e.g. a
    :class:`tsnet.dns.NameResolver`) resolves client-supplied names; None hands names to ``dial`` as is.
    ``credentials`` None disables auth; :meth:`generate_credentials` makes a random password.
    At most ``max_connections`` client connections are served at once; more are closed at once (and
    counted as ``connection_limit``), so a local client cannot exhaust the process.
    """

    def __init__(
        self,
        dial: Dial = direct_dial,
        *,
        dial_udp: DialUDP | None = direct_dial_udp,
        resolve: Resolve | None = None,
        credentials: Credentials | None = None,
        socks5: bool = True,
        http: bool = True,
        handshake_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        max_connections: int = 512,
    ) -> None:
        if not (socks5 or http):
            raise ValueError("enable at least one of socks5 and http")
        self._connection_slots = trio.Semaphore(max_connections)
        self.settings = ProxySettings(
            dial=dial,
            dial_udp=dial_udp,
            resolve=resolve,
            credentials=credentials,
            handshake_timeout=handshake_timeout,
            connect_timeout=connect_timeout,
        )
        self.socks5 = socks5
        self.http = http

    @staticmethod
    def generate_credentials() -> Credentials:
        """Fresh random credentials for a loopback proxy."""
        return Credentials(LOOPBACK_USERNAME, secrets.token_urlsafe(24))

    @property
    def stats(self) -> dict[str, int]:
        """Counters of refusals, failures and successes."""
        return self.settings.stats

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection (either protocol). Never raises for client misbehaviour."""
        try:
            self._connection_slots.acquire_nowait()
        except trio.WouldBlock:
            self.settings.count("connection_limit")
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._handle(stream)
        finally:
            self._connection_slots.release()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        try:
            with trio.move_on_after(self.settings.handshake_timeout):
                try:
                    first = await stream.receive_some(4096)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    first = b""
            if not first:
                await trio.aclose_forcefully(stream)
                return
            if first[0] in (4, 5) and self.socks5:
                await handle_socks5(stream, first, self.settings)
            elif self.http:
                await handle_http(stream, first, self.settings)
            else:
                self.settings.count("not_socks")
                await trio.aclose_forcefully(stream)
        except Exception:  # one broken connection must not take the listener down
            log.exception("proxy connection failed")
            self.settings.count("internal_error")
            await trio.aclose_forcefully(stream)

    async def serve_listeners(self, listeners: list[trio.abc.Listener[Any]], *, task_status: Any = None) -> None:
        """Serve connections from already-open listeners (e.g. the netstack's) until cancelled."""
        status = task_status or trio.TASK_STATUS_IGNORED
        await trio.serve_listeners(self.handle_stream, listeners, task_status=status)

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (loopback by default; port 0 picks one) until cancelled.

        ``task_status.started`` receives a :class:`LoopbackProxy` with the bound address and credentials.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((host, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        bound = sock.getsockname()
        info = LoopbackProxy(host, bound[1], self.settings.credentials)
        async with listener:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.serve_listeners, [listener])
                task_status.started(info)
