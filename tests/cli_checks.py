"""The bad-input contract of the `privdiff` command, shared by the tests that check it (loaded by path)."""

from __future__ import annotations

import stat
from pathlib import Path

from privdiff.cli import main as cli


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: mode, and for files size, mtime and content up to 1 MiB (a folder's mtime
    changes when the output checks probe it with a temporary file, so folders keep only their mode)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            out[str(path.relative_to(root))] = (st.st_mode,)
            continue
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20 else None
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return out


def refused(capsys, root: Path, args: list, *needles: str) -> str:
    """Run the CLI in-process; assert exit 2, exactly one non-empty ``privdiff: error:`` line holding
    ``needles``, nothing on stdout, no traceback, and no change under ``root``. Returns the line."""
    before = snapshot(root)
    capsys.readouterr()  # drop what fixtures printed
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith("privdiff: error: ") and len(lines[0]) > 17, (args, err)
    assert "Traceback" not in err and out == "", (args, err)
    for needle in needles:
        assert needle in lines[0], (args, lines[0])
    assert snapshot(root) == before, args
    return lines[0]
