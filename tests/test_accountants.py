"""Accountants: reference values, calibration round trips, the single Gaussian release, bad input, the served
ranges (refused at once outside, a few seconds at their corners) and the neighbouring relations."""

import json
import math
import re
import subprocess
import sys
import time
import warnings

import pytest
from scipy import optimize
from scipy.stats import norm

from privdiff.cli.main import main
from privdiff.errors import PrivdiffError
from privdiff.privacy import accountants
from privdiff.privacy.accountants import (
    ACCOUNTANTS,
    ADD_REMOVE,
    RELATIONS,
    REPLACE_ONE,
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


@pytest.mark.parametrize("start", [1e-3, 0.5, 3.0, 1e6])
@pytest.mark.parametrize("eps_of", [lambda s: 2 / s, lambda s: 8 / s**3, lambda s: 2 / s + 1e-3 * math.sin(50 * s)])
def test_solver_finds_the_smallest_sigma_from_any_start(eps_of, start):
    sigma, _ = accountants._solve(eps_of, 1.0, start)
    assert eps_of(sigma) <= 1.0
    assert eps_of(sigma / (1 + accountants._CALIBRATION_TOLERANCE)) > 1.0


def test_solver_stays_in_the_served_range():
    low, high = accountants.NOISE_MULTIPLIERS
    assert accountants._solve(lambda s: 1e-9 / s, 1.0, 1.0)[0] == low  # met everywhere: the smallest sigma
    with pytest.raises(PrivdiffError, match=r"^no noise multiplier up to 1e\+06 brings the rdp accountant's epsilon "
                                            r"down to 0.5 \(it gives 1"):
        accountants._solve(lambda s: 1 + 1 / s, 0.5, 1.0, name="rdp")  # never met: refused, not looped


def test_merged_events_are_one_event():
    assert composed_epsilon([(4.0, 0.1, 5)] * 2, 1e-5, "pld") == epsilon_for(4.0, 0.1, 10, 1e-5, "pld")


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
    err = capsys.readouterr().err.strip()  # refused by the parser or by the accountants, on one line
    assert err.startswith("privdiff: error: ") and "noise" in err and "-1" in err and "\n" not in err


def test_pld_handles_very_large_epsilon():
    # Small sigma: a default-spaced loss grid would not fit in memory; the widened grid stays an upper bound.
    name, sigma = calibrate_noise_multiplier(1000.0, 1e-3, 1.0, 1, accountant="pld")
    assert name == "pld" and 0 < sigma < 0.1
    _, eps = epsilon_for(sigma, 1.0, 1, 1e-3, accountant="pld")
    _, rdp = epsilon_for(sigma, 1.0, 1, 1e-3, accountant="rdp")
    assert eps <= 1000.0 and eps <= rdp


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: epsilon_for(1.0, 0.01, 10**9, 1e-5), "steps=1000000000 is over the 1000000 the accountants can serve"),
        (lambda: epsilon_for(1.0, 0.01, 2**31, 1e-5, "rdp"), "steps=2147483648 is over the 1000000"),
        (lambda: composed_epsilon([(1.0, 0.01, 600_000), (2.0, 0.1, 600_000)], 1e-5),
         "total steps=1200000 is over the 1000000 the accountants can serve"),
        (lambda: composed_epsilon([(1 + i / 1000, 0.01, 1) for i in range(33)], 1e-5, "rdp"),
         "distinct (noise_multiplier, sample_rate) events=33 is over the 32 the accountants can serve"),
        (lambda: epsilon_for(1.0, 5e-324, 10, 1e-5),
         "sample_rate=5e-324 is below the smallest sample rate the accountants can serve (1e-09)"),
        (lambda: epsilon_for(1e-4, 0.01, 10, 1e-5),
         "noise_multiplier=0.0001 is below the smallest noise multiplier the accountants can serve (0.001)"),
        (lambda: composed_epsilon([(1.0, 0.01, 10), (1e7, 0.01, 10)], 1e-5, "prv"),
         "noise_multiplier (event 1)=10000000.0 is over the 1e+06 the accountants can serve"),
        (lambda: epsilon_for(1.0, 0.01, 10, 1e-300, "pld"),
         "delta=1e-300 is below the smallest delta the accountants can serve (1e-08)"),
        (lambda: epsilon_for(1.0, 0.01, 10, 0.9), "delta=0.9 is over the 0.5 the accountants can serve"),
        (lambda: calibrate_noise_multiplier(1e-9, 1e-5, 0.01, 1000),
         "epsilon=1e-09 is below the smallest target the accountants can serve (0.01)"),
        (lambda: calibrate_noise_multiplier(1e6, 1e-5, 1.0, 1, "rdp"),
         "epsilon=1000000.0 is over the 10000 the accountants can serve"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10**9, "pld"), "steps=1000000000 is over the 1000000"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-9, 0.01, 100), "delta=1e-09 is below the smallest delta"),
        (lambda: calibrate_noise_multiplier(0.02, 1e-5, 0.01, 100, "prv"),
         "epsilon=0.02 is below the smallest target the prv accountant can serve (0.05); use pld"),
        (lambda: calibrate_noise_multiplier(1e3, 1e-5, 0.01, 100, "prv"),
         "epsilon=1000.0 is over the 500 the prv accountant can serve; use pld"),
        (lambda: epsilon_for(1.0, 0.01, 10, 1e-5, relation="swap"),
         "relation='swap' is not one of add-remove, replace-one"),
        (lambda: epsilon_for(1.0, 0.01, 10, 1e-5, "prv", relation=REPLACE_ONE),
         "accountant 'prv' supports only the add-remove relation; use pld for replace-one"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10, "rdp", relation=REPLACE_ONE),
         "accountant 'rdp' supports only the add-remove relation; use pld for replace-one"),
    ],
)
def test_out_of_range_values_are_refused_at_once(call, message):
    start = time.monotonic()
    with pytest.raises(PrivdiffError) as info:
        call()
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value) and time.monotonic() - start < 2


