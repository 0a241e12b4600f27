"""The coordination server: what tailscaled and our client talk to.

One listener serves ``GET /key``, ``POST /ts2021`` (Noise + HTTP/2, carrying
``/machine/register`` and ``/machine/map``), ``/generate_204`` and, when an
embedded DERP server is attached, ``/derp``. State lives in a
:class:`~tsnet.control.store.Store`.

Map long-polls are per-node sessions. Every state change bumps a generation
and wakes all sessions; each session recomputes its node's view and sends only
what differs from what that session already sent (``PeersChanged``,
``PeersRemoved``, a new self ``Node``, filter, DNS, DERP map), so peers see
changes within one scheduling round. A quiet session sends ``{"KeepAlive":true}``
every ``keepalive_interval`` seconds.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import os
import re
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import zstandard

from ..key import DiscoPublic, MachinePrivate, MachinePublic, NodePublic
from . import controlhttp, tailcfg
from . import conn as ts2021
from .h2conn import H2Request, H2ResponseWriter, serve_h2
from .httpd import HTTPRequest, Reply, Takeover, serve_http1
from .jsoncodec import DecodeError, from_json
from .store import NodeRecord, Store

__all__ = ["ControlServer", "ServerConfig", "default_derp_map", "sanitize_hostname"]

log = logging.getLogger("tsnet.control.server")

_ALLOW_ALL = (
    tailcfg.FilterRule(
        src_ips=("*",),
        dst_ports=(tailcfg.NetPortRange(ip="*", ports=tailcfg.PortRange(first=0, last=65535)),),
    ),
)
_TAGGED_LOGIN = "tagged-devices"
_NEEDS_AUTH = "this tsnet control server needs an auth key (tailscale up --authkey=...)"
# The bytes Tailscale's control writes over the start of an expired peer's node key (so that it
# shows as [bad01]); the rest of the key is kept.
_EXPIRED_KEY_PREFIX = bytes((109, 167, 116, 213, 215, 116))


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def sanitize_hostname(hostname: str | None) -> str:
    """A DNS label from a Hostinfo hostname: lowercase letters, digits and ``-``, at most 63."""
    label = (hostname or "").strip().lower().split(".")[0]
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:63].strip("-")
    return label or "node"


def default_derp_map(host: str, port: int, *, stun_port: int = -1, region_id: int = 900) -> tailcfg.DERPMap:
    """A one-region DERP map for an embedded DERP server reachable at ``http://host:port/derp``."""
    node = tailcfg.DERPNode(
        name=f"{region_id}a",
        region_id=region_id,
        host_name=host,
        ipv4=host if ":" not in host else None,
        ipv6=host if ":" in host else "none",
        derp_port=port,
        stun_port=stun_port if stun_port else -1,
        insecure_for_tests=True,
        can_port80=False,
    )
    region = tailcfg.DERPRegion(region_id=region_id, region_code="tsnet", region_name="tsnet embedded", nodes=(node,))
    return tailcfg.DERPMap(regions={region_id: region})


@dataclass(slots=True)
class ServerConfig:
    """Settings of a :class:`ControlServer`."""

    base_domain: str = "tailnet.test"
    derp_map: tailcfg.DERPMap | None = None
    ephemeral_timeout: float = 300.0
    keepalive_interval: float = 55.0
    #: A map stream whose client does not take a message within this many seconds is dropped.
    write_timeout: float = 30.0
    #: Node-key lifetime for user-owned nodes; None = never expire. Tagged nodes never expire.
    key_expiry: _dt.timedelta | None = _dt.timedelta(days=180)
    magic_dns: bool = True
    nameservers: tuple[str, ...] = ()
    split_dns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extra_records: tuple[tailcfg.DNSRecord, ...] = ()
    #: Filter compiler: (destination node, all live nodes, user id -> login) -> that node's rules.
    filter_for: Callable[[NodeRecord, list[NodeRecord], dict[int, str]], tuple[tailcfg.FilterRule, ...]] | None = None
    #: Whether ``a`` should see ``b`` as a peer: (a, b, all live nodes, logins). Default: all see all.
    can_see: Callable[[NodeRecord, NodeRecord, list[NodeRecord], dict[int, str]], bool] | None = None
    #: Extra node attributes (self CapMap) per node, e.g. from the policy's ``nodeAttrs``.
    attrs_for: Callable[[NodeRecord, list[NodeRecord], dict[int, str]], dict[str, Any]] | None = None
    #: Policy file to watch: edits are applied live (a bad edit is logged and ignored).
    policy_path: str | None = None
    #: Whether a node of user ``login`` may take ``tag`` via Hostinfo.RequestTags (None: any tag is fine).
    tag_allowed: Callable[[str, str], bool] | None = None
    #: Send the optional early payload (EarlyNoise with a node-key challenge) before HTTP/2.
    send_early_payload: bool = True
    #: Unknown nodes without an auth key get an AuthURL; an admin approves with ``nodes approve``.
    interactive_login: bool = True
    #: How long a follow-up register waits for approval before answering the AuthURL again.
    interactive_wait: float = 120.0
    node_attrs: dict[str, Any] = field(
        default_factory=lambda: {"disable-captive-portal-detection": None, "debug-disable-upnp": None}
    )
    clock: Callable[[], _dt.datetime] = _utcnow


