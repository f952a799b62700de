"""Accounting for the Poisson-subsampled Gaussian mechanism (docs/privacy.md).

Wrappers over well-kept accountants; no privacy formula is re-derived here (the grids are sized here, and
read through a few private dp_accounting attributes, so dp-accounting is pinned below 0.7):

- ``pld``: Google's dp_accounting PLD accountant (pessimistic estimate, an upper bound);
- ``prv``: opacus' PRV accountant (its upper bound);
- ``rdp``: opacus' RDP accountant (looser, but fast).

An event ``(sigma, q, steps)`` is ``steps`` compositions of the Gaussian mechanism with noise multiplier
``sigma`` on a Poisson sample of rate ``q`` (``q == 1``: no sampling). Neighbouring datasets differ by adding or
removing one record (``add-remove``, every accountant) or by replacing one record with another
(``replace-one``, pld only: dp_accounting's REPLACE_ONE pair (1-q)N(0, σ²) + qN(∓1, σ²), i.e. the sampled
record's clipped contribution moves between two vectors of norm <= C; at q = 1 that is sensitivity 2C).

Every call answers within seconds (2 CPU cores) or refuses with a one-line PrivdiffError naming the value. The
served ranges: steps <= MAX_STEPS in all (DP-SGD never needs more), at most MAX_EVENTS distinct (sigma, q) pairs
in one composition, noise multipliers in NOISE_MULTIPLIERS, sample rates >= MIN_SAMPLE_RATE, delta in DELTAS
and, as calibration targets, epsilon in EPSILONS (PRV_EPSILONS for prv). Inside them the grids of pld and prv are
sized to a fixed work budget (a coarser grid loosens their upper bound, never breaks it); pld refuses only events
whose epsilon is far beyond any target; prv also events whose grid cannot be made small enough, whose epsilon
passes ~700, or where opacus' discretisation fails (tiny sigma or sample rate): use pld there.

One cohesive thing, kept whole over 400 lines: the one front door to the three accountants (epsilon
and sigma calibration under either relation, and the grids they are read on).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks

ACCOUNTANTS = ("pld", "prv", "rdp")
ADD_REMOVE = "add-remove"
REPLACE_ONE = "replace-one"
RELATIONS = (ADD_REMOVE, REPLACE_ONE)

MAX_STEPS = 10**6
MAX_EVENTS = 32
NOISE_MULTIPLIERS = (1e-3, 1e6)
MIN_SAMPLE_RATE = 1e-9  # pld's loss grid degenerates near the smallest floats
DELTAS = (1e-8, 0.5)  # below, the FFT round-off of pld's and prv's 10**6-point grids reaches delta / 1000
EPSILONS = (0.01, 1e4)  # calibration targets; rdp's order 1024 cannot certify 0.01 at delta 1e-8 any more
PRV_EPSILONS = (0.05, 500.0)  # prv adds its eps_error (>= 0.01) and represents epsilon up to ~700 only

Event = tuple[float, float, int]


class _Unservable(PrivdiffError):
    """Events whose epsilon lies beyond every target the accountant serves, which it cannot compute."""


# PLD work budgets: points of the single-step loss grids, points of the composed grid times the number of events,
# spacing snapped to powers of two. ~1-2 s per evaluation; ~0.1 s in a calibration's coarse search, whose spacing
# follows sigma continuously so that its epsilon stays continuous for the root finder.
_PLD_BUDGET = (120_000, 1_000_000, True)
_PLD_COARSE = (10_000, 100_000, False)
_PLD_SPACING = 1e-4  # dp_accounting's default; scaled by powers of two, 2**-10 finer to 2**20 coarser
_PRV_POINTS = 1_000_000  # ~1.3 s
_PRV_MAX_EPS_ERROR = 0.5  # opacus' domain rule is only vouched for below eps_error = 1
_RDP_FRACTIONAL = tuple(1 + x / 10 for x in range(1, 100))
_RDP_INTEGER = tuple(list(range(2, 64)) + [round(64 * 2 ** (k / 4)) for k in range(1, 9)])
_RDP_MAX_ORDER = 2**14  # at q < 1 opacus' binomials overflow (NaN) past order 1024
_CALIBRATION_TOLERANCE = 1e-3


def default_accountant() -> str:
    """The tightest sound accountant installed: ``"pld"`` if dp_accounting is importable, else ``"prv"``."""
    return "pld" if importlib.util.find_spec("dp_accounting") is not None else "prv"


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str | None = None,
    *, relation: str = ADD_REMOVE,
) -> tuple[str, float]:
    """Upper bound on epsilon at ``delta`` after ``steps`` subsampled Gaussian releases; (accountant, eps)."""
    return composed_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant, relation=relation)


def composed_epsilon(
    events: Sequence[Event], delta: float, accountant: str | None = None, *, relation: str = ADD_REMOVE
) -> tuple[str, float]:
    """Upper bound on epsilon at ``delta`` of the composition of ``events`` [(sigma, q, steps)]."""
    name = _resolve(accountant, relation)
    delta = _delta(delta)
    many = len(events) > 1
    merged = _merge([_check_event(event, f" (event {i})" if many else "") for i, event in enumerate(events)])
    if not merged:
        return name, 0.0
    checks.served("total steps" if many else "steps", sum(steps for _, _, steps in merged), high=MAX_STEPS)
    checks.served("distinct (noise_multiplier, sample_rate) events", len(merged), high=MAX_EVENTS)
    return name, _composed(name, tuple(merged), delta, relation)


@functools.lru_cache(maxsize=256)
def _composed(name: str, events: tuple[Event, ...], delta: float, relation: str) -> float:
    """``composed_epsilon``'s answer for checked arguments, remembered: a GUI asks again for the same release."""
    return _run(name, f"{_describe(list(events))} at delta={delta}", lambda: _epsilon(name, list(events), delta,
                                                                                        relation))


