"""Prometheus text exposition and health checks for a running node.

Three pieces, each usable on its own:

* :func:`render` turns a node's counters (``Server.metrics()``), its per-peer traffic (``Server.status()``)
  and this Python process's resource use into the Prometheus text format (version 0.0.4).
* :func:`health_problems` says why a node is not healthy (empty list: healthy), the way containerboot's
  ``TS_ENABLE_HEALTH_CHECK`` endpoint does.
* :func:`serve` runs a small HTTP server (h11) with ``/metrics`` and/or ``/healthz`` on a TCP address.

The node is duck-typed: anything with ``metrics() -> dict[str, float]`` and ``status()`` works.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import trio

from .control.httpd import HTTPRequest, Reply, serve_http1

__all__ = [
    "CONTENT_TYPE",
    "health_problems",
    "make_app",
    "parse_listen",
    "process_metrics",
    "render",
    "serve",
]

#: The Content-Type of the Prometheus text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Gauges we know by name; everything else ending in _total is a counter, the rest are gauges.
_HELP = {
    "tailscaled_peer_relay_endpoints": "Peer relay endpoints this node is serving (when it is a peer relay)",
    "tsnet_peers": "Peers in the current network map",
    "tsnet_peers_online": "Peers the control server reports online",
    "tsnet_peer_path_count": "Peers by the path their traffic takes now",
    "tsnet_peer_rx_bytes_total": "Bytes received from peers, by the path each peer uses now",
    "tsnet_peer_tx_bytes_total": "Bytes sent to peers, by the path each peer uses now",
    "tsnet_backend_running": "1 when the node is logged in and running",
    "tsnet_health_problems": "Number of current health problems",
    "tsnet_control_map_connected": "1 while the map long-poll to the control server is open",
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds",
    "process_resident_memory_bytes": "Resident memory size in bytes",
    "process_max_resident_memory_bytes": "Peak resident memory size in bytes",
    "process_open_fds": "Number of open file descriptors",
    "process_start_time_seconds": "Start time of the process since unix epoch in seconds",
    "python_gc_collections_total": "Garbage collections by generation",
    "python_gc_objects_collected_total": "Objects collected by the garbage collector, by generation",
    "python_info": "Python platform information",
}

_NAME_OK = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _process_start_time() -> float:
    """When this process started (Unix time), from /proc; the import time where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, clock ticks since boot) follows the parenthesised command name.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


_PROCESS_START = _process_start_time()


def _sanitize_name(name: str) -> str:
    """A metric name Prometheus accepts: bad characters become ``_``, a leading digit gets a ``_``."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    if not name or not _NAME_OK.fullmatch(name):
        name = "_" + name
    return name


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _split_key(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``'name{a="x",b="y"}'`` -> ``('name', (('a','x'), ('b','y')))``; a bare name has no labels."""
    name, brace, rest = key.partition("{")
    labels: list[tuple[str, str]] = []
    if brace:
        body = rest.rstrip().removesuffix("}")
        pos = 0
        while pos < len(body):
            m = _LABEL_PAIR.match(body, pos)
            if m is None or m.end() == pos:
                break  # malformed label text: keep what parsed, drop the rest
            labels.append((m.group(1), m.group(2).encode().decode("unicode_escape")))
            pos = m.end()
    return _sanitize_name(name.strip()), tuple(labels)


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _path_kind(path: str) -> str:
    """``'direct 1.2.3.4:41641'`` -> ``direct``; ``'relay via X'`` -> ``relay``; ``'derp region 1'`` -> ``derp``."""
    word = (path or "idle").split(" ", 1)[0].lower()
    return word if word in ("direct", "relay", "derp", "idle") else "other"


