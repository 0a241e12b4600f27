"""Azure Functions (Python v2 programming model): an HTTP function that reaches a tailnet service.

App settings (Configuration -> Application settings, or local.settings.json locally):
    TS_AUTHKEY      ephemeral, reusable auth key
    TS_CONTROL_URL  optional
    TS_HOSTNAME     optional (default: WEBSITE_SITE_NAME, else "azure-function")
    TS_STATE        optional: "mem:" (default), or a directory on the persistent /home share
    TARGET_URL      default target, e.g. http://inventory/api/items

The node starts once per worker process and is reused by every invocation.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from tsnet import blocking

try:  # the Functions host provides this; the core logic below does not need it
    import azure.functions as func
except ImportError:  # pragma: no cover - exercised only outside Azure
    func = None

#: Extra ``tsnet.Server`` settings (tests bind magicsock to loopback with ``udp_bind``).
NODE_SETTINGS: dict[str, Any] = {}

_lock = threading.Lock()
_node: blocking.Server | None = None
_session: Any = None


def settings_from_environment() -> dict[str, Any]:
    """tsnet settings from app settings: TS_* variables plus Azure's own site name."""
    store = os.environ.get("TS_STATE", "mem:")
    return {
        "hostname": os.environ.get("TS_HOSTNAME") or os.environ.get("WEBSITE_SITE_NAME") or "azure-function",
        "ephemeral": store == "mem:" or os.environ.get("TS_EPHEMERAL", "true").lower() in ("1", "true", "yes"),
        "store": store,
        **NODE_SETTINGS,
    }


def session() -> Any:
    """The HTTP session over the tailnet (starting the node on first use)."""
    global _node, _session
    with _lock:
        if _node is None:
            node = blocking.Server(**settings_from_environment())
            node.up(timeout=20)
            atexit.register(node.close)
            _node, _session = node, node.http_client()
        return _session


def fetch(url: str | None) -> tuple[int, str, str]:
    """GET ``url`` (or TARGET_URL) over the tailnet: (status, content type, body)."""
    response = session().get(url or os.environ["TARGET_URL"], timeout=15)
    return response.status_code, response.headers.get("content-type", "text/plain"), response.text


def shutdown() -> None:
    global _node, _session
    with _lock:
        if _node is not None:
            _node.close()
        _node, _session = None, None


if func is not None:  # pragma: no cover - needs the Azure Functions host
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

    @app.route(route="fetch")
    def fetch_function(req: "func.HttpRequest") -> "func.HttpResponse":
        status, ctype, body = fetch(req.params.get("url"))
        return func.HttpResponse(body, status_code=status, mimetype=ctype.split(";")[0])
