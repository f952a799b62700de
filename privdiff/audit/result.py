"""What an audit prints: the claim, the bound, the counts behind it and the attack."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from privdiff.audit.bound import best_lower_bound
from privdiff.privacy.report import PrivacyReport

NOT_A_RELEASE = "none: an audit writes no file and charges no ledger; its run is not a release of the images"


@dataclass(frozen=True)
class AuditResult:
    """One audit: the release's claimed (ε, δ), the empirical lower bound and how it was reached."""

    kind: str
    attack: str
    claimed_epsilon: float
    delta: float
    relation: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_lower_bound: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    candidates: int
    release: str = NOT_A_RELEASE

    def to_json(self) -> str:
        """Indented JSON in field order (an infinite bound is written as the string "inf")."""
        data = dataclasses.asdict(self)
        if not np.isfinite(data["epsilon_lower_bound"]):
            data["epsilon_lower_bound"] = "inf"
        return json.dumps(data, indent=2, allow_nan=False)


def audit_result(kind: str, attack: str, report: PrivacyReport, scores: np.ndarray, included: np.ndarray,
                 confidence: float) -> AuditResult:
    """The bound of ``scores`` for the canaries ``included`` (best fixed guess counts, Bonferroni-corrected),
    against the claim of the run's ``report``."""
    bound = best_lower_bound(scores, included, report.delta, confidence)
    return AuditResult(
        kind=kind, attack=attack, claimed_epsilon=report.epsilon, delta=report.delta, relation=report.relation,
        noise_multiplier=report.noise_multiplier, sample_rate=report.sample_rate, steps=report.steps,
        epsilon_lower_bound=bound.epsilon_lower_bound, canaries=bound.canaries,
        included=int(np.count_nonzero(included)), guesses=bound.guesses, correct=bound.correct,
        k_plus=bound.k_plus, k_minus=bound.k_minus, confidence=confidence, candidates=bound.candidates,
    )