def calibrate_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str | None = None,
    *, relation: str = ADD_REMOVE,
) -> tuple[str, float]:
    """Smallest noise multiplier (within ~0.1%, at least NOISE_MULTIPLIERS[0]) whose epsilon at ``delta`` is <=
    ``epsilon``.

    A coarse search (pld on a small grid; rdp on integer orders) is refined with the accountant's own
    evaluation, which ``epsilon_for`` repeats: the answer is one whose epsilon was computed.
    """
    name = _resolve(accountant, relation)
    eps = checks.served("epsilon", checks.positive("epsilon", epsilon), *EPSILONS, what="target")
    if name == "prv":
        checks.served("epsilon", eps, *PRV_EPSILONS, what="target", who="the prv accountant", hint="use pld")
    delta = _delta(delta)
    q = _sample_rate(sample_rate)
    steps = checks.served("steps", checks.count("steps", steps), high=MAX_STEPS)
    return name, _calibrated(name, eps, delta, q, steps, relation)


@functools.lru_cache(maxsize=256)
def _calibrated(name: str, eps: float, delta: float, q: float, steps: int, relation: str) -> float:
    """``calibrate_noise_multiplier``'s answer for checked arguments, remembered: a GUI asks again for the same
    release."""

    def exact(sigma: float) -> float:
        try:
            return _epsilon(name, [(sigma, q, steps)], delta, relation)
        except _Unservable:  # far above any target
            return math.inf

    def rdp(sigma: float) -> float:
        return _rdp_epsilon([(sigma, q, steps)], delta, fractional=False)

    def coarse(sigma: float) -> float:
        try:
            return _pld_epsilon([(sigma, q, steps)], delta, relation, _PLD_COARSE)
        except _Unservable:
            return math.inf

    def search() -> float:
        # RDP on integer orders first (milliseconds a try, a little above every accountant's answer), to 1%;
        # then pld's small grid, to 1%; then the accountant's own evaluation, to _CALIBRATION_TOLERANCE.
        sigma, slope = q * math.sqrt(2 * steps * math.log(1.25 / delta)) / eps, -1.0  # the classic bound
        if q < 1:  # (at q = 1 the classic bound is close already)
            with contextlib.suppress(PrivdiffError):  # beyond what rdp can certify: start from the classic bound
                sigma, slope = _solve(rdp, eps, sigma, name="rdp", tolerance=0.01)
        if name == "pld":
            start = sigma * (2 if relation == REPLACE_ONE else 1)  # rdp's answer is add-remove's
            sigma, slope = _solve(coarse, eps, start, slope, tries=5, name=name, tolerance=0.01)
        return _solve(exact, eps, sigma, slope, tries=5, name=name)[0]

    return _run(name, f"epsilon={eps}, delta={delta}, sample_rate={q}, steps={steps}", search)


