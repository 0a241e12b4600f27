"""AWS Lambda: reach a private service on your tailnet from a function, no TUN, no extension.

The node is ephemeral with in-memory state (nothing to persist in Lambda), started once per
container on the first invocation and reused by every later one (Lambda keeps the process warm).
Requests go through the node's in-process HTTP proxy on 127.0.0.1, so plain ``requests`` works.
When the container is recycled the node logs out (atexit), so it disappears from the tailnet at
once instead of lingering; if Lambda kills the process first, the control server's ephemeral
timeout removes it.

Function settings (environment):
    TS_AUTHKEY      an ephemeral, reusable, pre-approved auth key (e.g. tagged tag:lambda)
    TS_CONTROL_URL  optional (default Tailscale's)
    TS_HOSTNAME     optional (default "lambda")
    TARGET_URL      the private service, e.g. http://grafana:3000/api/health

Handler: ``lambda_handler.handler``.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from tsnet import blocking

#: Extra ``tsnet.Server`` settings (tests bind magicsock to loopback with ``udp_bind``).
NODE_SETTINGS: dict[str, Any] = {}

_lock = threading.Lock()
_node: blocking.Server | None = None
_session: Any = None
#: How many times this container started a node (1 for a warm container).
starts = 0


def _get_session() -> Any:
    """The node and its HTTP session, started on the first call in this container."""
    global _node, _session, starts
    with _lock:
        if _node is None:
            node = blocking.Server(hostname=os.environ.get("TS_HOSTNAME", "lambda"), ephemeral=True, store="mem:",
                                   **NODE_SETTINGS)
            node.up(timeout=float(os.environ.get("TS_UP_TIMEOUT", "20")))
            atexit.register(node.close)
            _node, _session = node, node.http_client()
            starts += 1
        return _session


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """GET ``event["url"]`` (or TARGET_URL) over the tailnet and return it as an API Gateway response."""
    url = (event or {}).get("url") or os.environ["TARGET_URL"]
    session = _get_session()
    response = session.get(url, timeout=15)
    return {
        "statusCode": response.status_code,
        "headers": {"content-type": response.headers.get("content-type", "text/plain")},
        "body": response.text,
    }


def shutdown() -> None:
    """Log the node out now (what atexit does when the container ends)."""
    global _node, _session
    with _lock:
        if _node is not None:
            _node.close()
        _node, _session = None, None
