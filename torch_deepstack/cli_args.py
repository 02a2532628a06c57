"""argparse value types shared by the `deepstack` subcommands: errors name the option (argparse adds its name)."""
from __future__ import annotations

import argparse


def int_in_range(lowest: int, highest: int | None = None, what: str = ""):
    """An argparse type: an integer in [lowest, highest] (no upper bound by default; `what` adds why, e.g.
    " (one training batch)")."""
    bounds = f">= {lowest}" if highest is None else f"in {lowest}..{highest}"

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < lowest or (highest is not None and n > highest):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}{what}, got {text!r}")
        return n
    return parse


def int_at_least(lowest: int, what: str = ""):
    return int_in_range(lowest, None, what)
