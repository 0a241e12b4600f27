"""A reusable NAT topology on top of :mod:`tests.lab`: an "internet", NAT routers, hosts, our control server.

::

    host(public) ──┐
                   ├── inet (forwards; runs `tsnet control serve` + DERP + STUN on a dummy address)
    host ── easy/hard NAT router ──┘

* ``inet`` routes between all its links; it never learns the LANs behind the routers.
* An *easy* router is MASQUERADE (keeps the source port: endpoint-independent
  mapping) and filters by conntrack (address-and-port-dependent filtering): a
  port-restricted cone NAT, where hole punching works. A *hard* router adds
  ``--random-fully`` (a new port per destination), where it does not.
* Routers drop unsolicited inbound UDP to themselves (INPUT), so a peer's
  early probe leaves no conntrack entry behind that would later force the
  router to pick another port for our own outbound flow (Linux's clash rule).

Python nodes (:mod:`tests.lab.magicsock_node`) run as processes inside their
namespace; :class:`PyNode.status` reads their JSON status. Everything is
cleaned up by the lab (processes, namespaces) at teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.netns import Lab, LabProcess, Link, Namespace, wait_until

__all__ = ["CONTROL_PORT", "STUN_PORT", "RELAY_POLICY", "FullNode", "NatTopology", "PyNode", "Host", "TailscaledNode",
           "start_tailscaled_node"]

#: Everyone may talk to everyone, and every node may be everyone's peer relay.
RELAY_POLICY = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "grants": [{"src": ["*"], "dst": ["*"], "app": {"tailscale.com/cap/relay": []}}],
}
"""

REPO = Path(__file__).resolve().parents[2]
CONTROL_PORT = 8080
STUN_PORT = 3478


