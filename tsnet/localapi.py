"""The local API: HTTP/1.1 over a Unix socket in the node's state directory.

Every running node (``tsnet up``, or any :class:`tsnet.Server` whose owner calls :func:`serve`) answers
these requests on ``<state dir>/tsnet.sock`` (mode 0600, so only the node's user can talk to it):

==============================================  =====================================================
``GET /localapi/v0/status``                      ``Status.as_dict()``: self, peers with paths, health
``GET /localapi/v0/peers``                       just the peers (name, addresses, path, handshake, bytes)
``GET|POST /localapi/v0/ping?peer=NAME``         one ping: ``{"latency": s, "path": ..., "endpoint": ...}``
``GET /localapi/v0/netcheck``                    the netcheck report
``GET /localapi/v0/whois?addr=IP[:PORT]``        who owns a tailnet address (404 if nobody)
``GET /localapi/v0/metrics``                     Prometheus text (same as ``/metrics``)
``GET /localapi/v0/healthz``                     200 ``ok`` or 503 with one reason per line
==============================================  =====================================================

Errors are JSON ``{"error": "..."}`` with a 4xx/5xx status (503 while the node is not running). :class:`LocalClient` is a small blocking
client for the CLI (``tsnet status``, ``tsnet ping``, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import http.client
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import trio

from . import metrics as _metrics
from .control.httpd import HTTPRequest, Reply, serve_http1
from .errors import NotRunningError

__all__ = ["SOCKET_NAME", "LocalAPIError", "LocalClient", "default_socket_path", "make_app", "serve", "to_jsonable"]

log = logging.getLogger(__name__)

#: The socket's file name inside the state directory.
SOCKET_NAME = "tsnet.sock"
_PREFIX = "/localapi/v0/"
_JSON = "application/json"
#: A ping through the local API never waits longer than this, whatever the client asks.
_MAX_PING_TIMEOUT = 60.0


def default_socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where a node with this state directory serves its local API."""
    return Path(state_dir) / SOCKET_NAME


