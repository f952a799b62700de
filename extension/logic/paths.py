"""Files the tab names by a relative name: embedding files listed, and a choice confined to its folders."""

from __future__ import annotations

from pathlib import Path

from privdiff.embeddings.dpagg import EMBEDDING_SUFFIXES
from privdiff.errors import PrivdiffError


def embedding_files(folder: Path) -> list[str]:
    """Embedding files under ``folder`` (A1111 also reads subfolders), as paths relative to it."""
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.suffix in EMBEDDING_SUFFIXES)


def relative_name(folders: list[Path], choice: str) -> Path:
    """``choice`` as a relative name, refused in one line when it is empty, absolute, ``~`` or climbs with ``..``."""
    text = (choice or "").strip()
    if not text:
        raise PrivdiffError("pick an embedding file")
    name = Path(text)
    if name.is_absolute() or name.drive or ".." in name.parts or text.startswith("~"):
        raise PrivdiffError(f"file {text!r} must be a name inside {', '.join(str(f) for f in folders)}")
    return name


def confined_path(folders: list[Path], choice: str) -> Path:
    """The file named ``choice`` (a relative name) in the first of ``folders`` that has it, after links are
    resolved; an absolute name, ``..`` or a link out of its folder is one line (the web UI may be on a network)."""
    name, text = relative_name(folders, choice), choice.strip()
    for folder in folders:
        root = folder.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise PrivdiffError(f"file {text!r} leads out of {folder}")
        if path.exists():
            return path
    raise PrivdiffError(f"file {text!r} is in none of {', '.join(str(f) for f in folders)}")
