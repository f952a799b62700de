"""Atomic file writes: temporary files in the target folder, renamed into place on success.

:func:`replace_files` does this for a set of files (an embedding and its report sidecar): all of them
are written before any is renamed, and a failure while renaming puts back the files already replaced.
Released artifacts get the usual mode (0o666 less the umask); files only the data owner may read (the
ledger, private checkpoints) are written with ``mode=PRIVATE`` and live in :func:`private_folder` folders.
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
PRIVATE = 0o600
"""The mode of a file only its owner may read or write (the ledger, private checkpoints)."""
PRIVATE_FOLDER = 0o700
"""The mode of a folder only its owner may list or enter (private checkpoints)."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = False, *,
                 mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``; nothing is left behind on failure.

    An existing ``path`` is refused unless ``force`` is true. ``mode`` sets the file's permissions (e.g.
    :data:`PRIVATE`: the temporary file is 0600 from its creation, so private bytes are never readable by
    others); None gives a released artifact the usual 0o666 less the umask.
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
        tmp.chmod(_released_mode() if mode is None else mode)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, force: bool = False, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, with ``mode`` as for :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force, mode=mode)


def private_folder(path: str | os.PathLike, tighten: bool = False) -> Path:
    """The folder ``path``, created (with missing parents) as :data:`PRIVATE_FOLDER` when it does not exist.

    An existing folder keeps its mode (it may be the user's own) unless ``tighten``, for a folder privdiff
    names itself; an OSError becomes a one-line PrivdiffError naming the folder.
    """
    folder = Path(path)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=PRIVATE_FOLDER)
            tighten = True  # mkdir's mode is narrowed by the umask: set it exactly
        except FileExistsError:
            if not folder.is_dir():
                raise PrivdiffError(f"{folder} is a file, not a folder") from None
        if tighten:
            folder.chmod(PRIVATE_FOLDER)
    except OSError as exc:
        raise PrivdiffError(f"cannot create private folder {folder}: {os_reason(exc)}") from exc
    return folder


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
                temps[current].chmod(_released_mode())  # mkstemp creates 0600
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


def _released_mode() -> int:
    """0o666 less the umask: the mode an ordinary file write gives a released artifact."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
