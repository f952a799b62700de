"""The one-run audit's bound (privdiff.audit.bound) against values computed here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privdiff.audit import best_lower_bound, epsilon_lower_bound, guesses, lower_bound_at, p_value
from privdiff.audit.bound import guess_counts
from privdiff.errors import PrivdiffError


def _p_value_by_hand(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke, Nasr & Jagielski's p-value with exact binomial terms written out (math.comb)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:])
    worst = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1)) if v else 0.0
    return min(1.0, tail + 2 * m * delta * worst) if v else 1.0


def _bound_by_scan(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest ε on a 1e-4 grid whose p-value is at most 1 - confidence."""
    eps = np.arange(0, 12, 1e-4)
    ok = [e for e in eps[::100] if _p_value_by_hand(m, r, v, e, delta) <= 1 - confidence]
    if not ok:
        return 0.0
    start = ok[-1]
    fine = [e for e in np.arange(start, start + 0.0101, 1e-4) if _p_value_by_hand(m, r, v, e, delta) <= 1 - confidence]
    return float(fine[-1])


@pytest.mark.parametrize(("m", "r", "v", "delta", "confidence"), [
    (1000, 100, 100, 1e-5, 0.95), (1000, 100, 90, 1e-5, 0.95), (1000, 200, 150, 0.0, 0.95),
    (256, 50, 45, 1e-5, 0.99), (64, 20, 19, 1e-3, 0.9), (1000, 1000, 700, 1e-6, 0.95),
])
def test_bound_matches_an_independent_computation(m, r, v, delta, confidence):
    for eps in (0.0, 0.5, 1.0, 3.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(_p_value_by_hand(m, r, v, eps, delta), rel=1e-9, abs=1e-15)
    assert epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(_bound_by_scan(m, r, v, delta, confidence),
                                                                            abs=2e-4)


def test_bound_is_zero_without_evidence_and_delta_weakens_it():
    assert epsilon_lower_bound(100, 10, 5, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 100, 1e-4) < epsilon_lower_bound(1000, 100, 100, 1e-6)  # the δ term


def test_guesses_take_the_extremes_and_abstain_elsewhere():
    scores = np.array([0.1, 5.0, -3.0, 2.0, 0.0])
    assert guesses(scores, 2, 1).tolist() == [0, 1, -1, 1, 0]
    assert guesses(scores, 0, 0).tolist() == [0] * 5
    with pytest.raises(PrivdiffError, match="at most 5"):
        guesses(scores, 3, 3)
    with pytest.raises(PrivdiffError, match="finite"):
        guesses(np.array([0.0, np.nan]), 1, 0)


def test_counts_of_one_guess():
    included = np.array([True, True, False, False, True, False])
    scores = np.array([3.0, 2.0, 1.0, -1.0, -2.0, -3.0])
    result = lower_bound_at(scores, included, 2, 2, 1e-5)
    assert (result.guesses, result.correct) == (4, 3)  # in: 3.0, 2.0 (right); out: -2.0 (wrong), -3.0 (right)


def test_bonferroni_over_fixed_guess_counts():
    pairs = guess_counts(1000)
    assert pairs[:2] == [(10, 0), (10, 10)] and (500, 500) in pairs and len(pairs) == 12
    assert guess_counts(10)[:2] == [(1, 0), (1, 1)]
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(0, 0.2, 1000)  # a leaky release
    best = best_lower_bound(scores, included, 1e-5)
    alone = lower_bound_at(scores, included, best.k_plus, best.k_minus, 1e-5)
    assert best.candidates == 12 and 0 < best.epsilon_lower_bound < alone.epsilon_lower_bound


def _randomized_response(eps: float, included: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ε-DP per canary: report its bit with probability e^ε / (1 + e^ε), plus a tie-breaking jitter."""
    truthful = rng.random(len(included)) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(truthful, included, ~included) + rng.random(len(included)) * 1e-3


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_an_exactly_eps_dp_release_is_never_audited_above_eps(eps):
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        bounds.append(best_lower_bound(_randomized_response(eps, included, rng), included, 0.0).epsilon_lower_bound)
    assert max(bounds) <= eps
    assert np.mean(bounds) > 0.5 * eps  # and the audit is close to tight on it
