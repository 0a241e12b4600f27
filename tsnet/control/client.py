"""The control client (trio driver): server key, ts2021 connection, register, map poll.

Typical use::

    async with ControlClient(config) as client:
        await client.login()                       # register (auth key, or AuthURL shown)
        await client.run(on_netmap)                # long-poll forever, reconnecting

``on_netmap`` receives an immutable :class:`~tsnet.control.netmap.NetworkMap`
after every map message that changed something. The protocol logic (delta
application) lives in the sans-IO :mod:`tsnet.control.netmap`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import logging
import secrets
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import trio

from ..key import DiscoPublic, MachinePrivate, MachinePublic, NodePrivate, NodePublic
from . import tailcfg
from . import conn as ts2021
from .h2conn import H2Client, H2Error
from .netmap import MapFrameDecoder, MapSession, MapSessionError, NetworkMap, _shift
from .noise import HandshakeError, NoiseError

__all__ = [
    "ClientConfig",
    "ControlClient",
    "ControlError",
    "LoginError",
    "LoginURL",
    "NeedsLogin",
    "fetch_server_key",
    "parse_login_url",
]

log = logging.getLogger("tsnet.control.client")

WATCHDOG_SECONDS = 120.0
#: The expiry timer re-reads the wall clock at least this often (it may jump, e.g. after suspend).
EXPIRY_RECHECK_SECONDS = 60.0
_ZERO_NL = "nlpub:" + "0" * 64


class _Signal:
    """A re-armable wake-up: :meth:`fire` wakes the current waiters and arms a fresh event."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class ControlError(Exception):
    """Talking to the control server failed (network, protocol or HTTP status)."""


class LoginError(ControlError):
    """The server refused the login (bad or expired auth key, ...)."""


class NeedsLogin(ControlError):
    """The server no longer knows this node key (deleted or logged out by an admin)."""


@dataclass(frozen=True, slots=True)
class LoginURL:
    """Where to reach a control server, derived from its login URL."""

    url: str
    scheme: str
    host: str
    port: int
    #: Plain-HTTP port for /ts2021 (tried first), and the TLS port (None = no TLS fallback).
    http_port: int
    https_port: int | None
    path: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress

        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private


