"""``tsnet.Server``: one tailnet node inside this Python program (trio).

A Server wires the layers together::

    control client ──NetworkMap──▶ magicsock (peers, DERP map)
                                 ├▶ netstack addresses
                                 ├▶ inbound packet filter (replaced live)
                                 └▶ MagicDNS names (replaced live)
    magicsock ──decrypted packets (batches)──▶ filter.check_inbound ──▶ netstack.deliver
    netstack ──packets──▶ filter.note_outbound ──▶ magicsock.send_ip_packets
    magicsock endpoint / home-DERP events ──▶ control lite map update

Usage::

    async with tsnet.Server(hostname="app", auth_key=key, ephemeral=True) as srv:
        stream = await srv.dial("tcp", "db:5432")          # MagicDNS short name
        listener = await srv.listen("tcp", ":8080")

The node runs in a trio *system task*, so ``up()`` and ``close()`` may be called from any task of
the same trio run, and nothing of the node leaks into the caller's cancel scopes. Several Servers in
one process share nothing.
"""

from __future__ import annotations

import datetime as _dt
import errno
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import trio

from .errors import (
    AuthKeyError,
    ConfigError,
    ControlUnreachableError,
    HostNotFoundError,
    NeedsLoginError,
    NotRunningError,
    TsnetError,
    UpTimeoutError,
)
from .store import FileStore, MemoryStore, Store, store_from_spec

if TYPE_CHECKING:  # the netstack and proxies load lazily, when the node starts
    from .netstack.sockets import TCPListener, TCPStream, UDPSocket
    from .proxy import LoopbackProxy

_TCPNetwork = Literal["tcp", "tcp4", "tcp6"]
_UDPNetwork = Literal["udp", "udp4", "udp6"]

__all__ = ["NodeStatus", "PingResult", "Server", "Status", "UserProfile", "WhoIs"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_CONTROL_URL = "https://controlplane.tailscale.com"
#: close() gives up waiting for the node's tasks after this many seconds (they are cancelled anyway).
CLOSE_TIMEOUT = 3.0
#: An ephemeral node's logout on close() is bounded by this many seconds.
LOGOUT_TIMEOUT = 2.0
#: up() waits at most this long for the home DERP connection before reporting Running anyway.
DERP_READY_TIMEOUT = 5.0

QUAD100_V4 = ipaddress.IPv4Address("100.100.100.100")
QUAD100_V6 = ipaddress.IPv6Address("fd7a:115c:a1e0::53")

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0


# --- public result types ---------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    return value


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node (ourselves or a peer) as ``tailscale status`` would show it.

    ``path`` is ``"direct IP:PORT"``, ``"relay via NAME"`` (a peer relay), ``"derp region N"`` or
    ``"idle"`` (no WireGuard session yet). ``latency`` is the last disco round trip in seconds.
    ``last_handshake`` / ``last_path_change`` are wall-clock times (UTC) or None.
    """

    name: str
    dns_name: str
    addresses: tuple[IPAddress, ...]
    os: str
    online: bool | None
    path: str
    latency: float | None
    last_handshake: _dt.datetime | None
    last_path_change: _dt.datetime | None
    rx_bytes: int
    tx_bytes: int
    key: str = ""
    id: int = 0
    tags: tuple[str, ...] = ()
    user: str = ""
    #: The node's home DERP region (0: not known yet).
    home_derp: int = 0
    #: The peer's node key has expired: control still lists it, but no traffic goes to or from it.
    expired: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of the node. ``backend_state`` is Starting, NeedsLogin, Running or Stopped."""

    backend_state: str
    self_node: NodeStatus | None
    peers: tuple[NodeStatus, ...]
    magic_dns_suffix: str
    health: tuple[str, ...] = ()
    auth_url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (addresses as strings, times in ISO 8601)."""
        return _jsonable(asdict(self))

    def peer(self, name: str) -> NodeStatus | None:
        """The peer with this short name or FQDN, if any."""
        key = name.rstrip(".").lower()
        for p in self.peers:
            if p.name.lower() == key or p.dns_name.rstrip(".").lower() == key:
                return p
        return None


@dataclass(frozen=True, slots=True)
class UserProfile:
    """The user who owns a node (for tagged nodes, the tagged-devices pseudo user)."""

    id: int
    login_name: str
    display_name: str
    profile_pic_url: str = ""


@dataclass(frozen=True, slots=True)
class WhoIs:
    """Who is behind a tailnet address: the node and its owner."""

    node: NodeStatus
    user: UserProfile

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class PingResult:
    """The answer to :meth:`Server.ping`: round trip in seconds and the path it took."""

    peer: str
    ip: IPAddress
    latency: float
    path: str

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


# --- settings ------------------------------------------------------------------------------------


def _read_auth_key(value: str | None) -> str | None:
    """An auth key, reading ``file:/path`` forms (as containerboot does)."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("file:"):
        path = value[5:]
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read auth key file {path}: {exc}") from None
        if not value:
            raise ConfigError(f"auth key file {path} is empty")
    return value


#: A hostname: one DNS-label-like word (it names the node, its MagicDNS name and the default state dir).
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9_])?")


def _check_hostname(name: str) -> str:
    """``name`` if it can be a node's hostname, else ConfigError saying why.

    Letters, digits, ``-``, ``_`` and ``.``, at most 63 characters, not starting or ending with
    ``-`` or ``.``: control derives the MagicDNS label from it, and the default state directory
    is named after it (so ``/`` or ``..`` must never reach a path).
    """
    if not _HOSTNAME_RE.fullmatch(name):
        raise ConfigError(
            f"hostname {name!r} is not valid: use 1-63 letters, digits, '-', '_' or '.', "
            f"not starting or ending with '-' or '.'")
    return name


def _default_hostname() -> str:
    prog = Path(sys.argv[0] if sys.argv and sys.argv[0] else "tsnet").stem
    if not prog or prog in ("-c", "-m", "__main__", "python", "pytest"):
        return "tsnet"
    # A program name may hold characters a hostname cannot (spaces, '+'): replace them.
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", prog)[:63].strip("-.")
    return cleaned if _HOSTNAME_RE.fullmatch(cleaned) else "tsnet"


def _check_control_url(url: str) -> str:
    from .control.client import parse_login_url

    try:
        parse_login_url(url)
    except ValueError as exc:
        raise ConfigError(f"control_url: {exc}") from None
    return url


def _check_auth_key(key: str | None) -> str | None:
    # Keys are printable ASCII without spaces; anything else is a paste or quoting mistake.
    if key is not None and not all(33 <= ord(c) < 127 for c in key):
        raise ConfigError("auth_key contains spaces or non-printable characters (a copy/paste or quoting mistake?)")
    return key


def _parse_port(port_text: str, address: str) -> int:
    """A port number or a service name (``http``), like Go's ``net.LookupPort``."""
    if port_text.isdigit():
        port = int(port_text)
        if port > 65535:
            raise ConfigError(f"bad address {address!r}: port out of range")
        return port
    try:
        return socket.getservbyname(port_text)
    except (OSError, UnicodeError):
        raise ConfigError(f"bad address {address!r}: port {port_text!r} is not a number or a known service name"
                          ) from None