def to_jsonable(obj: Any) -> Any:
    """Turn status objects (dataclasses, addresses, datetimes, enums...) into plain JSON values."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    as_dict = getattr(obj, "as_dict", None)
    if callable(as_dict):
        return to_jsonable(as_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if isinstance(obj, _dt.timedelta):
        return obj.total_seconds()
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "__dict__"):
        return {k: to_jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return str(obj)  # addresses, keys and other value types print as their text form


def _json_reply(status: int, obj: Any) -> Reply:
    return Reply(status, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode(), content_type=_JSON)


def _error(status: int, message: str) -> Reply:
    return _json_reply(status, {"error": message})


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse_whois_addr(text: str) -> Any:
    """``100.64.0.1``, ``100.64.0.1:80``, ``fd7a::1`` or ``[fd7a::1]:80`` -> an IP address (ValueError if not)."""
    text = text.strip()
    if text.startswith("["):
        return ipaddress.ip_address(text[1:].split("]", 1)[0])
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        host, sep, port = text.rpartition(":")
        if sep and port.isdigit():
            return ipaddress.ip_address(host)
        raise


def make_app(server: Any) -> Any:
    """The local API as an app for :func:`tsnet.control.httpd.serve_http1`."""

    async def app(req: HTTPRequest) -> Reply:
        if not req.path.startswith(_PREFIX):
            return _error(404, f"unknown path {req.path!r} (the local API lives under {_PREFIX})")
        name = req.path[len(_PREFIX):]
        query = req.query
        try:
            if name == "status" and req.method == "GET":
                return _json_reply(200, server.status())
            if name == "peers" and req.method == "GET":
                return _json_reply(200, list(server.status().peers))
            if name == "ping" and req.method in ("GET", "POST"):
                peer = query.get("peer", "").strip()
                if not peer:
                    return _error(400, "ping needs ?peer=NAME or IP")
                try:
                    timeout = min(float(query.get("timeout", "5")), _MAX_PING_TIMEOUT)
                except ValueError:
                    timeout = math.nan
                if not timeout > 0:  # also NaN
                    return _error(400, "timeout must be a number of seconds above 0")
                try:
                    result = await server.ping(peer, timeout=timeout)
                except (TimeoutError, trio.TooSlowError) as exc:
                    return _error(504, f"no reply from {peer} within {timeout:g}s ({_error_text(exc)})")
                except (LookupError, ValueError, socket.gaierror) as exc:  # unknown peer
                    return _error(404, _error_text(exc))
                return _json_reply(200, result)
            if name == "netcheck" and req.method == "GET":
                return _json_reply(200, await server.netcheck())
            if name == "whois" and req.method == "GET":
                text = query.get("addr", "")
                try:
                    addr = _parse_whois_addr(text)
                except ValueError:
                    return _error(400, f"whois needs ?addr=IP[:PORT], not {text!r}")
                who = server.whois(str(addr))
                if who is None:
                    return _error(404, f"no node owns {addr}")
                return _json_reply(200, who)
            if name == "metrics" and req.method == "GET":
                body = _metrics.render(_metrics.node_metrics(server)).encode()
                return Reply(200, body, content_type=_metrics.CONTENT_TYPE)
            if name == "healthz" and req.method == "GET":
                problems = _metrics.health_problems(server)
                return Reply(503 if problems else 200, ("".join(p + "\n" for p in problems) or "ok\n").encode())
        except NotRunningError as exc:  # starting, stopping or stopped: not a server fault
            return _error(503, _error_text(exc))
        except Exception as exc:  # noqa: BLE001 - one failed request must not stop the API
            log.exception("local API %s failed", req.path)
            return _error(500, _error_text(exc))
        return _error(404 if name not in ("status", "peers", "ping", "netcheck", "whois", "metrics", "healthz") else 405,
                      f"no {req.method} {req.path}")

    return app


def _bind_private_unix_socket(path: Path) -> socket.socket:
    """Bind a listening Unix socket at ``path`` with mode 0600 from the start.

    We bind under a random name, chmod, then rename into place, so there is no moment where another user
    could connect. A stale socket at ``path`` (left by a crashed node) is replaced; a live one is an error.
    """
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listening: a leftover from an earlier run
        else:
            raise OSError(f"another node is already serving the local API at {path}")
        finally:
            probe.close()
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(staging))
        os.chmod(staging, 0o600)
        os.replace(staging, path)
        sock.listen(64)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    return sock


async def serve(server: Any, path: str | os.PathLike[str], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the local API for ``server`` on a Unix socket at ``path`` (mode 0600) until cancelled.

    ``path`` is usually :func:`default_socket_path` of the node's state directory; the directory is created
    (mode 0700) if missing. ``task_status.started`` receives the socket path. The socket file is removed when
    serving stops.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    raw = _bind_private_unix_socket(path)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    app = make_app(server)

    async def handle(stream: trio.abc.Stream) -> None:
        await serve_http1(stream, app, remote="unix", idle_timeout=60.0)

    try:
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
            task_status.started(path)
    finally:
        try:
            path.unlink()
        except OSError:
            pass


class LocalAPIError(Exception):
    """The node answered with an error (``status`` is the HTTP status; 0 when we could not reach it)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("local-tsnet", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class LocalClient:
    """Blocking client of a node's local API (what the CLI uses)."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, name: str, query: dict[str, str] | None = None,
                *, timeout: float | None = None) -> tuple[int, bytes]:
        """One request; returns ``(status, body)``. Raises LocalAPIError if the node is not reachable."""
        from urllib.parse import urlencode

        target = _PREFIX + name + ("?" + urlencode(query) if query else "")
        conn = _UnixHTTPConnection(self.socket_path, self.timeout if timeout is None else timeout)
        try:
            conn.request(method, target)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except FileNotFoundError:
            raise LocalAPIError(f"no node is running here (no local API socket at {self.socket_path})") from None
        except ConnectionRefusedError:
            raise LocalAPIError(f"no node is listening on {self.socket_path} (stale socket?)") from None
        except PermissionError:
            raise LocalAPIError(f"permission denied on {self.socket_path} (the socket is mode 0600)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise LocalAPIError(f"local API at {self.socket_path}: {_error_text(exc)}") from None
        finally:
            conn.close()

    def get_json(self, name: str, query: dict[str, str] | None = None, *, method: str = "GET",
                 timeout: float | None = None) -> Any:
        """A JSON endpoint's value; a non-200 answer raises LocalAPIError with the node's message."""
        status, body = self.request(method, name, query, timeout=timeout)
        try:
            value = json.loads(body) if body else None
        except ValueError:
            value = None
        if status != 200:
            message = value.get("error") if isinstance(value, dict) else body.decode("utf-8", "replace").strip()
            raise LocalAPIError(message or f"HTTP {status}", status)
        return value

    def status(self) -> dict[str, Any]:
        """``Status.as_dict()`` of the node."""
        return self.get_json("status")

    def peers(self) -> list[dict[str, Any]]:
        """The node's peers, each with its current path."""
        return self.get_json("peers")

    def ping(self, peer: str, *, timeout: float = 5.0) -> dict[str, Any]:
        """One ping to ``peer``: ``{"latency": seconds, "path": ..., "endpoint": ...}``."""
        return self.get_json("ping", {"peer": peer, "timeout": f"{timeout:g}"}, method="POST", timeout=timeout + 5)

    def netcheck(self) -> dict[str, Any]:
        """The node's netcheck report."""
        return self.get_json("netcheck", timeout=max(self.timeout, 30.0))

    def whois(self, addr: str) -> dict[str, Any]:
        """Who owns ``addr`` (raises LocalAPIError with status 404 if nobody)."""
        return self.get_json("whois", {"addr": addr})

    def metrics(self) -> str:
        """Prometheus text."""
        status, body = self.request("GET", "metrics")
        if status != 200:
            raise LocalAPIError(body.decode("utf-8", "replace").strip() or f"HTTP {status}", status)
        return body.decode()
