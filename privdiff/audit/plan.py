"""What every audit settles before its run: its checks, the run's parameters and the two random streams."""

from __future__ import annotations

import dataclasses

from privdiff.audit.canaries import check_count
from privdiff.errors import PrivdiffError
from privdiff.privacy.randomness import SecureRandom
from privdiff.release.dp_params import DPParams, check_params


def check_audit(canaries: int, confidence: float) -> None:
    """Refuse a canary count or confidence the bound cannot use, before any work."""
    check_count(canaries)
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise PrivdiffError(f"confidence {confidence!r} must be in (0, 1)")


def audit_params(params: DPParams, dataset_size: int, canaries: int) -> DPParams:
    """The audited run's parameters: add-remove, public size (P or N) + M // 2; δ must stay below 1/(N + M), the
    most records the run can hold, so that no draw of the canaries makes the release refuse it."""
    check_count(canaries)
    public = (dataset_size if params.public_size is None else params.public_size) + canaries // 2
    audited = dataclasses.replace(params, public_size=public)
    check_delta(params.delta, dataset_size, canaries)
    check_params(audited, dataset_size + canaries)
    return audited


def check_delta(delta: float, dataset_size: int, canaries: int) -> None:
    """δ below 1/(N + M): whichever canaries go in, the run's records stay few enough for δ."""
    if not delta < 1 / (dataset_size + canaries):
        raise PrivdiffError(f"delta {delta} must be below 1/(N + canaries) = {1 / (dataset_size + canaries):.3g} "
                            f"for N={dataset_size} records and {canaries} canaries")


def audit_streams(seed: int | None) -> tuple[SecureRandom, int | None]:
    """The canaries' CSPRNG and the audited run's seed. Unseeded, the run keys its own CSPRNG (None). With ``seed``
    the run's seed is drawn from the canaries' stream: reproducible, yet its sampling and noise never replay the
    canaries' draws (a run keyed with ``seed`` itself would start with the very bytes that drew them)."""
    rng = SecureRandom(seed)
    return rng, (int.from_bytes(rng.random_bytes(8), "little") if rng.reproducible else None)
