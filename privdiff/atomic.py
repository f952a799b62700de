"""Atomic file writes: a temporary file in the target folder, renamed into place on success."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from privdiff.errors import PrivdiffError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; nothing is left behind on failure.

    An existing ``path`` is refused unless ``force`` is true.
    """
    target = Path(path)
    if target.exists() and not force:
        raise PrivdiffError(f"{target} already exists; pass --force (force=True) to overwrite it")
    if not target.parent.is_dir():
        raise PrivdiffError(f"output folder {target.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
