"""One release from start to file: output plan, ledger reservation, the work, atomic write, commit.

Shared by every front (CLI, ComfyUI, A1111) and every method, so each release is checked, charged and
written the same way:

1. the output plan is checked before anything else (``privdiff.output_plan.plan_output``);
2. the method computes its report and calls ``check(report)`` before touching private data, which
   reserves the release in the ledger under its lock (refused over budget);
3. the artifact is written atomically, then the reservation is committed.

A clean failure or an interrupt before the write cancels the reservation (no file, no charge, the ledger
as it was); a killed process leaves the reservation counted until the user clears it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from privdiff.embeddings.dpagg import DPAggResult
from privdiff.errors import PrivdiffError
from privdiff.output_plan import OutputPlan, save_planned
from privdiff.privacy.ledger import BudgetLedger, Reservation, image_digests, request_key
from privdiff.privacy.report import PrivacyReport

BudgetCheck = Callable[[PrivacyReport], None]


@dataclass(frozen=True)
class LedgerRequest:
    """What a release asks of the data owner's ledger: the images it charges and how."""

    ledger: BudgetLedger
    digests: list[str]
    budget: tuple[float, float] | None = None
    change_budget: bool = False
    force: bool = False
    request: str | None = None


def open_ledger(
    path: str | Path,
    files: Sequence[Path],
    *,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    change_budget: bool = False,
    force: bool = False,
    accountant: str | None = None,
    request: dict[str, object] | None = None,
) -> LedgerRequest:
    """A ledger request charging the images ``files``; nothing is written until the release reserves.

    ``request`` (the parameters that make two runs the same request) lets a front find an earlier
    identical release with ``ledger.find(LedgerRequest.request)``.
    """
    if budget_epsilon is not None and budget_delta is None:
        raise PrivdiffError("a budget epsilon needs its delta")
    budget = None if budget_epsilon is None else (budget_epsilon, budget_delta)
    digests = image_digests(files)
    key = None if request is None else request_key(digests, request)
    return LedgerRequest(BudgetLedger(path, accountant=accountant), digests, budget,
                         change_budget=change_budget, force=force, request=key)


def release_embedding(
    produce: Callable[[BudgetCheck | None], DPAggResult],
    output: OutputPlan,
    ledger: LedgerRequest | None = None,
) -> tuple[Path, DPAggResult]:
    """Run ``produce(check)`` and write its embedding as planned; returns (path, result).

    ``produce`` is a method run (e.g. ``run_dpagg_ti``) that calls ``check(report)`` before any private
    computation; with a ledger, that call reserves the release.
    """
    reservation: Reservation | None = None

    def check(report: PrivacyReport) -> None:
        nonlocal reservation
        reservation = ledger.ledger.reserve(
            ledger.digests, report, budget=ledger.budget, change_budget=ledger.change_budget,
            force=ledger.force, request=ledger.request, output=str(output.path))

    written = False
    try:
        result = produce(check if ledger is not None else None)
        path = save_planned(result.embedding, output)
        written = True
    finally:
        if reservation is not None and not written:
            reservation.cancel()
    if reservation is not None:
        reservation.commit()
    return path, result