# Corners of the served ranges that used to run for minutes, overflow or warn; each now takes a few seconds.
CORNERS = [
    (epsilon_for, (1.0, 0.01, 10**6, 1e-5, "pld")),  # composed loss grid of ~1e9 points at the default spacing
    (epsilon_for, (1e6, 0.5, 10**6, 1e-5, "rdp")),  # opacus' series for fractional orders crawls near q = 0.5
    (epsilon_for, (1e-3, 0.5, 1, 1e-5, "pld")),  # losses below -709 overflowed exp()
    (epsilon_for, (1.0, 1e-9, 10**6, 1e-8, "pld")),  # a sparse loss grid self-composed 10**6 times
    (epsilon_for, (30.0, 0.01, 10**6, 1e-5, "prv")),  # a 1e8-point PRV grid at eps_error = 0.01
    (calibrate_noise_multiplier, (0.01, 1e-5, 0.01, 1000, "pld")),  # tiny target: large sigma
    (calibrate_noise_multiplier, (1e4, 1e-5, 0.5, 1000, "pld")),  # huge target: tiny sigma
    (calibrate_noise_multiplier, (100.0, 1e-5, 0.01, 1000, "prv")),
]


@pytest.mark.parametrize(("function", "args"), CORNERS, ids=[f"{f.__name__}{args}" for f, args in CORNERS])
def test_extreme_but_served_calls_answer_quickly(function, args):
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name, value = function(*args)
    assert time.monotonic() - start < 30  # ~1-8 s on 2 busy cores; minutes (or a crash) before
    assert math.isfinite(value) and value > 0
    if function is calibrate_noise_multiplier:
        target, delta, q, steps, _ = args
        assert epsilon_for(value, q, steps, delta, name)[1] <= target


def test_relations():
    assert RELATIONS == (ADD_REMOVE, REPLACE_ONE) == ("add-remove", "replace-one")
    assert epsilon_for(4.0, 1.0, 1, 1e-5, relation=REPLACE_ONE)[0] == "pld"  # pld is the default for replace-one


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_replace_one_at_full_batch_is_add_remove_at_twice_the_sensitivity(sigma):
    # dp_accounting's replace-one pair at q = 1 is N(-1, σ²) vs N(1, σ²): sensitivity 2, i.e. add-remove at σ / 2.
    _, replace = epsilon_for(sigma, 1.0, 1, 1e-5, relation=REPLACE_ONE)
    _, doubled = epsilon_for(sigma / 2, 1.0, 1, 1e-5)
    assert replace == pytest.approx(doubled, rel=1e-4)
    assert exact_gaussian_epsilon(sigma / 2, 1e-5) <= replace <= exact_gaussian_epsilon(sigma / 2, 1e-5) * 1.01


def test_replace_one_lies_between_add_remove_at_sigma_and_at_half_sigma():
    _, replace = epsilon_for(4.0, 0.1, 5, 1e-5, relation=REPLACE_ONE)
    assert epsilon_for(4.0, 0.1, 5, 1e-5)[1] < replace < epsilon_for(2.0, 0.1, 5, 1e-5)[1]


def test_replace_one_calibration():
    _, add_remove = calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1)
    name, replace = calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1, relation=REPLACE_ONE)
    assert name == "pld" and replace == pytest.approx(2 * add_remove, rel=2e-3)
    name, sigma = calibrate_noise_multiplier(0.3, 1e-5, 0.02, 5, "pld", relation=REPLACE_ONE)
    assert 0.99 * 0.3 <= epsilon_for(sigma, 0.02, 5, 1e-5, relation=REPLACE_ONE)[1] <= 0.3


def test_the_accountants_answer_without_importing_torch_or_opacus():
    """`privdiff privacy sigma|epsilon` answers in about a second: none of the accountants imports torch, or opacus'
    package (its __init__ imports torch and its model code); prv and rdp load opacus' analysis modules alone, with
    the answers of the tests above."""
    code = (
        "import json, sys\n"
        "from privdiff.privacy.accountants import calibrate_noise_multiplier, epsilon_for\n"
        "out = {a: [epsilon_for(1.0, 0.01, 1000, 1e-5, accountant=a)[1],\n"
        "           calibrate_noise_multiplier(8, 1e-5, 0.01, 1000, accountant=a)[1]] for a in ('pld', 'prv', 'rdp')}\n"
        "out['imported'] = sorted(m for m in ('torch', 'opacus', 'diffusers') if m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       timeout=300).stdout)
    assert result.pop("imported") == []
    for accountant, (eps, sigma) in result.items():
        assert eps == pytest.approx(epsilon_for(1.0, 0.01, 1000, 1e-5, accountant=accountant)[1], rel=1e-12)
        assert sigma == pytest.approx(calibrate_noise_multiplier(8, 1e-5, 0.01, 1000, accountant=accountant)[1],
                                      rel=1e-12)