def tsnet_cli(*args: str) -> str:
    """Run ``python -m tsnet ARGS`` in this (host) namespace; state files only, no network."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "tsnet", *args], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    if out.returncode != 0:
        raise AssertionError(f"tsnet {' '.join(args)} failed: {out.stderr}")
    return out.stdout


@dataclass
class Host:
    name: str
    ns: Namespace
    nat: str  # "public", "easy" or "hard"
    router: Namespace | None = None
    wan: Link | None = None

    def lossy_nat_link(self, probability: float) -> None:
        """Drop this fraction of the UDP packets the host's NAT router forwards, both directions.

        Unlike ``Namespace.random_loss`` (which appends), the rule goes first in FORWARD, ahead of the
        router's ESTABLISHED accept rule, so established flows (WireGuard, disco) are hit too.
        """
        if self.router is None:
            raise ValueError(f"{self.name} has no NAT router")
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        self.router.iptables("-I", "FORWARD", "1", "-p", "udp", "-m", "statistic", "--mode", "random",
                             "--probability", f"{probability:.6f}", "-j", "DROP")

    def segment_udp_in_software(self) -> None:
        """Turn off UDP segmentation offload on the host's interfaces.

        A node sending with UDP_SEGMENT otherwise crosses the veths and the router as one ~64 KiB
        super-packet, and iptables loss rules would drop whole batches instead of single datagrams.
        """
        for ifname in self.ns.link_names():
            if ifname != "lo":
                self.ns.run(["ethtool", "-K", ifname, "tx-udp-segmentation", "off", "tx-gso-list", "off"])

    def nat_link_drops(self) -> int:
        """Packets the :meth:`lossy_nat_link` rule has dropped so far."""
        if self.router is None:
            return 0
        out = self.router.run(["iptables", "-L", "FORWARD", "-v", "-n", "-x"])
        return sum(int(line.split()[0]) for line in out.splitlines() if "statistic" in line and "DROP" in line)

    @property
    def public_ip(self) -> str:
        """The address the internet sees for this host (its own, or its router's WAN address)."""
        if self.wan is not None:
            return str(self.wan.a_addr)
        return str(self.ns.addresses[0].ip)


@dataclass
class PyNode:
    host: Host
    proc: LabProcess
    status_path: Path

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def peer(self, hostname: str) -> dict[str, Any] | None:
        return next((p for p in self.status().get("peers", ()) if p.get("hostname") == hostname), None)

    def path_kind(self, hostname: str) -> str | None:
        p = self.peer(hostname)
        return p["kind"] if p else None

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class NatTopology:
    lab: Lab
    tmp: Path
    inet: Namespace = field(init=False)
    control_ip: str = field(init=False)
    control_url: str = field(init=False)
    state: Path = field(init=False)
    authkey: str = field(init=False)
    server: LabProcess = field(init=False)
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inet = self.lab.namespace("inet")
        self.inet.enable_forwarding()
        self.control_ip = str(self.inet.add_dummy().ip)
        self.control_url = f"http://{self.control_ip}:{CONTROL_PORT}"
        self.state = self.tmp / "control"
        self.authkey = tsnet_cli("control", "authkey", "create", "--state-dir", str(self.state),
                                 "--reusable").strip()

    def start_control(self, *extra: str, policy: str | None = None) -> None:
        """``tsnet control serve`` in ``inet`` with embedded DERP (plain HTTP) and STUN; optional HuJSON policy."""
        if policy is not None:
            path = self.tmp / "policy.hujson"
            path.write_text(policy)
            extra = (*extra, "--policy", str(path))
        self.server = self.inet.popen(
            [sys.executable, "-m", "tsnet", "control", "serve", "--listen", f"{self.control_ip}:{CONTROL_PORT}",
             "--state-dir", str(self.state), "--stun-port", str(STUN_PORT), "--no-interactive-login", *extra],
            env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
        wait_until(lambda: "publicKey" in self.inet.run(["curl", "-s", "-m", "2", self.control_url + "/key?v=133"],
                                                        check=False) or self.server.poll() is not None,
                   30, "control server up")
        assert self.server.poll() is None, self.server.log()

    def add_host(self, name: str, nat: str) -> Host:
        """A host on the internet (``public``) or behind its own ``easy`` / ``hard`` NAT router."""
        ns = self.lab.namespace(name)
        if nat == "public":
            link = self.lab.link(self.inet, ns)
            ns.add_route("default", via=link.a_addr)
            host = Host(name, ns, nat)
        elif nat in ("easy", "hard"):
            router, _lan, wan = self.lab.router(f"{name}r", ns, self.inet, nat=nat)
            router.add_route("default", via=wan.b_addr)
            router.iptables("-A", "INPUT", "-i", wan.a_if, "-p", "udp", "-j", "DROP")
            host = Host(name, ns, nat, router, wan)
        else:
            raise ValueError(f"unknown host kind {nat!r}")
        ns.assert_isolated()
        self.hosts[name] = host
        return host

    def start_python_node(self, host: Host, *, ping: str | None = None, port: int = 41641,
                          relay_server_port: int | None = None) -> PyNode:
        status = self.tmp / f"{host.name}.status.json"
        args = [sys.executable, "-m", "tests.lab.magicsock_node", "--control-url", self.control_url,
                "--authkey", self.authkey, "--hostname", host.name, "--status", str(status), "--port", str(port)]
        if ping:
            args += ["--ping", ping]
        if relay_server_port is not None:
            args += ["--relay-server-port", str(relay_server_port)]
        proc = host.ns.popen(args, env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))
        return PyNode(host, proc, status)

    def start_full_node(self, host: Host, *, port: int = 41641, socks5_port: int | None = None,
                        forwards: tuple[str, ...] = (), relay_server_port: int | None = None,
                        advertise_tags: tuple[str, ...] = ()) -> FullNode:
        """``tsnet up`` (a whole :class:`tsnet.Server`: netstack, proxies, local API) as a process on ``host``.

        ``socks5_port`` serves SOCKS5 on the namespace's 127.0.0.1, ``forwards`` are ``PORT=HOST:PORT``
        (tailnet TCP port -> address inside the namespace). The state directory survives :meth:`FullNode.restart`,
        so a restarted node keeps its identity. Returns once the process is started; use
        :meth:`FullNode.wait_running`.
        """
        state = self.tmp / f"node-{host.name}"
        args = [sys.executable, "-m", "tsnet", "up", "--control-url", self.control_url, "--authkey", self.authkey,
                "--hostname", host.name, "--state-dir", str(state), "--port", str(port)]
        if socks5_port is not None:
            args += ["--socks5", f"127.0.0.1:{socks5_port}"]
        for fwd in forwards:
            args += ["--forward", fwd]
        if relay_server_port is not None:
            args += ["--relay-server-port", str(relay_server_port)]
        if advertise_tags:
            args += ["--advertise-tags", ",".join(advertise_tags)]
        node = FullNode(host, args, state, socks5_port)
        node.start()
        return node

    def logs(self) -> str:
        return self.lab.process_logs()

    def wait(self, cond: Any, what: str, timeout: float, *, allow_dead: tuple[object, ...] = ()) -> None:
        """Poll ``cond`` (bounded); fail at once if a lab process died (other than ``allow_dead``),
        printing the tail of every process's log when it fails."""
        def check() -> bool:
            dead = [p for p in self.lab.processes if p.poll() is not None and p not in allow_dead]
            if dead:
                raise AssertionError(f"process died: {dead[0]}")
            return bool(cond())

        try:
            wait_until(check, timeout, what, interval=0.1)
        except Exception:
            print(self.logs()[-30000:])
            raise


@dataclass
class FullNode:
    """A ``tsnet up`` process on a lab host; status and metrics come from its local API (a Unix socket)."""

    host: Host
    args: list[str]
    state_dir: Path
    socks5_port: int | None
    proc: LabProcess | None = None

    def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.proc = self.host.ns.popen(self.args, env={"PYTHONPATH": str(REPO)}, cwd=str(REPO))

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) the node; its state directory stays."""
        assert self.proc is not None
        self.proc.stop()

    def kill(self) -> None:
        """SIGKILL: the node vanishes without a goodbye (no logout, no disco)."""
        assert self.proc is not None
        import signal as _signal

        self.proc.signal(_signal.SIGKILL)
        self.proc.popen.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "tsnet.sock"

    def _client(self) -> Any:
        from tsnet.localapi import LocalClient

        return LocalClient(self.socket_path, timeout=5.0)

    def status(self) -> dict[str, Any]:
        """``tsnet status --json`` (empty while the local API is not up)."""
        from tsnet.localapi import LocalAPIError

        try:
            return self._client().status()
        except (LocalAPIError, OSError, ValueError):
            return {}

    def metrics(self) -> str:
        return str(self._client().metrics())

    def metric(self, name: str) -> float:
        """Sum of every sample of ``name`` (all label sets) in the node's Prometheus text."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def metric_values(self, *names: str) -> dict[str, float]:
        """Each of ``names`` summed over its label sets, all from one scrape (0.0 when absent).

        One scrape keeps related counters consistent with each other (e.g. requests received versus
        requests answered plus refused), which separate :meth:`metric` calls would not.
        """
        totals = dict.fromkeys(names, 0.0)
        for line in self.metrics().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals and not line.startswith("#"):
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals

    def peer(self, hostname: str) -> dict[str, Any] | None:
        return next((p for p in self.status().get("peers") or () if p.get("name") == hostname), None)

    def path(self, hostname: str) -> str:
        """The peer's path as ``tsnet status`` shows it: ``direct IP:PORT``, ``relay via NAME``, ``derp region N``,
        ``idle`` or ``""`` (unknown peer)."""
        p = self.peer(hostname)
        return str(p.get("path") or "") if p else ""

    def ipv4(self) -> str:
        me = self.status().get("self_node") or {}
        return next(a.split("/")[0] for a in me.get("addresses", ()) if "." in a)

    def running(self) -> bool:
        return self.status().get("backend_state") == "Running"

    def wait_running(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.running() or not self.alive(), timeout, f"{self.host.name} running")
        assert self.alive(), self.proc.log()[-4000:] if self.proc else ""