def parse_login_url(url: str) -> LoginURL:
    """Parse a login URL and derive the ts2021 ports the way tailscaled does."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"login URL must be http:// or https:// with a host, got {url!r}")
    host = parts.hostname
    if parts.scheme == "https":
        port = parts.port or 443
        return LoginURL(url, "https", host, port, 80, port, parts.path.rstrip("/"))
    port = parts.port or 80
    https = None if _is_local(host) else 443
    return LoginURL(url, "http", host, port, port, https, parts.path.rstrip("/"))


async def _open(
    host: str, port: int, tls: bool, verify: bool = True, context: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    tcp = await trio.open_tcp_stream(host, port)
    if not tls:
        return tcp
    if verify:
        ctx = context or ssl.create_default_context()
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    stream = trio.SSLStream(tcp, ctx, server_hostname=host)
    await stream.do_handshake()
    return stream


async def fetch_server_key(
    login: LoginURL, version: int = tailcfg.CURRENT_CAPABILITY_VERSION, *, ssl_context: ssl.SSLContext | None = None
) -> MachinePublic:
    """``GET /key?v=N``: the server's Noise public key (TLS verified with ``ssl_context`` or system roots)."""
    try:
        stream = await _open(login.host, login.port, login.scheme == "https", context=ssl_context)
    except trio.BrokenResourceError as exc:  # trio reports TLS failures this way
        raise ControlError(f"/key: TLS: {exc.__cause__ or exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ControlError(f"/key: cannot connect to {login.authority}: {exc}") from None
    try:
        conn = h11.Connection(h11.CLIENT)
        target = f"{login.path}/key?v={version}"
        req = h11.Request(method="GET", target=target, headers=[("Host", login.authority), ("Connection", "close")])
        await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > 64 * 1024:
                    raise ControlError("/key answer too large")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except h11.ProtocolError as exc:
        raise ControlError(f"/key: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)
    if status != 200:
        raise ControlError(f"/key: HTTP {status}: {bytes(body[:200])!r}")
    try:
        answer = tailcfg.decode(tailcfg.OverTLSPublicKeyResponse, bytes(body))
    except tailcfg.DecodeError:
        raise ControlError("control server is too old; no noise key") from None
    if answer.public_key is None or answer.public_key.is_zero():
        raise ControlError("control server is too old; no noise key")
    return answer.public_key


def _refusal_text(body: bytes) -> str:
    """The reason in a refused register answer: its RegisterResponse.Error, else its text."""
    try:
        resp = tailcfg.decode(tailcfg.RegisterResponse, body)
    except tailcfg.DecodeError:
        resp = None
    if resp is not None and resp.error:
        return resp.error
    text = body[:200].decode("utf-8", "replace").strip()
    if resp is not None or not text:
        return "the server refused the auth key or credentials (no reason given)"
    return text


def _print_auth_url(url: str) -> None:
    print(f"\nTo authenticate, visit:\n\n\t{url}\n", file=sys.stderr, flush=True)


@dataclass(slots=True)
class ClientConfig:
    """Identity and login settings of one node."""

    control_url: str
    machine_key: MachinePrivate
    node_key: NodePrivate
    disco_key: DiscoPublic
    hostname: str
    auth_key: str | None = None
    ephemeral: bool = False
    tags: tuple[str, ...] = ()
    backend_log_id: str = field(default_factory=lambda: secrets.token_hex(32))
    version: int = tailcfg.CURRENT_CAPABILITY_VERSION
    ipn_version: str = "1.96.4-tsnet"
    on_auth_url: Callable[[str], None] = _print_auth_url
    #: Trust for ``GET /key`` over https (default: system roots). ts2021 itself is authenticated by Noise.
    ssl_context: ssl.SSLContext | None = None
    #: Wall clock (timezone-aware) for key-expiry decisions; tests substitute a fake one.
    wall_clock: Callable[[], _dt.datetime] = field(default=lambda: _dt.datetime.now(_dt.timezone.utc))


class ControlClient:
    """One node's connection to its control server."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.login_url = parse_login_url(config.control_url)
        self.server_key: MachinePublic | None = None
        self.old_node_key: NodePublic | None = None
        self.endpoints: tuple[str, ...] = ()
        self.preferred_derp = 0
        self.netmap: NetworkMap | None = None
        self.logged_in = False
        #: Set by :meth:`logout`; :meth:`run` then returns instead of logging in again.
        self.logged_out = False
        self._h2: H2Client | None = None
        self._last_ping_url: str | None = None
        #: Optional c2n handler: (method, path, body) -> (status, body). ``/echo`` is built in.
        self.c2n_handler: Callable[[str, str, bytes], tuple[int, bytes]] | None = None
        self._conn_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: object | None = None
        self.counters = {"dials": 0, "polls": 0, "map_messages": 0, "keepalives": 0, "key_changes": 0}
        #: True while a map long-poll is open and streaming (health checks read it).
        self.map_connected = False
        # Control's clock minus ours, from the last poll (expiry is judged on control's clock).
        self._clock_delta = _dt.timedelta(0)

    async def __aenter__(self) -> ControlClient:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        try:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self._drop_conn()
        finally:
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            return await self._nursery_cm.__aexit__(*exc)  # type: ignore[attr-defined]

    # -- connection ----------------------------------------------------------------------------

    def hostinfo(self) -> tailcfg.Hostinfo:
        return tailcfg.Hostinfo(
            ipn_version=self.config.ipn_version,
            backend_log_id=self.config.backend_log_id,
            os="linux",
            hostname=self.config.hostname,
            request_tags=self.config.tags or None,
            userspace=True,
            userspace_router=True,
            no_logs_no_support=True,
            net_info=tailcfg.NetInfo(preferred_derp=self.preferred_derp) if self.preferred_derp else None,
        )

    async def _dial(self) -> ts2021.DialResult:
        lu = self.login_url
        if self.server_key is None:
            self.server_key = await fetch_server_key(lu, self.config.version, ssl_context=self.config.ssl_context)
        attempts: list[tuple[int, bool]] = [(lu.http_port, False)]
        if lu.https_port is not None:
            attempts.append((lu.https_port, True))
        last: BaseException | None = None
        for port, tls in attempts:
            try:
                with trio.fail_after(15):
                    stream = await _open(lu.host, port, tls, verify=False)  # Noise authenticates
                    host = lu.host if port in (80, 443) else f"{lu.host}:{port}"
                    try:
                        return await ts2021.handshake_over(
                            stream, host=host, machine_key=self.config.machine_key, server_key=self.server_key,
                            version=self.config.version,
                        )
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
            except (HandshakeError, ts2021.controlhttp.UpgradeError, NoiseError) as exc:
                # A server that cannot authenticate us closes the connection right after the 101:
                # perhaps its key changed. Refetch it; the caller's retry then uses the new one.
                try:
                    new_key = await fetch_server_key(lu, self.config.version, ssl_context=self.config.ssl_context)
                except (OSError, ControlError):
                    new_key = self.server_key
                if new_key != self.server_key:
                    self.counters["key_changes"] += 1
                    self.server_key = new_key
                last = exc
            except (OSError, trio.TooSlowError, ssl.SSLError, trio.BrokenResourceError) as exc:
                last = exc
        raise ControlError(f"cannot connect to {lu.url}: {last}")

    async def _client(self) -> H2Client:
        async with self._conn_lock:
            if self._h2 is not None and not self._h2.closed.is_set():
                return self._h2
            self.counters["dials"] += 1
            result = await self._dial()
            h2c = H2Client(result.stream, self.login_url.authority)
            h2c._start()
            await h2c.flush()
            assert self._nursery is not None, "use ControlClient as an async context manager"
            self._nursery.start_soon(h2c._read_loop, h2c.on_event)
            self._h2 = h2c
            return h2c

    async def _drop_conn(self) -> None:
        h2c, self._h2 = self._h2, None
        if h2c is not None:
            await h2c.aclose()

    async def _post(
        self, path: str, body: bytes, *, lb_keys: tuple[NodePublic, ...] | None = None
    ) -> tuple[int, bytes]:
        """POST over Noise with one ``ts-lb`` header per non-zero key (default: our node key)."""
        keys = lb_keys if lb_keys is not None else (self.config.node_key.public,)
        try:
            client = await self._client()
            resp = await client.request("POST", self.login_url.path + path, body=body,
                                        headers=[("ts-lb", str(k)) for k in keys if not k.is_zero()])
            data = await resp.read(limit=1 << 20)
        except (H2Error, OSError, trio.BrokenResourceError) as exc:
            await self._drop_conn()
            raise ControlError(f"{path}: {exc}") from None
        return resp.status, data

    # -- register / login / logout -------------------------------------------------------------

    async def _register(self, request: tailcfg.RegisterRequest) -> tailcfg.RegisterResponse:
        # As tailscaled: the load-balancer hint names the old key first when rotating, so the
        # request reaches the control shard that knows the node.
        lb_keys = tuple(k for k in (request.old_node_key, request.node_key) if k is not None)
        status, data = await self._post("/machine/register", tailcfg.dumps(request), lb_keys=lb_keys)
        if status in (401, 403):
            # Some servers (Headscale) refuse a bad auth key with 401 and a RegisterResponse body
            # (perhaps with no Error text): that is a refused login, not an unreachable server.
            raise LoginError(f"register refused (http {status}): {_refusal_text(data)}")
        if status != 200:
            raise ControlError(f"register request: http {status}: {data[:200].decode('utf-8', 'replace')}")
        try:
            return tailcfg.decode(tailcfg.RegisterResponse, data)
        except tailcfg.DecodeError as exc:
            raise ControlError(f"bad register response: {exc}") from None

    def _register_request(self, *, auth: bool, followup: str = "", expiry: _dt.datetime | None = None) -> tailcfg.RegisterRequest:
        cfg = self.config
        return tailcfg.RegisterRequest(
            version=cfg.version,
            node_key=cfg.node_key.public,
            old_node_key=self.old_node_key or NodePublic.zero(),
            nl_key=_ZERO_NL,
            auth=tailcfg.RegisterResponseAuth(auth_key=cfg.auth_key) if auth and cfg.auth_key else None,
            expiry=expiry or _dt.datetime(1, 1, 1, tzinfo=_dt.timezone.utc),
            followup=followup,
            hostinfo=self.hostinfo(),
            ephemeral=cfg.ephemeral,
        )

    def rotate_node_key(self) -> None:
        """Start using a fresh node key; the old one is sent as OldNodeKey on the next register."""
        self.old_node_key = self.config.node_key.public
        self.config.node_key = NodePrivate.generate()

    async def login(self) -> tailcfg.RegisterResponse:
        """Register the node key: without credentials first if it may be known, else with the auth key.

        Shows ``AuthURL`` through ``config.on_auth_url`` and waits when the server asks
        for interactive login. Raises :class:`LoginError` on a refusal.
        """
        use_auth = True
        followup = ""
        regenerated = False
        for _ in range(20):
            resp = await self._register(self._register_request(auth=use_auth, followup=followup))
            if resp.error:
                raise LoginError(resp.error)
            if resp.node_key_expired:
                if regenerated:
                    raise LoginError("server says the freshly generated node key is expired")
                self.rotate_node_key()
                regenerated = True
                continue
            if resp.auth_url:
                if resp.auth_url != followup:
                    self.config.on_auth_url(resp.auth_url)
                followup = resp.auth_url
                continue
            self.logged_in = True
            self.logged_out = False
            self.old_node_key = None
            return resp
        raise LoginError("login did not complete")

    async def logout(self) -> None:
        """Expire this node key at the server (ephemeral nodes are deleted) and forget it."""
        resp = await self._register(self._register_request(auth=False, expiry=tailcfg.LOGOUT_EXPIRY))
        if resp.error:
            raise LoginError(resp.error)
        self.logged_in = False
        self.logged_out = True
        self.config.node_key = NodePrivate.generate()
        self.old_node_key = None

    # -- map -----------------------------------------------------------------------------------

    def _map_request(self, *, stream: bool) -> tailcfg.MapRequest:
        cfg = self.config
        return tailcfg.MapRequest(
            version=cfg.version,
            compress="zstd",
            keep_alive=True,
            node_key=cfg.node_key.public,
            disco_key=cfg.disco_key,
            stream=True if stream else None,
            omit_peers=None if stream else True,
            hostinfo=self.hostinfo(),
            endpoints=self.endpoints or None,
            endpoint_types=tuple(1 for _ in self.endpoints) or None,
        )

    async def send_update(
        self,
        *,
        endpoints: tuple[str, ...] | None = None,
        preferred_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
    ) -> None:
        """A lite map update: new endpoints / home DERP / disco key reach the server and the peers."""
        if disco_key is not None:
            self.config.disco_key = disco_key
        if endpoints is not None:
            self.endpoints = tuple(endpoints)
        if preferred_derp is not None:
            self.preferred_derp = preferred_derp
        status, data = await self._post("/machine/map", tailcfg.dumps(self._map_request(stream=False)))
        if status != 200:
            raise ControlError(f"lite map update: http {status}: {data[:200].decode('utf-8', 'replace')}")

    async def _lite_update_quietly(self) -> None:
        try:
            await self.send_update()
        except ControlError as exc:
            log.info("lite update failed: %s", exc)

    async def poll_once(self, on_netmap: Callable[[NetworkMap], object]) -> None:
        """One long poll: returns when the server ends it; raises on errors and the 120 s watchdog."""
        self.counters["polls"] += 1
        try:
            client = await self._client()
            with trio.CancelScope(deadline=trio.current_time() + WATCHDOG_SECONDS) as watchdog:
                resp = await client.request(
                    "POST", self.login_url.path + "/machine/map",
                    body=tailcfg.dumps(self._map_request(stream=True)),
                    headers=[("ts-lb", str(self.config.node_key.public))],
                )
                if resp.status != 200:
                    body = await resp.read(limit=4096)
                    text = body[:200].decode("utf-8", "replace")
                    if resp.status in (400, 401, 403) and ("unknown node" in text or "logged out" in text):
                        raise NeedsLogin(f"map: http {resp.status}: {text}")
                    raise ControlError(f"map: http {resp.status}: {text}")
                decoder = MapFrameDecoder()
                session = MapSession()
                self.map_connected = True
                changed, timer_scope = _Signal(), trio.CancelScope()
                try:
                    with trio.CancelScope() as poll_scope:
                        assert self._nursery is not None, "use ControlClient as an async context manager"
                        self._nursery.start_soon(
                            self._expiry_timer, session, on_netmap, changed, poll_scope, timer_scope
                        )
                        async for chunk in resp.iter_chunks():
                            for msg in decoder.feed(chunk):
                                watchdog.deadline = trio.current_time() + WATCHDOG_SECONDS
                                self.counters["map_messages"] += 1
                                if msg.ping_request is not None:
                                    self._on_ping(msg.ping_request)
                                nm = session.apply(msg, self.config.wall_clock())
                                self._clock_delta = session.clock_delta
                                if nm is None:
                                    self.counters["keepalives"] += 1
                                    continue
                                self.netmap = nm
                                on_netmap(nm)
                                changed.fire()
                                if nm.self_expired:
                                    break  # run() renews the key and polls again
                            else:
                                continue
                            break
                finally:
                    timer_scope.cancel()
                    self.map_connected = False
                    with trio.CancelScope(shield=True):
                        await resp.aclose()
            if watchdog.cancelled_caught:
                raise ControlError("map poll watchdog: no message for 120 s")
        except (H2Error, OSError, trio.BrokenResourceError, MapSessionError) as exc:
            await self._drop_conn()
            raise ControlError(f"map poll: {exc}") from None

    async def _expiry_timer(
        self,
        session: MapSession,
        on_netmap: Callable[[NetworkMap], object],
        changed: _Signal,
        poll_scope: trio.CancelScope,
        timer_scope: trio.CancelScope,
    ) -> None:
        """Re-judge key expiry when a key expires with no word from control (as tailscaled's timer).

        A peer whose key expired leaves the netmap; when our own key expires the peers go and
        ``poll_scope`` is cancelled so that :meth:`run` logs in with a new key. Runs until
        ``timer_scope`` is cancelled (the poll's end).
        """
        with timer_scope:
            await self._expiry_loop(session, on_netmap, changed, poll_scope)

    async def _expiry_loop(
        self,
        session: MapSession,
        on_netmap: Callable[[NetworkMap], object],
        changed: _Signal,
        poll_scope: trio.CancelScope,
    ) -> None:
        while True:
            now = self.config.wall_clock()
            at = session.next_expiry(now)
            delay = EXPIRY_RECHECK_SECONDS if at is None else (at - now).total_seconds()
            with trio.move_on_after(max(0.0, min(delay, EXPIRY_RECHECK_SECONDS))):
                await changed.wait()
                continue  # a new netmap: its expiries may differ
            nm = session.refresh(self.config.wall_clock())
            if nm is None:
                continue
            self.counters["expiry_refreshes"] = self.counters.get("expiry_refreshes", 0) + 1
            self.netmap = nm
            on_netmap(nm)
            if nm.self_expired:
                poll_scope.cancel()
                return

    # -- control-to-node (PingRequest) ----------------------------------------------------------

    def _on_ping(self, ping: tailcfg.PingRequest) -> None:
        if not ping.url or ping.url == self._last_ping_url:
            return  # the same URL again is a repeat, not a new request
        self._last_ping_url = ping.url
        if self._nursery is not None:
            self._nursery.start_soon(self._answer_ping, ping)

    async def _answer_ping(self, ping: tailcfg.PingRequest) -> None:
        """Answer a PingRequest: HEAD for a plain ping, serve and POST back for c2n (both over Noise)."""
        parts = urlsplit(ping.url or "")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc or self.login_url.authority
        try:
            client = await self._client()
            if ping.types == "c2n":
                raw = base64.b64decode(ping.payload or "")
                reply = self.serve_c2n(raw)
                resp = await client.request("POST", target, body=reply, authority=authority)
            elif not ping.types and ping.url_is_noise:
                resp = await client.request("HEAD", target, authority=authority)
            else:
                log.debug("ignoring PingRequest of type %r", ping.types)
                return
            await resp.read(limit=64 * 1024)
            self.counters["pings_answered"] = self.counters.get("pings_answered", 0) + 1
        except (ControlError, H2Error, OSError, binascii.Error) as exc:
            log.info("answering PingRequest failed: %s", exc)

    def serve_c2n(self, raw_request: bytes) -> bytes:
        """Serve one c2n HTTP/1.1 request and return the raw HTTP/1.1 response.

        Built in: ``/echo`` (answers the request body). Other paths go to
        ``self.c2n_handler(method, path, body) -> (status, body)`` if set, else 404.
        """
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(raw_request)
        conn.receive_data(b"")
        method, path, body = "", "", bytearray()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    method, path = event.method.decode(), event.target.decode()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif event is h11.NEED_DATA or isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        except h11.ProtocolError:
            status, out = 400, b"bad request\n"
        else:
            if path.split("?", 1)[0] == "/echo":
                status, out = 200, bytes(body)
            elif self.c2n_handler is not None:
                status, out = self.c2n_handler(method, path, bytes(body))
            else:
                status, out = 404, b"not found\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Status")
        return f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(out)}\r\n\r\n".encode() + out

    def self_expired(self, now: _dt.datetime | None = None) -> bool:
        """Whether our node key has expired (control's flag, or KeyExpiry on control's clock)."""
        nm = self.netmap
        if nm is None:
            return False
        if nm.self_node.key is not None and nm.self_node.key != self.config.node_key.public:
            return False  # that netmap judged a key we have since replaced
        if nm.self_expired:
            return True
        now = _shift(now or self.config.wall_clock(), self._clock_delta)
        exp = nm.self_node.key_expiry
        return bool(nm.self_node.expired) or (exp is not None and exp.year > 1 and exp <= now)

    async def run(
        self,
        on_netmap: Callable[[NetworkMap], object],
        *,
        max_backoff: float = 30.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Log in if needed, then long-poll forever with exponential backoff between failures.

        When the node key expires, a new one is registered with the auth key (renewal).
        """
        backoff = 0.5
        started = False
        while not self.logged_out:
            try:
                if not self.logged_in or self.self_expired():
                    if self.self_expired():
                        self.rotate_node_key()
                    await self.login()
                    # Like tailscaled: a lite update alongside the first poll, since servers may
                    # ignore Hostinfo/endpoints carried by the long-poll request itself.
                    if self._nursery is not None:
                        self._nursery.start_soon(self._lite_update_quietly)
                if not started:
                    started = True
                    task_status.started()
                started_at = trio.current_time()
                await self.poll_once(on_netmap)
                if trio.current_time() - started_at < 1.0:
                    await trio.sleep(backoff)  # the server keeps ending polls at once: do not spin
                    backoff = min(max_backoff, backoff * 2)
                else:
                    backoff = 0.5
            except LoginError:
                raise
            except NeedsLogin as exc:
                log.info("control: %s; logging in again", exc)
                self.logged_in = False
                self.rotate_node_key()
                await trio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)
            except ControlError as exc:
                log.info("control: %s; retrying in %.1fs", exc, backoff)
                await trio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)

