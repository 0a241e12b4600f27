"""``tsnet up``, ``status``, ``ping``, ``netcheck`` and ``whois``: a node as a process, and its clients.

``tsnet up`` runs one :class:`tsnet.Server` until SIGTERM/SIGINT, the way tailscaled runs in a container:
optional SOCKS5 / HTTP proxies on local addresses, TCP forwards from tailnet ports, ``/metrics`` and
``/healthz`` listeners, and the local API on a Unix socket in the state directory. The other commands talk
to that socket (see :mod:`tsnet.localapi`).

Every ``up`` flag has a ``TS_*`` environment equivalent (flags win). A bad flag or environment value is
reported on one line naming it, with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ENV_VARS", "UpSettings", "UsageError", "register", "settings_from", "default_state_dir"]

# Flag -> environment variables (first one set wins). Containerboot's names where it has one.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "--control-url": ("TS_CONTROL_URL", "TS_LOGIN_SERVER"),
    "--authkey": ("TS_AUTHKEY", "TS_AUTH_KEY"),
    "--hostname": ("TS_HOSTNAME",),
    "--state-dir": ("TS_STATE_DIR",),
    "--state": ("TS_STATE",),
    "--ephemeral": ("TS_EPHEMERAL",),
    "--advertise-tags": ("TS_ADVERTISE_TAGS",),
    "--socks5": ("TS_SOCKS5_SERVER",),
    "--http-proxy": ("TS_OUTBOUND_HTTP_PROXY_LISTEN",),
    "--forward": ("TS_FORWARD",),
    "--relay-server-port": ("TS_RELAY_SERVER_PORT",),
    "--port": ("TS_PORT",),
    "--metrics-listen": ("TS_METRICS_LISTEN",),
    "--health-listen": ("TS_HEALTH_LISTEN",),
    "--json-logs": ("TS_JSON_LOGS",),
    "--socket": ("TS_SOCKET",),
    "--timeout": ("TS_UP_TIMEOUT",),
    "--udp-bind": ("TS_UDP_BIND",),
}

#: How long ``up`` gives the node to shut down after SIGTERM before giving up on a clean logout.
SHUTDOWN_BUDGET = 4.0


def default_state_dir() -> Path:
    """``$TS_STATE_DIR``, else ``$XDG_STATE_HOME/tsnet``, else ``~/.local/state/tsnet``."""
    if os.environ.get("TS_STATE_DIR"):
        return Path(os.environ["TS_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "tsnet"


class UsageError(Exception):
    """A bad flag or environment value; the message names it."""


@dataclass(frozen=True, slots=True)
class Forward:
    """``--forward PORT=HOST:PORT``: tailnet TCP port -> local target."""

    port: int
    target: str


@dataclass(slots=True)
class UpSettings:
    """Everything ``tsnet up`` was asked to do, validated."""

    control_url: str | None = None
    authkey: str | None = None
    hostname: str | None = None
    state_dir: Path | None = None
    in_memory: bool = False
    ephemeral: bool = False
    advertise_tags: tuple[str, ...] = ()
    socks5: tuple[str, int] | None = None
    http_proxy: tuple[str, int] | None = None
    forwards: list[Forward] = field(default_factory=list)
    relay_server_port: int | None = None
    port: int = 0
    metrics_listen: tuple[str, int] | None = None
    health_listen: tuple[str, int] | None = None
    json_logs: bool = False
    socket: Path | None = None
    timeout: float = 60.0
    udp_bind: str | None = None


# -- value parsers: each raises ValueError with a short reason ------------------------------------------


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _parse_port(text: str, *, allow_zero: bool = True) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{text!r} is not a port number")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{port} is out of range")
    return port


def _parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (loopback)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} is not HOST:PORT")
    port = _parse_port(port_text)
    host = host.strip("[]") or "127.0.0.1"
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{text!r} has a bad host")
    return host, port


def _parse_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    return text.strip().rstrip("/")


def _parse_authkey(text: str) -> str | None:
    """A key, or ``file:/path`` (checked readable and non-empty here so the error names the flag)."""
    text = text.strip()
    if text.startswith("file:"):
        try:
            if not Path(text[5:]).read_text().strip():
                raise ValueError(f"{text[5:]} is empty")
        except OSError as exc:
            raise ValueError(f"cannot read {text[5:]}: {exc.strerror or exc}") from None
    return text or None


def _parse_hostname(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", text.strip()):
        raise ValueError(f"{text!r} is not a valid host name (letters, digits and '-', up to 63)")
    return text.strip()


def _parse_tags(text: str) -> tuple[str, ...]:
    tags = tuple(t.strip() for t in text.split(",") if t.strip())
    for tag in tags:
        if not re.fullmatch(r"tag:[A-Za-z][A-Za-z0-9-]*", tag):
            raise ValueError(f"{tag!r} is not a tag (want tag:name)")
    return tags


def _parse_forward(text: str) -> Forward:
    port_text, sep, target = text.strip().partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not PORT=HOST:PORT")
    port = _parse_port(port_text, allow_zero=False)
    host, target_port = _parse_addr(target)
    if target_port == 0:
        raise ValueError(f"{text!r}: the target port must not be 0")
    return Forward(port, f"[{host}]:{target_port}" if ":" in host else f"{host}:{target_port}")


def _parse_timeout(text: str) -> float:
    try:
        value = float(text.rstrip("s"))
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise ValueError(f"{value:g} is out of range")
    return value


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> UpSettings:
    """Validate ``up``'s flags, falling back to the environment; raise UsageError naming the bad one."""
    env = os.environ if environ is None else environ

    def raw(flag: str) -> tuple[Any, str]:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value not in (None, [], False):
            return value, flag
        for var in ENV_VARS[flag]:
            if env.get(var, "") != "":
                return env[var], f"{flag} (from ${var})"
        return None, flag

    def parse(flag: str, parser: Callable[[str], Any]) -> Any:
        value, source = raw(flag)
        if value is None:
            return None
        try:
            return parser(value)
        except ValueError as exc:
            raise UsageError(f"bad {source}: {exc}") from None

    s = UpSettings()
    s.control_url = parse("--control-url", _parse_url)
    s.authkey = parse("--authkey", _parse_authkey)
    s.hostname = parse("--hostname", _parse_hostname)
    state_dir = parse("--state-dir", lambda t: Path(t).expanduser())
    state = parse("--state", str)
    if state is not None:
        if state.strip() != "mem:":
            raise UsageError(f"bad --state: {state!r} (only 'mem:' is supported; use --state-dir for a directory)")
        if state_dir is not None:
            raise UsageError("bad --state: 'mem:' and --state-dir exclude each other")
        s.in_memory = True
    s.state_dir = None if s.in_memory else (state_dir or default_state_dir())
    s.ephemeral = bool(parse("--ephemeral", lambda v: v if isinstance(v, bool) else _parse_bool(v)))
    s.advertise_tags = parse("--advertise-tags", _parse_tags) or ()
    s.socks5 = parse("--socks5", _parse_addr)
    s.http_proxy = parse("--http-proxy", _parse_addr)
    forwards, source = raw("--forward")
    items = forwards if isinstance(forwards, list) else re.split(r"[,\s]+", forwards or "")
    for item in (i for i in items if i):
        try:
            s.forwards.append(_parse_forward(item))
        except ValueError as exc:
            raise UsageError(f"bad {source}: {exc}") from None
    s.relay_server_port = parse("--relay-server-port", _parse_port)
    s.port = parse("--port", _parse_port) or 0
    s.metrics_listen = parse("--metrics-listen", _parse_addr)
    s.health_listen = parse("--health-listen", _parse_addr)
    s.json_logs = bool(parse("--json-logs", lambda v: v if isinstance(v, bool) else _parse_bool(v)))
    s.socket = parse("--socket", lambda t: Path(t).expanduser())
    s.timeout = parse("--timeout", _parse_timeout) or 60.0
    s.udp_bind = parse("--udp-bind", lambda t: str(ipaddress.ip_address(t.strip())))
    if s.in_memory and not s.ephemeral:
        raise UsageError("bad --state: 'mem:' needs --ephemeral (a persistent node must keep its keys)")
    return s