@dataclass
class TailscaledNode:
    """A real tailscaled 1.96.4 on a lab host, joined to our control server."""

    host: Host
    proc: LabProcess
    sock: Path
    bins: Any

    def cli(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        cmd = self.host.ns.exec_args([str(self.bins.tailscale), f"--socket={self.sock}", *args])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"tailscale {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}\n"
                                 f"--- tailscaled log ---\n{self.proc.log()[-4000:]}")
        return out.stdout

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json"))

    def peer(self, hostname: str) -> dict[str, Any] | None:
        return next((p for p in (self.status().get("Peer") or {}).values() if p.get("HostName") == hostname), None)

    def ipv4(self) -> str:
        return next(ip for ip in self.status()["Self"]["TailscaleIPs"] if "." in ip)


def start_tailscaled_node(topo: NatTopology, host: Host, bins: Any, *, port: int = 41641,
                          env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> TailscaledNode:
    """Start tailscaled (userspace networking, ``--no-logs-no-support``) on ``host`` and ``tailscale up`` it.

    ``extra_args`` go to tailscaled itself (e.g. ``--socks5-server=127.0.0.1:1080``).
    """
    from tests.lab.tailscaled import start_tailscaled

    state = topo.tmp / f"tailscaled-{host.name}"
    state.mkdir(parents=True, exist_ok=True)
    full_env = {
        "TS_DEBUG_USE_DERP_HTTP": "1",
        "TS_NO_LOGS_NO_SUPPORT": "true",
        "TS_DISABLE_PORTMAPPER": "1",
        "TS_ASSUME_NETWORK_UP_FOR_TEST": "1",
        "TS_NETCHECK_GENERATE_204_URL": topo.control_url + "/generate_204",
        "HOME": str(state),
        **(env or {}),
    }
    sock = state / "tailscaled.sock"
    proc, _ = start_tailscaled(host.ns, bins, env=full_env, state_dir=state / "state", socket_path=sock, port=port,
                               extra_args=extra_args)
    wait_until(lambda: sock.exists() or proc.poll() is not None, 20, "tailscaled socket")
    assert proc.poll() is None, proc.log()[-3000:]
    node = TailscaledNode(host, proc, sock, bins)
    node.cli("up", f"--login-server={topo.control_url}", f"--authkey={topo.authkey}", f"--hostname={host.name}",
             "--timeout=60s", timeout=90)
    return node