class _Session:
    """One open map long-poll."""

    __slots__ = ("node_id", "wake", "scope", "sent_self", "sent_peers", "sent_filter", "sent_dns", "sent_derp",
                 "sent_profiles", "sent_domain", "outbox", "synced_generation", "self_source", "self_encoded")

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.wake = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.sent_self: dict | None = None
        self.sent_peers: dict[int, dict] = {}
        self.sent_filter: list | None = None
        self.sent_dns: dict | None = None
        self.sent_derp: dict | None = None
        self.sent_profiles: dict[int, dict] = {}
        self.sent_domain: str | None = None
        self.outbox: list[dict] = []  # one-off messages (PingRequest) to send next
        #: The view generation whose peers ``sent_peers`` matches (allow-all sessions only, else None).
        self.synced_generation: int | None = None
        #: What the self node was last encoded from (record, domain, node attributes), and the encoding.
        self.self_source: tuple | None = None
        self.self_encoded: dict | None = None


# Node fields a PeerChange can carry, by JSON name: Node name -> PeerChange name.
_PATCHABLE = {"Online": "Online", "LastSeen": "LastSeen", "Endpoints": "Endpoints", "HomeDERP": "DERPRegion",
              "DiscoKey": "DiscoKey", "Cap": "Cap", "Key": "Key", "KeyExpiry": "KeyExpiry", "CapMap": "CapMap"}


def _peer_patch(node_id: int, before: dict, after: dict) -> dict | None:
    """A PeersChangedPatch entry turning ``before`` into ``after``, or None if a full node is needed."""
    patch: dict[str, Any] = {"NodeID": node_id}
    for name in set(before) | set(after):
        if before.get(name) == after.get(name):
            continue
        if name not in _PATCHABLE or name not in after:
            return None  # a removed field or one a patch cannot express
        patch[_PATCHABLE[name]] = after[name]
    return patch


@dataclass(frozen=True, slots=True)
class _View:
    generation: int
    now: _dt.datetime
    live: list[NodeRecord]
    by_id: dict[int, NodeRecord]
    users: dict[int, Any]
    logins: dict[int, str]
    peer_nodes: dict[int, dict]
    user_ids: frozenset[int]
    #: The previously built view's generation, and the peers whose encoding differs from it
    #: (added, changed or removed); None for the first view.
    prev_generation: int | None
    changed_ids: frozenset[int] | None
    dns: dict
    derp: dict | None
    control_time: str


