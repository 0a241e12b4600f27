"""An httpx client whose connections go over the tailnet (used by :meth:`tsnet.Server.http_client`).

httpcore lets a connection pool take a custom *network backend*: ours opens every TCP connection with
``Server.dial`` (so MagicDNS names work) and wraps TLS with trio's SSLStream when the URL is https.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import httpcore
import httpx
import trio


def _deadline(timeout: float | None) -> Any:
    return trio.fail_after(timeout) if timeout else contextlib.nullcontext()


class _TailnetStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            with _deadline(timeout):
                return bytes(await self._stream.receive_some(max_bytes))
        except trio.TooSlowError:
            raise httpcore.ReadTimeout("read timed out over the tailnet") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            with _deadline(timeout):
                await self._stream.send_all(buffer)
        except trio.TooSlowError:
            raise httpcore.WriteTimeout("write timed out over the tailnet") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname)
        try:
            with _deadline(timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpcore.ConnectError(f"TLS handshake failed: {exc.__cause__ or exc}") from None
        return _TailnetStream(tls)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._stream, trio.SSLStream):
            return self._stream._ssl_object  # what httpcore inspects for ALPN
        return None


class _TailnetBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, server: Any) -> None:
        self.server = server

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            stream = await self.server.dial("tcp", address, timeout=timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or f"connecting to {address} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"{address}: {exc}") from None
        return _TailnetStream(stream)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not reachable over the tailnet")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def tailnet_async_client(server: Any, **kwargs: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` dialling through ``server`` (keyword arguments go to AsyncClient)."""
    verify = kwargs.pop("verify", True)
    transport = httpx.AsyncHTTPTransport(verify=verify)
    ssl_context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
    # Swap in a pool on our backend; httpx's transport only maps requests and errors around it.
    transport._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, network_backend=_TailnetBackend(server))
    return httpx.AsyncClient(transport=transport, verify=verify, **kwargs)
