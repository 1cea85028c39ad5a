"""Command-line option checks shared by every `vae` command (argparse `type=` functions).

A bad value is refused where it is parsed, before any model is loaded: `Parser` prints one line
(`vae train: error: argument --batch-size: must be an integer >= 1, got '0'`) and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_range(low: int | None = None, high: int | None = None):
    """An integer in [low, high] (either bound may be None)."""

    def check(text: str) -> int:
        value = _int(text)
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                want = f"an integer >= {low}"
            elif low is None:
                want = f"an integer <= {high}"
            else:
                want = f"an integer from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    check.__name__ = "integer"  # what argparse names in "invalid integer value"
    return check


def float_range(low: float | None = None, high: float | None = None, *, high_open: bool = False):
    """A finite number in [low, high] (or [low, high) with `high_open`)."""

    def check(text: str) -> float:
        value = _float(text)
        too_high = high is not None and (value >= high if high_open else value > high)
        if (low is not None and value < low) or too_high:
            upper = "" if high is None else f"below {high:g}" if high_open else f"at most {high:g}"
            if high is None:
                want = f"a finite number >= {low:g}"
            elif low is None:
                want = f"a finite number {upper}"
            else:
                want = f"a number from {low:g}, {upper}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    check.__name__ = "number"
    return check


def multiple_of(factor: int, low: int):
    """An integer >= `low` that is a multiple of `factor` (image sides the model can downsample)."""

    def check(text: str) -> int:
        value = _int(text)
        if value < low or value % factor:
            raise argparse.ArgumentTypeError(f"must be a multiple of {factor} of at least {low}, got {text!r}")
        return value

    check.__name__ = "integer"
    return check


def list_of(item):
    """A comma-separated list of values that each pass `item` (an option type above), as a tuple."""

    def check(text: str) -> tuple:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list with no empty item, got {text!r}")
        values = []
        for part in parts:
            try:
                values.append(item(part))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{exc} (in the list {text!r})") from None
        return tuple(values)

    check.__name__ = "list"
    return check


positive_int = int_range(1)
nonnegative_int = int_range(0)
finite_float = float_range()
nonnegative_float = float_range(0.0)


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` on one line (newlines folded) and return 2, the usage-error status."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