def _resolve(accountant: str | None, relation: str) -> str:
    if relation not in RELATIONS:
        raise PrivdiffError(f"relation={relation!r} is not one of {', '.join(RELATIONS)}")
    name = ("pld" if relation == REPLACE_ONE else default_accountant()) if accountant is None else accountant
    if name not in ACCOUNTANTS:
        raise PrivdiffError(f"accountant={accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    if relation == REPLACE_ONE and name != "pld":
        raise PrivdiffError(f"accountant {name!r} supports only the {ADD_REMOVE} relation; use pld for {relation}")
    if name == "pld" and importlib.util.find_spec("dp_accounting") is None:
        raise PrivdiffError("accountant='pld' needs the dp-accounting package; install it or use 'prv'")
    return name


def _delta(delta: object) -> float:
    return checks.served("delta", checks.open_unit("delta", delta), *DELTAS, what="delta")


def _sample_rate(q: object, name: str = "sample_rate") -> float:
    return checks.served(name, checks.sample_rate(q, name), MIN_SAMPLE_RATE, what="sample rate")


def _check_event(event: Sequence[object], where: str) -> Event:
    if len(event) != 3:
        raise PrivdiffError(f"event{where} must be (noise_multiplier, sample_rate, steps), got {event!r}")
    sigma, q, steps = event
    sigma = checks.positive(f"noise_multiplier{where}", sigma)
    return (
        checks.served(f"noise_multiplier{where}", sigma, *NOISE_MULTIPLIERS, what="noise multiplier"),
        _sample_rate(q, f"sample_rate{where}"),
        checks.served(f"steps{where}", checks.count(f"steps{where}", steps), high=MAX_STEPS),
    )


def _describe(events: list[Event]) -> str:
    return f"events {events}" if len(events) <= 3 else f"{len(events)} events (first {events[0]})"


def _merge(events: list[Event]) -> list[Event]:
    """Events with the same (sigma, q) joined into one: composition does not depend on the order."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, count in events:
        steps[sigma, q] = steps.get((sigma, q), 0) + count
    return [(sigma, q, count) for (sigma, q), count in steps.items()]


def _run(name: str, what: str, compute: Callable[[], float]) -> float:
    """``compute()`` with the libraries' harmless warnings silenced; their failures become one-line errors."""
    try:
        with _quiet():
            value = float(compute())
    except PrivdiffError:
        raise
    except (ValueError, ArithmeticError, MemoryError, RuntimeError) as exc:
        raise PrivdiffError(f"{name} accountant failed for {what}: {_one_line(exc)}") from exc
    if not math.isfinite(value) or value < 0:
        raise PrivdiffError(f"{name} accountant gave {value} for {what}; please report this bug")
    return value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence harmless numerical warnings of the libraries.

    opacus' PRV code takes log(1 - q) = -inf at q == 1 and overflows exp() far in the tails, where the density
    is zero anyway; an RDP optimum on the end of the orders only means a looser (still valid) bound. Results are
    checked for being finite instead.
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def _epsilon(name: str, events: list[Event], delta: float, relation: str) -> float:
    if name == "pld":
        return _pld_epsilon(events, delta, relation)
    return _prv_epsilon(events, delta) if name == "prv" else _rdp_epsilon(events, delta)


def _solve(
    eps_of: Callable[[float], float], target: float, start: float, slope: float = -1.0, tries: int = 10,
    name: str = "this", tolerance: float = _CALIBRATION_TOLERANCE,
) -> tuple[float, float]:
    """Smallest noise multiplier in NOISE_MULTIPLIERS whose ``eps_of`` (decreasing) is <= ``target``, to within
    ``tolerance`` (relative), and the slope of log eps against log sigma there.

    Secant steps on log eps against log sigma from ``start``, then a bracket widened geometrically (so it ends
    within the range: unreachable targets are refused, a target the smallest sigma meets returns it), then
    bisection. Only evaluated sigmas are returned.
    """
    rel, (low, high) = tolerance, NOISE_MULTIPLIERS
    seen: dict[float, float] = {}

    def ev(sigma: float) -> tuple[float, float]:
        sigma = min(max(sigma, low), high)
        if sigma not in seen:
            seen[sigma] = min(float(eps_of(sigma)), 1e300)
        return sigma, seen[sigma]

    sigma, eps = ev(start)
    for _ in range(tries):
        step = math.log(target / eps) / slope if eps > 0 else -3.0
        step = max(-3.0, min(3.0, step))
        if abs(step) < rel / 2:
            break
        new, new_eps = ev(sigma * math.exp(step))
        if new == sigma:
            break
        if min(eps, new_eps) > 0 and max(eps, new_eps) < 1e300 and (new_eps - eps) * (new - sigma) < 0:
            slope = max(-1000.0, math.log(new_eps / eps) / math.log(new / sigma))
        sigma, eps = new, new_eps
    width = rel / 2
    if eps > target:
        lo = sigma
        while (hi := ev(lo * math.exp(width)))[1] > target:
            if hi[0] >= high:
                raise PrivdiffError(f"no noise multiplier up to {high:g} brings the {name} accountant's epsilon "
                                    f"down to {target} (it gives {hi[1]:.4g})")
            lo, width = hi[0], width * 4
        hi = hi[0]
    else:
        hi = sigma
        while (lo := ev(hi * math.exp(-width)))[1] <= target and lo[0] > low:
            hi, width = lo[0], width * 4
        lo = lo[0]
    while seen[lo] > target and hi > lo * (1 + rel):  # bisection on log sigma (scipy's brentq costs its import)
        mid = ev(math.sqrt(lo * hi))
        lo, hi = (mid[0], hi) if mid[1] > target else (lo, mid[0])
    return min(s for s, e in seen.items() if e <= target), slope


def _pld_epsilon(
    events: list[Event], delta: float, relation: str = ADD_REMOVE, budget: tuple[int, int, bool] = _PLD_BUDGET
) -> float:
    """dp_accounting's PLD epsilon, composed as its PLDAccountant does, on a grid sized by ``budget``."""
    from dp_accounting.pld import privacy_loss_distribution as lib

    spacing, neighbours = _pld_spacing(events, relation, *budget), _pld_relation(relation)
    pld = None
    for sigma, q, steps in events:
        if q == 1:  # steps full-batch Gaussians are one with sigma / sqrt(steps)
            one = lib.from_gaussian_mechanism(sigma / math.sqrt(steps), value_discretization_interval=spacing,
                                              neighboring_relation=neighbours)
        else:
            one = _dense(lib.from_gaussian_mechanism(sigma, value_discretization_interval=spacing, sampling_prob=q,
                                                     neighboring_relation=neighbours)).self_compose(steps)
        pld = one if pld is None else pld.compose(one)
    return _pld_epsilon_for_delta(pld, delta)


def _dense(pld):  # dp_accounting PrivacyLossDistribution -> the same with dense pmfs
    """``pld`` with dense pmfs: self-composing a sparse one first computes size**steps exactly (seconds at 10**6)."""
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    remove, add = pld._pmf_remove.to_dense_pmf(), pld._pmf_add.to_dense_pmf()
    return PrivacyLossDistribution(remove, None if pld._symmetric else add)


def _pld_epsilon_for_delta(pld, delta: float) -> float:  # pld: dp_accounting PrivacyLossDistribution
    """Smallest epsilon >= 0 whose hockey-stick divergence ``pld.get_delta_for_epsilon`` is <= ``delta``, by
    Brent's method, rounded up. (dp_accounting's own get_epsilon_for_delta walks the grid in Python and
    overflows exp() on losses below -709, which small sigma produces.)"""

    def excess(eps: float) -> float:
        return float(pld.get_delta_for_epsilon(eps)) - delta

    from scipy import optimize  # dp_accounting has imported it already

    if excess(0.0) <= 0:
        return 0.0
    top = 1.0
    while excess(top) > 0:
        if top > 1e12:
            return math.inf
        top *= 4
    eps = optimize.brentq(excess, 0.0, top, xtol=1e-12, rtol=1e-12)
    return eps + 4e-12 * (1 + eps)  # past the root, where the divergence (decreasing) is <= delta


def _pld_relation(relation: str):  # -> dp_accounting.NeighboringRelation
    import dp_accounting

    return dp_accounting.NeighboringRelation[{ADD_REMOVE: "ADD_OR_REMOVE_ONE", REPLACE_ONE: "REPLACE_ONE"}[relation]]


def _pld_spacing(events: list[Event], relation: str, points: int, grid: int, snap: bool = True) -> float:
    """Grid spacing of the privacy-loss distributions: the smallest (down to dp_accounting's default times 2**-10:
    finer pays off for large sigma) at which the single-step grids hold at most ``points`` points and the composed
    grid, times the number of events (each is convolved in turn), at most ``grid``; with ``snap``, the default
    times a power of two.

    The pessimistic estimate stays an upper bound at any spacing.
    """
    widths = [_pld_widths(*event, relation) for event in events]
    single, composed = sum(w[0] for w in widths), sum(w[1] for w in widths)
    needed = max(single / points, composed * len(events) / grid, _PLD_SPACING * 2.0**-10)
    if needed > _PLD_SPACING * 2.0**20:  # dp_accounting overflows exp() near 709
        raise _Unservable(f"pld accountant cannot serve {_describe(events)}: its loss grid would need a spacing of "
                          f"{needed:.3g}; epsilon there is far above {EPSILONS[1]:g} (rdp can bound it)")
    return _PLD_SPACING * 2.0 ** math.ceil(math.log2(needed / _PLD_SPACING)) if snap else needed


def _pld_widths(sigma: float, q: float, steps: int, relation: str) -> tuple[float, float]:
    """Widths (in loss units, summed over the event's loss distributions) of the single-step loss grid and of the
    ``steps``-fold composition that dp_accounting builds for an event (its Chernoff bound for the tails).

    They scale as 1 / spacing, so they are measured once on a grid of ~1000 points.
    """
    from dp_accounting.pld import common, privacy_loss_distribution, privacy_loss_mechanism

    if q == 1:  # dp_accounting composes full-batch Gaussians into one with sigma / sqrt(steps)
        sigma, steps = sigma / math.sqrt(steps), 1
    kinds = privacy_loss_mechanism.AdjacencyType
    adjacencies = [kinds.REPLACE] if relation == REPLACE_ONE else [kinds.REMOVE, kinds.ADD][: 1 if q == 1 else 2]
    bounds = [privacy_loss_mechanism.GaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=a).connect_dots_bounds()
              for a in adjacencies]
    single = sum(b.epsilon_upper - b.epsilon_lower for b in bounds)
    if steps == 1:
        return single, single
    probe = min(max(single / 1000, 1e-12), 64.0)  # dp_accounting overflows exp() near 709
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, value_discretization_interval=probe, sampling_prob=q, neighboring_relation=_pld_relation(relation))
    pmfs = {id(pmf): pmf for pmf in (pld._pmf_remove, pld._pmf_add)}.values()  # private: sizes only
    spans = [common.compute_self_convolve_bounds(pmf.to_dense_pmf()._probs, steps, 1e-15) for pmf in pmfs]
    return single, sum(hi - lo + 1 for lo, hi in spans) * probe


