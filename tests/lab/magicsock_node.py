"""A Python tailnet node for lab tests: control client + MagicSock + a tiny ICMP echo responder.

Run inside a lab namespace (``python -m tests.lab.magicsock_node ...``). It
logs in to our control server, keeps its endpoints and home DERP reported,
answers ICMP echo requests arriving over WireGuard, optionally pings one peer
(by host name) every ``--interval`` seconds, and rewrites ``--status`` (JSON)
several times a second: own endpoints, netcheck, per-peer path, echo replies.
Tests poll that file; the lab kills the process at teardown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import trio

from tests.lab import packets
from tsnet.control.client import ClientConfig, ControlClient
from tsnet.key import DiscoPrivate, MachinePrivate, NodePrivate, NodePublic
from tsnet.magicsock.conn import EndpointsChanged, HomeDerpChanged
from tsnet.magicsock.driver import MagicSockDriver

log = logging.getLogger("labnode")


class LabNode:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node_private = NodePrivate.generate()
        self.driver = MagicSockDriver(self.node_private, DiscoPrivate.generate(), port=args.port, bind_v6=None,
                                      derp_plain_http=True, on_packet=self.on_packet, on_event=self.on_event,
                                      relay_server_port=args.relay_server_port)
        self.client = ControlClient(ClientConfig(
            control_url=args.control_url, machine_key=MachinePrivate.generate(), node_key=self.node_private,
            disco_key=self.driver.disco_key, hostname=args.hostname, auth_key=args.authkey))
        self.my_ip: str | None = None
        self.netmap = None
        self.replies = 0
        self.requests_answered = 0
        self.last_reply_at: float | None = None
        self.sent = 0
        self._update_wanted = trio.Event()
        self.netcheck: dict | None = None

    # -- data plane ---------------------------------------------------------------

    def on_packet(self, peer: NodePublic, pkt: bytes) -> None:
        try:
            ip = packets.parse_ipv4(pkt)
            if ip.proto != packets.PROTO_ICMP:
                return
            echo = packets.parse_icmp_echo(ip.payload)
        except ValueError:
            return
        if not echo.is_reply:
            self.requests_answered += 1
            self.driver.send_ip_packet(packets.icmp_echo(str(ip.dst), str(ip.src), echo.ident, echo.seq, echo.data,
                                                         reply=True))
        else:
            self.replies += 1
            self.last_reply_at = time.monotonic()

    def on_event(self, ev: object) -> None:
        if isinstance(ev, (EndpointsChanged, HomeDerpChanged)):
            if isinstance(ev, HomeDerpChanged) and ev.report is not None:
                self.netcheck = ev.report.as_dict()
            self._update_wanted.set()

    def on_netmap(self, nm) -> None:  # type: ignore[no-untyped-def]
        self.netmap = nm
        v4 = [a for a in nm.addresses if a.version == 4]
        if v4:
            self.my_ip = str(v4[0].ip)
        self.driver.set_netmap(nm)

    # -- tasks --------------------------------------------------------------------

    async def report_endpoints(self) -> None:
        """Lite map updates whenever endpoints or home DERP change (coalesced)."""
        while True:
            await self._update_wanted.wait()
            self._update_wanted = trio.Event()
            core = self.driver.core
            try:
                await self.client.send_update(endpoints=tuple(str(e.addr) for e in core.endpoints),
                                              preferred_derp=core.home_derp or None)
            except Exception as exc:  # control hiccup: try again on the next change or in a second
                log.info("endpoint update failed: %s", exc)
                await trio.sleep(1)
                self._update_wanted.set()

    def _peer_ip(self, name: str) -> str | None:
        if self.netmap is None:
            return None
        p = self.netmap.peer_by_name(name)
        if p is None:
            return None
        v4 = [a for a in p.addresses if a.version == 4]
        return str(v4[0].ip) if v4 else None

    async def pinger(self) -> None:
        seq = 0
        while True:
            await trio.sleep(self.args.interval)
            dst = self._peer_ip(self.args.ping)
            if dst is None or self.my_ip is None:
                continue
            seq = (seq + 1) & 0xFFFF
            if self.driver.send_ip_packet(packets.icmp_echo(self.my_ip, dst, 0x7473, seq, b"tsnet-lab")):
                self.sent += 1

    def status(self) -> dict:
        core = self.driver.core
        peers = []
        for st in self.driver.status():
            d = st.as_dict()
            p = self.netmap.peer_by_key(st.node_key) if self.netmap else None
            d["hostname"] = p.name.split(".")[0] if p else ""
            d["ip"] = str(next((a.ip for a in p.addresses if a.version == 4), "")) if p else ""
            peers.append(d)
        return {
            "pid": os.getpid(),
            "node_key": str(self.driver.node_key),
            "ip": self.my_ip,
            "port": core.ports.get(4),
            "endpoints": [str(e.addr) for e in core.endpoints],
            "home_derp": core.home_derp,
            "netcheck": core.last_report.as_dict() if core.last_report else None,
            "peers": peers,
            "sent": self.sent,
            "replies": self.replies,
            "requests_answered": self.requests_answered,
            "counters": dict(core.counters),
            "driver": dict(self.driver.counters),
            "relay": dict(core.relay.counters),
            "relay_server": {
                "addr_ports": [str(a) for a in self.driver.relay_server.addr_ports],
                "forwarded_packets": sum(self.driver.relay_server.forwarded_packets.values()),
                "endpoints": self.driver.relay_server.endpoint_gauge(),
            } if self.driver.relay_server else None,
        }

    async def write_status(self) -> None:
        path = Path(self.args.status)
        tmp = path.with_suffix(".tmp")
        while True:
            tmp.write_text(json.dumps(self.status()))
            tmp.replace(path)
            await trio.sleep(0.1)

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.driver.run)
            self.client.endpoints = tuple(str(e.addr) for e in self.driver.core.endpoints)
            async with self.client:
                nursery.start_soon(self.write_status)
                nursery.start_soon(self.report_endpoints)
                if self.args.ping:
                    nursery.start_soon(self.pinger)
                await self.client.run(self.on_netmap)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--control-url", required=True)
    ap.add_argument("--authkey", required=True)
    ap.add_argument("--hostname", required=True)
    ap.add_argument("--status", required=True)
    ap.add_argument("--port", type=int, default=41641)
    ap.add_argument("--ping", help="host name of a peer to ping")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--relay-server-port", type=int, help="also run a peer relay server on this UDP port")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    async def run() -> None:
        await LabNode(args).main()

    trio.run(run)


if __name__ == "__main__":
    main()
