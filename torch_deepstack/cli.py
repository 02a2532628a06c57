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
    "fs": "torch_deepstack.storage.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepstack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