def _prv_epsilon(events: list[Event], delta: float) -> float:
    """opacus' PRVAccountant.get_epsilon (its eps_error 0.01, delta_error delta / 1000, safe domain from RDP), with
    this module's faster RDP for the domain and eps_error widened when the grid would exceed _PRV_POINTS."""
    prv = _opacus_prv()

    total = sum(steps for _, _, steps in events)
    delta_error = delta / 1000
    tail = max(_rdp_epsilon(events, delta_error / 4),
               *(_rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)) for sigma, q, _ in events))
    scale = math.sqrt(total * math.log(12 / delta_error) / 2)
    eps_error = max(0.01, 2 * (max(tail, 0.01) + 3) * scale * len(events) / _PRV_POINTS)
    if eps_error > _PRV_MAX_EPS_ERROR:
        raise PrivdiffError(f"prv accountant cannot serve {_describe(events)} at delta={delta}: its grid would need "
                            f"{eps_error / 0.01 * _PRV_POINTS:.3g} points at eps_error=0.01; use pld")
    half = max(tail, eps_error) + 3
    domain = prv.Domain.create_aligned(-half, half, eps_error / scale)
    try:  # opacus raises RuntimeError where its discretisation does not hold (tiny sigma or sample rate)
        dprvs = [prv.discretize(prv.TruncatedPrivacyRandomVariable(prv.PoissonSubsampledGaussianPRV(q, sigma),
                                                                   domain.t_min, domain.t_max), domain)
                 for sigma, q, _ in events]
        composed = prv.compose_heterogeneous(dprvs, [steps for _, _, steps in events])
        eps = composed.compute_epsilon(delta, delta_error, eps_error)[2]  # the upper end of PRV's error bars
    except RuntimeError as exc:
        raise PrivdiffError(f"prv accountant cannot serve {_describe(events)}: {_one_line(exc)}; use pld") from exc
    if not math.isfinite(eps):  # exp(-loss) underflows past ~745, which epsilon (<= its bound) then crosses
        raise _Unservable(f"prv accountant cannot serve {_describe(events)} at delta={delta}: epsilon is beyond "
                          "the ~700 its grid can represent; use pld")
    return max(0.0, eps)  # a negative bound means (0, delta)-DP


