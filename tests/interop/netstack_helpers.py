"""Harness for running our userspace TCP/IP stack against the Linux kernel's, through wireguard-go.

Topology (built by :func:`make_netstack_setup` on top of ``make_wireguard_go_setup``)::

    [ns wg]  kernel TCP/IP  <->  TUN (wireguard-go, MTU 1280)  <-- veth, UDP -->  [ns py]  our UDP socket
             10.x.y.1/24, fd7e:5700:..::1/64 on the TUN                                      open_static_peer()
                                                                                            10.x.y.2, fd7e:5700:..::2

wireguard-go's peer (us) gets both overlay addresses as allowed IPs and our endpoint, so
the kernel can start the conversation (ping, connect) as well as answer it.

Two ways to drive the kernel side:

* **in-process kernel sockets** (:meth:`NetstackSetup.kernel_socket`): a trio socket
  created inside the wg namespace. Cheap; right for edge cases and many small connections.
* **a kernel peer process** (:func:`run_kernel_peer`): this module run as a script inside
  the wg namespace (``python -m tests.interop.netstack_helpers MODE ...``), plain blocking
  sockets, printing one JSON line with what it saw. Used for bulk transfers so that
  the kernel side's Python work does not share our interpreter (and core) with the stack
  under test. A listening socket can be handed to it already bound (``pass_fds``), so
  the test needs no "ready" handshake with the process.

The script half imports only the standard library, so it starts fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

CHUNK = 256 * 1024  # kernel peer's read/write size


# ----------------------------------------------------------------------------------------------------------------
# The kernel peer script (stdlib only; runs inside the wg namespace)
# ----------------------------------------------------------------------------------------------------------------


def _receive_all(conn: socket.socket) -> dict[str, Any]:
    """Read until EOF; return byte count, SHA-256 and seconds from the first byte to EOF."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    first: float | None = None
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        if first is None:
            first = time.perf_counter()
        digest.update(view[:n])
        total += n
    elapsed = time.perf_counter() - first if first is not None else 0.0
    return {"bytes": total, "sha256": digest.hexdigest(), "seconds": elapsed}


