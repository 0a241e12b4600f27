"""``tsnet derper``: run a standalone DERP (+ STUN) server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from functools import partial
import sys

import trio

from ..key import NodePrivate

__all__ = ["register"]


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def register(subparsers) -> None:
    """Add the ``derper`` subcommand."""
    p = subparsers.add_parser("derper", help="run a DERP relay server (and STUN)")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 3340), help="HOST:PORT (default 127.0.0.1:3340)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plain-http", action="store_true", help="serve plain HTTP, the default (tailscaled then needs TS_DEBUG_USE_DERP_HTTP=1)")
    mode.add_argument("--self-signed", action="store_true", help="TLS with a freshly generated self-signed certificate")
    mode.add_argument("--tls-cert", metavar="C", help="TLS certificate chain (PEM); needs --tls-key")
    p.add_argument("--tls-key", metavar="K", help="TLS private key (PEM)")
    p.add_argument("--stun-port", type=int, default=3478, help="UDP STUN port on the listen IP; 0 or -1 disables")
    p.add_argument("--mesh-with", action="append", default=[], metavar="URL", help="peer DERP URL, http://host:port or https://host:port (repeatable or comma-separated)")
    p.add_argument("--mesh-key", metavar="K", help="64 hex chars shared by mesh peers")
    p.add_argument("--verify-clients-url", metavar="URL", help="admission check: POST {NodePublic, Source}")
    p.add_argument("--private-key", metavar="KEY", help="server key (privkey:hex); random if omitted")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="BYTES_PER_SEC", help="per-client send limit")
    p.add_argument("--rate-limit-burst", type=int, default=0, metavar="BYTES", help="bucket size (min 65573)")
    p.add_argument("--rate-limit-mode", choices=("drop", "pace"), default="drop",
                   help="over the limit: drop and count packets, or pace reading (lossless backpressure)")
    p.add_argument("--print-derp-map", action="store_true",
                   help="print a one-region DERPMap (JSON) pointing at this server, for a control server")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    if args.tls_cert and not args.tls_key:
        print("tsnet derper: --tls-cert needs --tls-key", file=sys.stderr)
        return 2
    mesh_key = None
    if args.mesh_key:
        try:
            mesh_key = bytes.fromhex(args.mesh_key.removeprefix("mesh:"))
        except ValueError:
            mesh_key = b""
        if len(mesh_key) != 32:
            print("tsnet derper: --mesh-key must be 64 hex characters", file=sys.stderr)
            return 2
    if args.mesh_with and not mesh_key:
        print("tsnet derper: --mesh-with needs --mesh-key", file=sys.stderr)
        return 2
    try:
        private = NodePrivate.parse(args.private_key) if args.private_key else NodePrivate.generate()
    except ValueError as exc:
        print(f"tsnet derper: {exc}", file=sys.stderr)
        return 2
    failure = None
    try:
        return trio.run(_main, args, private, mesh_key)
    except* OSError as group:
        failure = group.exceptions[0]
    print(f"tsnet derper: {failure}", file=sys.stderr)
    return 1


async def _main(args: argparse.Namespace, private: NodePrivate, mesh_key: bytes | None) -> int:
    from .server import DerpServer
    from .tls import generate_self_signed, server_ssl_context

    host, port = args.listen
    ssl_context = None
    cert = None
    if args.self_signed:
        cert = generate_self_signed(host)
        ssl_context = server_ssl_context(self_signed=cert)
        print(f"self-signed certificate; pin it with CertName {cert.cert_name}", flush=True)
    elif args.tls_cert:
        ssl_context = server_ssl_context(args.tls_cert, args.tls_key)
    server = DerpServer(private, mesh_key=mesh_key, verify_client_url=args.verify_clients_url,
                        rate_limit_bytes_per_sec=args.rate_limit, rate_limit_burst=args.rate_limit_burst,
                        rate_limit_mode=args.rate_limit_mode)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(server.serve_tcp, host, port, ssl_context=ssl_context))
            scheme = "https" if ssl_context else "http"
            print(f"derper {server.public_key} listening on {scheme}://{host}:{bound}/derp", flush=True)
            sport = -1
            if args.stun_port > 0:
                sport = await nursery.start(server.serve_stun, host, args.stun_port)
                print(f"STUN on udp {host}:{sport}", flush=True)
            if args.print_derp_map:
                from .derpmap import single_region_derp_map

                cert_name = ""
                if cert is not None:
                    cert_name = cert.cert_name
                elif args.tls_cert:
                    cert_name = _pin_of(args.tls_cert)  # pin the leaf rather than switch checks off
                derp_map = single_region_derp_map(bound, host=host, stun_port=sport, cert_name=cert_name)
                print(json.dumps(derp_map), flush=True)
            for url in (u.strip() for arg in args.mesh_with for u in arg.split(",")):
                if url:
                    nursery.start_soon(server.run_mesh_peer, url)
            async for signum in signals:
                print(f"signal {signal.Signals(signum).name}: shutting down", flush=True)
                break
            await server.shutdown()
            nursery.cancel_scope.cancel()
    return 0


def _pin_of(cert_file: str) -> str:
    """``sha256-raw:<hex>`` of the first (leaf) certificate in a PEM file."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    with open(cert_file, "rb") as fh:
        leaf = x509.load_pem_x509_certificates(fh.read())[0]
    return "sha256-raw:" + hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
