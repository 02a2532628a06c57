"""argparse value types shared by the `deepstack` subcommands: errors name the option (argparse adds its name)."""
from __future__ import annotations

import argparse


def int_at_least(lowest: int, what: str = ""):
    """An argparse type: an integer >= lowest (`what` adds why, e.g. " (one training batch)")."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lowest - 1
        if n < lowest:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}{what}, got {text!r}")
        return n
    return parse
