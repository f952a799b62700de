"""The one-run audit's statistics (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023): from an attacker's guesses about m canaries, each included independently with probability 1/2,
the largest ε that an (ε, δ)-DP release could not have produced at a chosen confidence.

If the release is (ε, δ)-DP in the canaries' inclusion, the number V of correct guesses among r guesses
satisfies, for every v (the paper's Theorem 3.1 with its δ term, as in its Algorithm 2's p-value):

    P[V ≥ v] ≤ P[Bin(r, p) ≥ v] + 2 m δ · max_{1≤i≤v} P[v − i ≤ Bin(r, p) < v] / i,   p = e^ε / (1 + e^ε).

The right side grows with ε; the audit's lower bound is the largest ε whose bound is still at most
1 − confidence: every smaller ε is rejected at that confidence. Everything here works from counts or scores
only, so it audits any mechanism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from privdiff.errors import PrivdiffError

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""Guess counts tried by ``best_lower_bound``, as fractions of m, fixed before any score is seen."""


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Bound on P[at least ``v`` of ``r`` guesses correct] about ``m`` canaries for an (ε, δ)-DP release."""
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)) or not 0 <= delta <= 1:
        raise PrivdiffError(f"epsilon {epsilon} must be finite and >= 0 and delta {delta} in [0, 1]")
    if v == 0:
        return 1.0
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v - i] for i = 1 .. v
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct of ``r`` guesses about ``m`` canaries reject at ``confidence``
    (0 when even ε = 0 is not rejected)."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise PrivdiffError(f"confidence {confidence} must be in (0, 1)")
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    high = 1.0
    while p_value(m, r, v, high, delta) <= level:
        high *= 2
        if high > 1e3:  # only v = r with a negligible δ term gets here: the bound is that large
            return math.inf
    return float(optimize.brentq(lambda e: p_value(m, r, v, e, delta) - level, 0.0, high, xtol=1e-9))


def guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the ``k_plus`` highest scores, -1 ("out") for the ``k_minus`` lowest, 0 (abstain) elsewhere.
    Ties are broken by position, which carries no information about inclusion."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise PrivdiffError("every canary score must be finite")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise PrivdiffError(f"k_plus {k_plus} and k_minus {k_minus} must be >= 0 with a sum of at most "
                            f"{len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(len(scores), dtype=np.int8)
    out[order[:k_plus]] = 1
    out[order[len(scores) - k_minus:]] = -1
    return out


@dataclass(frozen=True)
class AuditBound:
    """An audit's outcome: the guesses made and correct, and the ε they rule out."""

    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    candidates: int
    """How many (k₊, k₋) pairs were tried; the bound of each was taken at confidence 1 − (1 − c)/candidates."""


def lower_bound_at(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int, delta: float,
                   confidence: float = 0.95, candidates: int = 1) -> AuditBound:
    """The bound of one fixed guess (k₊ highest "in", k₋ lowest "out") at ``confidence`` corrected for
    ``candidates`` pairs tried (Bonferroni)."""
    included = np.asarray(included, dtype=bool)
    if len(included) != len(scores):
        raise PrivdiffError(f"{len(scores)} scores for {len(included)} canaries")
    guess = guesses(scores, k_plus, k_minus)
    r = int(np.count_nonzero(guess))
    v = int(np.count_nonzero((guess == 1) & included) + np.count_nonzero((guess == -1) & ~included))
    corrected = 1 - (1 - confidence) / candidates
    bound = epsilon_lower_bound(len(scores), r, v, delta, corrected)
    return AuditBound(canaries=len(scores), guesses=r, correct=v, k_plus=k_plus, k_minus=k_minus,
                      confidence=confidence, delta=delta, epsilon_lower_bound=bound, candidates=candidates)


def guess_counts(m: int) -> list[tuple[int, int]]:
    """The (k₊, k₋) pairs ``best_lower_bound`` tries for ``m`` canaries: k "in" guesses alone and k of each,
    for k = ``GUESS_FRACTIONS`` of m. Fixed by m alone, never by the scores."""
    pairs: list[tuple[int, int]] = []
    for fraction in GUESS_FRACTIONS:
        k = max(1, round(fraction * m))
        for pair in ((k, 0), (k, k)):
            if sum(pair) <= m and pair not in pairs:
                pairs.append(pair)
    return pairs


def best_lower_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95,
                     pairs: list[tuple[int, int]] | None = None) -> AuditBound:
    """The highest bound over the guess counts ``pairs`` (default ``guess_counts(m)``), each taken at the
    Bonferroni-corrected confidence, so the maximum holds at ``confidence``."""
    pairs = guess_counts(len(scores)) if pairs is None else pairs
    if not pairs:
        raise PrivdiffError("no guess counts to try")
    bounds = [lower_bound_at(scores, included, kp, km, delta, confidence, len(pairs)) for kp, km in pairs]
    return max(bounds, key=lambda b: (b.epsilon_lower_bound, -b.guesses))


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise PrivdiffError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
