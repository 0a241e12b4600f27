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
import typing
from collections.abc import Sequence

from . import __version__

# Modules that contribute subcommands, in help order.
_SUBCOMMAND_MODULES = (
    "tsnet.demo",
    "tsnet.cli_node",
    "tsnet.derp.cli",
    "tsnet.control.cli",
)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line naming the offending flag (``tsnet up: error: argument --port: ...``), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tsnet", description="A userspace Tailscale-compatible node for Python.")
    parser.add_argument("--version", action="version", version=f"tsnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
