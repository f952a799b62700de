"""One release from start to file: output and budget checks, the work, atomic write, ledger record.

Shared by every front (CLI, ComfyUI, A1111) and every method, so each release is checked and
recorded the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privdiff.embeddings.dpagg import DPAggResult
from privdiff.embeddings.files import save_embedding
from privdiff.errors import PrivdiffError
from privdiff.privacy.ledger import BudgetLedger, dataset_fingerprint
from privdiff.privacy.report import PrivacyReport

BudgetCheck = Callable[[PrivacyReport], None]


@dataclass(frozen=True)
class Output:
    """Where and how the released embedding is written."""

    path: Path
    fmt: str = "safetensors"
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class LedgerEntry:
    """The data owner's ledger and the dataset's local fingerprint (never written to the artifact)."""

    ledger: BudgetLedger
    fingerprint: str
    force: bool = False


def open_ledger(
    path: str | Path,
    files: list[Path],
    *,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    force: bool = False,
    accountant: str | None = None,
) -> LedgerEntry:
    """The ledger entry of the dataset made of ``files``, setting its budget when one is given."""
    ledger = BudgetLedger(path, accountant=accountant)
    fingerprint = dataset_fingerprint(files)
    if budget_epsilon is not None:
        if budget_delta is None:
            raise PrivdiffError("a budget epsilon needs its delta")
        ledger.set_budget(fingerprint, budget_epsilon, budget_delta)
    return LedgerEntry(ledger, fingerprint, force=force)


def release_embedding(
    produce: Callable[[BudgetCheck | None], DPAggResult],
    output: Output,
    ledger: LedgerEntry | None = None,
) -> tuple[Path, DPAggResult]:
    """Run ``produce(check)`` and write its embedding; returns (path, result).

    ``produce`` is a method run (e.g. ``run_dpagg_ti``) that calls ``check(report)`` before any
    training. The output path is checked first, and the ledger records the release only once the
    file is written, so an interrupted run leaves neither a file nor a ledger entry.
    """
    if output.path.exists() and not output.force:
        raise PrivdiffError(f"{output.path} already exists; pass --force (force=True) to overwrite it")
    if not output.path.parent.is_dir():
        raise PrivdiffError(f"output folder {output.path.parent} does not exist")
    check = None
    if ledger is not None:
        def check(report: PrivacyReport) -> None:
            ledger.ledger.check(ledger.fingerprint, report, force=ledger.force)
    result = produce(check)
    path = save_embedding(
        result.embedding, output.path, fmt=output.fmt, token=output.token, force=output.force
    )
    if ledger is not None:
        ledger.ledger.record(ledger.fingerprint, result.report)
    return path, result
