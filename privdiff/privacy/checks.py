"""Input checks shared by the privacy code: each failure is a one-line PrivdiffError naming the value."""

from __future__ import annotations

import math
import numbers

from privdiff.errors import PrivdiffError


def real(name: str, value: object) -> float:
    """``value`` as a finite float; bools, strings and NaN/inf are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PrivdiffError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive(name: str, value: object) -> float:
    """A finite float > 0."""
    v = real(name, value)
    if v <= 0:
        raise PrivdiffError(f"{name} must be > 0, got {value!r}")
    return v


def open_unit(name: str, value: object) -> float:
    """A float in the open interval (0, 1), e.g. delta."""
    v = real(name, value)
    if not 0 < v < 1:
        raise PrivdiffError(f"{name} must be in (0, 1), got {value!r}")
    return v


def sample_rate(value: object, name: str = "sample_rate") -> float:
    """A Poisson sampling rate q in (0, 1]."""
    v = real(name, value)
    if not 0 < v <= 1:
        raise PrivdiffError(f"{name} must be in (0, 1], got {value!r}")
    return v


def count(name: str, value: object, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise PrivdiffError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def served(
    name: str, value: float, low: float | None = None, high: float | None = None, what: str = "value",
    who: str = "the accountants", hint: str = "",
) -> float:
    """``value`` (already checked) if it lies in [low, high], the range ``who`` answer within seconds."""
    if low is not None and value < low:
        problem = f"is below the smallest {what} {who} can serve ({_show(low)})"
    elif high is not None and value > high:
        problem = f"is over the {_show(high)} {who} can serve"
    else:
        return value
    raise PrivdiffError(f"{name}={value!r} {problem}" + (f"; {hint}" if hint else ""))


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"
