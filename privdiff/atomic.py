"""Atomic file writes: temporary files in the target folder, renamed into place on success.

:func:`replace_files` does this for a set of files (an embedding and its report sidecar): all of them
are written before any is renamed, and a failure while renaming puts back the files already replaced.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from privdiff.errors import PrivdiffError

Writer = Callable[[Path], None]
"""Writes a file's new content to the temporary path it is given."""


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


def os_reason(exc: BaseException) -> str:
    """The system's reason for an OSError (e.g. "No space left on device"), else the exception's text."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(reason).split())


def replace_files(files: Mapping[Path, Writer | None]) -> None:
    """Give every path in ``files`` its new content (``None``: remove the file), all or nothing.

    Every content is first written to a temporary file next to its target. Then each target is replaced
    by a rename; with several targets, an existing one is first kept as a hidden backup (a hard link), so
    that a failure puts back every file already replaced. Any failure, interrupts included, removes the
    temporaries and leaves every existing file as it was; an OSError becomes a one-line PrivdiffError
    naming the target and the system's reason.
    """
    temps: dict[Path, Path] = {}
    backups: dict[Path, Path] = {}
    created: list[Path] = []
    current: Path | None = None
    try:
        for current, write in files.items():
            if write is not None:
                fd, name = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=current.parent)
                os.close(fd)
                temps[current] = Path(name)
                write(temps[current])
                temps[current].chmod(0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        for current in files:
            existed = os.path.lexists(current)
            if existed and len(files) > 1:
                backups[current] = _backup(current)
            if current in temps:
                os.replace(temps[current], current)
                del temps[current]
                if not existed:
                    created.append(current)
            elif existed:
                os.unlink(current)
    except BaseException as exc:
        _roll_back(created, backups, list(temps.values()))
        if isinstance(exc, OSError):
            raise PrivdiffError(f"cannot write {current}: {os_reason(exc)}") from exc
        raise
    for backup in backups.values():
        with contextlib.suppress(OSError):
            os.unlink(backup)


def _roll_back(created: list[Path], backups: dict[Path, Path], temps: list[Path]) -> None:
    """Undo a partial :func:`replace_files`: remove new files and temporaries, put the backups back."""
    for path in [*created, *temps]:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for target, backup in backups.items():
        with contextlib.suppress(OSError):  # a backup that cannot be put back stays, hidden, next to its target
            if not (os.path.lexists(target) and os.path.samestat(os.lstat(target), os.lstat(backup))):
                os.replace(backup, target)
            os.unlink(backup)  # still there when the target was never replaced (both names, one file)


def _backup(path: Path) -> Path:
    """A hidden second name for the file at ``path`` (a hard link; moved aside where links are refused)."""
    backup = path.with_name(f".{path.name}.{secrets.token_hex(6)}.bak")
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        os.replace(path, backup)
    return backup


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
