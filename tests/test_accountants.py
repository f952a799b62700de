"""Accountants: reference values, calibration round trips, the single Gaussian release, bad input."""

import json
import math
import re
import warnings

import pytest
from scipy import optimize
from scipy.stats import norm

from privdiff.cli import main
from privdiff.errors import PrivdiffError
from privdiff.privacy import accountants
from privdiff.privacy.accountants import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    composed_epsilon,
    default_accountant,
    epsilon_for,
)


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Tight epsilon of one Gaussian release, sensitivity 1 (Balle & Wang 2018, Theorem 8)."""

    def delta_of(eps: float) -> float:
        return norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)

    return optimize.brentq(lambda eps: delta_of(eps) - delta, 0.0, 50.0, xtol=1e-12)


@pytest.mark.parametrize(("accountant", "expected"), [("pld", 1.828), ("prv", 1.838), ("rdp", 2.101)])
def test_reference_values(accountant, expected):
    name, eps = epsilon_for(1.0, 0.01, 1000, 1e-5, accountant=accountant)
    assert name == accountant
    assert round(eps, 3) == expected


def test_default_is_pld_when_dp_accounting_is_installed():
    assert default_accountant() == "pld"
    assert composed_epsilon([], 1e-5) == ("pld", 0.0)


@pytest.mark.parametrize("sigma", [0.8, 3.0])
def test_single_full_batch_release_matches_analytic_gaussian(sigma):
    exact = exact_gaussian_epsilon(sigma, 1e-5)
    for accountant in ACCOUNTANTS:
        _, eps = epsilon_for(sigma, 1.0, 1, 1e-5, accountant=accountant)
        assert eps >= exact, accountant  # an upper bound, always
        if accountant != "rdp":  # RDP's conversion is known to be loose
            assert eps <= exact * 1.01, accountant


def test_full_batch_steps_compose_like_one_gaussian():
    # T full-batch releases with noise sigma are one release with noise sigma / sqrt(T).
    _, eps = epsilon_for(4.0, 1.0, 4, 1e-5, accountant="pld")
    exact = exact_gaussian_epsilon(2.0, 1e-5)
    assert exact <= eps <= exact * 1.01


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibration_round_trip_is_sound_and_tight(accountant):
    target = 0.3
    name, sigma = calibrate_noise_multiplier(target, 1e-5, 0.05, 10, accountant=accountant)
    assert name == accountant
    _, eps = epsilon_for(sigma, 0.05, 10, 1e-5, accountant=accountant)
    assert 0.99 * target <= eps <= target


def test_full_batch_calibration_matches_analytic_gaussian():
    _, sigma = calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1)
    exact = optimize.brentq(lambda s: exact_gaussian_epsilon(s, 1e-5) - 1.0, 1.0, 10.0, xtol=1e-10)
    assert exact <= sigma <= exact * 1.01


def test_pld_calibration_recovers_from_a_low_starting_sigma(monkeypatch):
    _, sigma = calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1, accountant="pld")
    monkeypatch.setattr(accountants, "_calibrate_opacus", lambda *args, **kwargs: 0.8 * sigma)
    _, again = calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1, accountant="pld")
    assert again == pytest.approx(sigma, rel=2e-3)
    assert epsilon_for(again, 1.0, 1, 1e-5, accountant="pld")[1] <= 1.0


def test_composition_of_events():
    _, one = epsilon_for(1.0, 0.01, 500, 1e-5, accountant="rdp")
    _, split = composed_epsilon([(1.0, 0.01, 500), (1.0, 0.01, 500)], 1e-5, accountant="rdp")
    _, whole = epsilon_for(1.0, 0.01, 1000, 1e-5, accountant="rdp")
    assert split == pytest.approx(whole, rel=1e-9)
    _, mixed = composed_epsilon([(1.0, 0.01, 500), (2.0, 1.0, 1)], 1e-5, accountant="rdp")
    assert mixed > one


def test_rdp_orders_are_widened_instead_of_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, small = epsilon_for(50.0, 0.01, 10, 1e-5, accountant="rdp")  # optimal order is far above 63
        _, sigma = calibrate_noise_multiplier(0.05, 1e-5, 0.01, 10, accountant="rdp")
    assert 0 < small < 0.01
    assert sigma > 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0, got 0.0"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite number, got nan"),
        ({"sample_rate": 0.0}, "sample_rate must be in (0, 1], got 0.0"),
        ({"sample_rate": 1.5}, "sample_rate must be in (0, 1], got 1.5"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, "steps must be an integer >= 1, got 2.5"),
        ({"delta": 0.0}, "delta must be in (0, 1), got 0.0"),
        ({"delta": 1.0}, "delta must be in (0, 1), got 1.0"),
        ({"accountant": "moments"}, "accountant='moments' is not one of pld, prv, rdp"),
    ],
)
def test_epsilon_for_bad_values(kwargs, fragment):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5} | kwargs
    with pytest.raises(PrivdiffError) as info:
        epsilon_for(**args)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epsilon": 0.0}, "epsilon must be > 0, got 0.0"),
        ({"epsilon": -1.0}, "epsilon must be > 0, got -1.0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number, got inf"),
        ({"delta": 2.0}, "delta must be in (0, 1), got 2.0"),
        ({"sample_rate": -0.1}, "sample_rate must be in (0, 1], got -0.1"),
        ({"steps": -3}, "steps must be an integer >= 1, got -3"),
    ],
)
def test_calibrate_bad_values(kwargs, fragment):
    args = {"epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 10} | kwargs
    with pytest.raises(PrivdiffError, match="^" + re.escape(fragment)):
        calibrate_noise_multiplier(**args)


def test_composed_epsilon_names_the_bad_event():
    with pytest.raises(PrivdiffError, match=r"sample_rate \(event 1\) must be in \(0, 1\], got 2"):
        composed_epsilon([(1.0, 0.1, 10), (1.0, 2, 10)], 1e-5)


def test_cli_epsilon_and_sigma(capsys):
    assert main(["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "1000",
                 "--delta", "1e-5", "--accountant", "rdp"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accountant"] == "rdp" and round(out["epsilon"], 3) == 2.101
    assert main(["privacy", "sigma", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "1", "--steps", "1",
                 "--accountant", "rdp"]) == 0
    assert json.loads(capsys.readouterr().out)["noise_multiplier"] > 1
    assert main(["privacy", "epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.01", "--steps", "10",
                 "--delta", "1e-5"]) == 2
    assert capsys.readouterr().err.strip() == "privdiff: error: noise_multiplier must be > 0, got -1.0"


def test_pld_handles_very_large_epsilon():
    # Small sigma: a default-spaced loss grid would not fit in memory; the widened grid stays an upper bound.
    name, sigma = calibrate_noise_multiplier(1000.0, 1e-3, 1.0, 1, accountant="pld")
    assert name == "pld" and 0 < sigma < 0.1
    _, eps = epsilon_for(sigma, 1.0, 1, 1e-3, accountant="pld")
    _, rdp = epsilon_for(sigma, 1.0, 1, 1e-3, accountant="rdp")
    assert eps <= 1000.0 and eps <= rdp