class ControlServer:
    """A Tailscale-compatible coordination server over a :class:`Store`."""

    def __init__(self, store: Store, config: ServerConfig | None = None) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self.noise_key: MachinePrivate = store.noise_key()
        self.sessions: dict[int, _Session] = {}
        self.generation = 0
        self._view_cache: _View | None = None
        self._peer_cache: dict[int, tuple[NodeRecord, bool, bool, dict]] = {}
        self._c2n_waiters: dict[str, tuple[MachinePublic, list[bytes], trio.Event]] = {}
        self._changed = trio.Event()
        self._compressor = zstandard.ZstdCompressor(level=3)
        #: An embedded :class:`tsnet.derp.server.DerpServer` served at ``/derp`` on our listener.
        self.derp: Any = None
        self.counters: dict[str, int] = {"noise_conns": 0, "handshake_failures": 0, "registers": 0, "map_polls": 0,
                                         "lite_updates": 0, "bad_requests": 0}

    # -- clocks and notifications --------------------------------------------------------------

    def now(self) -> _dt.datetime:
        return self.config.clock()

    def notify(self) -> None:
        """Something changed: wake every map session so it sends its delta."""
        self.generation += 1
        for session in self.sessions.values():
            session.wake.set()
        self._changed.set()
        self._changed = trio.Event()

    # -- HTTP/1.1 front ------------------------------------------------------------------------

    async def http_app(self, req: HTTPRequest) -> Reply | Takeover:
        path = req.path
        if path == "/key":
            if "v" not in req.query:
                # Pre-Noise clients: bare hex of the legacy key (zero), as testcontrol does.
                return Reply(200, b"0" * 64, "text/plain")
            body = tailcfg.dumps(
                tailcfg.OverTLSPublicKeyResponse(
                    legacy_public_key=MachinePublic.zero(), public_key=self.noise_key.public
                )
            )
            return Reply(200, body, "application/json")
        if path == "/ts2021":
            verdict = controlhttp.check_upgrade_request(req.method, req.headers)
            if isinstance(verdict, controlhttp.UpgradeRejected):
                self.counters["bad_requests"] += 1
                return Reply(verdict.status, verdict.reason.encode() + b"\n")
            initiation = verdict

            async def run(stream: trio.abc.Stream, leftover: bytes) -> None:
                await self._serve_noise(stream, initiation, leftover)

            return Takeover(run)
        if path == "/generate_204":
            headers = []
            challenge = req.header("x-tailscale-challenge")
            if challenge and re.fullmatch(r"[A-Za-z0-9._:-]{0,64}", challenge):
                headers.append(("x-tailscale-response", "response " + challenge))
            return Reply(204, b"", headers=headers)
        if self.derp is not None and path in ("/derp", "/derp/probe", "/derp/latency-check"):
            return self._derp_route(req)
        if path.startswith("/register/"):
            token = path.rsplit("/", 1)[1]
            pending = self.store.pending(token)
            if pending is None:
                return Reply(404, b"unknown login link\n")
            text = (
                f"Login request from {pending.hostname}.\n\n"
                f"An administrator approves it on the control server with:\n\n"
                f"    tsnet control nodes approve {token}\n"
            )
            return Reply(200, text.encode())
        if path == "/debug/vars":
            return self._debug_vars(req)
        if path == "/":
            return Reply(200, b"tsnet control server\n")
        return Reply(404, b"not found\n")

    def _debug_vars(self, req: HTTPRequest) -> Reply:
        """Counters as JSON (control, and the embedded DERP server's); loopback clients only, like derper."""
        host = req.remote.rpartition(":")[0].strip("[]").split("%")[0]
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            return Reply(403, b"forbidden\n")
        out: dict[str, Any] = {"control": dict(self.counters), "map_sessions": len(self.sessions)}
        if self.derp is not None:
            out["derp"] = self.derp.stats()
        return Reply(200, json.dumps(out).encode(), "application/json")

    def attach_derp(self, derp: Any) -> None:
        """Serve ``derp`` (a :class:`tsnet.derp.server.DerpServer`) at ``/derp``; only our nodes may use it."""
        self.derp = derp
        if derp.verify_client is None:
            derp.verify_client = self._derp_verify
            derp.core.verify_clients = True

    def _derp_verify(self, node_key: Any, source: str) -> bool:
        node = self.store.node_by_key(str(node_key))
        return node is not None and not node.expired(self.now())

    def _derp_route(self, req: HTTPRequest) -> Reply | Takeover:
        import h11

        h11_req = h11.Request(
            method=req.method,
            target=req.target,
            headers=[(k, v) for k, v in req.headers] or [("host", "derp")],
        )
        upgrade = (req.header("upgrade") or "").lower()
        if req.path == "/derp" and upgrade in ("derp", "websocket"):
            derp = self.derp
            remote = None
            if req.remote:
                host, _, port = req.remote.rpartition(":")
                remote = (host, int(port))

            async def run(stream: trio.abc.Stream, leftover: bytes) -> None:
                await derp.handle_upgrade(stream, h11_req, leftover, remote)

            return Takeover(run)
        status, headers, body = self.derp.http_response(h11_req)
        ctype = "text/plain; charset=utf-8"
        extra = []
        for k, v in headers:
            if k.lower() == b"content-type":
                ctype = v.decode()
            else:
                extra.append((k.decode(), v.decode()))
        return Reply(status, body, ctype, extra)

    async def handle_tcp(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted TCP connection (HTTP/1.1, possibly upgraded)."""
        remote = ""
        sock = getattr(stream, "socket", None) or getattr(getattr(stream, "transport_stream", None), "socket", None)
        if sock is not None:
            try:
                remote = "%s:%d" % sock.getpeername()[:2]
            except OSError:
                pass
        await serve_http1(stream, self.http_app, remote=remote)

    async def _serve_noise(self, stream: trio.abc.Stream, initiation: bytes, leftover: bytes) -> None:
        try:
            early = None
            if self.config.send_early_payload:
                # Like headscale: a per-connection node-key challenge (1.96 reads and ignores it).
                challenge = "chalpub:" + MachinePrivate.generate().public.hex()
                early = tailcfg.EarlyNoise(node_key_challenge=challenge)
            noise = await ts2021.accept(stream, initiation, self.noise_key, leftover=leftover, early=early)
        except (ts2021.HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.counters["handshake_failures"] += 1
            log.info("noise handshake failed: %s", exc)
            return
        self.counters["noise_conns"] += 1
        machine = noise.peer

        async def handler(req: H2Request, resp: H2ResponseWriter) -> None:
            await self._handle_noise_request(machine, req, resp)

        await serve_h2(noise, handler, on_error=lambda exc: log.exception("handler failed", exc_info=exc))

    async def _handle_noise_request(self, machine: MachinePublic, req: H2Request, resp: H2ResponseWriter) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/machine/register":
            if req.method != "POST":
                await resp.respond(400, b"POST required\n")
                return
            try:
                rreq = tailcfg.decode(tailcfg.RegisterRequest, req.body)
            except DecodeError as exc:
                self.counters["bad_requests"] += 1
                await resp.respond(400, f"bad register request: {exc}\n".encode())
                return
            answer = await self._register_interactive(machine, rreq, req.authority)
            await resp.respond(200, tailcfg.dumps(answer), "application/json")
            return
        if path == "/machine/map":
            if req.method != "POST":
                await resp.respond(400, b"POST required\n")
                return
            try:
                mreq = tailcfg.decode(tailcfg.MapRequest, req.body)
            except DecodeError as exc:
                self.counters["bad_requests"] += 1
                await resp.respond(400, f"bad map request: {exc}\n".encode())
                return
            await self.serve_map(machine, mreq, resp)
            return
        if path.startswith("/c2n/") and req.method == "POST":
            waiter = self._c2n_waiters.get(path[len("/c2n/"):])
            if waiter is None or waiter[0] != machine:
                await resp.respond(404, b"unknown c2n token\n")
                return
            waiter[1].append(req.body)
            waiter[2].set()
            await resp.respond(200, b"")
            return
        await resp.respond(404, b"not found\n")

    async def c2n_request(self, node_id: int, request: bytes, *, timeout: float = 10.0) -> bytes:
        """Ask a connected node to serve ``request`` (raw HTTP/1.1) through control-to-node (c2n).

        Returns the node's raw HTTP/1.1 response. Raises LookupError if the node has
        no open map poll and trio.TooSlowError if it does not answer in time.
        """
        import base64
        import secrets

        session = self.sessions.get(node_id)
        node = self.store.node(node_id)
        if session is None or node is None:
            raise LookupError(f"node {node_id} is not connected")
        token = secrets.token_hex(16)
        got: list[bytes] = []
        done = trio.Event()
        self._c2n_waiters[token] = (MachinePublic.parse(node.machine_key), got, done)
        ping = tailcfg.PingRequest(url=f"https://unused/c2n/{token}", url_is_noise=True, types="c2n",
                                   payload=base64.b64encode(request).decode())
        session.outbox.append({"PingRequest": tailcfg.encode(ping)})
        session.wake.set()
        try:
            with trio.fail_after(timeout):
                await done.wait()
        finally:
            del self._c2n_waiters[token]
        return got[0]

    # -- register ------------------------------------------------------------------------------

    def _user_for(self, tags: tuple[str, ...]) -> Any:
        now = self.now()
        if tags:
            return self.store.ensure_user(_TAGGED_LOGIN, "Tagged Devices", now)
        domain = self.config.base_domain
        return self.store.ensure_user(f"tsnet@{domain}", "tsnet", now)

    def _register_ok(self, node: NodeRecord) -> tailcfg.RegisterResponse:
        user = next((u for u in self.store.users() if u.id == node.user_id), None)
        if user is None:
            user = self._user_for(node.tags)
        return tailcfg.RegisterResponse(
            user=tailcfg.User(id=user.id, display_name=user.display_name, created=user.created),
            login=tailcfg.Login(id=user.id, provider="tsnet", login_name=user.login_name, display_name=user.display_name),
            machine_authorized=True,
            auth_url="",
        )

    async def _register_interactive(
        self, machine: MachinePublic, req: tailcfg.RegisterRequest, authority: str
    ) -> tailcfg.RegisterResponse:
        """Register, with the interactive flow: unknown node without a key gets an AuthURL;
        its follow-up request waits until an administrator approves the token."""
        if req.followup and "/register/" in req.followup and not (req.auth and req.auth.auth_key):
            token = req.followup.rsplit("/register/", 1)[1]
            pending = self.store.pending(token)
            if pending is None or pending.machine_key != str(machine):
                return tailcfg.RegisterResponse(error="unknown or expired login URL; run tailscale up again")
            with trio.move_on_after(self.config.interactive_wait):
                while not pending.approved:
                    await self._changed.wait()
                    pending = self.store.pending(token) or pending
            if not pending.approved:
                return tailcfg.RegisterResponse(auth_url=req.followup)
            answer = self.register(machine, req, approved=True)
            if not answer.error:
                self.store.delete_pending(token)
            return answer
        answer = self.register(machine, req)
        if answer.error == _NEEDS_AUTH and self.config.interactive_login and req.node_key is not None:
            hostname = sanitize_hostname(req.hostinfo.hostname if req.hostinfo else None)
            pending = self.store.create_pending(self.now(), machine_key=str(machine), node_key=str(req.node_key),
                                                hostname=hostname)
            host = authority or "localhost"
            log.info("interactive login for %s: approve with 'tsnet control nodes approve %s'", hostname, pending.token)
            return tailcfg.RegisterResponse(auth_url=f"http://{host}/register/{pending.token}")
        return answer

    def register(
        self, machine: MachinePublic, req: tailcfg.RegisterRequest, *, approved: bool = False
    ) -> tailcfg.RegisterResponse:
        """Handle one ``/machine/register`` for the Noise peer ``machine``.

        ``approved``: an administrator approved this login interactively, so no auth key is needed.
        """
        self.counters["registers"] += 1
        now = self.now()
        mkey = str(machine)
        if req.node_key is None or req.node_key.is_zero():
            return tailcfg.RegisterResponse(error="register request lacks a NodeKey")
        nkey = str(req.node_key)
        node = self.store.node_by_key(nkey)
        if node is not None and node.machine_key != mkey:
            return tailcfg.RegisterResponse(error="node key is registered to another machine")
        hostinfo = tailcfg.encode(req.hostinfo) if req.hostinfo is not None else None

        wants_expiry = req.expiry is not None and req.expiry.year > 1
        if wants_expiry and req.expiry <= now:  # type: ignore[operator]
            # Logout (tailscale sends 1970-01-01T00:02:03Z) or "expire now".
            if node is None:
                return tailcfg.RegisterResponse(error="unknown node key")
            answer = self._register_ok(node)
            if node.ephemeral:
                self.store.delete_node(node.id)
                self._end_session(node.id)
            else:
                self.store.update_node(node.id, logged_out=True, key_expiry=now)
                self._end_session(node.id)
            self.notify()
            log.info("node %s logged out%s", node.name, " (ephemeral, deleted)" if node.ephemeral else "")
            return answer

        if node is not None and not node.expired(now) and not (req.auth and req.auth.auth_key):
            changes: dict[str, Any] = {}
            if hostinfo is not None:
                changes["hostinfo"] = hostinfo
            if wants_expiry and (node.key_expiry is None or req.expiry < node.key_expiry):  # type: ignore[operator]
                changes["key_expiry"] = req.expiry
            node = self.store.update_node(node.id, **changes)
            self.notify()
            return self._register_ok(node)

        authkey = None
        if req.auth is not None and req.auth.auth_key:
            authkey = self.store.authkey(req.auth.auth_key)
            if authkey is None:
                return tailcfg.RegisterResponse(error="invalid key")
            reason = authkey.usable(now)
            if reason is not None:
                return tailcfg.RegisterResponse(error=reason)

        old = None
        if req.old_node_key is not None and not req.old_node_key.is_zero():
            old = self.store.node_by_key(str(req.old_node_key))
            if old is not None and old.machine_key != mkey:
                old = None
        if node is not None and node.expired(now) and authkey is None and not approved:
            return tailcfg.RegisterResponse(node_key_expired=True)
        if old is not None and authkey is None and old.expired(now) and not approved:
            return tailcfg.RegisterResponse(error=_NEEDS_AUTH)  # re-authenticate: auth key or interactive
        if old is None and node is None and authkey is None and not approved:
            return tailcfg.RegisterResponse(error=_NEEDS_AUTH)

        target = old or node
        if target is None and (authkey is not None or approved):
            # Re-login after logout keeps the machine's node (ID, name, addresses).
            mine = self.store.nodes_by_machine(mkey)
            target = mine[-1] if mine else None

        tags = authkey.tags if authkey is not None and authkey.tags else (target.tags if target else ())
        requested = tuple(req.hostinfo.request_tags or ()) if req.hostinfo is not None else ()
        if requested and not (authkey is not None and authkey.tags):
            login = self._user_for(()).login_name
            allowed = self.config.tag_allowed
            bad = [t for t in requested if not re.fullmatch(r"tag:[A-Za-z][A-Za-z0-9-]*", t)
                   or (allowed is not None and not allowed(t, login))]
            if bad:
                return tailcfg.RegisterResponse(error=f"requested tags {bad} are invalid or not permitted")
            tags = requested
        ephemeral = bool(req.ephemeral) or (authkey.ephemeral if authkey is not None else bool(target and target.ephemeral))
        if tags or self.config.key_expiry is None:
            key_expiry = None
        else:
            key_expiry = now + self.config.key_expiry
        if wants_expiry and (key_expiry is None or req.expiry < key_expiry):  # type: ignore[operator]
            key_expiry = req.expiry
        user = self._user_for(tags)
        if target is not None:
            if node is not None and node.id != target.id:
                self.store.delete_node(node.id)
            fields: dict[str, Any] = dict(
                node_key=nkey, logged_out=False, key_expiry=key_expiry, tags=tags, ephemeral=ephemeral, user_id=user.id
            )
            if hostinfo is not None:
                fields["hostinfo"] = hostinfo
            if authkey is not None:
                fields["authkey_id"] = authkey.id
            result = self.store.update_node(target.id, **fields)
        else:
            name = sanitize_hostname(req.hostinfo.hostname if req.hostinfo else None)
            result = self.store.create_node(
                now,
                machine_key=mkey,
                node_key=nkey,
                name=name,
                user_id=user.id,
                ephemeral=ephemeral,
                tags=tags,
                key_expiry=key_expiry,
                hostinfo=hostinfo,
                authkey_id=authkey.id if authkey else None,
            )
        if authkey is not None:
            self.store.mark_authkey_used(authkey.id)
        self.notify()
        log.info("node %s registered (id %d, %s, %s)%s", result.name, result.id, result.ipv4, result.ipv6,
                 " ephemeral" if result.ephemeral else "")
        return self._register_ok(result)

    # -- map -----------------------------------------------------------------------------------

    def _apply_map_request(self, node: NodeRecord, req: tailcfg.MapRequest) -> NodeRecord:
        changes: dict[str, Any] = {}
        if req.disco_key is not None and str(req.disco_key) != node.disco_key:
            changes["disco_key"] = str(req.disco_key)
        if req.endpoints is not None and tuple(req.endpoints) != node.endpoints:
            changes["endpoints"] = tuple(req.endpoints)
        if req.hostinfo is not None:
            hostinfo = tailcfg.encode(req.hostinfo)
            if hostinfo != node.hostinfo:
                changes["hostinfo"] = hostinfo
            ni = req.hostinfo.net_info
            if ni is not None and ni.preferred_derp and ni.preferred_derp != node.home_derp:
                changes["home_derp"] = ni.preferred_derp
        if req.version is not None and req.version != node.cap:
            changes["cap"] = req.version
        if changes:
            node = self.store.update_node(node.id, **changes)
            self.notify()
        return node

    def _frame(self, msg: dict[str, Any] | bytes, compress: bool) -> bytes:
        body = msg if isinstance(msg, bytes) else json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
        if compress:
            body = self._compressor.compress(body)
        return struct.pack("<I", len(body)) + body

    async def serve_map(self, machine: MachinePublic, req: tailcfg.MapRequest, resp: H2ResponseWriter) -> None:
        """Serve one ``/machine/map`` request (long poll, lite update or one-shot)."""
        if req.node_key is None:
            await resp.respond(400, b"map request lacks NodeKey\n")
            return
        node = self.store.node_by_key(str(req.node_key))
        if node is None or node.machine_key != str(machine):
            self.counters["bad_requests"] += 1
            await resp.respond(400, b"unknown node key for this machine\n")
            return
        if node.logged_out:
            await resp.respond(401, b"node logged out\n")
            return
        node = self._apply_map_request(node, req)
        compress = req.compress == "zstd"
        if not req.stream:
            if req.omit_peers:
                self.counters["lite_updates"] += 1
                await resp.respond(200, b"")
                return
            session = _Session(node.id)
            msg = self._session_delta(session, first=True)
            await resp.respond(200, self._frame(msg or {}, compress))
            return

        self.counters["map_polls"] += 1
        log.debug("map poll opened by %s", node.name)
        old = self.sessions.get(node.id)
        if old is not None and old.scope is not None:
            old.scope.cancel()  # a new long poll replaces the old one
        session = _Session(node.id)
        self.sessions[node.id] = session
        self.notify()  # online status changed for the peers
        try:
            with trio.CancelScope() as scope:
                session.scope = scope
                await resp.start(200, [("content-type", "application/octet-stream")])
                first = True
                while True:
                    session.wake = trio.Event()
                    # Deleted or logged out: end the stream. The view (rebuilt once per change, which
                    # every deletion/logout notifies) answers this without a query per session.
                    if self._view().by_id.get(node.id) is None:
                        break
                    msg = self._session_delta(session, first=first)
                    if msg is not None:
                        await self._write(resp, self._frame(msg, compress))
                    first = False
                    while session.outbox:
                        await self._write(resp, self._frame(session.outbox.pop(0), compress))
                    with trio.move_on_after(self.config.keepalive_interval) as idle:
                        await session.wake.wait()
                    if idle.cancelled_caught:
                        await self._write(resp, self._frame(b'{"KeepAlive":true}', compress))
                await resp.end()
        except trio.TooSlowError:
            log.info("map poll of %s dropped: client stopped reading", node.name)
        finally:
            if self.sessions.get(node.id) is session:
                del self.sessions[node.id]
                gone = self.store.node(node.id)
                if gone is not None:
                    self.store.update_node(node.id, last_seen=self.now())
                self.notify()

    async def _write(self, resp: H2ResponseWriter, frame: bytes) -> None:
        # A client that stops reading must not keep its session (and "online") forever.
        with trio.fail_after(self.config.write_timeout):
            await resp.write(frame)

    def _end_session(self, node_id: int) -> None:
        session = self.sessions.get(node_id)
        if session is not None:
            session.wake.set()

    # -- building the view ---------------------------------------------------------------------

    def node_name(self, node: NodeRecord) -> str:
        return f"{node.name}.{self.config.base_domain}."

    def _tailcfg_node(self, node: NodeRecord, now: _dt.datetime, *, is_self: bool) -> tailcfg.Node:
        online = node.id in self.sessions
        hostinfo = None
        if node.hostinfo is not None:
            try:
                # NetInfo (DERP latencies, ...) churns on every netcheck and peers do not use it;
                # leaving it out lets endpoint/DERP changes travel as small patches.
                hostinfo = from_json(tailcfg.Hostinfo, {k: v for k, v in node.hostinfo.items() if k != "NetInfo"})
            except DecodeError:
                hostinfo = None
        addresses = (f"{node.ipv4}/32", f"{node.ipv6}/128")
        key = NodePublic.parse(node.node_key)
        expired = node.expired(now) and not is_self
        if expired:
            # As Tailscale's control: an expired peer is sent without endpoints or DERP home and
            # with a deliberately broken key, so no client can still reach it (even over DERP).
            key = NodePublic(_EXPIRED_KEY_PREFIX + key.raw[len(_EXPIRED_KEY_PREFIX):])
        return tailcfg.Node(
            id=node.id,
            stable_id=node.stable_id,
            name=self.node_name(node),
            user=node.user_id,
            key=key,
            key_expiry=node.key_expiry,
            machine=MachinePublic.parse(node.machine_key),
            disco_key=DiscoPublic.parse(node.disco_key) if node.disco_key else None,
            addresses=addresses,
            allowed_ips=addresses,
            endpoints=None if expired else node.endpoints or None,
            home_derp=None if expired else node.home_derp or None,
            hostinfo=hostinfo,
            created=node.created,
            cap=node.cap or None,
            tags=node.tags or None,
            online=None if is_self else online,
            last_seen=None if (online or is_self or node.last_seen is None) else node.last_seen,
            machine_authorized=True,
            cap_map=dict(self.config.node_attrs) if is_self and self.config.node_attrs else None,
            expired=True if expired else None,
        )

    def dns_config(self) -> tailcfg.DNSConfig:
        cfg = self.config
        resolvers = tuple(tailcfg.DNSResolver(addr=a) for a in cfg.nameservers) or None
        routes: dict[str, tuple[tailcfg.DNSResolver, ...] | None] = {}
        for suffix, servers in cfg.split_dns.items():
            routes[suffix.rstrip(".") + "."] = tuple(tailcfg.DNSResolver(addr=a) for a in servers)
        if cfg.magic_dns:
            routes.setdefault(cfg.base_domain + ".", None)
        return tailcfg.DNSConfig(
            resolvers=resolvers,
            routes=routes or None,
            domains=(cfg.base_domain,) if cfg.magic_dns else None,
            proxied=True if cfg.magic_dns else None,
            extra_records=cfg.extra_records or None,
        )

    def _encoded_peer(self, node: NodeRecord, now: _dt.datetime) -> dict:
        """The peer form of ``node`` as JSON, reused while nothing about the node changed."""
        online, expired = node.id in self.sessions, node.expired(now)
        hit = self._peer_cache.get(node.id)
        if hit is not None and hit[1] == online and hit[2] == expired and hit[0] == node:
            return hit[3]
        encoded = tailcfg.encode(self._tailcfg_node(node, now, is_self=False))
        self._peer_cache[node.id] = (node, online, expired, encoded)
        return encoded

    def _view(self) -> _View:
        """Everything sessions share, built once per generation (so a change costs O(nodes), not O(nodes²))."""
        cached = self._view_cache
        if cached is not None and cached.generation == self.generation:
            return cached
        now = self.now()
        live = [n for n in self.store.nodes() if not n.logged_out]
        users = {u.id: u for u in self.store.users()}
        peer_nodes = {n.id: self._encoded_peer(n, now) for n in live}
        changed_ids = None
        if cached is not None:
            # Unchanged peers keep their encoding object, so identity finds what changed, once per
            # generation; sessions synced to the previous view then only look at these.
            old = cached.peer_nodes
            changed_ids = frozenset([i for i, enc in peer_nodes.items() if old.get(i) is not enc]
                                    + [i for i in old if i not in peer_nodes])
        view = _View(
            generation=self.generation,
            now=now,
            live=live,
            by_id={n.id: n for n in live},
            users=users,
            logins={uid: u.login_name for uid, u in users.items()},
            peer_nodes=peer_nodes,
            user_ids=frozenset(n.user_id for n in live),
            prev_generation=cached.generation if cached is not None else None,
            changed_ids=changed_ids,
            dns=tailcfg.encode(self.dns_config()),
            derp=tailcfg.encode(self.config.derp_map) if self.config.derp_map is not None else None,
            control_time=tailcfg.encode(tailcfg.MapResponse(control_time=now))["ControlTime"],
        )
        self._view_cache = view
        return view

    def _session_delta(self, session: _Session, *, first: bool) -> dict[str, Any] | None:
        """What this session has not yet been told; None if nothing changed."""
        view = self._view()
        me = view.by_id.get(session.node_id)
        if me is None:
            return None
        live, logins, users = view.live, view.logins, view.users
        can_see = self.config.can_see
        if can_see is None:
            # Everyone sees everyone: copy the shared encodings (one C-level dict copy per session,
            # which matters when one change fans out to a thousand sessions).
            peer_nodes = dict(view.peer_nodes)
            del peer_nodes[me.id]
            peer_users: Any = view.user_ids
        else:
            peers = [n for n in live if n.id != me.id and can_see(me, n, live, logins)]
            peer_nodes = {n.id: view.peer_nodes[n.id] for n in peers}
            peer_users = {n.user_id for n in peers}
        # The self node only depends on its record, the domain and the node attributes: re-encode it
        # only when one of those changed (a peer's change fans out to every session).
        source = (me, self.config.base_domain, self.config.node_attrs)
        if session.self_source is not None and session.self_source == source:
            self_node = dict(session.self_encoded)  # type: ignore[arg-type]
        else:
            self_node = tailcfg.encode(self._tailcfg_node(me, view.now, is_self=True))
            session.self_source = (me, self.config.base_domain, dict(self.config.node_attrs))
            session.self_encoded = dict(self_node)
        if self.config.attrs_for is not None:
            extra_attrs = self.config.attrs_for(me, live, logins)
            if extra_attrs:
                self_node["CapMap"] = {**self_node.get("CapMap", {}), **extra_attrs}
        rules = self.config.filter_for(me, live, logins) if self.config.filter_for is not None else _ALLOW_ALL
        packet_filter = [tailcfg.encode(r) for r in rules]
        dns = view.dns
        derp = view.derp
        profile_ids = {me.user_id} | peer_users
        profiles = {
            uid: tailcfg.encode(
                tailcfg.UserProfile(id=uid, login_name=users[uid].login_name, display_name=users[uid].display_name)
            )
            for uid in sorted(profile_ids)
            if uid in users
        }

        out: dict[str, Any] = {}
        if first or self_node != session.sent_self:
            out["Node"] = self_node
        if first:
            if peer_nodes:
                out["Peers"] = [peer_nodes[i] for i in sorted(peer_nodes)]
        else:
            changed, patches, removed = [], [], []
            sent = session.sent_peers
            if can_see is None and view.changed_ids is not None and session.synced_generation == view.prev_generation:
                candidates = sorted(view.changed_ids)  # the session has the previous view's peers
            else:
                candidates = sorted(peer_nodes.keys() | sent.keys())
            for i in candidates:
                before, now_node = sent.get(i), peer_nodes.get(i)
                if now_node is None:
                    if before is not None:
                        removed.append(i)
                    continue
                if before is now_node or before == now_node:  # identity: unchanged peers share one encoding
                    continue
                patch = _peer_patch(i, before, now_node) if before is not None else None
                if patch is not None:
                    patches.append(patch)
                else:
                    changed.append(now_node)
            if changed:
                out["PeersChanged"] = changed
            if patches:
                out["PeersChangedPatch"] = patches
            if removed:
                out["PeersRemoved"] = removed
        if first or packet_filter != session.sent_filter:
            out["PacketFilter"] = packet_filter
        if first or dns != session.sent_dns:
            out["DNSConfig"] = dns
        if derp is not None and (first or derp != session.sent_derp):
            out["DERPMap"] = derp
        new_profiles = [p for uid, p in profiles.items() if session.sent_profiles.get(uid) != p]
        if new_profiles:
            out["UserProfiles"] = new_profiles
        if first or session.sent_domain != self.config.base_domain:
            out["Domain"] = self.config.base_domain
            out["CollectServices"] = False
        # Whether or not anything is sent, the session now holds this view's peers.
        session.synced_generation = view.generation if can_see is None else None
        if not out:
            return None
        out["ControlTime"] = view.control_time
        session.sent_self = self_node
        session.sent_peers = peer_nodes
        session.sent_filter = packet_filter
        session.sent_dns = dns
        session.sent_derp = derp
        session.sent_profiles.update(profiles)
        session.sent_domain = self.config.base_domain
        return out

    # -- ephemeral GC --------------------------------------------------------------------------

    def collect_ephemeral(self) -> list[str]:
        """Delete ephemeral nodes offline for longer than the timeout; returns their names."""
        now = self.now()
        timeout = _dt.timedelta(seconds=self.config.ephemeral_timeout)
        gone = []
        for node in self.store.nodes():
            if not node.ephemeral or node.id in self.sessions:
                continue
            last = node.last_seen or node.created
            if now - last >= timeout:
                self.store.delete_node(node.id)
                gone.append(node.name)
        if gone:
            self.notify()
        return gone

    async def run_ephemeral_gc(self) -> None:
        """Periodic housekeeping: ephemeral GC, and telling peers when a node key expires by time."""
        interval = max(0.05, min(self.config.ephemeral_timeout / 4, 5.0))
        expired: set[int] = set()
        while True:
            await trio.sleep(interval)
            self.collect_ephemeral()
            now = self.now()
            current = {n.id for n in self.store.nodes() if n.expired(now)}
            if current != expired:
                expired = current
                self.notify()

    async def watch_store(self, interval: float = 0.5) -> None:
        """Notice writes by other processes (the admin CLI) and edits of the policy file; push them to the nodes."""
        version = self.store.data_version()
        policy_stamp = self._policy_stamp()
        while True:
            await trio.sleep(interval)
            current = self.store.data_version()
            if current != version:
                version = current
                self.notify()
            stamp = self._policy_stamp()
            if stamp != policy_stamp:
                policy_stamp = stamp
                self.reload_policy()

    def _policy_stamp(self) -> tuple[int, int] | None:
        path = self.config.policy_path
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_policy(self) -> str | None:
        """Re-read ``config.policy_path``; a bad file is reported and the old policy stays. Returns the error."""
        from .policy import PolicyError, load_policy_file

        if self.config.policy_path is None:
            return None
        try:
            policy = load_policy_file(self.config.policy_path)
        except (OSError, PolicyError) as exc:
            log.error("policy %s not applied: %s", self.config.policy_path, exc)
            return str(exc)
        policy.install(self.config)
        log.info("policy %s applied", self.config.policy_path)
        self.notify()
        return None

    # -- admin actions used by the CLI and tests -----------------------------------------------

    def delete_node(self, node_id: int) -> bool:
        ok = self.store.delete_node(node_id)
        self._end_session(node_id)
        self.notify()
        return ok

    def expire_node(self, node_id: int) -> None:
        self.store.update_node(node_id, key_expiry=self.now())
        self.notify()

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (HTTPS when ``ssl_context`` is given) until cancelled.

        Reports the bound port through ``task_status``.
        """
        async with trio.open_nursery() as nursery:
            listeners: list[Any] = list(await trio.open_tcp_listeners(port, host=host))
            bound = listeners[0].socket.getsockname()[1]
            if ssl_context is not None:
                listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners]
            nursery.start_soon(self.run_ephemeral_gc)
            nursery.start_soon(self.watch_store)
            nursery.start_soon(trio.serve_listeners, self._handle_guarded, listeners)
            task_status.started(bound)

    async def _handle_guarded(self, stream: trio.abc.Stream) -> None:
        # A failed TLS handshake (scanner, wrong client) must not take the listener down.
        try:
            await self.handle_tcp(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.debug("connection failed: %r", exc)