def _split_host_port(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port); the port may be a service name
    (``:http``). Raises ConfigError (also for an IPv6 literal without brackets)."""
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"bad address {address!r}: want [v6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"bad address {address!r}: missing port (want host:port)")
        if ":" in host:
            raise ConfigError(f"bad address {address!r}: an IPv6 address needs brackets, e.g. [{host}]:{port_text}")
    return host, _parse_port(port_text, address)


def _check_port(name: str, port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{name} {port!r} is not a port number (0-65535; 0 picks a free one)")
    return port


def _wall(trio_time: float | None) -> _dt.datetime | None:
    """A trio-clock instant as a UTC wall-clock time."""
    if trio_time is None or not math.isfinite(trio_time):
        return None
    age = trio.current_time() - trio_time
    return _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=max(0.0, age))


def _ip_checksum(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp4_echo(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, ident: int, seq: int) -> bytes:
    payload = b"tsnet-ping" + secrets.token_bytes(6)
    icmp = bytearray(struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload)
    struct.pack_into("!H", icmp, 2, _ip_checksum(icmp))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, src.packed, dst.packed))
    struct.pack_into("!H", hdr, 10, _ip_checksum(hdr))
    return bytes(hdr + icmp)


def _parse_icmp4_echo_reply(pkt: bytes | memoryview) -> tuple[int, int] | None:
    """(ident, seq) if ``pkt`` is an IPv4 ICMP echo reply, else None."""
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 1:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    if len(pkt) < ihl + 8 or pkt[ihl] != _ICMP_ECHO_REPLY:
        return None
    ident, seq = struct.unpack_from("!HH", pkt, ihl + 4)
    return ident, seq


# --- the server ------------------------------------------------------------------------------------


class Server:
    """A tailnet node in this process (trio). See the module docstring.

    Settings mirror Go tsnet; each has an environment fallback:

    * ``hostname`` (``TS_HOSTNAME``; default: the program name).
    * ``state_dir`` (``TS_STATE_DIR``) or ``store`` (``TS_STATE``): a :class:`~tsnet.store.Store`, or a
      spec ``mem:`` / ``env:NAME`` / directory. Default: memory for ephemeral nodes, else
      ``~/.config/tsnet-<hostname>``. Memory state requires ``ephemeral=True``
      (:class:`~tsnet.errors.ConfigError` otherwise).
    * ``auth_key`` (``TS_AUTHKEY`` or ``TS_AUTH_KEY``; ``file:/path`` reads the key from a file).
    * ``control_url`` (``TS_CONTROL_URL``; default Tailscale's).
    * ``ephemeral``: the node is deleted from the tailnet when it logs out (on :meth:`close`).
    * ``port``: UDP port for WireGuard/disco (0 = random).
    * ``advertise_tags``: ACL tags to request (``tag:name``).
    * ``relay_server_port``: also run a peer relay server on this UDP port (0 = random).
    * ``logger`` (internal logs), ``user_logf`` (one-line messages meant for a person, e.g. the login URL).

    Advanced (mostly for tests and labs): ``udp_bind`` is the IPv4 address magicsock binds
    (default ``0.0.0.0``; a loopback address advertises only itself), ``derp_plain_http`` talks to
    DERP without TLS (default: when ``control_url`` is ``http://`` or ``TS_DEBUG_USE_DERP_HTTP`` is set).

    Settings are checked here, before anything starts: a hostname that is not 1-63 letters,
    digits, ``-``, ``_`` or ``.``, a control URL that is not ``http(s)://host``, an auth key with
    spaces or non-printable characters, a port outside 0-65535, a tag without ``tag:``, or
    contradicting settings raise :class:`~tsnet.errors.ConfigError`.
    """

    def __init__(
        self,
        *,
        hostname: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        store: Store | str | None = None,
        auth_key: str | None = None,
        control_url: str | None = None,
        ephemeral: bool = False,
        port: int = 0,
        advertise_tags: Sequence[str] = (),
        relay_server_port: int | None = None,
        logger: logging.Logger | None = None,
        user_logf: Callable[[str], None] | None = None,
        udp_bind: str | None = None,
        derp_plain_http: bool | None = None,
    ) -> None:
        env = os.environ
        self.hostname = _check_hostname(hostname or env.get("TS_HOSTNAME") or _default_hostname())
        self.control_url = _check_control_url(
            (control_url or env.get("TS_CONTROL_URL") or DEFAULT_CONTROL_URL).rstrip("/"))
        self.auth_key = _check_auth_key(_read_auth_key(auth_key or env.get("TS_AUTHKEY") or env.get("TS_AUTH_KEY")))
        self.ephemeral = bool(ephemeral)
        self.port = _check_port("port", port)
        tags = tuple(advertise_tags)
        for tag in tags:
            if not tag.startswith("tag:") or len(tag) <= 4:
                raise ConfigError(f"advertise_tags: {tag!r} is not a tag (want tag:name)")
        self.advertise_tags = tags
        self.relay_server_port = None if relay_server_port is None else _check_port("relay_server_port",
                                                                                    relay_server_port)
        self.log = logger or logging.getLogger("tsnet.server")
        self.user_logf = user_logf or (lambda msg: self.log.info("%s", msg))
        self.udp_bind = udp_bind or "0.0.0.0"
        if derp_plain_http is None:
            derp_plain_http = self.control_url.startswith("http://") or env.get(
                "TS_DEBUG_USE_DERP_HTTP", "").lower() in ("1", "true", "yes")
        self.derp_plain_http = derp_plain_http
        self.store = self._resolve_store(store, state_dir)

        # Runtime state (everything below belongs to one up()/close() cycle).
        self._state = "NoState"
        self._closed = False
        self._task_running = False
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        self._up_event: trio.Event | None = None
        self._up_error: BaseException | None = None
        self._auth_url: str | None = None
        self._reported_auth_url: str | None = None
        self._nursery: trio.Nursery | None = None
        self._client: Any = None
        self._driver: Any = None
        self._net: Any = None
        self._filter: Any = None
        self._netmap: Any = None
        self._magic: Any = None
        self._resolver: Any = None
        #: current warnings by topic (a newer warning on a topic replaces the older one)
        self._health: dict[str, str] = {}
        self._update_wanted: trio.Event | None = None
        self._have_addresses: trio.Event | None = None
        self._netmap_changed = trio.Event()
        self._driver_scopes: dict[Any, tuple[trio.CancelScope, trio.Event]] = {}
        self._rekeying = False
        self._disco: Any = None
        self._started_at = 0.0
        #: seconds from up() to each startup phase: login, netmap, derp, running
        self._startup: dict[str, float] = {}
        self._pings: dict[tuple[int, int], trio.Event] = {}
        self._ping_ident = secrets.randbelow(0xFFFF) + 1
        self._ping_seq = 0
        self._loopback: Any = None
        self._loopback_lock: trio.Lock | None = None
        self._self_ips: frozenset[IPAddress] = frozenset()
        #: packed addresses the netstack owns (ours + MagicDNS): packets to them loop back locally
        self.counters: dict[str, int] = {
            "packets_in": 0, "packets_out": 0,
            "filter_dropped": 0, "no_route": 0, "netmaps": 0, "lite_updates": 0,
        }

    def _resolve_store(self, store: Store | str | None, state_dir: str | os.PathLike[str] | None) -> Store:
        env = os.environ
        if store is not None and state_dir is not None:
            raise ConfigError("give either store or state_dir, not both")
        if isinstance(store, Store):
            chosen: Store = store
        elif isinstance(store, str):
            chosen = store_from_spec(store)
        elif state_dir is not None:
            chosen = FileStore(state_dir)
        elif env.get("TS_STATE"):
            chosen = store_from_spec(env["TS_STATE"])
        elif env.get("TS_STATE_DIR"):
            chosen = FileStore(env["TS_STATE_DIR"])
        elif self.ephemeral:
            chosen = MemoryStore()
        else:
            base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
            chosen = FileStore(base / f"tsnet-{self.hostname}")
        if chosen.volatile and not self.ephemeral:
            raise ConfigError(
                "in-memory state requires ephemeral=True: a persistent node with memory state would "
                "leave a new stale node on the tailnet at every start (use a state_dir, or set ephemeral)"
            )
        return chosen

    # --- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Server:
        """``up()``; if that fails or is cancelled, the node is closed before the error propagates
        (the ``async with`` body never runs, so nothing else would close it).

        Without an auth key it waits for the interactive login, as Go's ``Up`` does: the login URL
        goes to ``user_logf`` and the wait ends after ``up()``'s default timeout
        (:class:`UpTimeoutError` naming the URL) instead of raising :class:`NeedsLoginError`.
        """
        try:
            try:
                await self.up()
            except NeedsLoginError:
                await self.up()  # the URL is logged; a second up() waits for the approval
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def up(self, *, timeout: float = 60.0) -> Status:
        """Start the node (if needed) and return once it is Running with its addresses.

        Raises :class:`~tsnet.errors.AuthKeyError` (login refused), :class:`ControlUnreachableError`,
        :class:`UpTimeoutError` (not running after ``timeout`` s), :class:`NeedsLoginError` (no auth
        key; visit ``.login_url``, then call ``up()`` again, which waits for the approval),
        :class:`StateDirInUseError`,
        :class:`NotRunningError` (already closed). After an error other than NeedsLogin and
        UpTimeout nothing of the node keeps running.

        Cancelling ``up()`` (a cancel scope, Ctrl-C) only stops the wait, as a cancelled Go
        ``Up(ctx)`` does: the node keeps starting in the background until :meth:`close`, and a
        later ``up()`` picks it up. ``async with Server(...)`` closes it for you.
        """
        if not timeout >= 0:  # also NaN; checked before anything starts
            raise ConfigError(f"up(timeout={timeout!r}): want a number of seconds >= 0")
        if self._closed:
            raise NotRunningError("this Server was closed; create a new one")
        if self._state == "Running":
            return self.status()
        if not self._task_running:
            self._start()
        assert self._up_event is not None
        with trio.move_on_after(timeout):
            while True:
                await self._up_event.wait()
                if self._up_error is not None or self._state == "Running":
                    break
                if self._closed or not self._task_running:
                    raise NotRunningError("the Server was closed while starting")
                if self._state == "NeedsLogin" and self._auth_url and self._auth_url != self._reported_auth_url:
                    # Raised once per login URL; a later up() waits for the approval instead.
                    self._reported_auth_url = self._auth_url
                    raise NeedsLoginError(
                        f"this node needs to be logged in: visit {self._auth_url} (or pass an auth key, "
                        f"e.g. TS_AUTHKEY), then call up() again", self._auth_url)
                self._up_event = trio.Event()
        if self._up_error is not None:
            err, self._up_error = self._up_error, None
            await self._wait_stopped()
            raise err
        if self._state != "Running":
            raise UpTimeoutError(
                f"node {self.hostname!r} not running after {timeout:g}s (state {self._state}; "
                f"control {self.control_url}); "
                + (f"the login at {self._auth_url} is not approved yet" if self._state == "NeedsLogin" else
                   "check that the control server and DERP are reachable")
                + (f"; health: {'; '.join(self._health.values())}" if self._health else ""))
        return self.status()

    def _start(self) -> None:
        self._state = "Starting"
        self._started_at = trio.current_time()
        self._startup.clear()
        self._health.clear()
        self._up_event = trio.Event()
        self._stopped = trio.Event()
        self._update_wanted = trio.Event()
        self._have_addresses = trio.Event()
        self._loopback_lock = trio.Lock()
        self._task_running = True
        trio.lowlevel.spawn_system_task(self._run, name=f"tsnet.Server({self.hostname})")

    def _signal(self) -> None:
        if self._up_event is not None:
            self._up_event.set()

    async def _wait_stopped(self) -> None:
        if self._stopped is not None and self._task_running:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._stopped.wait()

    async def close(self) -> None:
        """Stop the node; idempotent and bounded (5 s at most: 2 s logout + 3 s for the tasks).

        An ephemeral node logs out first, so the control server deletes it at once. Every socket
        of the node stops, waking the tasks waiting on it: listeners and UDP sockets raise
        ``trio.ClosedResourceError``, streams ``trio.BrokenResourceError`` (peers get a reset), never
        a clean end of data.
        """
        self._closed = True
        if not self._task_running:
            self._state = "Stopped"
            return
        client = self._client
        if self.ephemeral and client is not None and client.logged_in:
            with trio.move_on_after(LOGOUT_TIMEOUT):
                try:
                    await client.logout()
                except Exception as exc:  # best effort: the server's GC removes it later anyway
                    self.log.info("ephemeral logout failed: %s", exc)
        self._shutdown_netstack()
        if self._scope is not None:
            self._scope.cancel()
        # (If the system task has not entered its scope yet, it sees _closed and returns.)
        await self._wait_stopped()
        self._state = "Stopped"

    def _shutdown_netstack(self) -> None:
        """Reset every connection (peers get RSTs), unbind every socket, wake every waiting task."""
        if self._net is None:
            return
        try:
            # A reader must not take the shutdown for the peer's clean end of data (a silently
            # truncated transfer): its stream breaks (BrokenResourceError from ConnectionAbortedError),
            # as a Go tsnet conn's Read fails after Server.Close.
            for conn in list(self._net.stack.connections.values()):
                if conn.error is None:
                    conn.error = ConnectionAbortedError(errno.ECONNABORTED, "the tsnet node was closed")
            self._net.abort_all()
        except Exception:
            self.log.exception("netstack shutdown")

    async def _run(self) -> None:
        """The node: runs as a system task until close() (or a fatal error during up())."""
        from .control.client import ClientConfig, ControlClient, ControlError, LoginError
        from .key import DiscoPrivate, MachinePrivate, NodePrivate

        assert self._stopped is not None
        locked = False
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                if self._closed:
                    return
                self.store.lock()
                locked = True
                machine = self.store.read("machine-key")
                node = self.store.read("node-key")
                machine_key = MachinePrivate.from_raw(machine) if machine else MachinePrivate.generate()
                node_key = NodePrivate.from_raw(node) if node else NodePrivate.generate()
                disco = DiscoPrivate.generate()
                config = ClientConfig(
                    control_url=self.control_url, machine_key=machine_key, node_key=node_key,
                    disco_key=disco.public, hostname=self.hostname, auth_key=self.auth_key,
                    ephemeral=self.ephemeral, tags=self.advertise_tags, on_auth_url=self._on_auth_url,
                )
                try:
                    client = ControlClient(config)
                except ValueError as exc:
                    raise ConfigError(f"control_url: {exc}") from None
                async with client:
                    self._client = client
                    try:
                        await client.login()
                    except LoginError as exc:
                        raise AuthKeyError(
                            f"control server {self.control_url} refused the login: {exc}. Check the auth key "
                            f"(TS_AUTHKEY): it may be mistyped, expired, revoked, or single-use and already used"
                        ) from None
                    except ControlError as exc:
                        raise ControlUnreachableError(
                            f"cannot reach the control server {self.control_url}: {exc}. Check the URL "
                            f"(TS_CONTROL_URL) and that the server is up and reachable from here"
                        ) from None
                    self._mark("login")
                    self.store.write("machine-key", machine_key.raw)
                    self.store.write("node-key", client.config.node_key.raw)
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await self._start_data_plane(nursery, client, disco)
                        nursery.start_soon(self._control_loop, client)
                        nursery.start_soon(self._become_running)
                        nursery.start_soon(self._lite_updater, client)
        except Exception as exc:  # never crash the trio run from a system task
            err = _find_tsnet_error(exc)
            if err is None:
                self.log.exception("tsnet node failed")
                err = TsnetError(f"node failed: {exc!r}")
            elif self._state == "Running":
                self.log.error("tsnet node stopped: %s", err)
            self._health["node"] = f"node stopped: {err}"
            self._up_error = err
        finally:
            self._scope = None
            self._nursery = None
            self._shutdown_netstack()
            self._client = None
            self._driver = None
            self._net = None
            self._state = "Stopped"
            if locked:
                self.store.unlock()
            self._task_running = False
            for ev in self._pings.values():
                ev.set()
            self._stopped.set()
            self._signal()

    async def _become_running(self) -> None:
        """Running = we have addresses and our home DERP connection is up (bounded wait).

        Waiting for DERP matters: a peer's first WireGuard handshake reaches us over DERP, and
        one sent before we are connected is lost at the DERP server until WireGuard retries
        (5 s later). Peers that have not learnt our home region yet need no wait: their
        magicsock holds the initiation until control tells them, and ours answers an
        initiation from a node our netmap does not list yet as soon as it does.
        """
        assert self._have_addresses is not None
        await self._have_addresses.wait()
        driver = self._driver
        with trio.move_on_after(DERP_READY_TIMEOUT) as scope:
            while driver is not None and driver.core.derp_map is not None:
                client = driver.regions.clients.get(driver.core.home_derp)
                if client is not None:
                    await client.wait_connected()
                    break
                await trio.sleep(0.01)  # home region not chosen yet
        self._mark("derp")
        if scope.cancelled_caught:
            self._health["derp"] = "home DERP region not connected"
        else:
            self._health.pop("derp", None)
        self._mark("running")
        self._state = "Running"
        self._auth_url = None
        self.log.info("tsnet: %s running as %s", self.hostname, " ".join(str(ip) for ip in self.tailscale_ips()))
        self._signal()

    def _mark(self, phase: str) -> None:
        """Note how long after start a startup phase completed (reported by metrics())."""
        self._startup[phase] = trio.current_time() - self._started_at

    async def _control_loop(self, client: Any) -> None:
        from .control.client import LoginError

        try:
            await client.run(self._on_netmap)
        except LoginError as exc:
            self._health["login"] = f"login refused: {exc}"
            self._up_error = AuthKeyError(f"control server refused the login: {exc}")
            self._signal()
            assert self._scope is not None
            self._scope.cancel()

    def _on_auth_url(self, url: str) -> None:
        self._auth_url = url
        self._state = "NeedsLogin"
        self.user_logf(f"To authenticate node {self.hostname!r}, visit: {url}")
        self._signal()

    async def _start_data_plane(self, nursery: trio.Nursery, client: Any, disco: Any) -> None:
        from .dns import DNSConfig, MagicDNS, MagicDNSUpstream, NameResolver

        self._disco = disco
        self._driver = await self._new_driver(nursery, client.config.node_key, disco)
        self._magic = MagicDNS(DNSConfig())
        self._magic_upstream = MagicDNSUpstream(self._magic, self._forward_dns)
        self._resolver = NameResolver(self._magic, self._upstream_lookup)

    async def _new_driver(self, nursery: trio.Nursery, node_key: Any, disco: Any) -> Any:
        """Start a magicsock driver for ``node_key`` in its own cancel scope (so a key change can replace it)."""
        from .magicsock.driver import MagicSockDriver

        local = None
        bind_v6: str | None = "::"
        try:
            bind_ip = ipaddress.ip_address(self.udp_bind)
        except ValueError:
            raise ConfigError(f"udp_bind {self.udp_bind!r} is not an IPv4 address") from None
        if bind_ip.is_loopback:
            local, bind_v6 = [bind_ip], None
        driver = MagicSockDriver(
            node_key, disco, port=self.port, bind_v4=self.udp_bind, bind_v6=bind_v6,
            local_addresses=local, derp_plain_http=self.derp_plain_http, on_event=self._on_magicsock_event,
            on_packets=self._on_packets, relay_server_port=self.relay_server_port,
        )

        done = trio.Event()

        async def run(task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as scope:
                    await driver.run(task_status=_Forward(task_status, scope))
            finally:
                done.set()

        try:
            scope = await nursery.start(run)
        except OSError as exc:
            raise ConfigError(f"cannot open the UDP socket on {self.udp_bind}:{self.port}: {exc.strerror or exc} "
                              f"(is another node using port {self.port}? port=0 picks a free one)") from None
        self._driver_scopes[driver] = (scope, done)
        return driver

    async def _replace_driver(self, nm: Any) -> None:
        """Control renewed our node key (expiry): WireGuard needs a driver with the new key."""
        old = self._driver
        client = self._client
        if old is None or client is None or self._nursery is None:
            return
        self.log.info("node key changed to %s: restarting magicsock", client.config.node_key.public.short())
        # Stop the old driver first: a fixed UDP port must be free before the new one binds it.
        scope, done = self._driver_scopes.pop(old)
        scope.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await done.wait()
        new = await self._new_driver(self._nursery, client.config.node_key, self._disco)
        self._driver = new
        new.set_netmap(self._netmap if self._netmap is not None else nm)
        self.store.write("node-key", client.config.node_key.raw)
        if self._update_wanted is not None:
            self._update_wanted.set()
        self._rekeying = False

    # --- netmap ------------------------------------------------------------------------------------

    def _on_netmap(self, nm: Any) -> None:
        self.counters["netmaps"] += 1
        self._netmap = nm
        self._netmap_changed.set()
        self._netmap_changed = trio.Event()
        driver = self._driver
        if driver is None:
            return
        if nm.node_key is not None and nm.node_key != driver.node_key:
            if not self._rekeying and self._nursery is not None:
                self._rekeying = True
                self._nursery.start_soon(self._replace_driver, nm)
        else:
            driver.set_netmap(nm)
        addresses = [a.ip for a in nm.addresses]
        self._self_ips = frozenset(addresses)
        if addresses:
            self._ensure_netstack(addresses)
        self._update_filter(nm)
        self._update_dns(nm)
        if addresses and self._net is not None and self._have_addresses is not None:
            if not self._have_addresses.is_set():
                self._mark("netmap")
            self._have_addresses.set()

    def _ensure_netstack(self, addresses: list[IPAddress]) -> None:
        from .netstack.sockets import NetStack
        from .netstack.stack import Stack

        # The stack also owns the MagicDNS service addresses, so 100.100.100.100:53 is a real socket.
        stack_addresses = list(addresses) + [QUAD100_V4, QUAD100_V6]
        if self._net is not None:
            self._net.stack.set_addresses(stack_addresses)
            return
        # Packets reach the stack only after WireGuard decrypted (authenticated) them, or from the
        # stack itself: checksums are not summed again (see Stack's verify_checksums).
        net = NetStack(Stack(stack_addresses, now=trio.current_time(), verify_checksums=False), self._send_packets)
        self._net = net
        assert self._nursery is not None
        self._nursery.start_soon(net.run)
        self._nursery.start_soon(self._serve_dns, net)

    def _update_filter(self, nm: Any) -> None:
        """Swap in the netmap's packet filter; the flow table (replies to our flows) survives."""
        from .netstack.filter import FilterState, PacketFilter

        try:
            new = PacketFilter.from_netmap(nm)
        except Exception as exc:  # a filter we cannot build: keep the old one, report it
            self.log.error("packet filter not applied: %s", exc)
            self._health["filter"] = f"packet filter not applied: {exc}"
            return
        self._health.pop("filter", None)
        if self._filter is None:
            self._filter = FilterState(new)
        else:
            self._filter.set_filter(new)

    def _update_dns(self, nm: Any) -> None:
        from .control import tailcfg
        from .dns import DNSConfig

        nodes: dict[str, list[str]] = {}
        for p in (*nm.peers, *nm.skipped_peers):  # names of expired peers still resolve, as in tailscaled
            if p.name:
                nodes[p.name] = [str(a.ip) for a in p.addresses]
        if nm.name:
            nodes[nm.name] = [str(a.ip) for a in nm.addresses]
        raw = json.loads(tailcfg.dumps(nm.dns_config)) if nm.dns_config is not None else None
        try:
            self._magic.set_config(DNSConfig.from_control(raw, nodes))
        except ValueError as exc:
            self.log.error("MagicDNS config not applied: %s", exc)

    # --- packets -------------------------------------------------------------------------------------

    def _on_packets(self, packets: list[tuple[Any, bytes]]) -> None:
        """Decrypted packets from magicsock: ping replies, then the filter, then the netstack (one batch)."""
        counters = self.counters
        pings = self._pings
        if pings:  # a ping() is waiting: take its echo replies out of the batch
            batch = []
            for _peer, pkt in packets:
                echo = _parse_icmp4_echo_reply(pkt)
                if echo is not None and echo in pings:
                    pings.pop(echo).set()
                    continue
                batch.append(pkt)
        else:
            batch = [pkt for _peer, pkt in packets]
        counters["packets_in"] += len(packets)
        filt = self._filter
        if filt is None:  # no netmap yet: nothing is allowed in
            counters["filter_dropped"] += len(batch)
            return
        net = self._net
        if net is not None:
            # The stack asks the filter about each packet as it parses it (one pass over the batch).
            dropped = filt.dropped
            net.deliver(batch, filt)
            counters["filter_dropped"] += filt.dropped - dropped
            rejects = filt.take_rejects()
        else:
            accepted, rejects = filt.filter_inbound(batch)
            counters["filter_dropped"] += len(batch) - len(accepted)
        if rejects and self._driver is not None:
            # A denied TCP SYN gets a TSMP reject, so the peer fails fast instead of retrying.
            self._driver.send_ip_packets(rejects)

    def _send_packets(self, packets: Sequence[bytes | bytearray | memoryview]) -> None:
        """Netstack output: note flows, encrypt and send.

        Packets to our own addresses (and MagicDNS's) never get here: the stack owns all of them
        and loops such packets back itself (``Stack.packets_to_send``).
        """
        driver = self._driver
        if driver is None or not packets:
            return
        out: Sequence[bytes | bytearray | memoryview] = packets
        filt = self._filter
        if filt is not None:
            out = filt.note_outbound_batch(out)  # remembers UDP flows so their replies get in
        self.counters["packets_out"] += len(out)
        sent = driver.send_ip_packets(out)
        self.counters["no_route"] += len(out) - sent

    async def _serve_dns(self, net: Any) -> None:
        """MagicDNS at 100.100.100.100:53 and [fd7a:115c:a1e0::53]:53, UDP and TCP, on the netstack."""
        from .dns import DNSServer

        server = DNSServer(self._magic, self._forward_dns)
        try:
            async with trio.open_nursery() as nursery:
                listeners = []
                for ip in (QUAD100_V4, QUAD100_V6):
                    udp = await net.open_udp_socket(host=str(ip), port=53)
                    nursery.start_soon(server.serve_udp, udp)
                    listeners.append(await net.open_tcp_listener(53, host=str(ip)))
                nursery.start_soon(server.serve_tcp, listeners)
        except* (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the node is closing: its sockets were closed under the server
        except* Exception as group:
            exc = group.exceptions[0]
            self.log.warning("MagicDNS server on the netstack failed: %r", exc)
            self._health["dns"] = f"MagicDNS server not running: {exc}"

    async def _forward_dns(self, forward: Any) -> bytes:
        """Forward a query MagicDNS does not answer: tailnet nameservers over the netstack, others via the OS."""
        from .dns import UpstreamForwarder
        from .dns.server import _reply_matches, parse_nameserver

        for ns in forward.nameservers:
            parsed = parse_nameserver(ns)
            if parsed is None:
                continue
            ip = ipaddress.ip_address(parsed[0])
            if self._is_tailnet(ip) and self._net is not None:
                with trio.move_on_after(2.0):
                    try:
                        sock = await self._net.open_udp_socket()
                        try:
                            await sock.sendto(forward.query, parsed)
                            while True:
                                data, _ = await sock.recvfrom(65535)
                                if _reply_matches(forward.query, data):
                                    return forward.finish(data)
                        finally:
                            await sock.aclose()
                    except OSError:
                        continue
            else:
                reply = await UpstreamForwarder()(type(forward)((ns,), forward.query, forward.max_response))
                if not (len(reply) > 3 and reply[3] & 0x0F == 2):  # not SERVFAIL
                    return reply
        return forward.servfail()

    def _is_tailnet(self, ip: IPAddress) -> bool:
        driver = self._driver
        return ip in (QUAD100_V4, QUAD100_V6) or ip in self._self_ips or (
            driver is not None and driver.core.peer_for_ip(ip) is not None)

    # --- control updates ---------------------------------------------------------------------------

    def _on_magicsock_event(self, ev: Any) -> None:
        from .magicsock.conn import EndpointsChanged, HomeDerpChanged

        if isinstance(ev, (EndpointsChanged, HomeDerpChanged)) and self._update_wanted is not None:
            self._update_wanted.set()

    async def _lite_updater(self, client: Any) -> None:
        """Send our endpoints and home DERP to control whenever magicsock changes them (coalesced)."""
        from .control.client import ControlError

        while True:
            assert self._update_wanted is not None
            await self._update_wanted.wait()
            self._update_wanted = trio.Event()
            driver = self._driver
            if driver is None:
                continue
            endpoints = tuple(str(e.addr) for e in driver.core.endpoints)
            try:
                await client.send_update(endpoints=endpoints, preferred_derp=driver.core.home_derp or None)
                self.counters["lite_updates"] += 1
            except ControlError as exc:
                self.log.info("lite map update failed: %s", exc)

    # --- queries -----------------------------------------------------------------------------------

    def _require_running(self) -> Any:
        if self._state != "Running" or self._driver is None:
            raise NotRunningError(f"node is {self._state}: call up() first" if not self._closed
                                  else "this Server was closed")
        return self._driver

    def _require_net(self) -> Any:
        self._require_running()
        if self._net is None:
            raise NotRunningError("the netstack is not available in this build (see status().health)")
        return self._net

    def tailscale_ips(self) -> list[IPAddress]:
        """Our tailnet addresses (IPv4 first). Empty until the node is running."""
        nm = self._netmap
        if nm is None or self._state != "Running":
            return []
        ips = [a.ip for a in nm.addresses]
        return [ip for ip in ips if ip.version == 4] + [ip for ip in ips if ip.version == 6]

    def _node_status(self, node: Any, peer: Any | None) -> NodeStatus:
        nm = self._netmap
        hostinfo = getattr(node, "hostinfo", None)
        dns_name = (node.name or "").rstrip(".")
        user = ""
        if nm is not None and node.user is not None:
            prof = nm.user_profiles.get(node.user)
            user = (prof.login_name or "") if prof is not None else ""
        addresses = tuple(ipaddress.ip_interface(a).ip for a in node.addresses or ())
        path, latency, hs, change, rx, tx = "idle", None, None, None, 0, 0
        driver = self._driver
        if peer is not None and driver is not None:
            now = trio.current_time()
            try:
                ps = driver.core.peer_status(peer.key, now)
                wg = driver.core.wg.peer_status(peer.key, now)
            except KeyError:
                ps = wg = None
            if ps is not None and wg is not None:
                latency = ps.latency
                change = _wall(ps.last_change)
                hs = _wall(wg.last_handshake) if wg.last_handshake is not None else None
                rx, tx = wg.rx_bytes, wg.tx_bytes
                if not ps.handshake and wg.last_handshake is None:
                    path = "idle"
                elif ps.kind == "direct" and ps.addr:
                    path = f"direct {ps.addr}"
                elif ps.kind == "peer-relay" and ps.addr:
                    path = f"relay via {self._relay_name(ps.addr)}"
                elif ps.derp_region:
                    path = f"derp region {ps.derp_region}"
        elif peer is None:
            path = "self"
        expired = peer is not None and peer.expired
        if expired:
            path = "expired"
        elif peer is not None and nm is not None and peer in nm.skipped_peers:
            path = "unreachable"  # neither a disco key nor a DERP home: no way to reach it
        return NodeStatus(
            name=dns_name.split(".")[0], dns_name=dns_name, addresses=addresses,
            os=(hostinfo.os or "") if hostinfo is not None else ("linux" if peer is None else ""),
            online=True if peer is None else node.online, path=path, latency=latency,
            last_handshake=hs, last_path_change=change, rx_bytes=rx, tx_bytes=tx,
            key=str(node.key) if node.key is not None else "", id=node.id or 0,
            tags=tuple(node.tags or ()), user=user,
            home_derp=(node.home_derp or 0) if peer is not None else (
                driver.core.home_derp if driver is not None else 0),
            expired=expired,
        )

    def _relay_name(self, addr: str) -> str:
        """The name of the peer relay behind a relay path (``ip:port:vni:N``), else the address."""
        host = addr.rsplit(":vni:", 1)[0]
        host = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        nm = self._netmap
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return addr
        for p in nm.peers if nm is not None else ():
            if any(ep_ip == ip for ep_ip, _port in p.endpoints) or any(a.ip == ip for a in p.addresses):
                return p.name.split(".")[0]
        return addr

    def _health_now(self) -> tuple[str, ...]:
        warnings = list(self._health.values())
        nm = self._netmap
        if nm is not None and nm.self_expired:
            warnings.append("this node's key has expired: it has no peers until it logs in again")
        client = self._client
        if self._state == "Running" and client is not None and not getattr(client, "map_connected", True):
            warnings.append("not connected to the control server (map poll down; retrying)")
        return tuple(warnings)

    def status(self) -> Status:
        """A snapshot: backend state, self, peers (with paths), MagicDNS suffix and health warnings."""
        nm = self._netmap
        state = self._state if self._state != "NoState" else "Stopped"
        if nm is None or state == "Stopped":
            return Status(state, None, (), "", self._health_now(), self._auth_url)
        self_status = self._node_status(nm.self_node, None)
        peers = tuple(self._node_status(p.node, p) for p in (*nm.peers, *nm.skipped_peers))
        suffix = ""
        if self._magic is not None and self._magic.config.base_domain:
            suffix = self._magic.config.base_domain
        elif nm.domain:
            suffix = nm.domain
        return Status(state, self_status, peers, suffix, self._health_now(), self._auth_url)

    def whois(self, address: str) -> WhoIs | None:
        """The node and user behind a tailnet address (``"ip"`` or ``"ip:port"``), or None if unknown."""
        nm = self._netmap
        if nm is None:
            return None
        text = address.strip()
        try:
            ip = ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            try:
                ip = ipaddress.ip_address(_split_host_port(text)[0])
            except (ValueError, ConfigError):
                return None
        candidates = [(nm.self_node, None)] + [(p.node, p) for p in (*nm.peers, *nm.skipped_peers)]
        for node, peer in candidates:
            for a in node.addresses or ():
                if ipaddress.ip_interface(a).ip == ip:
                    prof = nm.user_profiles.get(node.user) if node.user is not None else None
                    user = UserProfile(
                        id=node.user or 0,
                        login_name=(prof.login_name or "") if prof else "",
                        display_name=(prof.display_name or "") if prof else "",
                        profile_pic_url=(prof.profile_pic_url or "") if prof else "",
                    )
                    return WhoIs(self._node_status(node, peer), user)
        return None

    async def wait_for_peer(self, name: str, *, timeout: float = 30.0) -> NodeStatus:
        """Wait until peer ``name`` (short name or FQDN) is in our netmap, so it can be resolved and dialled.

        Useful right after two nodes started together. A first packet needs no further wait:
        while no path to the peer is known yet, magicsock keeps the WireGuard handshake and
        sends it as soon as control tells us one. Raises ``TimeoutError``.
        """
        self._require_running()
        with trio.move_on_after(timeout):
            while True:
                peer = self.status().peer(name)
                if peer is not None:
                    return peer
                await self._netmap_changed.wait()
        raise TimeoutError(f"peer {name!r} did not appear in the netmap within {timeout:g}s")

    async def _upstream_lookup(self, name: str) -> list[IPAddress]:
        """Names MagicDNS does not answer: its routes and resolvers when the tailnet configures them,
        else the host's resolver (as tailscaled uses the OS's DNS when control sets none)."""
        from .dns import system_lookup

        cfg = self._magic.config
        key = name.rstrip(".").lower()
        routed = any(key == suffix or key.endswith("." + suffix) for suffix in cfg.routes)
        if cfg.default_resolvers or routed:
            return await self._magic_upstream(name)
        return await system_lookup(name)

    async def resolve(self, host: str) -> list[IPAddress]:
        """Addresses for ``host``: an IP literal, a MagicDNS short name or FQDN, or an upstream name.

        A single-label name is always a tailnet short name (the MagicDNS search domain), never sent
        upstream. Multi-label names outside the tailnet go to the tailnet's DNS routes/resolvers, or
        the host's resolver when it configures none. Raises :class:`HostNotFoundError`.
        """
        self._require_running()
        from .dns import NameNotFound
        from .dns.resolve import parse_ip_literal

        if parse_ip_literal(host) is None and "." not in host.rstrip("."):
            found = self._magic.lookup(host)
            if found.status != "found" or not found.addresses:
                raise HostNotFoundError(host, f"no tailnet node named {host!r}")
        try:
            return await self._resolver.resolve(host)
        except NameNotFound as exc:
            raise HostNotFoundError(host, "not a tailnet name and not found upstream") from exc
        except OSError as exc:
            raise HostNotFoundError(host, str(exc)) from exc

    async def ping(self, peer: str, *, timeout: float = 5.0) -> PingResult:
        """Disco-ping a peer (name or IP), like ``tailscale ping``: round trip and the path it took.

        ``path`` is ``direct <ip:port>``, ``relay via <relay>`` or ``derp region <id>``: the
        path of the first answered ping (a trusted direct or relay path is pinged alone;
        otherwise DERP and every candidate address, which also helps discover a direct path).
        No WireGuard session is needed. A peer without a disco key gets an ICMP echo over
        WireGuard instead. Unanswered pings are re-sent every second until ``timeout``.
        Raises :class:`HostNotFoundError` for an unknown peer and ``TimeoutError`` without reply.
        """
        driver = self._require_running()
        ips = await self.resolve(peer)
        key = dst = None
        for ip in ips:
            key = driver.core.peer_for_ip(ip)
            if key is not None:
                dst = ip
                break
        if key is None or dst is None:
            raise HostNotFoundError(peer, f"{ips[0] if ips else peer} is not a peer's address")
        st = driver.core.peers.get(key)
        if st is None or st.config.disco_key is None:
            return await self._icmp_ping(peer, key, timeout)
        start = trio.current_time()
        deadline = start + timeout
        while (driver := self._driver) is not None and (remaining := deadline - trio.current_time()) > 0:
            try:
                r = await driver.disco_ping(key, timeout=min(1.0, remaining))
            except TimeoutError:
                continue
            except (KeyError, ValueError):
                # Not in this driver's peers (yet), or no path known yet: wait for the next netmap.
                with trio.move_on_after(min(0.2, remaining)):
                    await self._netmap_changed.wait()
                continue
            name = next((p.name for p in self.status().peers if p.key == str(key)), peer)
            path = f"relay via {self._relay_name(r.addr)}" if r.kind == "peer-relay" and r.addr else r.path
            return PingResult(name, dst, r.latency, path)
        raise TimeoutError(f"no pong from {peer} ({dst}) within {trio.current_time() - start:.1f}s")

    async def _icmp_ping(self, peer: str, key: Any, timeout: float) -> PingResult:
        """ICMP echo over WireGuard, for peers that cannot answer disco pings."""
        driver = self._require_running()
        ips = [ip for ip in await self.resolve(peer) if ip.version == 4]
        src = next((ip for ip in self._self_ips if ip.version == 4), None)
        if not ips or src is None:
            raise HostNotFoundError(peer, "no IPv4 tailnet address to ping")
        dst = ips[0]
        start = trio.current_time()
        with trio.move_on_after(timeout):
            while True:
                self._ping_seq = (self._ping_seq + 1) & 0xFFFF
                token = (self._ping_ident, self._ping_seq)
                event = trio.Event()
                self._pings[token] = event
                sent = trio.current_time()
                driver.send_ip_packet(_icmp4_echo(src, dst, *token))
                with trio.move_on_after(1.0):
                    await event.wait()
                self._pings.pop(token, None)
                if event.is_set() and self._driver is not None:
                    latency = trio.current_time() - sent
                    st = next((p for p in self.status().peers if p.key == str(key)), None)
                    return PingResult(st.name if st else peer, dst, latency, st.path if st else "unknown")
                if self._driver is None:
                    break
        raise TimeoutError(f"no ping reply from {peer} ({dst}) within {trio.current_time() - start:.1f}s")

    async def netcheck(self) -> dict[str, Any]:
        """Run a netcheck (STUN to the DERP regions) and return its report as a JSON-able dict."""
        driver = self._require_running()
        before = driver.core.last_report
        driver.core.restun(trio.current_time())
        driver._pump()
        with trio.move_on_after(5.0):
            while driver.core.last_report is before:
                await trio.sleep(0.02)  # library polling of the core's result, bounded
        report = driver.core.last_report
        result = report.as_dict() if report is not None else {"udp": False}
        result["home_derp"] = driver.core.home_derp
        return result

    def metrics(self) -> dict[str, float]:
        """Counters and gauges: packets/bytes by path, handshakes, DERP and control state, peer relay client and server."""
        out: dict[str, float] = {f"tsnet_{k}": float(v) for k, v in self.counters.items()}
        out["tsnet_running"] = 1.0 if self._state == "Running" else 0.0
        if self._client is not None:
            out["tsnet_control_map_connected"] = 1.0 if getattr(self._client, "map_connected", False) else 0.0
        for phase, seconds in self._startup.items():
            out[f"tsnet_startup_{phase}_seconds"] = seconds
        driver, client = self._driver, self._client
        if client is not None:
            out["tsnet_control_logged_in"] = 1.0 if client.logged_in else 0.0
            for k, v in client.counters.items():
                out[f"tsnet_control_{k}"] = float(v)
        if driver is not None:
            for k, v in driver.counters.items():
                out[f"tsnet_magicsock_{k}"] = float(v)
            for k, v in driver.core.counters.items():
                out[f"tsnet_magicsock_core_{k}"] = float(v)
            # The peer-relay client side: allocations asked for and answered, binds, relay paths found.
            for k, v in driver.core.relay.counters.items():
                out[f"tsnet_relay_client_{k}"] = float(v)
            out["tsnet_relay_client_servers"] = float(len(driver.core.relay.servers))
            rx = tx = 0
            now = trio.current_time()
            for key in list(driver.core.peers):
                try:
                    wg = driver.core.wg.peer_status(key, now)
                except KeyError:
                    continue
                rx += wg.rx_bytes
                tx += wg.tx_bytes
            out["tsnet_wireguard_rx_bytes"] = float(rx)
            out["tsnet_wireguard_tx_bytes"] = float(tx)
            out["tsnet_derp_home_region"] = float(driver.core.home_derp)
            out["tsnet_derp_connections"] = float(len(getattr(driver.regions, "clients", {}) or {}))
            kinds = {"direct": 0, "peer-relay": 0, "derp": 0, "none": 0}
            for ps in driver.status():
                kinds[ps.kind] = kinds.get(ps.kind, 0) + 1
            for k, v in kinds.items():
                out[f"tsnet_peers_path_{k.replace('-', '_')}"] = float(v)
            relay = driver.relay_server
            if relay is not None:
                out["tsnet_relay_server_running"] = 1.0
                for state, count in relay.endpoint_gauge().items():
                    out[f"tsnet_relay_server_endpoints_{state}"] = float(count)
                out["tsnet_relay_server_forwarded_packets"] = float(sum(relay.forwarded_packets.values()))
                out["tsnet_relay_server_forwarded_bytes"] = float(sum(relay.forwarded_bytes.values()))
        if self._filter is not None:
            for k, v in (getattr(self._filter, "counters", None) or {}).items():
                out[f"tsnet_filter_{k}"] = float(v)
        return out

    # --- connections -------------------------------------------------------------------------------

    @overload
    async def dial(self, network: _TCPNetwork, address: str, *, timeout: float | None = None) -> TCPStream: ...
    @overload
    async def dial(self, network: _UDPNetwork, address: str, *, timeout: float | None = None) -> UDPSocket: ...
    @overload
    async def dial(self, network: str, address: str, *,
                   timeout: float | None = None) -> TCPStream | UDPSocket: ...

    async def dial(self, network: str, address: str, *, timeout: float | None = None) -> TCPStream | UDPSocket:
        """Connect to ``address`` (``host:port``) over the tailnet.

        ``network`` is ``tcp``/``tcp4``/``tcp6`` (returns a netstack ``TCPStream``, a trio
        HalfCloseableStream) or ``udp``/``udp4``/``udp6`` (a connected netstack ``UDPSocket``).
        ``host`` may be an IP (IPv6 in brackets: ``[fd7a::1]:80``), a MagicDNS short name or FQDN;
        the port a number or a service name (``db:postgresql``). ``timeout`` bounds the whole dial.
        Raises :class:`ConfigError` (malformed address, port 0), :class:`HostNotFoundError`,
        ``ConnectionRefusedError`` (closed port), ``TimeoutError``, :class:`NotRunningError`.
        Cancelling a dial leaves no half-open connection behind.
        """
        net = self._require_net()
        family = self._family(network)
        host, port = _split_host_port(address)
        if not host:
            raise ConfigError(f"dial {address!r}: missing host")
        if port == 0:
            raise ConfigError(f"dial {address!r}: port 0 cannot be dialled")
        ips = await self.resolve(host)
        if family:
            ips = [ip for ip in ips if ip.version == family]
        if not ips:
            raise HostNotFoundError(host, f"no IPv{family} address" if family else "no address")
        proto = network.rstrip("46")
        # ``timeout`` bounds the whole dial, across every address the name has.
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        error: BaseException | None = None
        for ip in ips:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            if not self._is_tailnet(ip):
                # Only tailnet addresses are reachable through the node: fail now, not after a timeout.
                error = OSError(errno.EHOSTUNREACH, f"{ip} is not on the tailnet (no peer has it in AllowedIPs)")
                continue
            try:
                if proto == "tcp":
                    return await net.open_tcp_stream(str(ip), port, timeout=None if timeout is None else remaining)
                sock = await net.open_udp_socket()
                try:
                    await sock.connect((str(ip), port))
                except BaseException:
                    await sock.aclose()
                    raise
                return sock
            except OSError as exc:
                error = exc
        if error is None:
            raise TimeoutError(f"dial {address}: timed out after {timeout}s")
        raise error

    @staticmethod
    def _family(network: str) -> int:
        if network not in ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"):
            raise ConfigError(f"unsupported network {network!r}: use tcp, tcp4, tcp6, udp, udp4 or udp6")
        return int(network[-1]) if network[-1] in "46" else 0

    @overload
    async def listen(self, network: _TCPNetwork, address: str) -> TCPListener: ...
    @overload
    async def listen(self, network: _UDPNetwork, address: str) -> UDPSocket: ...
    @overload
    async def listen(self, network: str, address: str) -> TCPListener | UDPSocket: ...

    async def listen(self, network: str, address: str) -> TCPListener | UDPSocket:
        """Listen on the tailnet: ``listen("tcp", ":8080")`` -> ``TCPListener`` (a trio Listener);
        ``listen("udp", ":53")`` -> ``UDPSocket``.

        As in Go tsnet, the host part is empty (or ``0.0.0.0`` / ``::``) for all our addresses,
        or one of our IP literals; the port may be 0 (a free one: see ``.port`` /
        ``.getsockname()``) or a service name (``:http``). ``tcp4``/``udp4`` (``tcp6``/``udp6``)
        take only IPv4 (IPv6) traffic. Raises :class:`ConfigError` for a malformed address,
        ``OSError`` ``EADDRINUSE`` when the port is taken and ``EADDRNOTAVAIL`` for an address
        that is not ours.
        """
        net = self._require_net()
        family = self._family(network)
        host, port = _split_host_port(address)
        bind: IPAddress | None = None
        if host:
            try:
                bind = ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"listen {address!r}: the host must be empty or an IP literal (one of "
                                  f"ours), not a name") from None
            if family and bind.version != family:
                raise ConfigError(f"listen {address!r}: not an IPv{family} address, as {network!r} needs")
            if bind.is_unspecified:
                bind = None
        if bind is None and family:
            # One family only: listen on our address of that family (the netstack's wildcard takes both).
            bind = next((ip for ip in self.tailscale_ips() if ip.version == family), None)
            if bind is None:
                raise OSError(errno.EADDRNOTAVAIL, f"this node has no IPv{family} tailnet address")
        if network.startswith("udp"):
            return await net.open_udp_socket(host=bind, port=port)
        return await net.open_tcp_listener(port, host=bind)

    async def listen_packet(self, network: str, address: str) -> UDPSocket:
        """A UDP socket on the tailnet (``network`` udp/udp4/udp6), like Go's ListenPacket."""
        if not network.startswith("udp"):
            raise ConfigError(f"listen_packet needs a udp network, got {network!r}")
        sock = await self.listen(network, address)
        assert not isinstance(sock, trio.abc.Listener)
        return sock

    async def loopback(self) -> LoopbackProxy:
        """Start (once) a SOCKS5 + HTTP proxy on 127.0.0.1 that dials over the tailnet.

        Returns a :class:`tsnet.proxy.LoopbackProxy` (``address``, ``credentials``, ``socks5_url``,
        ``http_url``). Names resolve through MagicDNS; non-tailnet addresses are dialled from this
        host directly, like tailscaled's proxies.
        """
        self._require_running()
        from .proxy import ProxyServer, route_by_address, route_udp_by_address

        assert self._loopback_lock is not None
        async with self._loopback_lock:
            if self._loopback is None:
                proxy = ProxyServer(
                    route_by_address(self._is_tailnet, self._proxy_dial),
                    dial_udp=route_udp_by_address(self._is_tailnet, self._proxy_dial_udp),
                    resolve=self.resolve,
                    credentials=ProxyServer.generate_credentials(),
                )
                assert self._nursery is not None
                self._loopback = await self._nursery.start(proxy.serve, "127.0.0.1", 0)
                self._proxy = proxy
            return self._loopback

    async def _proxy_dial(self, host: str, port: int) -> Any:
        return await self._require_net().open_tcp_stream(host, port, timeout=30.0)

    async def _proxy_dial_udp(self, host: str, port: int) -> Any:
        sock = await self._require_net().open_udp_socket()
        await sock.connect((host, port))
        return _UDPFlow(sock)

    async def serve_forward(self, port: int, target: str, *,
                            task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward tailnet connections on ``:port`` to ``target`` (``host:port`` on this host's network).

        Runs until cancelled; each connection is spliced both ways with half-close. With
        ``await nursery.start(srv.serve_forward, port, target)`` it returns once listening.
        """
        from .proxy.splice import splice

        host, tport = _split_host_port(target)
        listener = await self.listen("tcp", f":{port}")

        async def handle(stream: Any) -> None:
            try:
                upstream = await trio.open_tcp_stream(host or "127.0.0.1", tport)
            except OSError as exc:
                self.log.info("serve_forward :%d -> %s: %s", port, target, exc)
                await trio.aclose_forcefully(stream)
                return
            await splice(stream, upstream)

        async with listener:
            try:
                await trio.serve_listeners(handle, [listener], task_status=task_status)
            except* trio.ClosedResourceError:
                pass  # the node was closed

    def http_client(self, **kwargs: Any) -> Any:
        """An ``httpx.AsyncClient`` whose connections go over the tailnet (names via MagicDNS).

        Needs ``httpx`` (and its ``httpcore``); keyword arguments go to ``httpx.AsyncClient``.
        Use it inside the trio run of this Server, e.g. ``async with srv.http_client() as c:``.
        """
        from ._httpx import tailnet_async_client

        return tailnet_async_client(self, **kwargs)


class _Forward:
    """A task_status that reports ``value`` instead of what the wrapped task passes to ``started``."""

    def __init__(self, status: Any, value: Any) -> None:
        self.status, self.value = status, value

    def started(self, _value: Any = None) -> None:
        self.status.started(self.value)


class _UDPFlow:
    """A connected netstack UDP socket as the proxies' ``UDPConnection``."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def receive(self) -> bytes:
        return await self.sock.recv(65535)

    async def aclose(self) -> None:
        await self.sock.aclose()


def _find_tsnet_error(exc: BaseException) -> TsnetError | None:
    """The first TsnetError in ``exc`` (looking inside exception groups)."""
    if isinstance(exc, TsnetError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find_tsnet_error(sub)
            if found is not None:
                return found
    return None
