"""Where and how a release is written, checked before any work, and the write itself.

:func:`plan_output` refuses everything about the output that can be known before private data is read
or a model is loaded: the format and extension, the token, the target and its report sidecar, and the
folder (exists, writable, not full). :func:`privdiff.embeddings.files.save_planned` writes an embedding as
planned so that a failure at any point leaves every existing file as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import os_reason
from privdiff.privacy.report import sidecar_path

FORMATS = ("safetensors", "a1111-pt", "diffusers")
TOKEN_FORMATS = ("a1111-pt", "diffusers")
"""The formats that store a token (A1111's ``name``, diffusers' key); others are loaded by file name."""
SUFFIXES = {"safetensors": (".safetensors",), "diffusers": (".safetensors",), "a1111-pt": (".pt", ".bin")}
MIN_FREE_BYTES = 1 << 20


@dataclass(frozen=True)
class OutputPlan:
    """A checked output: ``token`` is the token stored in the file (None for formats that store none)."""

    path: Path
    fmt: str
    token: str | None
    force: bool

    @property
    def sidecar(self) -> Path | None:
        """The ``<file>.privacy.json`` report sidecar written next to an A1111 ``.pt``, else None."""
        return sidecar_path(self.path) if self.fmt == "a1111-pt" else None


def plan_output(
    path: str | os.PathLike, fmt: str | None = None, token: str | None = None, force: bool = False
) -> OutputPlan:
    """Check everything about an output before any work; raises a one-line PrivdiffError naming the problem.

    ``fmt`` defaults from the extension (``.pt``/``.bin``: a1111-pt, ``.safetensors``: safetensors).
    ``token`` (default: the file stem) is refused for formats that cannot store it, unless it is the stem.
    An existing target or sidecar needs ``force``; a directory in their place is refused even with it.
    """
    target = Path(path)
    if target.is_dir():
        raise PrivdiffError(f"output {target} is a directory; name a file")
    fmt = _format(target, fmt)
    plan = OutputPlan(target, fmt, _token(target, fmt, token), bool(force))
    _check_target(plan.path, plan.force)
    if plan.sidecar is not None:
        _check_target(plan.sidecar, plan.force, sidecar_of=plan.path)
    _check_folder(target.parent, (plan.sidecar or plan.path).name)
    return plan


def _format(target: Path, fmt: str | None) -> str:
    suffix = target.suffix.lower()
    if fmt is None:
        for name in ("safetensors", "a1111-pt"):
            if suffix in SUFFIXES[name]:
                return name
        raise PrivdiffError(f"{target}: unsupported extension {target.suffix!r}; embedding files end in "
                            ".safetensors (safetensors, diffusers) or .pt (a1111-pt)")
    if fmt not in FORMATS:
        raise PrivdiffError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if suffix not in SUFFIXES[fmt]:
        raise PrivdiffError(f"{target}: a {fmt} embedding file must end in {' or '.join(SUFFIXES[fmt])}")
    return fmt


def _token(target: Path, fmt: str, token: str | None) -> str | None:
    if fmt not in TOKEN_FORMATS:
        if token is not None and token != target.stem:
            raise PrivdiffError(
                f"token {token!r} cannot be stored in a {fmt} file (ComfyUI, A1111 and diffusers use its file "
                f"name {target.stem!r}); only {' and '.join(TOKEN_FORMATS)} files store a token (--format)"
            )
        return None
    name = target.stem if token is None else token
    if not isinstance(name, str) or not name or not name.isprintable() or any(c.isspace() for c in name):
        source = f"the file name of {target}" if token is None else "--token"
        raise PrivdiffError(f"token {name!r} (from {source}) must be one word without spaces or control "
                            "characters: prompts refer to it")
    return name


def _check_target(path: Path, force: bool, sidecar_of: Path | None = None) -> None:
    """Refuse a directory or special file at ``path``, and an existing file unless ``force``."""
    what = f"output {path}" if sidecar_of is None else f"{path} (the report sidecar of {sidecar_of.name})"
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # a missing folder is named by _check_folder
    except (OSError, ValueError) as exc:
        raise PrivdiffError(f"cannot check {what}: {os_reason(exc)}") from None
    if stat.S_ISDIR(mode) or not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        fix = "name a file" if sidecar_of is None else "move it or choose another output name"
        raise PrivdiffError(f"{what} is {kind}; {fix}")
    if not force:
        of = "" if sidecar_of is None else f" (the report sidecar of {sidecar_of.name})"
        raise PrivdiffError(f"{path} already exists{of}; pass --force (force=True) to overwrite it")


def _check_folder(folder: Path, longest: str) -> None:
    """The folder exists, is a folder, takes a new file and has at least MIN_FREE_BYTES free.

    The probe is a real file, named like the longest temporary the write will create for the file name
    ``longest``: it catches read-only filesystems, missing permissions, and names too long (or refused) there.
    """
    if not folder.is_dir():
        missing = not folder.exists()
        raise PrivdiffError(f"output folder {folder} {'does not exist' if missing else 'is not a folder'}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{longest}.", suffix=".probe.tmp", dir=folder)
        try:
            os.close(fd)
        finally:
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise PrivdiffError(f"{folder / longest}: the name is too long for that folder's filesystem, with room "
                                "for the temporary files of an atomic write (20 more characters)") from None
        if exc.errno in (errno.EINVAL, errno.EILSEQ):
            raise PrivdiffError(f"{folder / longest}: that folder's filesystem refuses the name "
                                f"({os_reason(exc)})") from None
        raise PrivdiffError(f"output folder {folder} is not writable: {os_reason(exc)}") from None
    if free < MIN_FREE_BYTES:
        raise PrivdiffError(f"output folder {folder} has only {free} bytes free; at least "
                            f"{MIN_FREE_BYTES} are needed")