def process_metrics() -> dict[str, float]:
    """Resource use of this Python process, named like prometheus_client's process collector."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, float] = {
        "process_cpu_seconds_total": usage.ru_utime + usage.ru_stime,
        "process_max_resident_memory_bytes": usage.ru_maxrss * 1024.0,  # Linux reports KiB
        "process_start_time_seconds": _PROCESS_START,
    }
    try:
        with open("/proc/self/statm") as f:
            out["process_resident_memory_bytes"] = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        out["process_open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass
    for gen, stats in enumerate(gc.get_stats()):
        out[f'python_gc_collections_total{{generation="{gen}"}}'] = float(stats.get("collections", 0))
        out[f'python_gc_objects_collected_total{{generation="{gen}"}}'] = float(stats.get("collected", 0))
    v = sys.version_info
    out[
        f'python_info{{implementation="{platform.python_implementation()}",major="{v.major}",minor="{v.minor}",'
        f'patchlevel="{v.micro}",version="{platform.python_version()}"}}'
    ] = 1.0
    return out


def _status_metrics(status: Any) -> dict[str, float]:
    """Gauges and per-path byte counters derived from a ``Status`` snapshot."""
    out: dict[str, float] = {}
    peers = list(getattr(status, "peers", None) or ())
    out["tsnet_peers"] = float(len(peers))
    out["tsnet_peers_online"] = float(sum(1 for p in peers if getattr(p, "online", False)))
    by_path: dict[str, list[float]] = {k: [0.0, 0.0, 0.0] for k in ("direct", "relay", "derp", "idle")}
    for p in peers:
        kind = _path_kind(str(getattr(p, "path", "") or "idle"))
        row = by_path.setdefault(kind, [0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += float(getattr(p, "rx_bytes", 0) or 0)
        row[2] += float(getattr(p, "tx_bytes", 0) or 0)
    for kind, (count, rx, tx) in by_path.items():
        out[f'tsnet_peer_path_count{{path="{kind}"}}'] = count
        out[f'tsnet_peer_rx_bytes_total{{path="{kind}"}}'] = rx
        out[f'tsnet_peer_tx_bytes_total{{path="{kind}"}}'] = tx
    out["tsnet_backend_running"] = 1.0 if getattr(status, "backend_state", "") == "Running" else 0.0
    out["tsnet_health_problems"] = float(len(list(getattr(status, "health", None) or ())))
    return out


def render(*sources: Mapping[str, float]) -> str:
    """Prometheus text for one or more ``{key: value}`` maps (later maps win on equal keys).

    A key is a metric name, optionally with labels in Prometheus syntax (``name{path="derp"}``). Names ending
    in ``_total`` are typed as counters, all others as gauges. Bad names are sanitised; non-numeric values
    are skipped, so a node's odd counter can never break the page.
    """
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for source in sources:
        for key, value in source.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            name, labels = _split_key(str(key))
            families.setdefault(name, {})[labels] = number
    lines: list[str] = []
    for name in sorted(families):
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# HELP {name} {_HELP.get(name, name.replace('_', ' '))}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, number in sorted(families[name].items()):
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {_format_value(number)}" if labels else f"{name} {_format_value(number)}")
    return "\n".join(lines) + "\n"


def relay_metrics(relay: Any) -> dict[str, float]:
    """tailscaled's peer relay user metrics from a :class:`tsnet.relay.server.RelayServer` (same names)."""
    out: dict[str, float] = {}
    for state, n in relay.endpoint_gauge().items():
        out[f'tailscaled_peer_relay_endpoints{{state="{state}"}}'] = float(n)
    for name, attr in (("tailscaled_peer_relay_forwarded_packets_total", "forwarded_packets"),
                       ("tailscaled_peer_relay_forwarded_bytes_total", "forwarded_bytes")):
        table = getattr(relay, attr, None) or {}
        for fin in ("udp4", "udp6"):
            for fout in ("udp4", "udp6"):
                out[f'{name}{{transport_in="{fin}",transport_out="{fout}"}}'] = float(table.get((fin, fout), 0))
    return out


def _relay_server_of(server: Any) -> Any:
    # Server has no public accessor for its peer relay yet; its magicsock driver holds it when relaying.
    return getattr(getattr(server, "_driver", None), "relay_server", None)


