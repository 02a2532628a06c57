"""The `deepstack` command.

Each subcommand lives in the module of its area, which provides `add_parser(subparsers)`; the parser it adds
sets `func(args) -> int`. Modules are imported only when their command is parsed, so `deepstack --help`
stays fast and an area that cannot load here does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> module providing add_parser(subparsers)
COMMANDS: dict[str, str] = {
    "doctor": "torch_deepstack.doctor",
    "jit": "torch_deepstack.jit.cli",
    "bench": "torch_deepstack.bench_cli",
    "demo": "torch_deepstack.demo",
    "pack": "torch_deepstack.data.cli",
    "fs": "torch_deepstack.storage.cli",
}


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser for `commands` (default: all); a module that fails to import is reported, not fatal."""
    parser = argparse.ArgumentParser(prog="deepstack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in commands or COMMANDS:
        try:
            importlib.import_module(COMMANDS[name]).add_parser(sub)
        except ImportError as e:
            sub.add_parser(name, help=f"(unavailable here: {e})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the command being run, so one area's import cost or failure stays its own.
    cmd = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([cmd] if cmd in COMMANDS else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.error(f"command {args.command!r} is unavailable on this machine (see `deepstack doctor`)")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
