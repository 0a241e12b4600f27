"""``tsnet demo``: a whole tailnet on this machine, nothing to configure.

It starts an embedded coordination server (with DERP and STUN) on loopback in a temporary directory, brings
up two nodes in this process, serves HTTP on one and fetches it from the other by its MagicDNS name, then
reports the path between them, the round-trip time and the throughput of a 64 MiB transfer. Everything it
started is stopped and its directory removed at the end. ``--keep`` leaves the tailnet running and prints how
to join it from another shell or from a real tailscaled.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

__all__ = ["DemoFailed", "register", "run_demo"]

_MiB = 1 << 20
_CHUNK = 64 * 1024
_WEB_HOST = "demo-web"
_CLIENT_HOST = "demo-client"
_PINGS = 5


class DemoFailed(Exception):
    """A demo step failed; ``step`` names it."""

    def __init__(self, step: str, cause: BaseException) -> None:
        text = str(cause)
        super().__init__(f"step '{step}' failed: {type(cause).__name__}{': ' + text if text else ''}")
        self.step = step
        self.cause = cause


@dataclass(slots=True)
class DemoResult:
    """What the demo measured."""

    path: str = "?"
    rtt: float | None = None
    throughput: float | None = None  # bytes per second
    fetched: str = ""


def _default_server_factory(*, hostname: str, state_dir: Path, auth_key: str, control_url: str) -> Any:
    from . import Server  # type: ignore[attr-defined]

    # The UDP socket binds loopback only: the demo never sends anything off this machine.
    return Server(hostname=hostname, state_dir=str(state_dir), auth_key=auth_key, control_url=control_url,
                  udp_bind="127.0.0.1")


class _Steps:
    """Numbered progress lines; a failing step becomes :class:`DemoFailed` naming it."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.n = 0
        self.out = out

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @asynccontextmanager
    async def step(self, title: str, timeout: float) -> AsyncIterator[None]:
        self.n += 1
        print(f"[{self.n}/{self.total}] {title} ...", file=self.out, flush=True)
        started = time.monotonic()
        try:
            with trio.fail_after(timeout):
                yield
        except trio.TooSlowError as exc:
            raise DemoFailed(title, TimeoutError(f"no result within {timeout:g}s")) from exc
        except DemoFailed:
            raise
        except Exception as exc:
            raise DemoFailed(title, exc) from exc
        print(f"      done in {time.monotonic() - started:.2f}s", file=self.out, flush=True)


# -- the HTTP bits: a tiny server and client over tailnet streams -------------------------------------