def wireguard_metrics(counters: Any) -> dict[str, float]:
    """WireGuard device counters (handshakes sent/completed/failed, data, every drop reason) as ``_total``s."""
    fields = dataclasses.asdict(counters) if dataclasses.is_dataclass(counters) else dict(counters)
    return {f"tsnet_wireguard_{name}_total": float(v) for name, v in fields.items() if isinstance(v, int | float)}


def _wireguard_counters_of(server: Any) -> Any:
    # Server.metrics() does not carry the WireGuard device counters yet; its magicsock core owns the device.
    core = getattr(getattr(server, "_driver", None), "core", None)
    return getattr(getattr(core, "wg", None), "counters", None)


def node_metrics(server: Any) -> dict[str, float]:
    """Everything we export for ``server``: its own counters, status-derived gauges and process metrics.

    A node whose ``metrics()`` or ``status()`` fails still gets the process metrics (the failure is exported
    as ``tsnet_metrics_errors``), so scraping never takes the node down.
    """
    errors = 0
    node: dict[str, float] = {}
    try:
        node = dict(server.metrics())
    except Exception:  # noqa: BLE001 - a scrape must not fail because a counter source did
        errors += 1
    derived: dict[str, float] = {}
    try:
        derived = _status_metrics(server.status())
    except Exception:  # noqa: BLE001
        errors += 1
    relay: dict[str, float] = {}
    try:
        relay_server = _relay_server_of(server)
        if relay_server is not None:
            relay = relay_metrics(relay_server)
        wg_counters = _wireguard_counters_of(server)
        if wg_counters is not None:
            relay.update(wireguard_metrics(wg_counters))
    except Exception:  # noqa: BLE001
        errors += 1
    return {**derived, **node, **relay, **process_metrics(), "tsnet_metrics_errors": float(errors)}


def health_problems(server: Any) -> list[str]:
    """Why ``server`` is unhealthy: empty when it is running with no health warnings."""
    try:
        status = server.status()
    except Exception as exc:  # noqa: BLE001 - a broken status is itself a health problem
        return [f"status unavailable: {type(exc).__name__}: {exc}"]
    problems: list[str] = []
    state = str(getattr(status, "backend_state", "") or "Unknown")
    if state != "Running":
        problems.append(f"backend state is {state}")
    problems.extend(str(h) for h in (getattr(status, "health", None) or ()))
    return list(dict.fromkeys(problems))  # one line per distinct problem


def make_app(server: Any, *, metrics: bool = True, health: bool = True) -> Any:
    """An HTTP app (for :func:`tsnet.control.httpd.serve_http1`) with ``/metrics`` and/or ``/healthz``."""

    async def app(req: HTTPRequest) -> Reply:
        if req.method not in ("GET", "HEAD"):
            return Reply(405, b"method not allowed\n", headers=[("allow", "GET, HEAD")])
        if metrics and req.path in ("/metrics", "/debug/metrics"):
            return Reply(200, render(node_metrics(server)).encode(), content_type=CONTENT_TYPE)
        if health and req.path == "/healthz":
            problems = health_problems(server)
            if problems:
                return Reply(503, ("".join(f"{p}\n" for p in problems)).encode())
            return Reply(200, b"ok\n")
        return Reply(404, b"not found\n")

    return app


def parse_listen(text: str, *, flag: str = "address") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (loopback) -> ``(host, port)``; ValueError names ``flag``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{flag}: {text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


async def serve(
    server: Any,
    host: str,
    port: int,
    *,
    metrics: bool = True,
    health: bool = True,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and/or ``/healthz`` for ``server`` on ``host:port`` until cancelled.

    ``task_status.started`` receives the bound port (useful with port 0).
    """
    app = make_app(server, metrics=metrics, health=health)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.abc.Stream) -> None:
        await serve_http1(stream, app, idle_timeout=30.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(bound)

