"""Safetensors files from outside, read defensively (``privdiff.io.untrusted`` for tensor files).

:func:`open_tensor_file` checks a file's kind (refused by kind, never opened blocking), then its header: a size
it may have, JSON of bounded size and depth, string metadata, float tensors whose declared shapes fit the bytes
the file holds. Only that header is read; the caller checks names, shapes and the memory they imply, and then
:meth:`TensorFile.tensors` reads the tensors from the same open file. Each refusal is one ``PrivdiffError`` line
that names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from privdiff.errors import PrivdiffError
from privdiff.io.images import half_memory
from privdiff.io.untrusted import file_kind, parse_json, regular_file

MAX_HEADER_BYTES = 1 << 22  # a prior of 64 layers declares about 800 tensors: some 100 KB of header
FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the header declares it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class TensorFile:
    """An open safetensors file whose header was checked; ``what`` names it in errors."""

    what: str
    metadata: dict[str, str]
    specs: dict[str, TensorSpec]
    size: int
    _fd: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, read from the open file (the header is read again and must not have changed); refused
        first when the file and its tensors would need over half the machine's memory."""
        half = half_memory()
        if half is not None and 2 * self.size > half:
            raise PrivdiffError(f"{self.what} holds {self.size / 2**20:,.0f} MiB: reading it needs over half of this "
                                f"machine's {2 * half / 2**20:,.0f} MiB of memory")
        data = _read_at(self._fd, 0, self.size, self.what)
        if _parse(data, self.size, self.what)[:2] != (self.metadata, self.specs):
            raise PrivdiffError(f"{self.what} changed while it was read")
        try:
            return load_tensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PrivdiffError(f"{self.what} is damaged: {' '.join(str(exc).split())[:200]}") from None


@contextlib.contextmanager
def open_tensor_file(path: str | os.PathLike, what: str) -> Iterator[TensorFile]:
    """The checked header of the safetensors file ``path`` (``what``: e.g. "prior"), the file held open."""
    with _open_regular(path, what) as (fd, name):
        size = os.fstat(fd).st_size
        head = _read_at(fd, 0, min(size, 8 + MAX_HEADER_BYTES), name)
        metadata, specs = _parse(head, size, name)
        yield TensorFile(name, metadata, specs, size, fd)


def file_digest(path: str | os.PathLike, what: str) -> str:
    """The SHA-256 (hex) of the regular file ``path``, read in chunks; other kinds are refused before any read."""
    digest = hashlib.sha256()
    with _open_regular(path, what) as (fd, name):
        size = os.fstat(fd).st_size
        for offset in range(0, size, 1 << 24):
            digest.update(_read_at(fd, offset, min(1 << 24, size - offset), name))
    return digest.hexdigest()


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike, what: str) -> Iterator[tuple[int, str]]:
    """(descriptor, "what path") of the regular file ``path``, opened without blocking (a FIFO swapped in after
    the check is refused, not waited on)."""
    path = regular_file(path, what)
    name = f"{what} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise PrivdiffError(f"{name} cannot be read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PrivdiffError(f"{name} is {file_kind(path) or 'not a regular file'}, not a file")
        yield fd, name
    finally:
        os.close(fd)


def _read_at(fd: int, offset: int, count: int, name: str) -> bytes:
    """``count`` bytes at ``offset`` (os.lseek and os.read: os.pread does not exist on Windows)."""
    chunks, left = [], count
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise PrivdiffError(f"{name} cannot be read ({exc.strerror or exc})") from None
    if left:
        raise PrivdiffError(f"{name} changed while it was read")
    return b"".join(chunks)


def _parse(head: bytes, size: int, name: str) -> tuple[dict[str, str], dict[str, TensorSpec]]:
    """(metadata, specs) from the first bytes ``head`` of a file of ``size`` bytes."""
    if len(head) < 8:
        raise PrivdiffError(f"{name} is not a safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise PrivdiffError(f"{name} is not a safetensors file (its header claims {length} bytes)")
    header = parse_json(head[8:8 + length], f"{name}'s header", MAX_HEADER_BYTES, depth=3)
    if not isinstance(header, dict):
        raise PrivdiffError(f"{name} is not a safetensors file (its header is no JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PrivdiffError(f"{name}'s metadata must map names to strings")
    data, specs, ends = size - 8 - length, {}, []
    for key, entry in header.items():
        specs[key] = _spec(entry, data, f"{name}: tensor {key[:80]!r}")
        ends.append(entry["data_offsets"][1])
    if max(ends, default=0) != data:
        raise PrivdiffError(f"{name} is damaged: its tensors cover {max(ends, default=0)} of its {data} data bytes")
    return metadata, specs


def _spec(entry: object, data: int, name: str) -> TensorSpec:
    if not isinstance(entry, dict) or entry.get("dtype") not in FLOAT_BYTES:
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        raise PrivdiffError(f"{name} has dtype {dtype!r:.40}, not one of {', '.join(FLOAT_BYTES)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_count(n) for n in shape):
        raise PrivdiffError(f"{name} has shape {shape!r:.60}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(n) for n in offsets)
            and offsets[0] <= offsets[1] <= data
            and offsets[1] - offsets[0] == math.prod(shape) * FLOAT_BYTES[entry["dtype"]]):
        raise PrivdiffError(f"{name} of shape {shape} does not fit its data offsets {offsets!r:.60} in the file")
    return TensorSpec(entry["dtype"], tuple(shape))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53

