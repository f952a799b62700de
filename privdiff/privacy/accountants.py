"""Accounting for the Poisson-subsampled Gaussian mechanism (DESIGN.md §3).

Thin wrappers over well-kept accountants; no formula is re-derived here:

- ``pld``: Google's dp_accounting PLD accountant (pessimistic estimate, an upper bound);
- ``prv``: opacus' PRV accountant (its upper bound);
- ``rdp``: opacus' RDP accountant (looser, but fast).

Neighbouring datasets differ by adding or removing one record. An event ``(sigma, q, steps)`` is
``steps`` compositions of the Gaussian mechanism with noise multiplier ``sigma`` on a Poisson sample
of rate ``q`` (``q == 1``: no sampling).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import optimize

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks

ACCOUNTANTS = ("pld", "prv", "rdp")

Event = tuple[float, float, int]

# opacus' default RDP orders and a few larger ones; widened on demand. (Orders below 1.1 would only
# matter for epsilon above ~log(1/delta) / 0.1 and are slow to evaluate.)
_RDP_ORDERS = tuple(
    [1 + x / 10 for x in range(1, 100)]
    + list(range(12, 64))
    + [round(64 * 2 ** (k / 4)) for k in range(1, 9)]
)
_RDP_MAX_ORDER = 2**14
_LARGEST_ALPHA = "Optimal order is the largest alpha"


def default_accountant() -> str:
    """The tightest sound accountant installed: ``"pld"`` if dp_accounting is importable, else ``"prv"``."""
    return "pld" if importlib.util.find_spec("dp_accounting") is not None else "prv"


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str | None = None
) -> tuple[str, float]:
    """Upper bound on epsilon at ``delta`` after ``steps`` subsampled Gaussian releases; (accountant, eps)."""
    return composed_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def composed_epsilon(
    events: Sequence[Event], delta: float, accountant: str | None = None
) -> tuple[str, float]:
    """Upper bound on epsilon at ``delta`` of the composition of ``events`` [(sigma, q, steps)]."""
    name = _resolve(accountant)
    delta = checks.open_unit("delta", delta)
    checked = [_check_event(event, f" (event {i})" if len(events) > 1 else "") for i, event in
               enumerate(events)]
    if not checked:
        return name, 0.0
    try:
        eps = _EPSILON[name](checked, delta)
    except (ValueError, ArithmeticError, MemoryError, RuntimeError) as exc:
        raise PrivdiffError(f"{name} accountant failed for events {checked} at delta={delta}: "
                            f"{_one_line(exc)}") from exc
    return name, float(eps)


def calibrate_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str | None = None
) -> tuple[str, float]:
    """Smallest noise multiplier (within ~0.1%) whose epsilon at ``delta`` is <= ``epsilon``.

    The answer is always checked against the same accountant before it is returned.
    """
    name = _resolve(accountant)
    eps = checks.positive("epsilon", epsilon)
    delta = checks.open_unit("delta", delta)
    q = checks.sample_rate(sample_rate)
    steps = checks.count("steps", steps)
    try:
        sigma = float(_CALIBRATE[name](eps, delta, q, steps))
    except (ValueError, ArithmeticError, MemoryError, RuntimeError) as exc:
        raise PrivdiffError(f"{name} accountant could not calibrate sigma for epsilon={eps}, delta={delta}, "
                            f"sample_rate={q}, steps={steps}: {_one_line(exc)}") from exc
    if name != "pld":  # _calibrate_pld only returns a sigma it has evaluated
        _, reached = composed_epsilon([(sigma, q, steps)], delta, name)
        if reached > eps:
            raise PrivdiffError(f"calibrated noise_multiplier={sigma} gives epsilon={reached} > {eps} "
                                f"({name}); please report this bug")
    return name, sigma


def _resolve(accountant: str | None) -> str:
    name = default_accountant() if accountant is None else accountant
    if name not in ACCOUNTANTS:
        raise PrivdiffError(f"accountant={accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    if name == "pld" and importlib.util.find_spec("dp_accounting") is None:
        raise PrivdiffError("accountant='pld' needs the dp-accounting package; install it or use 'prv'")
    return name


def _check_event(event: Sequence[object], where: str) -> Event:
    if len(event) != 3:
        raise PrivdiffError(f"event{where} must be (noise_multiplier, sample_rate, steps), got {event!r}")
    sigma, q, steps = event
    return (
        checks.positive(f"noise_multiplier{where}", sigma),
        checks.sample_rate(q, f"sample_rate{where}"),
        checks.count(f"steps{where}", steps),
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _opacus_quiet() -> Iterator[None]:
    """Silence two harmless warnings from opacus' PRV code.

    log(1 - q) at q == 1 is -inf, which is the value that code needs; and the PRV accountant sizes its
    truncation domain with an internal RDP bound over fixed orders: a looser bound there only widens
    the domain, it never loosens the reported epsilon.
    """
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LARGEST_ALPHA)
        yield


def _pld_event(sigma: float, q: float, steps: int):  # -> dp_accounting.DpEvent
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(sigma)
    event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def _pld_interval(events: list[Event]) -> float:
    """Grid spacing of the privacy-loss distribution: dp_accounting's default 1e-4, widened for small
    sigma, whose per-step loss range (about 1/(2σ²) + 8/σ) would otherwise need a grid larger than
    memory. The pessimistic estimate stays an upper bound at any spacing."""
    widest = max(1 / (2 * sigma * sigma) + 8 / sigma for sigma, _, _ in events)
    return max(1e-4, widest * 5e-6)


def _pld_epsilon(events: list[Event], delta: float) -> float:
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=_pld_interval(events))
    for event in events:
        accountant.compose(_pld_event(*event))
    return accountant.get_epsilon(delta)


def _prv_epsilon(events: list[Event], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(events)
    with _opacus_quiet():
        return accountant.get_epsilon(delta)  # the upper end of PRV's error bars


def _rdp_epsilon(events: list[Event], delta: float) -> float:
    """RDP epsilon; the orders are widened while the optimum sits on the largest one."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(events)
    orders = list(_RDP_ORDERS)
    while True:
        final = orders[-1] >= _RDP_MAX_ORDER
        with warnings.catch_warnings():
            if not final:  # not the answer yet: the orders are widened below
                warnings.filterwarnings("ignore", message=_LARGEST_ALPHA)
            eps, best = accountant.get_privacy_spent(delta=delta, alphas=orders)
        if final or best < orders[-1]:
            return eps
        orders = _widen(orders, 4 * orders[-1])


