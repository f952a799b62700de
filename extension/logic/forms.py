"""Form fields from JSON requests and number boxes: typed, whole and finite, or refused in one line naming the field."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import MISSING, fields
from typing import Any, get_type_hints

from privdiff.errors import PrivdiffError

MAX_SEED = 2**32 - 1


def _typed(name: str, kind: type, value: object) -> object:
    """``value`` as a ``kind`` field of a JSON request (a whole float such as 3.0 counts as an int); else one line."""
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is float and numeric and math.isfinite(value):
        return float(value)
    if kind is int and numeric and math.isfinite(value) and value == int(value):
        return int(value)
    wanted = {bool: "true or false", str: "a string", float: "a finite number", int: "a whole number"}[kind]
    raise PrivdiffError(f"field {name!r} must be {wanted}, got {json.dumps(value)[:60]}")


def parse_form(form_type: type, body: object) -> Any:
    """A form dataclass from a JSON request body; a field that is unknown, missing or of the wrong type is one
    line naming it (PrivdiffError)."""
    if not isinstance(body, dict):
        raise PrivdiffError(f"the request body must be a JSON object of fields, got {type(body).__name__}")
    hints, known = get_type_hints(form_type), {f.name: f for f in fields(form_type)}
    for name in body:
        if name not in known:
            raise PrivdiffError(f"unknown field {name!r}; the fields are {', '.join(known)}")
    for name, spec in known.items():
        if name not in body and spec.default is MISSING:
            raise PrivdiffError(f"field {name!r} is required")
    return form_type(**{name: _typed(name, hints[name], value) for name, value in body.items()})


def whole(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in low..high (a float like 3.0 from a number box is fine); else one line."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise PrivdiffError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise PrivdiffError(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


def number(name: str, value: object) -> float:
    """``value`` as a finite float (not a bool); else one line."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PrivdiffError(f"{name} must be a finite number, got {value!r}")
    return float(value)
