"""``tsnet.blocking.Server``: the tsnet node for programs that do not use trio.

The node runs in its own trio event loop on a background thread. Every method blocks until done.
Connections are **real sockets**: ``dial()`` and ``Listener.accept()`` return a ``socket.socket``
whose other end (a ``socket.socketpair``) is spliced to the tailnet stream by the background loop, so
``http.server``, ``socketserver``, ``requests`` (through :meth:`Server.loopback`), database drivers
and asyncio (``asyncio.open_connection(sock=...)``) work unchanged::

    from tsnet.blocking import Server

    with Server(hostname="worker", auth_key=key, ephemeral=True) as srv:
        sock = srv.dial("tcp", "db:5432")           # a socket.socket
        ln = srv.listen("tcp", ":8080")              # accept() -> (socket, (ip, port))

        httpd = http.server.HTTPServer(("", 0), Handler, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = ln                            # serve_forever() works on it
"""

from __future__ import annotations

import atexit
import errno
import queue
import socket
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, overload

import trio

from . import server as _server
from .errors import NotRunningError, TsnetError

if TYPE_CHECKING:
    from .proxy import LoopbackProxy

__all__ = ["Listener", "PacketConn", "Server"]

_TCPNetwork = Literal["tcp", "tcp4", "tcp6"]
_UDPNetwork = Literal["udp", "udp4", "udp6"]


def _peer_address(stream: Any) -> tuple[str, int]:
    for attr in ("remote_address", "peername", "remote"):
        value = getattr(stream, attr, None)
        if value:
            return (str(value[0]), int(value[1]))
    getpeername = getattr(stream, "getpeername", None)
    if getpeername is not None:
        try:
            value = getpeername()
            return (str(value[0]), int(value[1]))
        except Exception:
            pass
    return ("", 0)


