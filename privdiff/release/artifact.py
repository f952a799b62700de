"""One release from start to file: output plan, ledger reservation, the work, atomic write, commit.

Shared by every front (CLI, ComfyUI, A1111) and every method, so each release is checked, charged and
written the same way:

1. the output plan is checked before anything else (``privdiff.release.output_plan.plan_output``);
2. the release's report is planned (σ calibrated, no model needed) and reserved in the ledger under its
   lock, refused over budget, before a model loads or any private pixel is decoded (each file was read
   once, earlier: the ledger charges the digests of the very bytes decoded);
3. the work runs, the artifact is written atomically, then the reservation is committed.

A clean failure or an interrupt before the write cancels the reservation (no file, no charge, the ledger
as it was); a killed process, or a failure after the file is in place, leaves the reservation counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from safetensors import safe_open

from privdiff.errors import PrivdiffError
from privdiff.io.embedding_formats import check_vectors, read_file
from privdiff.privacy.ledger import BudgetLedger, Reservation, request_key
from privdiff.privacy.report import PrivacyReport

T = TypeVar("T")


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
    digests: Sequence[str],
    *,
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    change_budget: bool = False,
    force: bool = False,
    accountant: str | None = None,
    request: dict[str, object] | None = None,
) -> LedgerRequest:
    """A ledger request charging the images whose SHA-256 ``digests`` are given; nothing is written until the
    release reserves. The digests must be those of the bytes the release reads: ``PrivateFiles.digests`` or
    ``PrivateDataset.digests`` (or ``image_digests`` for images the release does not decode).

    ``request`` (the parameters that make two runs the same request) lets a front find an earlier
    identical release with ``ledger.find(LedgerRequest.request)``.
    """
    if budget_epsilon is not None and budget_delta is None:
        raise PrivdiffError("a budget epsilon needs its delta")
    budget = None if budget_epsilon is None else (budget_epsilon, budget_delta)
    if not digests:
        raise PrivdiffError("cannot charge a release without image files")
    if len(set(digests)) != len(digests):
        raise PrivdiffError("two of the images charged are identical: remove one (a duplicated image counts twice "
                            "in every release)")
    digests = list(digests)
    if not all(isinstance(d, str) and len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests):
        raise TypeError("open_ledger takes the SHA-256 hex digests of the images read, not their paths")
    key = None if request is None else request_key(digests, request)
    return LedgerRequest(BudgetLedger(path, accountant=accountant), digests, budget,
                         change_budget=change_budget, force=force, request=key)


def release_artifact(
    produce: Callable[[], T],
    report: PrivacyReport,
    output: Path,
    write: Callable[[T], Path],
    carries: Callable[[Path, str], bool],
    ledger: LedgerRequest | None = None,
    sidecar: Path | None = None,
    resume: bool = False,
) -> tuple[Path, T, Reservation | None]:
    """Reserve ``report``'s release, run ``produce()`` (which releases under that report), ``write`` its result
    to ``output``, commit; returns (path, result, reservation). ``produce`` may load a model: it runs after the
    charge. ``carries(path, release_id)`` tells whether a file at ``output`` (or the work's own checkpoint)
    already holds this release (then a failure keeps the charge); ``sidecar`` is the output's report sidecar,
    if it has one. ``resume`` continues an interrupted release: its reservation is taken over, not charged again."""
    if ledger is not None:
        _check_apart(ledger.ledger.path, (output, sidecar))
    if ledger is None:
        reservation = None
    elif resume:
        reservation = ledger.ledger.resume(report.release_id)
    else:
        reservation = ledger.ledger.reserve(
            ledger.digests, report, budget=ledger.budget, change_budget=ledger.change_budget, force=ledger.force,
            request=ledger.request, output=str(output))
    written = False
    try:
        result = produce()
        if result.report.release_id != report.release_id:
            raise PrivdiffError("the method released under another report than the one charged; please report this bug")
        path = write(result)
        written = True
    finally:
        if reservation is not None and not written and not carries(output, report.release_id):
            reservation.cancel()
    if reservation is not None:
        try:
            reservation.commit()
        except (PrivdiffError, OSError) as exc:
            raise PrivdiffError(f"{path} was written, but its ledger reservation {report.release_id} could not be "
                                f"committed ({exc}); it stays counted: do not clear it") from exc
    return path, result, reservation


def released_report(path: Path) -> PrivacyReport | None:
    """The privacy report in the artifact at ``path`` (an embedding, style target or LoRA), or None where the file
    is unreadable or carries none."""
    try:
        if Path(path).suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
        else:
            parsed = read_file(Path(path))
            check_vectors(parsed.tensors, str(path))  # as load_embedding: a file with bad vectors is no release
            metadata = parsed.metadata
        return PrivacyReport.from_metadata(metadata)
    except Exception:  # any unreadable file is no release
        return None


def carries_release(path: Path, release_id: str) -> bool:
    """Whether the file at ``path`` (an embedding, style target or LoRA) is the release ``release_id``."""
    report = released_report(path)
    return report is not None and report.release_id == release_id


def _check_apart(ledger: Path, outputs: tuple[Path, Path | None]) -> None:
    """The ledger must not be the output nor its sidecar: a release would overwrite the ledger."""
    taken = {Path(p).expanduser().resolve() for p in outputs if p is not None}
    if ledger.resolve() in taken:
        raise PrivdiffError(f"the ledger {ledger} is also the output {outputs[0]} or its report sidecar; "
                            "keep the ledger elsewhere")
