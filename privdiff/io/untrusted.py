"""Files and text from outside, read defensively: what every command checks before it trusts a file's content.

- ``regular_file``: the path must name a regular file, refused by kind (folder, FIFO, device, socket) from its
  ``stat`` alone, so a FIFO never blocks a read; ``read_bytes`` adds a size cap before reading.
- ``parse_json`` / ``read_json``: JSON of bounded size and nesting (depth is measured before parsing, so deep
  nesting cannot exhaust the stack), with NaN and ±Infinity refused.
- ``config_int`` / ``config_float``: numbers from a config or report, typed (no bool, no string) and in range.
Each refusal is one ``PrivdiffError`` line that names the file (``what``) and the value.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from privdiff.errors import PrivdiffError

MAX_JSON_BYTES = 1 << 20  # configs, reports and ledgers are kilobytes; a megabyte is generous
MAX_JSON_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path: str | os.PathLike) -> str | None:
    """None for a regular file (symlinks followed), else what ``path`` is ("missing" if nothing is there)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it names a regular file; else one line naming ``what`` and the kind found."""
    kind = file_kind(path)
    if kind == "missing":
        raise PrivdiffError(f"{what} {path} does not exist")
    if kind is not None:
        raise PrivdiffError(f"{what} {path} is {kind}, not a file" if kind.startswith("a ") else
                            f"{what} {path} is {kind}")
    return Path(path)


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refused (before reading) when larger than ``limit``."""
    path = regular_file(path, what)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise PrivdiffError(f"{what} {path} has {size} bytes, more than the {limit} it may have")
            data = handle.read(limit + 1)
    except OSError as error:
        raise PrivdiffError(f"{what} {path} cannot be read ({error.strerror or error})") from None
    if len(data) > limit:  # grew while read
        raise PrivdiffError(f"{what} {path} has more than the {limit} bytes it may have")
    return data


def json_depth(text: bytes) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest (brackets inside strings do not count)."""
    codes = np.frombuffer(_STRINGS.sub(b'""', bytes(text)), dtype=np.uint8)
    steps = np.isin(codes, list(b"[{")).astype(np.int64) - np.isin(codes, list(b"]}"))
    return int(np.cumsum(steps).max(initial=0))


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str | bytes, what: str, limit: int = MAX_JSON_BYTES, depth: int = MAX_JSON_DEPTH) -> object:
    """JSON ``text`` of at most ``limit`` bytes nested at most ``depth`` deep, without NaN or ±Infinity."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > limit:
        raise PrivdiffError(f"{what} holds {len(data)} bytes of JSON, more than the {limit} it may have")
    if json_depth(data) > depth:
        raise PrivdiffError(f"{what} is JSON nested more than {depth} deep")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PrivdiffError(f"{what} is not valid JSON ({str(error).splitlines()[0][:120]})") from None


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES, depth: int = MAX_JSON_DEPTH) -> object:
    """The JSON in the regular file ``path`` (see ``read_bytes`` and ``parse_json``)."""
    return parse_json(read_bytes(path, what, limit), f"{what} {path}", limit, depth)


def config_int(value: object, name: str, low: int, high: int) -> int:
    """``value`` if it is an integer (not a bool) in [low, high]; else one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PrivdiffError(f"{name} must be a whole number in {low}..{high}, got {value!r:.60}")
    return value


def config_float(value: object, name: str, low: float, high: float) -> float:
    """``value`` as a float if it is a finite number (not a bool) in [low, high]; else one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivdiffError(f"{name} must be a number, got {value!r:.60}")
    number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise PrivdiffError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r:.60}")
    return number