class Listener:
    """A tailnet TCP listener with a socket-like face: ``accept()``, ``fileno()``, ``close()``.

    ``fileno()`` becomes readable when a connection is waiting, so selectors (and
    ``socketserver.serve_forever``) work. ``accept()`` returns ``(socket.socket, (ip, port))``.
    """

    def __init__(self, owner: Server, address: tuple[str, int]) -> None:
        self._owner = owner
        self._address = address
        self._pending: queue.Queue[tuple[socket.socket, tuple[str, int]]] = queue.Queue()
        # One byte per waiting connection: makes fileno() readable for selectors.
        self._bell_r, self._bell_w = socket.socketpair()
        self._bell_w.setblocking(False)
        self._scope: trio.CancelScope | None = None
        self._closed = False
        self.timeout: float | None = None

    def fileno(self) -> int:
        """Readable while a connection waits (for selectors)."""
        return self._bell_r.fileno()

    def getsockname(self) -> tuple[str, int]:
        """``(host, port)`` we listen on (the chosen port when ``listen`` asked for port 0)."""
        return self._address

    def settimeout(self, timeout: float | None) -> None:
        """Timeout for :meth:`accept` (None: wait forever)."""
        self.timeout = timeout

    def gettimeout(self) -> float | None:
        return self.timeout

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        """Wait for the next tailnet connection.

        Raises ``TimeoutError`` (``socket.timeout``) after :meth:`settimeout`'s timeout, and
        ``OSError(EBADF)`` once the listener or its Server is closed (also waking a thread
        blocked here, as closing a listening socket does).
        """
        if self._closed:
            raise OSError(errno.EBADF, "listener is closed")
        try:
            self._bell_r.settimeout(self.timeout)
            if not self._bell_r.recv(1):
                raise OSError(errno.EBADF, "listener is closed")
        except socket.timeout:
            raise TimeoutError("accept timed out") from None
        except OSError as exc:
            if exc.errno == errno.EBADF or self._closed:
                raise OSError(errno.EBADF, "listener is closed") from None
            raise
        return self._pending.get_nowait()

    def close(self) -> None:
        """Stop listening; connections not yet accepted are closed."""
        if self._closed:
            return
        self._closed = True
        scope = self._scope
        if scope is not None:
            try:
                self._owner._sync(scope.cancel)
            except (TsnetError, RuntimeError):
                pass
        self._bell_w.close()
        self._bell_r.close()
        while True:
            try:
                sock, _ = self._pending.get_nowait()
            except queue.Empty:
                break
            sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _serve(self, listener: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            async with listener, trio.open_nursery() as nursery:
                while True:
                    try:
                        stream = await listener.accept()
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        # The node closed: wake a thread blocked in accept() (it sees EOF -> OSError).
                        self._bell_w.close()
                        return
                    ours, theirs = socket.socketpair()
                    nursery.start_soon(_bridge, stream, ours)
                    self._pending.put((theirs, _peer_address(stream)))
                    try:
                        self._bell_w.send(b"\0")
                    except OSError:
                        theirs.close()
                        return


async def _bridge(stream: Any, sock: socket.socket) -> None:
    from .proxy.splice import splice

    sock.setblocking(False)
    await splice(stream, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


async def _with_timeout(afn: Callable[..., Any], timeout: float | None, *args: Any) -> Any:
    if timeout is None:
        return await afn(*args)
    try:
        with trio.fail_after(timeout):
            return await afn(*args)
    except trio.TooSlowError:
        raise TimeoutError(f"no datagram within {timeout:g}s") from None


_UNSET: Any = object()


class PacketConn:
    """A tailnet UDP socket with blocking ``sendto``/``recvfrom``/``close`` (and ``send``/``recv`` when connected).

    Like a stdlib UDP socket: one call, one datagram (a ``bufsize`` shorter than the datagram
    truncates it and the rest is discarded); datagrams above 1252 (IPv4) / 1232 (IPv6) bytes
    raise ``OSError(EMSGSIZE)``; receives wait forever unless :meth:`settimeout` or the
    ``timeout`` argument says otherwise, then raise ``TimeoutError`` (``socket.timeout``);
    after :meth:`close` (or the Server's) every call raises ``OSError(EBADF)``.
    """

    def __init__(self, owner: Server, sock: Any) -> None:
        self._owner = owner
        self._sock = sock
        self._closed = False
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        """Default timeout of :meth:`recv` / :meth:`recvfrom` (None: wait forever)."""
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def _run(self, afn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise OSError(errno.EBADF, "socket is closed")
        try:
            return self._owner._call(afn, *args)
        except (trio.ClosedResourceError, NotRunningError):
            # A closed socket (or node) fails like a closed stdlib socket, not with trio's error.
            raise OSError(errno.EBADF, "socket is closed") from None

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        """Send one datagram to ``(ip, port)``."""
        return self._run(self._sock.sendto, bytes(data), address)

    def recvfrom(self, bufsize: int = 65535, timeout: float | None = _UNSET) -> tuple[bytes, tuple[str, int]]:
        """Wait for a datagram (raises ``TimeoutError`` after ``timeout`` seconds, default :meth:`gettimeout`)."""
        wait = self._timeout if timeout is _UNSET else timeout
        return self._run(_with_timeout, self._sock.recvfrom, wait, bufsize)

    def send(self, data: bytes) -> int:
        """Send one datagram to the connected address (after ``dial``)."""
        return self._run(self._sock.send, bytes(data))

    def recv(self, bufsize: int = 65535, timeout: float | None = _UNSET) -> bytes:
        """Like :meth:`recvfrom`, the payload only."""
        wait = self._timeout if timeout is _UNSET else timeout
        return self._run(_with_timeout, self._sock.recv, wait, bufsize)

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def close(self) -> None:
        """Close the socket (idempotent; a thread blocked in a receive gets ``OSError``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._owner._call(self._sock.aclose)
        except (NotRunningError, RuntimeError):
            pass

    def __enter__(self) -> PacketConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ReferenceType[Server]) -> None:
    server = ref()
    if server is not None:
        try:
            server.close()
        except Exception:  # exiting anyway
            pass


class Server:
    """Same settings and methods as :class:`tsnet.Server`, blocking, for non-trio programs.

    Differences: ``dial`` returns a ``socket.socket`` (TCP; an AF_UNIX socketpair end, so use the
    ``(ip, port)`` from ``Listener.accept`` or ``Server.whois`` rather than ``getpeername()`` for the
    tailnet address) or :class:`PacketConn` (UDP); ``listen``
    returns a :class:`Listener` (TCP) or :class:`PacketConn` (UDP); ``serve_forward`` runs in the
    background until :meth:`close`; ``http_client`` returns a ``requests.Session`` that goes through
    the loopback proxy.
    """

    def __init__(self, **settings: Any) -> None:
        self._settings = settings
        self._server = _server.Server(**settings)  # validates settings now, in the caller's thread
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._atexit_registered = False

    # --- plumbing -----------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._closed:
            raise NotRunningError("this Server was closed; create a new one")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._thread_main, name=f"tsnet-{self._server.hostname}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._loop_main)
        except BaseException as exc:  # reported to the caller through _ready
            self._error = exc
            self._ready.set()

    async def _loop_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _call(self, afn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._ensure_loop()

        async def run() -> Any:
            return await afn(*args, **kwargs)

        try:
            return trio.from_thread.run(run, trio_token=self._token)
        except trio.RunFinishedError:  # closed from another thread meanwhile
            raise NotRunningError("this Server was closed") from None

    def _sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise NotRunningError("call up() first")
        if self._closed:
            raise NotRunningError("this Server was closed; create a new one")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise NotRunningError("this Server was closed") from None

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> Server:
        """``up()``; if that fails (or Ctrl-C interrupts it), the node and its thread are closed first."""
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self, *, timeout: float = 60.0) -> _server.Status:
        """Start the node and block until Running (same errors as :meth:`tsnet.Server.up`).

        The node is also closed at interpreter exit if the program did not close it, so an
        ephemeral node logs out (and leaves the tailnet at once) even when a script just ends.
        """
        self._ensure_loop()
        if not self._atexit_registered:
            self._atexit_registered = True
            ref = weakref.ref(self)
            atexit.register(_close_at_exit, ref)
        return self._call(self._server.up, timeout=timeout)

    def close(self) -> None:
        """Stop the node and its thread (idempotent, bounded; may be called from any thread).

        Threads blocked in ``Listener.accept`` or a ``PacketConn`` receive get ``OSError(EBADF)``;
        afterwards the Server's methods raise :class:`~tsnet.errors.NotRunningError`.
        """
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        try:
            trio.from_thread.run(self._server.close, trio_token=self._token)
        except (RuntimeError, trio.RunFinishedError):
            pass
        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)  # type: ignore[union-attr]
        except (RuntimeError, trio.RunFinishedError):
            pass
        self._thread.join(timeout=10)

    # --- queries ------------------------------------------------------------------------------------

    @property
    def hostname(self) -> str:
        return self._server.hostname

    def _loop_alive(self) -> bool:
        return self._token is not None and self._thread is not None and self._thread.is_alive() and not self._closed

    def tailscale_ips(self) -> list[Any]:
        """Our tailnet addresses (IPv4 first); empty unless running."""
        return self._sync(self._server.tailscale_ips) if self._loop_alive() else []

    def status(self) -> _server.Status:
        """See :meth:`tsnet.Server.status`."""
        # Once the loop is gone the snapshot is static (Stopped), so it can be read from here.
        return self._sync(self._server.status) if self._loop_alive() else self._server.status()

    def whois(self, address: str) -> _server.WhoIs | None:
        """See :meth:`tsnet.Server.whois`."""
        return self._sync(self._server.whois, address)

    def metrics(self) -> dict[str, float]:
        """See :meth:`tsnet.Server.metrics`."""
        return self._sync(self._server.metrics)

    def ping(self, peer: str, *, timeout: float = 5.0) -> _server.PingResult:
        """See :meth:`tsnet.Server.ping`."""
        return self._call(self._server.ping, peer, timeout=timeout)

    def netcheck(self) -> dict[str, Any]:
        """See :meth:`tsnet.Server.netcheck`."""
        return self._call(self._server.netcheck)

    def wait_for_peer(self, name: str, *, timeout: float = 30.0) -> _server.NodeStatus:
        """See :meth:`tsnet.Server.wait_for_peer`."""
        return self._call(self._server.wait_for_peer, name, timeout=timeout)

    def resolve(self, host: str) -> list[Any]:
        """See :meth:`tsnet.Server.resolve`."""
        return self._call(self._server.resolve, host)

    # --- connections --------------------------------------------------------------------------------

    @overload
    def dial(self, network: _TCPNetwork, address: str, *, timeout: float | None = None) -> socket.socket: ...
    @overload
    def dial(self, network: _UDPNetwork, address: str, *, timeout: float | None = None) -> PacketConn: ...
    @overload
    def dial(self, network: str, address: str, *, timeout: float | None = None) -> socket.socket | PacketConn: ...

    def dial(self, network: str, address: str, *, timeout: float | None = None) -> socket.socket | PacketConn:
        """TCP: a connected ``socket.socket`` bridged to the tailnet stream. UDP: a :class:`PacketConn`."""
        conn = self._call(self._server.dial, network, address, timeout=timeout)
        if network.startswith("udp"):
            return PacketConn(self, conn)
        ours, theirs = socket.socketpair()

        async def start() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(_bridge, conn, ours)

        self._call(start)
        return theirs

    @overload
    def listen(self, network: _TCPNetwork, address: str) -> Listener: ...
    @overload
    def listen(self, network: _UDPNetwork, address: str) -> PacketConn: ...
    @overload
    def listen(self, network: str, address: str) -> Listener | PacketConn: ...

    def listen(self, network: str, address: str) -> Listener | PacketConn:
        """TCP: a :class:`Listener`. UDP: a :class:`PacketConn`."""
        if network.startswith("udp"):
            return PacketConn(self, self._call(self._server.listen, network, address))
        tcp = self._call(self._server.listen, network, address)
        listener = Listener(self, tcp.local_address)  # the real port, also for ":0"

        async def start() -> None:
            assert self._nursery is not None
            await self._nursery.start(listener._serve, tcp)

        self._call(start)
        return listener

    def listen_packet(self, network: str, address: str) -> PacketConn:
        """A tailnet UDP socket as a :class:`PacketConn`."""
        return PacketConn(self, self._call(self._server.listen_packet, network, address))

    def loopback(self) -> LoopbackProxy:
        """The SOCKS5 + HTTP proxy on 127.0.0.1 (a :class:`tsnet.proxy.LoopbackProxy`)."""
        return self._call(self._server.loopback)

    def serve_forward(self, port: int, target: str) -> None:
        """Forward tailnet ``:port`` to ``target`` in the background (until :meth:`close`)."""

        async def start() -> None:
            assert self._nursery is not None
            await self._nursery.start(self._server.serve_forward, port, target)

        self._call(start)

    def http_client(self) -> Any:
        """A ``requests.Session`` whose requests go over the tailnet (through the loopback HTTP proxy)."""
        import requests

        proxy = self.loopback()
        session = requests.Session()
        session.proxies = {"http": proxy.http_url, "https": proxy.http_url}
        session.trust_env = False  # ignore HTTP(S)_PROXY/NO_PROXY from the environment
        return session