# -- output ------------------------------------------------------------------------------------------


class _Out:
    """Progress lines for humans, or one JSON object per line with ``--json-logs``."""

    def __init__(self, json_logs: bool, stream: TextIO | None = None) -> None:
        self.json_logs = json_logs
        self.stream = stream or sys.stderr
        #: Recent messages (so a login URL the node already printed is not printed twice).
        self.recent: list[str] = []

    def __call__(self, message: str, **fields: Any) -> None:
        self.recent = [*self.recent[-19:], message]
        if self.json_logs:
            record = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                      "level": fields.pop("level", "info"), "msg": message, **fields}
            line = json.dumps(record, default=str)
        else:
            line = f"tsnet up: {message}"
        print(line, file=self.stream, flush=True)


class _JSONLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _setup_logging(json_logs: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JSONLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("tsnet").setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _addr_text(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


# -- tsnet up ----------------------------------------------------------------------------------------


def _make_server(s: UpSettings, out: _Out) -> Any:
    from . import Server  # type: ignore[attr-defined]

    kwargs: dict[str, Any] = dict(
        hostname=s.hostname, auth_key=s.authkey, control_url=s.control_url, ephemeral=s.ephemeral,
        port=s.port, advertise_tags=s.advertise_tags, relay_server_port=s.relay_server_port,
        user_logf=lambda msg: out(str(msg)),
    )
    if s.udp_bind:
        kwargs["udp_bind"] = s.udp_bind
    if s.in_memory:
        kwargs["store"] = "mem:"
    else:
        kwargs["state_dir"] = str(s.state_dir)
    return Server(**kwargs)


async def run_up(s: UpSettings, out: _Out, server: Any, *,
                 ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run a node until SIGTERM/SIGINT (or until it fails); return the exit code.

    ``ready`` (for embedding and tests) is called once everything is listening, with the bound addresses.
    """
    import trio

    from . import localapi
    from . import metrics as node_metrics

    outcome: dict[str, Any] = {"code": 0}
    private_dir: str | None = None
    if s.socket is not None:
        socket_path = s.socket
    elif s.state_dir is not None:
        socket_path = localapi.default_socket_path(s.state_dir)
    else:  # --state mem: has no state dir; keep the socket in a private temporary one
        private_dir = tempfile.mkdtemp(prefix="tsnet-")
        socket_path = Path(private_dir) / localapi.SOCKET_NAME

    async def join(nursery: trio.Nursery) -> None:
        out(f"joining {s.control_url or 'the default control server'}"
            f"{' as ' + s.hostname if s.hostname else ''}...", step="join")
        shown_url = None
        progress = trio.CancelScope()

        async def show_progress() -> None:
            with progress:
                await _show_join_progress(server, out)

        nursery.start_soon(show_progress)
        while True:
            try:
                status = await server.up(timeout=s.timeout)
                break
            except Exception as exc:
                login_url = getattr(exc, "login_url", None)
                if not login_url:
                    raise
                if login_url != shown_url:
                    if not any(login_url in m for m in out.recent):  # the node may have printed it already
                        out(f"to authenticate, visit: {login_url}", step="login", login_url=login_url)
                    shown_url = login_url
                await trio.sleep(1.0)  # retry pacing while a human approves; not synchronisation
        progress.cancel()
        _report_startup(server, out)
        ips = " ".join(str(ip) for ip in server.tailscale_ips())
        self_node = getattr(status, "self_node", None)
        name = getattr(self_node, "dns_name", None) or getattr(self_node, "name", None) or s.hostname or ""
        peers = list(getattr(status, "peers", None) or ())
        out(f"up: {name} {ips} ({len(peers)} peer{'s' if len(peers) != 1 else ''})", step="up",
            addresses=ips.split(), peers=len(peers))

    async def run_node(nursery: trio.Nursery) -> None:
        # The local API and the metrics/health listeners start before joining, so a container's health
        # check sees 503 "backend state is Starting" and ``tsnet status`` shows a pending login URL.
        step = f"local API on {socket_path}"
        try:
            bound: dict[str, Any] = {}
            bound["socket"] = str(await nursery.start(localapi.serve, server, socket_path))
            out(f"local API on {socket_path}", step="localapi")
            # One listener serves both when both flags name the same fixed address (port 0 means "any": two).
            same = s.metrics_listen is not None and s.metrics_listen == s.health_listen and s.metrics_listen[1] != 0
            if s.metrics_listen:
                host, port = s.metrics_listen
                step = f"--metrics-listen {_addr_text(s.metrics_listen)}"
                bound["metrics"] = (host, await nursery.start(
                    lambda task_status: node_metrics.serve(server, host, port, health=same, task_status=task_status)))
                out(f"metrics on http://{_addr_text(bound['metrics'])}/metrics", step="metrics")
            if s.health_listen and not same:
                host, port = s.health_listen
                step = f"--health-listen {_addr_text(s.health_listen)}"
                bound["health"] = (host, await nursery.start(
                    lambda task_status: node_metrics.serve(server, host, port, metrics=False,
                                                           task_status=task_status)))
                out(f"health on http://{_addr_text(bound['health'])}/healthz", step="health")
            elif same:
                bound["health"] = bound["metrics"]
                out(f"health on http://{_addr_text(bound['health'])}/healthz", step="health")
            step = "joining the tailnet"
            await join(nursery)
            proxies: dict[tuple[str, int], set[str]] = {}
            if s.socks5:
                proxies.setdefault(s.socks5, set()).add("socks5")
            if s.http_proxy:
                proxies.setdefault(s.http_proxy, set()).add("http")
            for addr, kinds in proxies.items():
                step = " and ".join(f"--{'socks5' if k == 'socks5' else 'http-proxy'} {_addr_text(addr)}"
                                    for k in sorted(kinds, reverse=True))
                info = await nursery.start(_serve_proxy, server, addr, "socks5" in kinds, "http" in kinds)
                for kind in sorted(kinds):
                    bound[kind] = info.address
                    out(f"{'SOCKS5' if kind == 'socks5' else 'HTTP'} proxy on {info.address}", step="proxy")
            for fwd in s.forwards:
                step = f"--forward {fwd.port}={fwd.target}"
                await server.serve_forward(fwd.port, fwd.target)
                out(f"forwarding tailnet port {fwd.port} to {fwd.target}", step="forward")
            out("running; SIGTERM or Ctrl-C stops", step="running")
            if ready is not None:
                ready(bound)
        except Exception as exc:  # report the failing step and stop
            out(f"failed: {step}: {_describe_error(exc)}", level="error", step="failed")
            outcome["code"] = 1
            nursery.cancel_scope.cancel()

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    async for signum in signals:
                        out(f"{signal.Signals(signum).name}: shutting down", step="shutdown")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch_signals)
                nursery.start_soon(run_node, nursery)
    finally:
        started = time.monotonic()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SHUTDOWN_BUDGET) as budget:
                try:
                    await server.close()
                except Exception as exc:  # noqa: BLE001 - still exit, but say what went wrong
                    out(f"close failed: {_describe_error(exc)}", level="error")
                    outcome["code"] = outcome["code"] or 1
            if budget.cancelled_caught:
                out(f"node did not stop within {SHUTDOWN_BUDGET:g}s; exiting anyway", level="error")
                outcome["code"] = outcome["code"] or 1
            else:
                out(f"stopped in {time.monotonic() - started:.2f}s", step="stopped")
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
    return int(outcome["code"])


async def _show_join_progress(server: Any, out: _Out, interval: float = 0.5) -> None:
    """While ``up()`` runs, print each change of backend state and health (e.g. control unreachable)."""
    import trio

    shown: tuple[str, tuple[str, ...]] | None = None
    while True:
        await trio.sleep(interval)  # a progress display refresh, not synchronisation
        try:
            st = server.status()
        except Exception:  # noqa: BLE001 - progress is best effort
            continue
        now = (str(getattr(st, "backend_state", "")), tuple(str(h) for h in getattr(st, "health", ()) or ()))
        if now != shown:
            shown = now
            out(f"state {now[0]}" + (f"; {'; '.join(now[1])}" if now[1] else ""), step="progress",
                backend_state=now[0], health=list(now[1]))


def _report_startup(server: Any, out: _Out) -> None:
    """One line with how long login, the first netmap and DERP took (from the node's startup metrics)."""
    try:
        values = server.metrics()
    except Exception:  # noqa: BLE001 - progress is nice to have, never fatal
        return
    parts = []
    for key, label in (("tsnet_startup_login_seconds", "control login"), ("tsnet_startup_netmap_seconds", "netmap"),
                       ("tsnet_startup_derp_seconds", "DERP"), ("tsnet_startup_running_seconds", "running")):
        if isinstance(values.get(key), int | float):
            parts.append(f"{label} {values[key]:.2f}s")
    home = values.get("tsnet_derp_home_region")
    if home:
        parts.append(f"home DERP region {int(home)}")
    if parts:
        out("joined: " + ", ".join(parts), step="joined")


async def _serve_proxy(server: Any, addr: tuple[str, int], socks5: bool, http: bool, *, task_status: Any) -> None:
    """A SOCKS5 and/or HTTP proxy on ``addr`` that dials through the node (no credentials, like tailscaled)."""
    from .proxy import ProxyServer

    async def dial(host: str, port: int) -> Any:
        return await server.dial("tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    proxy = ProxyServer(dial, dial_udp=None, socks5=socks5, http=http)
    await proxy.serve(addr[0], addr[1], task_status=task_status)


def _cmd_up(args: argparse.Namespace) -> int:
    import trio

    try:
        settings = settings_from(args)
    except UsageError as exc:
        print(f"tsnet up: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.json_logs, args.verbose)
    out = _Out(settings.json_logs)
    try:
        server = _make_server(settings, out)
    except ValueError as exc:  # tsnet.errors.ConfigError: the settings contradict each other
        print(f"tsnet up: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(run_up, settings, out, server)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


# -- clients of the local API ------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from .localapi import LocalClient, default_socket_path

    path = args.socket or os.environ.get("TS_SOCKET") or default_socket_path(args.state_dir or default_state_dir())
    return LocalClient(path)


def _fail(command: str, exc: BaseException) -> int:
    print(f"tsnet {command}: {exc}", file=sys.stderr)
    return 1


def _ago(value: Any, now: _dt.datetime) -> str:
    """A timestamp (ISO text or seconds) as '12s ago'; '-' when unknown."""
    if value in (None, "", 0):
        return "-"
    try:
        if isinstance(value, int | float):
            when = _dt.datetime.fromtimestamp(float(value), _dt.timezone.utc)
        else:
            when = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=_dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        return str(value)
    if when.year <= 1:
        return "-"
    secs = max(0, int((now - when).total_seconds()))
    if secs < 120:
        return f"{secs}s ago"
    if secs < 7200:
        return f"{secs // 60}m ago"
    if secs < 172800:
        return f"{secs // 3600}h ago"
    return f"{secs // 86400}d ago"


def _first_v4(addresses: Sequence[Any]) -> str:
    texts = [str(a).split("/")[0] for a in addresses or ()]
    for t in texts:
        try:
            if ipaddress.ip_address(t).version == 4:
                return t
        except ValueError:
            continue
    return texts[0] if texts else "-"


def format_status(st: dict[str, Any], *, now: _dt.datetime | None = None) -> str:
    """The ``tsnet status`` table from ``Status.as_dict()``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    me = st.get("self_node") or st.get("self") or {}
    rows = [("PEER", "ADDRESS", "OS", "PATH", "LAST HANDSHAKE")]
    rows.append((f"{me.get('name') or me.get('dns_name') or '-'} (this node)", _first_v4(me.get("addresses", ())),
                 me.get("os") or "-", "-", "-"))
    for p in sorted(st.get("peers") or (), key=lambda p: str(p.get("name") or p.get("dns_name") or "")):
        name = p.get("name") or p.get("dns_name") or "?"
        if p.get("online") is False:
            name += " (offline)"
        rows.append((name, _first_v4(p.get("addresses", ())), p.get("os") or "-", p.get("path") or "idle",
                     _ago(p.get("last_handshake"), now)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    state = st.get("backend_state")
    if state and state != "Running":
        lines.insert(0, f"# backend state: {state}")
        if st.get("auth_url"):
            lines.insert(1, f"# to log in, visit: {st['auth_url']}")
    for h in st.get("health") or ():
        lines.append(f"# health: {h}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    from .localapi import LocalAPIError

    try:
        st = _client(args).status()
    except LocalAPIError as exc:
        return _fail("status", exc)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_status(st))
    # As ``tailscale status``: exit 1 unless the node is Running or Starting (--json always 0).
    return 0 if st.get("backend_state") in ("Running", "Starting") else 1


def _format_latency(seconds: Any) -> str:
    try:
        ms = float(seconds) * 1000
    except (TypeError, ValueError):
        return "?"
    return f"{ms:.0f}ms" if ms >= 10 else f"{ms:.2f}ms"


def _cmd_ping(args: argparse.Namespace) -> int:
    from .localapi import LocalAPIError

    client = _client(args)
    ok = 0
    try:
        for i in range(args.count):
            try:
                r = client.ping(args.peer, timeout=args.timeout)
            except LocalAPIError as exc:
                if exc.status in (0, 404, 400):  # no node, or no such peer: no point retrying
                    return _fail("ping", exc)
                print(f"ping {args.peer}: {exc}", flush=True)
                continue
            ok += 1
            endpoint = r.get("endpoint")
            via = r.get("path") or "?"
            where = f" ({endpoint})" if endpoint and str(endpoint) not in via else ""
            who = r.get("peer") or args.peer
            ip = r.get("ip")
            print(f"pong from {who}{f' ({ip})' if ip else ''} via {via}{where} in "
                  f"{_format_latency(r.get('latency'))}", flush=True)
            if i + 1 < args.count and args.interval > 0:
                time.sleep(args.interval)  # pacing between pings, as tailscale ping does
    except KeyboardInterrupt:
        pass
    return 0 if ok else 1


def format_netcheck(report: dict[str, Any]) -> str:
    """``tsnet netcheck`` output: one ``key: value`` line per field, nested values indented."""
    lines = ["Report:"]

    def walk(obj: Any, indent: int, latencies: bool = False) -> None:
        pad = "  " * indent
        for key, value in obj.items():
            label = str(key).replace("_", " ")
            if isinstance(value, dict) and value:
                lines.append(f"{pad}* {label}:")
                walk(value, indent + 1, "latency" in str(key).lower())
            elif isinstance(value, list):
                lines.append(f"{pad}* {label}: {', '.join(str(v) for v in value) or '-'}")
            else:
                if isinstance(value, float) and (latencies or "latency" in str(key).lower()):
                    value = _format_latency(value)
                lines.append(f"{pad}* {label}: {value if value not in (None, '') else '-'}")

    walk(report if isinstance(report, dict) else {"report": report}, 1)
    return "\n".join(lines)


def _cmd_netcheck(args: argparse.Namespace) -> int:
    from .localapi import LocalAPIError

    try:
        report = _client(args).netcheck()
    except LocalAPIError as exc:
        return _fail("netcheck", exc)
    print(json.dumps(report, indent=2) if args.json else format_netcheck(report))
    return 0


def _cmd_whois(args: argparse.Namespace) -> int:
    from .localapi import LocalAPIError

    try:
        who = _client(args).whois(args.addr)
    except LocalAPIError as exc:
        return _fail("whois", exc)
    if args.json:
        print(json.dumps(who, indent=2))
        return 0
    node = who.get("node") if isinstance(who.get("node"), dict) else who
    user = who.get("user_profile") or who.get("user") or {}
    print("Machine:")
    for key, label in (("name", "Name"), ("dns_name", "DNS name"), ("id", "ID"), ("addresses", "Addresses"),
                       ("tags", "Tags"), ("os", "OS")):
        if node.get(key) not in (None, "", [], ()):
            val = node[key]
            print(f"  {label}: {', '.join(map(str, val)) if isinstance(val, list) else val}")
    if user:
        print("User:")
        if isinstance(user, dict):
            for key, label in (("login_name", "Login name"), ("display_name", "Display name"), ("id", "ID")):
                if user.get(key) not in (None, ""):
                    print(f"  {label}: {user[key]}")
        else:
            print(f"  {user}")
    return 0


# -- registration ------------------------------------------------------------------------------------

_UP_EPILOG = "environment (flags win):\n" + "\n".join(
    f"  {flag:22} {', '.join('$' + v for v in names)}" for flag, names in ENV_VARS.items()
) + "\n\n--forward in $TS_FORWARD is a comma- or space-separated list. Booleans take true/false/1/0."


def _positive(kind: type, *, zero_ok: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a number above zero (or at least zero); else a usage error (exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not zero_ok) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} must be {'0 or more' if zero_ok else 'above 0'}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def register(subparsers: Any) -> None:
    """Add ``up``, ``status``, ``ping``, ``netcheck`` and ``whois``."""
    up = subparsers.add_parser("up", help="run a node (like tailscaled in a container) until SIGTERM",
                               epilog=_UP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--control-url", metavar="URL", help="coordination server, e.g. http://127.0.0.1:8080")
    up.add_argument("--authkey", metavar="KEY", help="pre-auth key (else an interactive login URL is printed)")
    up.add_argument("--hostname", help="this node's name on the tailnet")
    up.add_argument("--state-dir", metavar="DIR", help=f"keys and settings (default {default_state_dir()})")
    up.add_argument("--state", metavar="mem:", help="'mem:' keeps state in memory only (pair with --ephemeral)")
    up.add_argument("--ephemeral", action="store_true", default=None,
                    help="remove the node from the tailnet when it stops")
    up.add_argument("--advertise-tags", metavar="TAGS", help="tag:a,tag:b")
    up.add_argument("--socks5", metavar="ADDR", help="serve a SOCKS5 proxy into the tailnet on HOST:PORT")
    up.add_argument("--http-proxy", metavar="ADDR", help="serve an HTTP proxy into the tailnet on HOST:PORT")
    up.add_argument("--forward", metavar="PORT=HOST:PORT", action="append", default=[],
                    help="forward tailnet TCP PORT to HOST:PORT (repeatable)")
    up.add_argument("--relay-server-port", metavar="N", help="offer a peer relay on UDP port N")
    up.add_argument("--port", metavar="N", help="UDP port for WireGuard (default: any)")
    up.add_argument("--metrics-listen", metavar="ADDR", help="serve Prometheus /metrics on HOST:PORT")
    up.add_argument("--health-listen", metavar="ADDR", help="serve /healthz on HOST:PORT (may equal --metrics-listen)")
    up.add_argument("--json-logs", action="store_true", default=None, help="log one JSON object per line")
    up.add_argument("--socket", metavar="PATH", help="local API socket (default: tsnet.sock in the state dir)")
    up.add_argument("--timeout", metavar="SECONDS", help="give up joining after this long (default 60)")
    up.add_argument("--udp-bind", metavar="IP", help="advanced: local IPv4 address for the UDP socket (default all)")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logs from the node")
    up.set_defaults(func=_cmd_up)

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text)
        p.add_argument("--state-dir", metavar="DIR", help=f"the node's state dir (default {default_state_dir()})")
        p.add_argument("--socket", metavar="PATH", help="the node's local API socket (overrides --state-dir)")
        return p

    status = client_parser("status", "show this node's peers and the path to each (exit 1 unless running)")
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=_cmd_status)

    ping = client_parser("ping", "ping a peer over the tailnet and show the path and latency")
    ping.add_argument("peer", help="peer name, MagicDNS name or tailnet IP")
    ping.add_argument("-c", "--count", type=_positive(int), default=10, help="number of pings (default %(default)s)")
    ping.add_argument("--timeout", type=_positive(float), default=5.0,
                      help="seconds to wait for each pong (default 5)")
    ping.add_argument("--interval", type=_positive(float, zero_ok=True), default=0.5,
                      help="seconds between pings (default 0.5)")
    ping.set_defaults(func=_cmd_ping)

    netcheck = client_parser("netcheck", "report UDP, NAT type and DERP latencies as this node sees them")
    netcheck.add_argument("--json", action="store_true")
    netcheck.set_defaults(func=_cmd_netcheck)

    whois = client_parser("whois", "show which node and user own a tailnet address")
    whois.add_argument("addr", help="IP or IP:PORT")
    whois.add_argument("--json", action="store_true")
    whois.set_defaults(func=_cmd_whois)