async def _read_head(stream: Any, limit: int = 16384) -> tuple[bytes, bytes]:
    """Read until the end of an HTTP head; return (head, bytes after it)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(_CHUNK)
        if not data:
            raise ConnectionError("connection closed before the HTTP head ended")
        buf += data
        if len(buf) > limit and b"\r\n\r\n" not in buf:  # body bytes may follow the head in one read
            raise ConnectionError("HTTP head too large")
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return head, rest


async def _handle_http(stream: Any, web_name: str) -> None:
    """``GET /`` -> a greeting; ``GET /bytes/N`` -> N bytes (at most 1 GiB). One request per connection."""
    try:
        head, _ = await _read_head(stream)
        parts = head.split(b"\r\n", 1)[0].split()
        path = parts[1].decode("latin-1") if len(parts) >= 2 else "/"
        if path.startswith("/bytes/") and path[7:].isdigit() and int(path[7:]) <= 1 << 30:
            size = int(path[7:])
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size)
            chunk = memoryview(bytes(_CHUNK))
            left = size
            while left:
                n = min(left, _CHUNK)
                await stream.send_all(chunk[:n])
                left -= n
        elif path == "/":
            body = f"hello from {web_name}, served over the tailnet by tsnet\n".encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                  b"Connection: close\r\n\r\n%s" % (len(body), body))
        else:
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_http(listener: Any, web_name: str) -> None:
    """Accept connections until the listener (or its node) is closed."""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            nursery.start_soon(_handle_http, stream, web_name)


async def _http_get(node: Any, address: str, path: str, *, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[int, bytes | int]:
    """GET over the tailnet. Returns (status, body); for ``/bytes/`` the body is only counted (an int)."""
    stream = await node.dial("tcp", address)
    try:
        host = address.rsplit(":", 1)[0]
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head, rest = await _read_head(stream)
        status = int(head.split(b"\r\n", 1)[0].split()[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        count_only = path.startswith("/bytes/")
        body = bytearray() if not count_only else None
        got = len(rest)
        if body is not None:
            body += rest
        while length is None or got < length:
            data = await stream.receive_some(256 * 1024)
            if not data:
                break
            got += len(data)
            if body is not None:
                body += data
            if progress is not None and length:
                progress(got, length)
        if length is not None and got < length:
            raise ConnectionError(f"transfer cut short: {got} of {length} bytes")
        return status, (got if body is None else bytes(body))
    finally:
        await trio.aclose_forcefully(stream)


def _fmt_rate(bps: float) -> str:
    return f"{bps / _MiB:.1f} MiB/s ({bps * 8 / 1e6:.0f} Mbit/s)"


def _magic_suffix(node: Any) -> str:
    try:
        return str(node.status().magic_dns_suffix or "").strip(".")
    except Exception:  # noqa: BLE001 - fall back to the embedded server's default domain
        return ""


# -- the demo ------------------------------------------------------------------------------------------


async def run_demo(
    *,
    out: TextIO | None = None,
    keep: bool = False,
    size: int = 64 * _MiB,
    control_port: int = 0,
    server_factory: Callable[..., Any] = _default_server_factory,
    stop: trio.Event | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> DemoResult:
    """Run the demo, printing progress to ``out``; raise :class:`DemoFailed` naming the failed step.

    With ``keep`` it stays up until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None) and reports
    ``(control_url, auth_key)`` through ``task_status`` once everything runs.
    """
    out = out or sys.stdout
    steps = _Steps(7, out)
    result = DemoResult()
    tmp = Path(tempfile.mkdtemp(prefix="tsnet-demo-"))
    nodes: list[Any] = []
    stores: list[Any] = []
    try:
        await _run_steps(steps, result, tmp, nodes, stores, keep=keep, size=size, control_port=control_port,
                         server_factory=server_factory, stop=stop, task_status=task_status, out=out)
    except BaseExceptionGroup as group:
        failed = _first_demo_failure(group)
        if failed is None:
            raise
        raise failed from None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            async with trio.open_nursery() as closers:
                for node in nodes:
                    closers.start_soon(_close_quietly, node)
        for store in stores:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _first_demo_failure(group: BaseExceptionGroup) -> DemoFailed | None:
    for exc in group.exceptions:
        if isinstance(exc, DemoFailed):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (inner := _first_demo_failure(exc)) is not None:
            return inner
    return None


async def _run_steps(steps: _Steps, result: DemoResult, tmp: Path, nodes: list[Any], stores: list[Any], *,
                     keep: bool, size: int, control_port: int, server_factory: Callable[..., Any],
                     stop: trio.Event | None, task_status: Any, out: TextIO) -> None:
    from . import localapi
    from .control.server import ControlServer, ServerConfig, default_derp_map
    from .control.store import Store
    from .derp.server import DerpServer

    async with trio.open_nursery() as nursery:
        async with steps.step("Starting the coordination server with DERP and STUN on 127.0.0.1", 10):
            store = Store.open(tmp / "control")
            stores.append(store)
            config = ServerConfig(base_domain="tailnet.test", interactive_login=False, ephemeral_timeout=60.0)
            control = ControlServer(store, config)
            port = await nursery.start(control.serve, "127.0.0.1", control_port)
            derp = DerpServer()
            control.attach_derp(derp)
            stun_port = await nursery.start(derp.serve_stun, "127.0.0.1", 0)
            config.derp_map = default_derp_map("127.0.0.1", port, stun_port=stun_port)
            control_url = f"http://127.0.0.1:{port}"
            auth_key = store.create_authkey(control.now(), reusable=True, ephemeral=False, tags=(),
                                            expires=None).key
            steps.say(f"      control + DERP at {control_url}, STUN at 127.0.0.1:{stun_port} (state in {tmp})")

        async with steps.step(f"Bringing up two nodes, {_WEB_HOST} and {_CLIENT_HOST}", 30):
            for host in (_WEB_HOST, _CLIENT_HOST):
                nodes.append(server_factory(hostname=host, state_dir=tmp / host, auth_key=auth_key,
                                            control_url=control_url))
            web, client = nodes
            async with trio.open_nursery() as ups:
                for node in nodes:
                    ups.start_soon(lambda n=node: n.up(timeout=25.0))
            for host, node in zip((_WEB_HOST, _CLIENT_HOST), nodes, strict=True):
                steps.say(f"      {host}: {' '.join(str(ip) for ip in node.tailscale_ips())}")
            # Both came up at once: each may have got its first network map before the other existed.
            # Wait until they list each other, or the first handshake goes to a peer that drops it.
            await _wait_for_peers(web, _CLIENT_HOST)
            await _wait_for_peers(client, _WEB_HOST)

        async with steps.step(f"Serving HTTP on {_WEB_HOST}:80", 10):
            listener = await web.listen("tcp", ":80")
            nursery.start_soon(_serve_http, listener, _WEB_HOST)

        suffix = _magic_suffix(client) or config.base_domain
        web_name = f"{_WEB_HOST}.{suffix}"
        async with steps.step(f"Fetching http://{web_name}/ from {_CLIENT_HOST} by its MagicDNS name", 20):
            status, body = await _http_get(client, f"{web_name}:80", "/")
            if status != 200:
                raise ConnectionError(f"HTTP {status}")
            result.fetched = bytes(body).decode("utf-8", "replace").strip()  # type: ignore[arg-type]
            steps.say(f"      HTTP {status}: {result.fetched}")

        async with steps.step(f"Measuring the round-trip time ({_PINGS} pings {_CLIENT_HOST} -> {_WEB_HOST})", 20):
            rtts = []
            for _ in range(_PINGS):
                pong = await client.ping(_WEB_HOST, timeout=5.0)
                rtts.append(float(pong.latency))
                result.path = str(pong.path)
            result.rtt = statistics.median(rtts)
            steps.say(f"      path: {result.path}")
            steps.say(f"      RTT: median {result.rtt * 1000:.2f} ms (min {min(rtts) * 1000:.2f}, "
                      f"max {max(rtts) * 1000:.2f})")

        # Generous: a slow machine should finish (slowly) rather than fail; 512 KiB/s is far below normal.
        async with steps.step(f"Transferring {size / _MiB:g} MiB over HTTP", 30 + size / (512 * 1024)):
            tty = hasattr(out, "isatty") and out.isatty()
            last = [0.0]

            def progress(got: int, total: int) -> None:
                now = time.monotonic()
                if tty and now - last[0] > 0.2:
                    last[0] = now
                    print(f"\r      {got * 100 // total:3d}%", end="", file=out, flush=True)

            started = time.monotonic()
            status, got = await _http_get(client, f"{web_name}:80", f"/bytes/{size}", progress=progress)
            elapsed = max(time.monotonic() - started, 1e-9)
            if tty:
                print("\r", end="", file=out)
            if status != 200 or got != size:
                raise ConnectionError(f"HTTP {status}, {got} of {size} bytes")
            result.throughput = size / elapsed
            steps.say(f"      {size / _MiB:g} MiB in {elapsed:.2f}s: {_fmt_rate(result.throughput)} "
                      f"via {_path_now(client, _WEB_HOST, result.path)}")

        async with steps.step("Summary", 5):
            rtt_ms = f"{result.rtt * 1000:.2f} ms" if result.rtt is not None else "?"
            steps.say(f"      path {result.path}; RTT {rtt_ms}; throughput "
                      f"{_fmt_rate(result.throughput or 0.0)}")
            if keep:
                for host, node in zip((_WEB_HOST, _CLIENT_HOST), nodes, strict=True):
                    await nursery.start(localapi.serve, node, localapi.default_socket_path(tmp / host))

        if keep:
            _print_join_help(out, control_url, auth_key, tmp)
            task_status.started((control_url, auth_key))
            await _wait_for_stop(stop)
        nursery.cancel_scope.cancel()


async def _wait_for_peers(node: Any, peer: str) -> None:
    """Return once ``node``'s status lists ``peer`` (the caller's step timeout bounds this)."""
    while not any(str(p.name).split(".")[0] == peer for p in node.status().peers):
        await trio.sleep(0.05)  # Server has no netmap-changed event to wait on; poll its status


def _path_now(node: Any, host: str, fallback: str) -> str:
    try:
        for p in node.status().peers:
            if str(p.name).split(".")[0] == host and p.path:
                return str(p.path)
    except Exception:  # noqa: BLE001 - the path at ping time is good enough
        pass
    return fallback


async def _close_quietly(node: Any) -> None:
    try:
        await node.close()
    except Exception:  # noqa: BLE001 - cleanup keeps going
        pass


async def _wait_for_stop(stop: trio.Event | None) -> None:
    if stop is not None:
        await stop.wait()
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def _print_join_help(out: TextIO, control_url: str, auth_key: str, tmp: Path) -> None:
    print(f"""
