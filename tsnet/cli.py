"""The ``tsnet`` command.

Each subsystem owns its subcommands: a module listed in ``_SUBCOMMAND_MODULES``
exposes ``register(subparsers)`` which adds its parser and sets ``func`` (a
callable taking the parsed namespace and returning an exit code). Keeping the
wiring here tiny means layers can grow their commands without touching this file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# Modules that contribute subcommands, in help order.
_SUBCOMMAND_MODULES = (
    "tsnet.derp.cli",
    "tsnet.control.cli",
)


def _demo(args: argparse.Namespace) -> int:
    print(
        "tsnet demo: not available yet. It needs the control plane, magicsock and the public Server API,\n"
        "which are still being built (see the status table in README.md).",
        file=sys.stderr,
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsnet", description="A userspace Tailscale-compatible node for Python.")
    parser.add_argument("--version", action="version", version=f"tsnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run a working tailnet on this machine and show it in action")
    demo.set_defaults(func=_demo)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # that layer has no commands yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
