"""The command line's value types: numbers within a range (argparse's one-line error
outside it), input shapes, NAME=RATIO pairs, lists. Each raises ArgumentTypeError (or
InputError, for a combination of values) with what a right value looks like."""
from __future__ import annotations

import argparse
import math

from .errors import InputError


def number(kind, low=None, above: bool = False, high=None, below: bool = False):
    """An argparse type: a finite `kind` value within [low, high] (`above` / `below`:
    the bound itself excluded). A value outside is argparse's one-line error, exit 2."""
    def parse(text: str):
        value = kind(text)       # ValueError: argparse's "invalid float value"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and (value < low or above and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if above else '>='} {low}")
        if high is not None and (value > high or below and value == high):
            raise argparse.ArgumentTypeError(f"{text} must be {'<' if below else '<='} {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


FINITE = number(float)
NONNEG = number(float, 0)               # training epochs, loss weights: 0 or more
POSITIVE = number(float, 0, above=True)  # learning rates, temperatures, budgets
FRACTION = number(float, 0, high=1, below=True)
SHARE = number(float, 0, high=1)        # a share of a budget: 0 to 1
COUNT = number(int, 1)                  # batch sizes, images, rounds
SOME = number(int, 0)                   # 0 or more


def shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """'1,3,224,224' or 'NAME:1,3,224,224' (the name may hold ':', as TF's 'input:0')."""
    name, _, sizes = text.rpartition(":")
    try:
        dims = tuple(int(v) for v in sizes.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,3,224,224 or "
                                         "NAME:1,3,224,224") from None
    if not dims or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must list positive sizes")
    return (name or None), dims


def input_shape(given: list | None):
    """--input-shape values -> None, one shape, or {input name: shape}."""
    if not given:
        return None
    names = [name for name, _ in given]
    if names == [None]:
        return given[0][1]
    if None in names:
        raise InputError("--input-shape was given without an input name next to other "
                         "shapes - name each one as NAME:1,3,224,224")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError(f"--input-shape gives input '{twice}' twice - give one shape per input")
    return dict(given)


def count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a count like 2")
    return n


def widths(text: str) -> tuple[int, int, int]:
    try:
        got = tuple(int(v) for v in text.split(","))
    except ValueError:
        got = ()
    if len(got) != 3 or min(got) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not three positive widths like 32,16,16")
    return got


def name_ratio(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=RATIO, e.g. conv1=0.25") from None


def name_values(text: str) -> tuple[str, tuple[float, ...]]:
    """'NAME=V1,V2,...' (the name may hold '=' but not end in it)."""
    name, sep, values = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        numbers = tuple(float(v) for v in values.split(","))
        if not all(map(math.isfinite, numbers)):
            raise ValueError
        return name, numbers
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VALUES, e.g. "
                                         "scale_factor=1,1 (finite numbers)") from None


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list like 0.5,0.5,0.5") from None
