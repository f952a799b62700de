"""An embedding's release: :func:`privdiff.release.artifact.release_artifact` writing the file (and report sidecar)
as its output plan says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privdiff.embeddings.dpagg import DPAggResult
from privdiff.embeddings.files import save_planned
from privdiff.privacy.ledger import Reservation
from privdiff.privacy.report import PrivacyReport
from privdiff.release.artifact import LedgerRequest, carries_release, release_artifact
from privdiff.release.output_plan import OutputPlan


def release_embedding(
    produce: Callable[[], DPAggResult],
    report: PrivacyReport,
    output: OutputPlan,
    ledger: LedgerRequest | None = None,
) -> tuple[Path, DPAggResult, Reservation | None]:
    """:func:`release_artifact` for an embedding written as ``output`` plans (file and report sidecar)."""
    return release_artifact(produce, report, output.path, lambda result: save_planned(result.embedding, output),
                            carries_release, ledger, sidecar=output.sidecar)
