"""``tsnet control ...``: run the coordination server and administer its state directory."""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "parse_duration"]

_DEFAULT_STATE = "./tsnet-control"


def parse_duration(text: str) -> _dt.timedelta:
    """``90s``, ``5m``, ``24h``, ``7d`` or combinations like ``1h30m``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 30s, 5m, 24h, 7d)")
    return _dt.timedelta(seconds=sum(float(n) * units[u] for n, u in parts))


def _open_store(args: argparse.Namespace) -> Any:
    from .store import Store, StoreError

    try:
        return Store.open(args.state_dir)
    except StoreError as exc:
        print(f"tsnet control: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _cmd_authkey_create(args: argparse.Namespace) -> int:
    store = _open_store(args)
    tags = tuple(t for group in args.tags or () for t in group.split(",") if t)
    for tag in tags:
        if not re.fullmatch(r"tag:[A-Za-z][A-Za-z0-9-]*", tag):
            print(f"tsnet control: bad tag {tag!r} (want tag:name)", file=sys.stderr)
            return 2
    expires = _now() + args.expiry if args.expiry else None
    key = store.create_authkey(_now(), reusable=args.reusable, ephemeral=args.ephemeral, tags=tags, expires=expires)
    print(key.key)
    return 0


def _cmd_authkey_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    now = _now()
    rows = []
    for k in store.authkeys():
        state = k.usable(now) or "valid"
        rows.append({"key": k.key, "reusable": k.reusable, "ephemeral": k.ephemeral, "tags": list(k.tags),
                     "created": k.created.isoformat(), "expires": k.expires.isoformat() if k.expires else None,
                     "used": k.used, "state": state})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        flags = ",".join(f for f in ("reusable" if r["reusable"] else "", "ephemeral" if r["ephemeral"] else "") if f) or "-"
        print(f"{r['key']}  {flags:18}  tags={','.join(r['tags']) or '-'}  used={r['used']}  "
              f"expires={r['expires'] or 'never'}  {r['state']}")
    return 0


def _cmd_authkey_revoke(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if not store.revoke_authkey(args.key):
        print("tsnet control: no such auth key", file=sys.stderr)
        return 1
    return 0


def _find_node(store: Any, name: str) -> Any:
    node = store.node_by_name(name.split(".")[0])
    if node is None and name.isdigit():
        node = store.node(int(name))
    if node is None:
        print(f"tsnet control: no node named {name!r}", file=sys.stderr)
        raise SystemExit(1)
    return node


def _cmd_nodes_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    now = _now()
    rows = []
    for n in store.nodes():
        rows.append({"id": n.id, "name": n.name, "addresses": [n.ipv4, n.ipv6], "node_key": n.node_key,
                     "machine_key": n.machine_key, "ephemeral": n.ephemeral, "tags": list(n.tags),
                     "expired": n.expired(now), "logged_out": n.logged_out,
                     "key_expiry": n.key_expiry.isoformat() if n.key_expiry else None,
                     "last_seen": n.last_seen.isoformat() if n.last_seen else None,
                     "created": n.created.isoformat()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "logged-out" if r["logged_out"] else ("expired" if r["expired"] else "ok")
        print(f"{r['id']:>4}  {r['name']:24}  {r['addresses'][0]:15}  {r['addresses'][1]:24}  "
              f"{'ephemeral ' if r['ephemeral'] else ''}{','.join(r['tags'])}  {state}")
    return 0


def _cmd_nodes_delete(args: argparse.Namespace) -> int:
    store = _open_store(args)
    node = _find_node(store, args.name)
    store.delete_node(node.id)
    return 0


def _cmd_nodes_expire(args: argparse.Namespace) -> int:
    store = _open_store(args)
    node = _find_node(store, args.name)
    store.update_node(node.id, key_expiry=_now())
    return 0


def _cmd_nodes_rename(args: argparse.Namespace) -> int:
    from .server import sanitize_hostname

    store = _open_store(args)
    node = _find_node(store, args.name)
    label = sanitize_hostname(args.new_name)
    if label != args.new_name.lower():
        print(f"tsnet control: {args.new_name!r} is not a valid DNS label (try {label!r})", file=sys.stderr)
        return 2
    other = store.node_by_name(label)
    if other is not None and other.id != node.id:
        print(f"tsnet control: name {label!r} is taken", file=sys.stderr)
        return 1
    store.rename_node(node.id, label)
    return 0


def _cmd_nodes_approve(args: argparse.Namespace) -> int:
    store = _open_store(args)
    token = args.token.rstrip("/").rsplit("/", 1)[-1]  # accept the whole AuthURL too
    if not store.approve_pending(token):
        print("tsnet control: no pending login with that token", file=sys.stderr)
        return 1
    return 0


def _cmd_nodes_pending(args: argparse.Namespace) -> int:
    store = _open_store(args)
    for p in store.pending_logins():
        print(f"{p.token}  {p.hostname:24}  {p.created.isoformat()}  {'approved' if p.approved else 'waiting'}")
    return 0


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from .policy import PolicyError, load_policy_file

    try:
        policy = load_policy_file(args.file)
    except OSError as exc:
        print(f"tsnet control: {exc}", file=sys.stderr)
        return 1
    except PolicyError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(policy.rules)} rules, {len(policy.groups)} groups, {len(policy.tag_owners)} tags)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    import trio

    from . import tailcfg
    from .server import ControlServer, ServerConfig, default_derp_map

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("tsnet").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    host, _, port_text = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        print(f"tsnet control: bad --listen {args.listen!r} (want HOST:PORT)", file=sys.stderr)
        return 2
    store = _open_store(args)
    config = ServerConfig(base_domain=args.base_domain, ephemeral_timeout=args.ephemeral_timeout.total_seconds())
    config.magic_dns = not args.no_magic_dns
    config.interactive_login = not args.no_interactive_login
    config.nameservers = tuple(args.nameserver or ())
    config.key_expiry = args.key_expiry if args.key_expiry.total_seconds() > 0 else None
    try:
        for item in args.split_dns or ():
            suffix, _, servers = item.partition("=")
            if not suffix or not servers:
                raise ValueError(f"--split-dns {item!r}: want SUFFIX=IP[,IP...]")
            config.split_dns[suffix] = tuple(s for s in servers.split(",") if s)
        records = []
        for item in args.extra_record or ():
            name, _, value = item.partition("=")
            addr = ipaddress.ip_address(value)
            records.append(tailcfg.DNSRecord(name=name, type="AAAA" if addr.version == 6 else "A", value=str(addr)))
        config.extra_records = tuple(records)
    except ValueError as exc:
        print(f"tsnet control: {exc}", file=sys.stderr)
        return 2
    if args.policy:
        from .policy import PolicyError, load_policy_file

        try:
            policy = load_policy_file(args.policy)
        except (OSError, PolicyError) as exc:
            print(f"tsnet control: policy {args.policy}: {exc}", file=sys.stderr)
            return 1
        policy.install(config)
        config.policy_path = args.policy
    derp_map = None
    if args.derp_map:
        try:
            derp_map = tailcfg.decode(tailcfg.DERPMap, Path(args.derp_map).read_bytes())
        except (OSError, tailcfg.DecodeError) as exc:
            print(f"tsnet control: --derp-map {args.derp_map}: {exc}", file=sys.stderr)
            return 1
    server = ControlServer(store, config)
    ssl_context = None
    if args.tls_cert or args.tls_key:
        import ssl

        if not (args.tls_cert and args.tls_key):
            print("tsnet control: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        try:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
            ssl_context.set_alpn_protocols(["http/1.1"])
        except (OSError, ssl.SSLError) as exc:
            print(f"tsnet control: TLS certificate: {exc}", file=sys.stderr)
            return 1
    scheme = "https" if ssl_context else "http"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(server.serve, host, port, ssl_context=ssl_context))
            advertised = args.advertise_host or host
            if derp_map is not None:
                config.derp_map = derp_map
            elif not args.no_derp:
                from ..derp.server import DerpServer

                derp = DerpServer()
                server.attach_derp(derp)
                stun_port = -1
                if args.stun_port:
                    stun_port = await nursery.start(derp.serve_stun, host, args.stun_port)
                config.derp_map = default_derp_map(advertised, bound, stun_port=stun_port)
            print(f"tsnet control: serving {scheme}://{advertised}:{bound} (state {args.state_dir})", file=sys.stderr,
                  flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"tsnet control: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _netmap_summary(nm: Any) -> dict[str, Any]:
    return {
        "self": {"name": nm.name, "addresses": [str(a) for a in nm.addresses], "key": str(nm.node_key)},
        "domain": nm.domain,
        "derp_regions": sorted(nm.derp_map.regions) if nm.derp_map and nm.derp_map.regions else [],
        "peers": [
            {"name": p.name, "addresses": [str(a) for a in p.addresses], "key": str(p.key),
             "disco_key": str(p.disco_key) if p.disco_key else None,
             "endpoints": [f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}" for ip, port in p.endpoints],
             "home_derp": p.home_derp, "cap": p.cap, "online": p.online, "tags": list(p.tags)}
            for p in nm.peers
        ],
        "packet_filter_rules": len(nm.packet_filter),
    }


def _cmd_netmap(args: argparse.Namespace) -> int:
    """Log in with our Python client and print the first network map (optionally waiting for peers)."""
    import os

    import trio

    from ..key import DiscoPrivate, MachinePrivate, NodePrivate
    from .client import ClientConfig, ControlClient, ControlError

    state: dict[str, str] = {}
    path = Path(args.state) if args.state else None
    if path is not None and path.exists():
        state = json.loads(path.read_text())
    machine = MachinePrivate.parse(state["machine"]) if "machine" in state else MachinePrivate.generate()
    node = NodePrivate.parse(state["node"]) if "node" in state else NodePrivate.generate()
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"machine": str(machine), "node": str(node)}, f)
    config = ClientConfig(control_url=args.login_server, machine_key=machine, node_key=node,
                          disco_key=DiscoPrivate.generate().public, hostname=args.hostname,
                          auth_key=args.authkey, ephemeral=args.ephemeral,
                          tags=tuple(t for group in args.tags or () for t in group.split(",") if t))
    result: dict[str, Any] = {}

    async def main() -> None:
        done = trio.Event()

        def on_netmap(nm: Any) -> None:
            if len(nm.peers) >= args.wait_peers:
                result["nm"] = nm
                done.set()

        with trio.fail_after(args.timeout.total_seconds()):
            async with ControlClient(config) as client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.run, on_netmap)
                    await done.wait()
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except (ControlError, trio.TooSlowError, OSError) as exc:
        print(f"tsnet control netmap: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    summary = _netmap_summary(result["nm"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        me = summary["self"]
        print(f"{me['name']}  {' '.join(me['addresses'])}")
        for p in summary["peers"]:
            print(f"  peer {p['name']:30} {' '.join(p['addresses']):40} derp={p['home_derp']} online={p['online']}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``tsnet control`` and its subcommands."""
    control = subparsers.add_parser("control", help="run or administer a coordination (control) server")
    csub = control.add_subparsers(dest="control_command", metavar="SUBCOMMAND")
    control.set_defaults(func=lambda args: (control.print_help(), 2)[1])

    def with_state(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--state-dir", default=_DEFAULT_STATE, help="server state directory (default %(default)s)")
        return p

    serve = with_state(csub.add_parser("serve", help="run the coordination server"))
    serve.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    serve.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate chain (also for /derp)")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.add_argument("--policy", help="HuJSON policy file (default: allow all)")
    serve.add_argument("--derp-map", help="JSON DERP map to advertise instead of the embedded DERP server")
    serve.add_argument("--no-derp", action="store_true", help="no embedded DERP server and no DERP map")
    serve.add_argument("--stun-port", type=int, default=0, help="UDP port for the embedded STUN server (0 = none)")
    serve.add_argument("--advertise-host", help="address nodes use to reach this server's DERP (default: listen host)")
    serve.add_argument("--base-domain", default="tailnet.test", help="MagicDNS domain (default %(default)s)")
    serve.add_argument("--no-magic-dns", action="store_true", help="turn MagicDNS off")
    serve.add_argument("--nameserver", action="append", help="upstream DNS resolver for nodes (repeatable)")
    serve.add_argument("--split-dns", action="append", metavar="SUFFIX=IP[,IP]",
                       help="send queries for SUFFIX to these resolvers (repeatable)")
    serve.add_argument("--extra-record", action="append", metavar="NAME=IP", help="extra MagicDNS record (repeatable)")
    serve.add_argument("--key-expiry", type=parse_duration, default=parse_duration("180d"),
                       help="node key lifetime for user nodes (default 180d; 0s = never)")
    serve.add_argument("--no-interactive-login", action="store_true",
                       help="refuse nodes without an auth key instead of giving them an AuthURL to approve")
    serve.add_argument("--ephemeral-timeout", type=parse_duration, default=parse_duration("5m"),
                       help="delete ephemeral nodes offline this long (default 5m)")
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=_cmd_serve)

    policy = csub.add_parser("policy", help="policy files")
    psub = policy.add_subparsers(dest="policy_command", metavar="ACTION")
    policy.set_defaults(func=lambda args: (policy.print_help(), 2)[1])
    pcheck = psub.add_parser("check", help="validate a HuJSON policy file (errors name the line)")
    pcheck.add_argument("file")
    pcheck.set_defaults(func=_cmd_policy_check)

    authkey = csub.add_parser("authkey", help="pre-auth keys")
    asub = authkey.add_subparsers(dest="authkey_command", metavar="ACTION")
    authkey.set_defaults(func=lambda args: (authkey.print_help(), 2)[1])
    create = with_state(asub.add_parser("create", help="create a key and print it"))
    create.add_argument("--reusable", action="store_true")
    create.add_argument("--ephemeral", action="store_true")
    create.add_argument("--tags", action="append", help="tag:a,tag:b (nodes get these tags and never expire)")
    create.add_argument("--expiry", type=parse_duration, default=parse_duration("24h"), help="key lifetime (default 24h)")
    create.set_defaults(func=_cmd_authkey_create)
    lst = with_state(asub.add_parser("list", help="list keys"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_authkey_list)
    revoke = with_state(asub.add_parser("revoke", help="revoke a key"))
    revoke.add_argument("key")
    revoke.set_defaults(func=_cmd_authkey_revoke)

    netmap = csub.add_parser("netmap", help="log in with the Python client and print the network map")
    netmap.add_argument("--login-server", required=True, help="control URL, e.g. http://127.0.0.1:8080")
    netmap.add_argument("--authkey", help="pre-auth key (omit to re-register a known node key from --state)")
    netmap.add_argument("--hostname", default="tsnet-py")
    netmap.add_argument("--state", help="JSON file keeping this node's machine and node keys (mode 0600)")
    netmap.add_argument("--ephemeral", action="store_true")
    netmap.add_argument("--tags", action="append", help="request tags tag:a,tag:b")
    netmap.add_argument("--wait-peers", type=int, default=0, help="wait until at least N peers are listed")
    netmap.add_argument("--timeout", type=parse_duration, default=parse_duration("30s"))
    netmap.add_argument("--json", action="store_true")
    netmap.set_defaults(func=_cmd_netmap)

    nodes = csub.add_parser("nodes", help="registered nodes")
    nsub = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    nodes.set_defaults(func=lambda args: (nodes.print_help(), 2)[1])
    nl = with_state(nsub.add_parser("list", help="list nodes"))
    nl.add_argument("--json", action="store_true")
    nl.set_defaults(func=_cmd_nodes_list)
    nd = with_state(nsub.add_parser("delete", help="delete a node"))
    nd.add_argument("name")
    nd.set_defaults(func=_cmd_nodes_delete)
    nr = with_state(nsub.add_parser("rename", help="change a node's MagicDNS name"))
    nr.add_argument("name")
    nr.add_argument("new_name")
    nr.set_defaults(func=_cmd_nodes_rename)
    na = with_state(nsub.add_parser("approve", help="approve an interactive login (token or AuthURL)"))
    na.add_argument("token")
    na.set_defaults(func=_cmd_nodes_approve)
    npd = with_state(nsub.add_parser("pending", help="list interactive logins waiting for approval"))
    npd.set_defaults(func=_cmd_nodes_pending)
    ne = with_state(nsub.add_parser("expire", help="expire a node's key now"))
    ne.add_argument("name")
    ne.set_defaults(func=_cmd_nodes_expire)
