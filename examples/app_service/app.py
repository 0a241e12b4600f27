"""Azure App Service (or any WSGI host): a web app that joins the tailnet at startup.

The node starts when the app is imported (gunicorn's worker boot), configured entirely from app
settings:

    TS_AUTHKEY      auth key (reusable; ephemeral unless TS_STATE_DIR is set)
    TS_CONTROL_URL  optional
    TS_HOSTNAME     optional (default: WEBSITE_SITE_NAME, else "app-service")
    TS_STATE_DIR    optional: e.g. /home/tsnet-state (App Service persists /home), keeps one node
                    across restarts; without it the node is ephemeral with memory state
    TS_SERVE_PORT   optional: also publish this app on the tailnet at :80, forwarding to the
                    local port given here (App Service's PORT, usually 8000)

Routes: ``/`` (node status as JSON) and ``/fetch?url=http://peer/...`` (GET over the tailnet).
Run with ``gunicorn app:application`` (one worker: each worker process would be its own node).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from typing import Any

from tsnet import blocking

#: Extra ``tsnet.Server`` settings (tests bind magicsock to loopback with ``udp_bind``).
NODE_SETTINGS: dict[str, Any] = {}

_lock = threading.Lock()
_node: blocking.Server | None = None


def node() -> blocking.Server:
    """The app's tailnet node, started once per process from the app settings."""
    global _node
    with _lock:
        if _node is None:
            persistent = bool(os.environ.get("TS_STATE_DIR"))
            n = blocking.Server(
                hostname=os.environ.get("TS_HOSTNAME") or os.environ.get("WEBSITE_SITE_NAME") or "app-service",
                ephemeral=not persistent,
                **({} if persistent else {"store": "mem:"}),
                **NODE_SETTINGS,
            )
            n.up(timeout=30)
            if os.environ.get("TS_SERVE_PORT"):
                n.serve_forward(80, f"127.0.0.1:{int(os.environ['TS_SERVE_PORT'])}")
            _node = n
        return _node


def shutdown() -> None:
    global _node
    with _lock:
        if _node is not None:
            _node.close()
        _node = None


def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The WSGI app."""
    n = node()
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        st = n.status()
        body = json.dumps({"state": st.backend_state, "ips": [str(ip) for ip in n.tailscale_ips()],
                           "peers": [p.name for p in st.peers]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/fetch":
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        url = (query.get("url") or [""])[0]
        if not url.startswith("http://"):
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"want ?url=http://peer/path\n"]
        response = n.http_client().get(url, timeout=15)
        body = response.content
        start_response(f"{response.status_code} {response.reason}",
                       [("Content-Type", response.headers.get("content-type", "text/plain")),
                        ("Content-Length", str(len(body)))])
        return [body]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