def _rdp_epsilon(events: list[Event], delta: float, fractional: bool = True) -> float:
    """opacus' RDP epsilon over integer orders, widened while the optimum sits on the largest one (up to
    _RDP_MAX_ORDER, or 1024 when sampling), then over the fractional orders within 1 of the best (opacus' series
    for those is slow near q = 0.5, and further ones cannot win when epsilon is unimodal in the order)."""
    analysis = _opacus_rdp()

    def rdp(orders: Sequence[float]) -> np.ndarray:
        return sum(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
                   for sigma, q, steps in events)

    top = _RDP_MAX_ORDER if all(q == 1 for _, q, _ in events) else 1024
    orders, values = list(_RDP_INTEGER), rdp(_RDP_INTEGER)
    while True:
        eps, best = analysis.get_privacy_spent(orders=orders, rdp=values, delta=delta)
        if best < orders[-1] or orders[-1] >= top:
            break
        last = orders[-1]
        new = [round(last * 2 ** (k / 4)) for k in range(1, 9) if last * 2 ** (k / 4) <= top]
        if not new:
            break
        orders, values = orders + new, np.concatenate([values, rdp(new)])
    near = [a for a in _RDP_FRACTIONAL if abs(a - best) < 1] if fractional else []
    if near:
        eps = min(eps, analysis.get_privacy_spent(orders=near, rdp=rdp(near), delta=delta)[0])
    return max(0.0, eps)  # a negative bound means (0, delta)-DP