The tailnet keeps running (Ctrl-C stops it and removes {tmp}).

Join it from another shell:
    tsnet up --control-url {control_url} --authkey {auth_key} --hostname my-node --state mem: --ephemeral --socks5 127.0.0.1:1080

Or from a real tailscaled on this machine (the demo's DERP is plain HTTP, so start tailscaled with
TS_DEBUG_USE_DERP_HTTP=1 in its environment):
    tailscale up --login-server={control_url} --authkey={auth_key}

Look at the demo nodes:
    tsnet status --state-dir {tmp / _CLIENT_HOST}
    tsnet ping --state-dir {tmp / _CLIENT_HOST} {_WEB_HOST}
""", file=out, flush=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.monotonic()
    print("tsnet demo: a tailnet on this machine (loopback only)", flush=True)
    try:
        trio.run(lambda: run_demo(keep=args.keep, size=args.size * _MiB, control_port=args.control_port))
    except DemoFailed as exc:
        print(f"tsnet demo: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"tsnet demo: all steps passed in {time.monotonic() - started:.1f}s; everything it started is stopped.",
          flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add ``tsnet demo``."""
    demo = subparsers.add_parser("demo", help="run a working tailnet on this machine and show it in action")
    demo.add_argument("--keep", action="store_true", help="leave the tailnet running and print how to join it")
    demo.add_argument("--size", type=int, default=64, metavar="MIB", help="transfer size in MiB (default 64)")
    demo.add_argument("--control-port", type=int, default=0, metavar="N",
                      help="loopback port for the coordination server (default: any free port)")
    demo.set_defaults(func=_cmd_demo)

