"""Value types for command-line options: each rejects a bad value naming it and the valid range.

Used as `argparse` `type=` functions, so `--batch-size 0` or `--depths ,` stops with
`error: argument --batch-size: ...` and exit status 2 before anything runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A parser for a whole number >= `minimum` (e.g. 1 for counts, 0 for steps)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_list(minimum: int | None = None) -> Callable[[str], list[int]]:
    """A parser for a non-empty comma-separated list of whole numbers (each >= `minimum`)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of whole numbers") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list; give at least one "
                                             "number, e.g. 20,32")
        bad = [v for v in values if minimum is not None and v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]} is not valid: each value must be at "
                                             f"least {minimum}")
        return values

    return parse


def word_list(text: str) -> list[str]:
    """A non-empty comma-separated list of words."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list; give at least one value")
    return values