def _send_random(conn: socket.socket, size: int) -> dict[str, Any]:
    """Send ``size`` fresh random bytes, then half-close; return count, SHA-256 and seconds."""
    digest = hashlib.sha256()
    start = time.perf_counter()
    left = size
    while left:
        block = os.urandom(min(CHUNK, left))
        digest.update(block)
        conn.sendall(block)
        left -= len(block)
    conn.shutdown(socket.SHUT_WR)
    return {"bytes": size, "sha256": digest.hexdigest(), "seconds": time.perf_counter() - start}


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    conn = socket.socket(family, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    conn.connect((host, port))
    return conn


def kernel_peer_main(argv: list[str] | None = None) -> int:
    """Entry point of the kernel peer script. Prints exactly one JSON line on success.

    Modes:
      recv FD           accept one connection on listening fd FD, read to EOF (then close)
      send FD SIZE      accept one connection on FD, send SIZE random bytes, half-close, wait for EOF
      connect-send HOST PORT SIZE   connect, send SIZE random bytes, half-close, wait for EOF
      connect-recv HOST PORT        connect, half-close at once, read to EOF
      echo FD           accept one connection on FD and echo until EOF (for round-trip timing)
      rtt HOST PORT COUNT           connect to an echo server, COUNT 1-byte round trips; print the times
    """
    p = argparse.ArgumentParser(prog="netstack_helpers")
    p.add_argument("mode", choices=["recv", "send", "connect-send", "connect-recv", "echo", "rtt"])
    p.add_argument("args", nargs="*")
    p.add_argument("--timeout", type=float, default=120.0)
    ns = p.parse_args(argv)
    a = ns.args
    result: dict[str, Any]
    if ns.mode in ("recv", "send", "echo"):
        listener = socket.socket(fileno=int(a[0]))
        listener.settimeout(ns.timeout)
        conn, _ = listener.accept()
        listener.close()
        conn.settimeout(ns.timeout)
        with conn:
            if ns.mode == "recv":
                result = _receive_all(conn)
            elif ns.mode == "send":
                result = _send_random(conn, int(a[1]))
                rest = _receive_all(conn)  # the peer closes after reading everything
                result["peer_sent"] = rest["bytes"]
            else:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                total = 0
                while data := conn.recv(CHUNK):
                    conn.sendall(data)
                    total += len(data)
                result = {"bytes": total}
    elif ns.mode == "connect-send":
        with _connect(a[0], int(a[1]), ns.timeout) as conn:
            result = _send_random(conn, int(a[2]))
            result["peer_sent"] = _receive_all(conn)["bytes"]
    elif ns.mode == "connect-recv":
        with _connect(a[0], int(a[1]), ns.timeout) as conn:
            conn.shutdown(socket.SHUT_WR)
            result = _receive_all(conn)
    else:  # rtt
        with _connect(a[0], int(a[1]), ns.timeout) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(int(a[2])):
                t0 = time.perf_counter()
                conn.sendall(b"x")
                if conn.recv(1) != b"x":
                    raise RuntimeError("echo server closed early")
                times.append(time.perf_counter() - t0)
            conn.shutdown(socket.SHUT_WR)
            result = {"rtts": times}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - runs in a subprocess inside the namespace
    sys.exit(kernel_peer_main())


# ----------------------------------------------------------------------------------------------------------------
# Test/benchmark side (trio, the lab, our stack)
# ----------------------------------------------------------------------------------------------------------------

import ipaddress  # noqa: E402
from collections.abc import AsyncIterator, Sequence  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import trio  # noqa: E402

from tests.interop.conftest import WireGuardGoSetup, make_wireguard_go_setup  # noqa: E402
from tests.lab import Lab, Namespace  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(eq=False)
class KernelResult:
    """What the kernel peer process reported (one JSON line) and its exit status."""

    returncode: int
    data: dict[str, Any]
    stderr: str

    @property
    def nbytes(self) -> int:
        return int(self.data["bytes"])

    @property
    def sha256(self) -> str:
        return str(self.data["sha256"])


async def run_kernel_peer(
    ns: Namespace, mode: str, *args: object, pass_fds: Sequence[int] = (), timeout: float = 120.0
) -> KernelResult:
    """Run the kernel peer script inside ``ns`` to completion; raise AssertionError if it fails.

    Cancelling the calling task kills the process (trio.run_process), so a failing test
    never leaves it behind.
    """
    cmd = ns.exec_args(
        [sys.executable, "-m", "tests.interop.netstack_helpers", mode, *map(str, args), "--timeout", str(timeout)]
    )
    proc = await trio.run_process(
        cmd, capture_stdout=True, capture_stderr=True, check=False, pass_fds=tuple(pass_fds), cwd=str(REPO_ROOT)
    )
    out = proc.stdout.decode(errors="replace").strip()
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 or not out:
        raise AssertionError(f"kernel peer {mode} {args} failed (rc={proc.returncode}): {out}\n{err[-3000:]}")
    return KernelResult(proc.returncode, json.loads(out.splitlines()[-1]), err)


@dataclass(eq=False)
class NetstackSetup:
    """The wireguard-go lab plus the dual-stack overlay our NetStack lives on."""

    wgs: WireGuardGoSetup
    kernel_v4: ipaddress.IPv4Address  # wireguard-go's TUN address (the kernel's side of the overlay)
    kernel_v6: ipaddress.IPv6Address
    our_v4: ipaddress.IPv4Address  # our NetStack's addresses
    our_v6: ipaddress.IPv6Address

    @property
    def lab(self) -> Lab:
        return self.wgs.lab

    @property
    def kernel_ns(self) -> Namespace:
        return self.wgs.wg_ns

    @property
    def tun(self) -> str:
        return self.wgs.wg.ifname

    @property
    def veth(self) -> str:
        """wireguard-go's end of the veth (its UDP leaves and arrives here)."""
        return next(n for n in self.kernel_ns.link_names() if n.startswith("v"))

    def kernel_addr(self, version: int) -> str:
        return str(self.kernel_v4 if version == 4 else self.kernel_v6)

    def our_addr(self, version: int) -> str:
        return str(self.our_v4 if version == 4 else self.our_v6)

    def kernel_socket(self, version: int = 4, type: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
        """A trio socket of the kernel's stack in the wg namespace (closed at lab teardown too)."""
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        return trio.socket.from_stdlib_socket(self.kernel_ns.socket(family, type))

    def kernel_sockets(self, n: int, version: int = 4) -> list[trio.socket.SocketType]:
        """``n`` kernel TCP sockets created in one namespace hop."""
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        socks = self.kernel_ns.call(lambda: [socket.socket(family, socket.SOCK_STREAM) for _ in range(n)])
        self.lab._sockets.extend(socks)
        return [trio.socket.from_stdlib_socket(s) for s in socks]

    def kernel_listener(self, version: int = 4, backlog: int = 128) -> tuple[socket.socket, int]:
        """A listening kernel socket on the TUN address (ephemeral port), for handing to a kernel peer process.

        Returns the stdlib socket (inheritable, so ``pass_fds`` works) and its port.
        """
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        sock = self.kernel_ns.socket(family, socket.SOCK_STREAM)
        sock.bind((self.kernel_addr(version), 0))
        sock.listen(backlog)
        sock.set_inheritable(True)
        return sock, sock.getsockname()[1]

    @asynccontextmanager
    async def our_stack(self, **kw: Any) -> AsyncIterator[Any]:
        """Our NetStack over our WireGuard, peered with wireguard-go (``open_static_peer``).

        With ``TSNET_NETSTACK_STANDIN=kernel`` in the environment this yields a
        :class:`KernelStandIn` instead (a second wireguard-go and the py namespace's kernel in
        our place): a self-check of the tests and harness against kernel<->kernel.
        """
        if os.environ.get("TSNET_NETSTACK_STANDIN") == "kernel":
            async with self.kernel_stand_in() as standin:
                yield standin
            return
        from tsnet.netstack.static import open_static_peer

        sock = self.wgs.our_socket(self.wgs.our_port)  # the endpoint wireguard-go was told, so it can initiate
        async with open_static_peer(
            self.wgs.our_private,
            self.wgs.wg_public,
            addresses=[str(self.our_v4), str(self.our_v6)],
            sock=sock,
            peer_endpoint=self.wgs.wg_endpoint,
            **kw,
        ) as net:
            yield net

    @asynccontextmanager
    async def kernel_stand_in(self) -> AsyncIterator[KernelStandIn]:
        """wireguard-go with our key, port and addresses in the py namespace; the kernel there plays us."""
        from tests.lab import PeerConfig, start_wireguard_go

        wgs = self.wgs
        wg = start_wireguard_go(
            wgs.py_ns,
            private_key=wgs.our_private.raw,
            address=f"{self.our_v4}/24",
            listen_port=wgs.our_port,
            peers=[
                PeerConfig(
                    wgs.wg_public.raw,
                    allowed_ips=[f"{self.kernel_v4}/32", f"{self.kernel_v6}/128"],
                    endpoint=f"{wgs.wg_endpoint[0]}:{wgs.wg_endpoint[1]}",
                )
            ],
        )
        wgs.py_ns.add_address(wg.ifname, ipaddress.IPv6Interface(f"{self.our_v6}/64"))
        try:
            yield KernelStandIn(wgs.py_ns)
        finally:
            wg.process.stop()

    def add_loss(self, probability: float) -> None:
        """Random loss of the WireGuard UDP datagrams on the veth, in both directions.

        wireguard-go's own UDP socket lives in the wg namespace, so its datagrams pass that
        namespace's INPUT chain on arrival (``-i veth``) and OUTPUT on departure (``-o veth``);
        nothing is forwarded. Only UDP is matched (proto udp), which is all there is on the veth.
        """
        self.kernel_ns.random_loss(probability, chain="INPUT", iface=self.veth, proto="udp")
        self.kernel_ns.random_loss(probability, chain="OUTPUT", iface=self.veth, proto="udp")

    def dropped_by_loss(self) -> int:
        """Packets the random-loss rules dropped so far (both chains)."""
        total = 0
        for chain in ("INPUT", "OUTPUT"):
            out = self.kernel_ns.run(["iptables", "-w", "-L", chain, "-v", "-n", "-x"])
            for line in out.splitlines():
                if "statistic" in line and "DROP" in line:
                    total += int(line.split()[0])
        return total


def make_netstack_setup(lab: Lab) -> NetstackSetup:
    """wireguard-go in ``wg`` with a v4 and a ULA v6 overlay on its TUN; our stack's addresses are .2/::2."""
    wgs = make_wireguard_go_setup(lab)
    v4net = ipaddress.IPv4Network(f"{wgs.wg_overlay}/24", strict=False)
    v6net = lab.subnet6_of(v4net)  # the overlay /24's twin ULA /64, owned by this lab
    kernel_v6, our_v6 = v6net[1], v6net[2]
    wgs.wg_ns.add_address(wgs.wg.ifname, ipaddress.IPv6Interface(f"{kernel_v6}/64"))
    wgs.wg.configure(
        peers=[wgs.our_peer_config(allowed_ips=[f"{wgs.our_overlay}/32", f"{our_v6}/128"])], replace_peers=True
    )
    return NetstackSetup(wgs, wgs.wg_overlay, kernel_v6, wgs.our_overlay, our_v6)


class KernelStandIn:
    """The TCP calls the tests use (not UDP), served by a namespace's kernel (harness self-check only)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    async def open_tcp_stream(self, host: str, port: int, *, timeout: float = 10.0) -> trio.SocketStream:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.from_stdlib_socket(self.ns.socket(family, socket.SOCK_STREAM))
        try:
            with trio.fail_after(timeout):
                await sock.connect((host, port))
        except trio.TooSlowError:
            sock.close()
            raise TimeoutError(f"connect to {host}:{port} timed out") from None
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def open_tcp_listener(self, port: int, *, backlog: int = 1024) -> trio.SocketListener:
        sock = trio.socket.from_stdlib_socket(self.ns.socket(socket.AF_INET6, socket.SOCK_STREAM))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("::", port))
        sock.listen(backlog)
        return trio.SocketListener(sock)


# -- Python-side transfer helpers (work on any trio.abc.Stream) ------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """Bytes moved, their SHA-256, and the seconds it took."""

    nbytes: int
    sha256: str
    seconds: float

    @property
    def mbit_per_s(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


async def send_random(stream: trio.abc.Stream, size: int, chunk: int = 64 * 1024) -> Transfer:
    """Send ``size`` fresh random bytes on ``stream`` and return their digest (no EOF is sent)."""
    digest = hashlib.sha256()
    start = trio.current_time()
    left = size
    while left:
        block = os.urandom(min(chunk, left))
        digest.update(block)
        await stream.send_all(block)
        left -= len(block)
    return Transfer(size, digest.hexdigest(), trio.current_time() - start)


async def receive_all(stream: trio.abc.Stream, max_bytes: int = 256 * 1024) -> Transfer:
    """Read ``stream`` to EOF; seconds count from the first byte."""
    digest = hashlib.sha256()
    total = 0
    first: float | None = None
    while data := await stream.receive_some(max_bytes):
        if first is None:
            first = trio.current_time()
        digest.update(data)
        total += len(data)
    return Transfer(total, digest.hexdigest(), trio.current_time() - first if first is not None else 0.0)


async def receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    """Read exactly ``n`` bytes (AssertionError on early EOF)."""
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def kernel_receive_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    """Read exactly ``n`` bytes from a kernel trio socket."""
    buf = bytearray()
    while len(buf) < n:
        data = await sock.recv(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def kernel_receive_all(sock: trio.socket.SocketType) -> bytes:
    buf = bytearray()
    while data := await sock.recv(65536):
        buf += data
    return bytes(buf)


async def kernel_send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """``sendall`` for a kernel trio socket (trio sockets only have ``send``)."""
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
