"""Network-namespace lab: namespaces, veth links, addresses, processes, iptables.

Everything a :class:`Lab` creates is recorded and removed by :meth:`Lab.close`
(also on exceptions, when used as a context manager), in reverse order:
processes first (SIGTERM, then SIGKILL), then sockets, then namespaces
(deleting a namespace removes its interfaces and iptables rules with it).

Safety: the lab never touches the root namespace's interfaces or routes. Links
are created directly between lab namespaces (``ip -n A link add ... netns B``),
and routes may only point at addresses inside subnets the lab allocated, so no
traffic can leave the machine.

Names carry the pid and a per-process counter (``tsl<pid>-<n>-<label>`` for
namespaces, ``v<pid>x<n>a`` for interfaces, 15 characters at most) and subnets
are claimed through files under ``/run/tsnet-lab`` so concurrent test runs do
not collide. Leftovers of dead runs (pid no longer alive) are swept on start.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .nssocket import run_in_namespace, socket_in_namespace

__all__ = [
    "Lab",
    "LabError",
    "LabProcess",
    "Link",
    "Namespace",
    "SubnetPool",
    "wait_until",
]

NETNS_DIR = Path("/var/run/netns")
CLAIM_DIR = Path(os.environ.get("TSNET_LAB_STATE", "/run/tsnet-lab"))
NS_PREFIX = "tsl"
OWNER_ENV = "TSNET_LAB_OWNER"
WG_SOCKET_DIR = Path("/var/run/wireguard")

# 10.240.0.0/12 split into /24s: 4096 subnets shared by all concurrent lab users.
LAB_POOL = ipaddress.IPv4Network("10.240.0.0/12")
# Each claimed /24 also owns the /64 with the same index in this ULA /48 (so IPv6 needs no claims of its own).
LAB_POOL6 = ipaddress.IPv6Network("fd7e:5700::/48")

_counter = itertools.count(1)
_counter_lock = threading.Lock()


def _next_id() -> int:
    with _counter_lock:
        return next(_counter)


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its output."""


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None) -> str:
    """Run a command, return its stdout; raise :class:`LabError` with stderr on failure."""
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, input=input, stdin=None if input else subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it or raise TimeoutError after ``timeout`` s.

    For waiting on external processes (a socket file appearing, a counter
    moving) where there is no event to block on; the timeout is a bound, not
    a synchronisation delay.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SubnetPool:
    """Hands out /24 IPv4 subnets from :data:`LAB_POOL`, claimed with O_EXCL files so runs don't clash."""

    def __init__(self, claim_dir: Path = CLAIM_DIR, pool: ipaddress.IPv4Network = LAB_POOL) -> None:
        self.claim_dir = claim_dir
        self.subnets = list(pool.subnets(new_prefix=24))
        self.claim_dir.mkdir(parents=True, exist_ok=True)
        self._held: list[Path] = []
        # Start at a pid-dependent offset so concurrent runs rarely contend for the same file.
        self._start = (os.getpid() * 37) % len(self.subnets)

    def _try_claim(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                return False
            if owner and _pid_alive(owner):
                return False
            # Stale claim from a dead run: take it over (under the pool lock; the rename is atomic).
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, path)
            return path.read_text().strip() == str(os.getpid())
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def claim(self) -> ipaddress.IPv4Network:
        """Claim a free /24 for this process; released by :meth:`release_all`."""
        n = len(self.subnets)
        # The lock makes taking over a dead run's claim race-free between concurrent runs.
        with open(self.claim_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for i in range(n):
                idx = (self._start + i) % n
                path = self.claim_dir / f"subnet-{idx}"
                if self._try_claim(path):
                    self._held.append(path)
                    self._start = idx + 1
                    return self.subnets[idx]
        raise LabError("lab subnet pool exhausted")

    def release_all(self) -> None:
        for path in self._held:
            try:
                if path.read_text().strip() == str(os.getpid()):
                    path.unlink()
            except OSError:
                pass
        self._held.clear()


class LabProcess:
    """A process started inside a namespace; output goes to a log file (no pipe can fill up).

    Always stopped by the lab's teardown; :meth:`stop` may be called earlier.
    """

    def __init__(self, args: Sequence[str], popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.args = list(args)
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; return the exit status."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        # Also reap anything left in the group (e.g. children of a shell).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"<LabProcess pid={self.pid} {shlex.join(self.args)!r} rc={self.popen.poll()}>"


@dataclass(slots=True)
class Link:
    """A veth pair between two namespaces with one address on each end (``a_addr``/``b_addr`` in ``subnet``)."""

    a: Namespace
    b: Namespace
    a_if: str
    b_if: str
    subnet: ipaddress.IPv4Network
    a_addr: ipaddress.IPv4Address
    b_addr: ipaddress.IPv4Address
    subnet6: ipaddress.IPv6Network | None = None  # with ipv6=True: a ULA /64, a gets ::1, b gets ::2
    a_addr6: ipaddress.IPv6Address | None = None
    b_addr6: ipaddress.IPv6Address | None = None

    def addr_of(self, ns: Namespace) -> ipaddress.IPv4Address:
        """The link address on ``ns``'s end."""
        if ns is self.a:
            return self.a_addr
        if ns is self.b:
            return self.b_addr
        raise ValueError(f"{ns.name} is not on this link")

    def if_of(self, ns: Namespace) -> str:
        """The interface name on ``ns``'s end."""
        if ns is self.a:
            return self.a_if
        if ns is self.b:
            return self.b_if
        raise ValueError(f"{ns.name} is not on this link")


@dataclass(eq=False)
class Namespace:
    """One lab network namespace. Create with :meth:`Lab.namespace`."""

    lab: Lab
    name: str
    label: str
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = field(default_factory=list)

    # -- commands -------------------------------------------------------------------------------------------------

    def exec_args(self, args: Sequence[str]) -> list[str]:
        """``args`` prefixed so that they run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
        """Run a command to completion inside the namespace and return its stdout."""
        return run(self.exec_args(args), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip -n NAME ...``."""
        return run(["ip", "-n", self.name, *args], check=check)

    def popen(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None) -> LabProcess:
        """Start a long-running process inside the namespace; the lab kills it at teardown."""
        return self.lab._popen(self, args, env=env, cwd=cwd)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside the namespace (``net.*`` keys are per namespace).

        Written through /proc/sys from a thread inside the namespace, so the
        ``sysctl`` binary (procps) is not needed.
        """
        path = Path("/proc/sys") / key.replace(".", "/")

        def write() -> None:
            path.write_text(f"{value}\n")

        self.call(write)

    def read_sysctl(self, key: str) -> str:
        path = Path("/proc/sys") / key.replace(".", "/")
        return self.call(lambda: path.read_text().strip())

    # -- addressing and routes ------------------------------------------------------------------------------------

    def add_address(self, ifname: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface | str) -> Any:
        """Add an IPv4 or IPv6 address (IPv6 without duplicate address detection, so it is usable at once)."""
        iface = ipaddress.ip_interface(iface)
        extra = ["nodad"] if iface.version == 6 else []
        self.ip("addr", "add", str(iface), "dev", ifname, *extra)
        self.addresses.append(iface)
        return iface

    def add_dummy(self, name: str | None = None) -> ipaddress.IPv4Interface:
        """Add a stand-alone interface with a fresh lab address, e.g. so tailscaled sees the network as up.

        The kernel may lack the ``dummy`` module, so this is a veth pair whose both
        ends stay in this namespace (address on the first end, both up).
        """
        ifname = name or self.lab.ifname("d")
        peer = self.lab.ifname("e")
        self.ip("link", "add", ifname, "type", "veth", "peer", "name", peer)
        subnet = self.lab.subnet()
        iface = self.add_address(ifname, ipaddress.IPv4Interface(f"{subnet[1]}/{subnet.prefixlen}"))
        self.ip("link", "set", peer, "up")
        self.ip("link", "set", ifname, "up")
        return iface

    def add_route(self, dest: str, via: ipaddress.IPv4Address | ipaddress.IPv6Address | str | None = None, dev: str | None = None) -> None:
        """Add a route; ``via`` must be an address inside a lab subnet (nothing routes off the machine)."""
        if via is not None:
            via = ipaddress.ip_address(via)
        family = "-6" if (via is not None and via.version == 6) or ":" in dest else "-4"
        args = [family, "route", "add", dest]
        if via is not None:
            if not self.lab.owns_address(via):
                raise LabError(f"refusing route via {via}: not inside a lab subnet")
            args += ["via", str(via)]
        if dev is not None:
            args += ["dev", dev]
        if via is None and dev is None:
            raise ValueError("add_route needs via or dev")
        if dest in ("default", "0.0.0.0/0") and via is None:
            # A default route out of a device is fine only for lab-made devices, which is all a namespace has.
            pass
        self.ip(*args)

    def assert_isolated(self) -> None:
        """Raise :class:`LabError` unless every route here stays inside the lab.

        Checks all IPv4 and IPv6 routing tables: gateways must be lab addresses, and the
        namespace must have a non-loopback address (tailscaled needs one).
        """
        for family in ("-4", "-6"):
            for line in self.ip(family, "route", "show", "table", "all").splitlines():
                m = re.search(r"\bvia (\S+)", line)
                if m is None:
                    continue
                try:
                    gw = ipaddress.ip_address(m.group(1))
                except ValueError as exc:
                    raise LabError(f"{self.name}: cannot parse route {line!r}") from exc
                if not self.lab.owns_address(gw):
                    raise LabError(f"{self.name}: route leaves the lab: {line!r}")
        if not any(not a.ip.is_loopback for a in self.addresses):
            raise LabError(f"{self.name}: no non-loopback address (add a link or add_dummy())")

    def enable_forwarding(self) -> None:
        self.sysctl("net.ipv4.ip_forward", 1)

    # -- iptables -------------------------------------------------------------------------------------------------

    def iptables(self, *args: str) -> None:
        """Run ``iptables ARGS`` in the namespace (rules vanish with the namespace)."""
        self.run(["iptables", "-w", *args])

    def masquerade(self, out_if: str, *, random_fully: bool = False) -> None:
        """Source-NAT everything leaving ``out_if`` to its address.

        Without ``random_fully`` Linux keeps the source port when it can: an "easy",
        endpoint-independent-mapping NAT. With it, every new flow gets a random
        port: a "hard" (endpoint-dependent) NAT.
        """
        self.enable_forwarding()
        args = ["-t", "nat", "-A", "POSTROUTING", "-o", out_if, "-j", "MASQUERADE"]
        if random_fully:
            args.append("--random-fully")
        self.iptables(*args)

    def drop_inbound_new(self, wan_if: str) -> None:
        """Firewall: forward only replies from ``wan_if`` (no unsolicited inbound), like a home router."""
        self.iptables("-A", "FORWARD", "-i", wan_if, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        self.iptables("-A", "FORWARD", "-i", wan_if, "-j", "DROP")

    def random_loss(self, probability: float, *, chain: str = "FORWARD", iface: str | None = None, proto: str | None = "udp") -> None:
        """Drop packets with the given probability (``-m statistic --mode random``).

        ``chain`` INPUT/OUTPUT affect this namespace's own traffic, FORWARD the traffic it routes.
        ``iface`` restricts to packets arriving on it (INPUT/FORWARD) or leaving it (OUTPUT).
        """
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        args = ["-A", chain]
        if iface is not None:
            args += ["-o" if chain in ("OUTPUT", "POSTROUTING") else "-i", iface]
        if proto is not None:
            args += ["-p", proto]
        args += ["-m", "statistic", "--mode", "random", "--probability", f"{probability:.6f}", "-j", "DROP"]
        self.iptables(*args)

    # -- sockets --------------------------------------------------------------------------------------------------

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
        """A stdlib socket created inside this namespace (see :mod:`tests.lab.nssocket`); closed at lab teardown.

        Wrap it with ``trio.socket.from_stdlib_socket`` for trio use.
        """
        sock = socket_in_namespace(self.name, family, type, proto)
        self.lab._sockets.append(sock)
        return sock

    def call(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn()`` in a helper thread that has entered this namespace; return its result."""
        return run_in_namespace(self.name, fn)

    def link_names(self) -> list[str]:
        out = self.ip("-o", "link", "show")
        return [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[@:]", out, re.M)]

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"


class Lab:
    """A set of namespaces, links and processes that all disappear on :meth:`close`.

    Example::

        with Lab() as lab:
            a, b = lab.namespace("a"), lab.namespace("b")
            link = lab.link(a, b)
            a.run(["true"])
    """

    def __init__(self, *, sweep_stale: bool = True) -> None:
        self.pid = os.getpid()
        self.namespaces: list[Namespace] = []
        self.processes: list[LabProcess] = []
        self._sockets: list[socket.socket] = []
        self._subnets: list[ipaddress.IPv4Network] = []
        self._cleanups: list[Callable[[], None]] = []
        self._pool = SubnetPool()
        #: Scratch directory for process logs and state (removed at teardown).
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"tsnet-lab-{self.pid}-"))
        self.closed = False
        if sweep_stale:
            sweep_stale_processes()
            sweep_stale_namespaces()
            sweep_stale_uapi_sockets()

    # -- naming ---------------------------------------------------------------------------------------------------

    def ifname(self, kind: str) -> str:
        """A fresh interface name (at most 15 characters) unique across processes."""
        name = f"{kind}{self.pid}x{_next_id()}"
        if len(name) > 15:
            raise LabError(f"interface name too long: {name}")
        return name

    # -- resources ------------------------------------------------------------------------------------------------

    def namespace(self, label: str = "ns") -> Namespace:
        """Create a namespace with ``lo`` up and nothing else."""
        if not re.fullmatch(r"[A-Za-z0-9_]{1,16}", label):
            raise ValueError(f"bad namespace label {label!r}")
        name = f"{NS_PREFIX}{self.pid}-{_next_id()}-{label}"
        run(["ip", "netns", "add", name])
        ns = Namespace(self, name, label)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def subnet(self) -> ipaddress.IPv4Network:
        """Claim a fresh /24 from the lab pool (released at teardown)."""
        net = self._pool.claim()
        self._subnets.append(net)
        return net

    def subnet6_of(self, net: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
        """The ULA /64 that belongs to a claimed lab /24."""
        index = (int(net.network_address) - int(LAB_POOL.network_address)) >> 8
        return ipaddress.IPv6Network((int(LAB_POOL6.network_address) + (index << 64), 64))

    def owns_address(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``addr`` lies in a subnet this lab claimed (or its IPv6 twin)."""
        if addr.version == 6:
            return any(addr in self.subnet6_of(net) for net in self._subnets)
        return any(addr in net for net in self._subnets)

    def link(self, a: Namespace, b: Namespace, *, mtu: int | None = None, ipv6: bool = False) -> Link:
        """Join two namespaces with a veth pair in a fresh /24: ``a`` gets .1, ``b`` gets .2.

        With ``ipv6`` the ends also get ``::1``/``::2`` in the /24's ULA /64.
        """
        a_if, b_if = self.ifname("v"), self.ifname("v")
        run(["ip", "-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name])
        net = self.subnet()
        a_addr, b_addr = net[1], net[2]
        a.add_address(a_if, ipaddress.IPv4Interface(f"{a_addr}/24"))
        b.add_address(b_if, ipaddress.IPv4Interface(f"{b_addr}/24"))
        link = Link(a, b, a_if, b_if, net, a_addr, b_addr)
        if ipv6:
            net6 = self.subnet6_of(net)
            link.subnet6, link.a_addr6, link.b_addr6 = net6, net6[1], net6[2]
            a.add_address(a_if, f"{net6[1]}/64")
            b.add_address(b_if, f"{net6[2]}/64")
        for ns, ifname in ((a, a_if), (b, b_if)):
            if mtu is not None:
                ns.ip("link", "set", ifname, "mtu", str(mtu))
            ns.ip("link", "set", ifname, "up")
        return link

    def router(self, label: str, inside: Namespace, outside: Namespace, *, nat: str | None = "easy") -> tuple[Namespace, Link, Link]:
        """Put ``inside`` behind a new router namespace connected to ``outside``.

        ``nat``: None (plain routing), "easy" (MASQUERADE) or "hard" (MASQUERADE --random-fully).
        ``inside`` gets a default route via the router; ``outside`` does not learn the inside subnet
        (as on the Internet), so it can only answer through the NAT.
        Returns (router, inside_link, outside_link), where inside_link.a is the router.
        """
        r = self.namespace(label)
        r.enable_forwarding()
        lan = self.link(r, inside)
        wan = self.link(r, outside)
        inside.add_route("default", via=lan.a_addr)
        if nat == "easy":
            r.masquerade(wan.a_if)
        elif nat == "hard":
            r.masquerade(wan.a_if, random_fully=True)
        elif nat is not None:
            raise ValueError(f"unknown nat kind {nat!r}")
        return r, lan, wan

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at teardown (before processes are stopped), last registered first."""
        self._cleanups.append(fn)

    def _popen(self, ns: Namespace, args: Sequence[str], *, env: Mapping[str, str] | None, cwd: str | None) -> LabProcess:
        if self.closed:
            raise LabError("lab is closed")
        log_path = self.tmpdir / f"{len(self.processes)}-{Path(args[0]).name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        # Marks the process as ours, so a later run can kill it if this run dies without teardown.
        full_env[OWNER_ENV] = str(self.pid)
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                ns.exec_args(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,  # own process group, so teardown can kill children too
            )
        proc = LabProcess(args, popen, log_path)
        self.processes.append(proc)
        return proc

    # -- teardown -------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything; collects errors and raises the first one after trying all steps."""
        if self.closed:
            return
        self.closed = True
        errors: list[BaseException] = []

        def attempt(fn: Callable[[], Any]) -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - teardown must continue
                errors.append(exc)

        for fn in reversed(self._cleanups):
            attempt(fn)
        for proc in reversed(self.processes):
            attempt(proc.stop)
        for sock in self._sockets:
            attempt(sock.close)
        for ns in reversed(self.namespaces):
            attempt(lambda ns=ns: run(["ip", "netns", "del", ns.name]))
        attempt(self._pool.release_all)
        if not errors:
            attempt(lambda: shutil.rmtree(self.tmpdir))
        if errors:
            raise errors[0]

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def process_logs(self) -> str:
        """All process logs, for failure messages."""
        parts = []
        for proc in self.processes:
            parts.append(f"--- {shlex.join(proc.args)} (rc={proc.poll()}) ---\n{proc.log()}")
        return "\n".join(parts)


def sweep_stale_namespaces(names: Iterable[str] | None = None) -> list[str]:
    """Delete lab namespaces (``tsl<pid>-...``) whose creating process is dead. Returns the names removed."""
    if names is None:
        try:
            names = [p.name for p in NETNS_DIR.iterdir()]
        except FileNotFoundError:
            return []
    removed = []
    for name in names:
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-\d+-\w+", name)
        if m and not _pid_alive(int(m.group(1))):
            if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
                removed.append(name)
    return removed


def sweep_stale_processes() -> list[int]:
    """SIGKILL processes started by a lab whose owning test process is dead (found via ``TSNET_LAB_OWNER``)."""
    marker = f"{OWNER_ENV}=".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(marker):
                try:
                    owner = int(var[len(marker):])
                except ValueError:
                    break
                if not _pid_alive(owner):
                    try:
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed.append(int(entry.name))
                    except OSError:
                        pass
                break
    return killed


def sweep_stale_uapi_sockets() -> list[str]:
    """Remove wireguard-go UAPI sockets of lab interfaces (``wg<pid>x<n>.sock``) whose pid is dead."""
    removed = []
    try:
        entries = list(WG_SOCKET_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        m = re.fullmatch(r"wg(\d+)x\d+\.sock", path.name)
        if m and not _pid_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