_OPACUS = "privdiff.privacy._opacus"
"""Where opacus' accountant analysis modules are loaded on their own (``_opacus_analysis``)."""


@functools.cache
def _opacus_rdp() -> ModuleType:
    """opacus' RDP analysis (opacus/accountants/analysis/rdp.py, which needs numpy and scipy.special only)."""
    return _opacus_analysis("rdp")


@functools.cache
def _opacus_prv() -> ModuleType:
    """opacus' PRV analysis (the package opacus/accountants/analysis/prv/: numpy, scipy and the RDP module)."""
    _opacus_rdp()  # its prvs module imports _compute_rdp from the RDP module beside it
    return _opacus_analysis("prv")


def _opacus_analysis(name: str) -> ModuleType:
    """opacus.accountants.analysis.``name``. Unless opacus is imported already, it is loaded from its files on its own,
    as ``privdiff.privacy._opacus.analysis.<name>``: ``import opacus`` runs the package's __init__, which imports torch
    and opacus' model code, seconds an accountant query does not need. The PRV package's one other import, opacus'
    ``RDPAccountant`` (only its ``compute_safe_domain_size`` uses it, and ``_prv_epsilon`` computes the domain
    itself), resolves to a placeholder that refuses to be used."""
    if "opacus" in sys.modules:
        return importlib.import_module(f"opacus.accountants.analysis.{name}")
    package = importlib.util.find_spec("opacus")  # locates the package without importing it
    if package is None or not package.submodule_search_locations:
        raise PrivdiffError("the rdp and prv accountants need the opacus package; install it or use 'pld'")
    analysis = Path(next(iter(package.submodule_search_locations))) / "accountants" / "analysis"
    for parent in (_OPACUS, f"{_OPACUS}.analysis", f"{_OPACUS}.rdp"):
        sys.modules.setdefault(parent, ModuleType(parent, "an opacus accountant module loaded without opacus"))
    sys.modules[_OPACUS].__path__ = []
    sys.modules[f"{_OPACUS}.analysis"].__path__ = []
    sys.modules[f"{_OPACUS}.rdp"].RDPAccountant = _NoRDPAccountant
    folder = analysis / name
    spec = (importlib.util.spec_from_file_location(f"{_OPACUS}.analysis.{name}", folder / "__init__.py",
                                                   submodule_search_locations=[str(folder)]) if folder.is_dir()
            else importlib.util.spec_from_file_location(f"{_OPACUS}.analysis.{name}", analysis / f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its own relative imports find it, and the RDP module beside it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


class _NoRDPAccountant:
    """Stands in for opacus' RDPAccountant in the PRV package loaded by ``_opacus_analysis``: never used there."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("opacus' RDPAccountant is not loaded here: privdiff computes the PRV domain itself")