def _widen(orders: list[int | float], top: float) -> list[int | float]:
    """``orders`` extended geometrically (integer orders, 4 per doubling) up to about ``top``."""
    last = orders[-1]
    return orders + [round(last * 2 ** (k / 4)) for k in range(1, 80) if last * 2 ** (k / 4) <= top]


def _calibrate_opacus(
    name: str, eps: float, delta: float, q: float, steps: int, rel_tol: float = 0.002, fast: bool = False
) -> float:
    """opacus' bisection for sigma; ``fast`` (RDP only) uses integer orders, whose bound is a bit looser."""
    from opacus.accountants.utils import get_noise_multiplier

    kwargs: dict[str, object] = {}
    if name == "rdp":
        # Orders reaching well past the optimum near the answer, where alpha - 1 >= log(1/delta) / eps.
        base = list(range(2, 64)) if fast else list(_RDP_ORDERS)
        kwargs["alphas"] = _widen(base, 4 * (1 + math.log(1 / delta) / eps))
    with _opacus_quiet():
        # The bisection also visits sigmas far from the answer whose optimal order is off the grid; their
        # epsilons are then overestimated, which only makes the search conservative.
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                    accountant=name, epsilon_tolerance=rel_tol * eps, **kwargs)


def _calibrate_pld(eps: float, delta: float, q: float, steps: int) -> float:
    """Brent's method on dp_accounting's PLD epsilon, each sigma evaluated once (0.1-3 s apiece).

    Returns the smallest evaluated sigma whose PLD epsilon is <= ``eps``, so the answer is checked by
    construction; Brent's bracket shrinks to 0.1% of sigma.
    """
    gaps: dict[float, float] = {}

    def gap(sigma: float) -> float:
        if sigma not in gaps:
            gaps[sigma] = _pld_epsilon([(sigma, q, steps)], delta) - eps
        return gaps[sigma]

    # RDP is looser than PLD, so a sigma meeting the target under RDP (fast to find) bounds PLD's from
    # above; step down from it until the target is missed, which brackets the answer.
    hi = _calibrate_opacus("rdp", eps, delta, q, steps, rel_tol=0.02, fast=True)
    while gap(hi) > 0:
        hi *= 1.25
    lo = 0.85 * hi
    while gap(lo) <= 0:
        hi, lo = lo, 0.85 * lo
    optimize.brentq(gap, lo, hi, xtol=1e-3 * lo)
    return min(sigma for sigma, g in gaps.items() if g <= 0)


_EPSILON: dict[str, Callable[[list[Event], float], float]] = {
    "pld": _pld_epsilon,
    "prv": _prv_epsilon,
    "rdp": _rdp_epsilon,
}

_CALIBRATE: dict[str, Callable[[float, float, float, int], float]] = {
    "pld": _calibrate_pld,
    "prv": lambda eps, delta, q, steps: _calibrate_opacus("prv", eps, delta, q, steps),
    "rdp": lambda eps, delta, q, steps: _calibrate_opacus("rdp", eps, delta, q, steps),
}
