"""Privacy report and ledger: the report a released file carries, and a ledger's budget and spend."""

from __future__ import annotations

import json
from pathlib import Path

from privdiff.app.reports import read_report
from privdiff.errors import PrivdiffError
from privdiff.privacy.ledger import BudgetLedger

from .common import Host, one_line_errors
from .paths import confined_path


def report(host: Host, choice: str) -> str:
    """The privacy report a file in the embeddings, style-target or priors folder carries (text and JSON)."""
    out: list[str] = []
    with one_line_errors(out):
        folders = [host.embeddings_dir(), host.targets_dir(), host.priors_dir()]
        return read_report(confined_path(folders, choice))
    return out[0]


def ledger(host: Host, path: str) -> str:
    """A ledger's budget, releases and largest per-image spend (the settings' ledger when ``path`` is empty)."""
    out: list[str] = []
    with one_line_errors(out):
        book = BudgetLedger(Path(path.strip()).expanduser() if path.strip() else host.default_ledger())
        if not book.path.is_file():
            raise PrivdiffError(f"ledger {book.path} does not exist yet: nothing was released with it")
        return f"ledger {book.path}\n" + json.dumps(book.summary(), indent=2)
    return out[0]
