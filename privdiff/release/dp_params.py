"""The privacy side of planning a release: its parameters, their checks, σ calibration and the report.

Every method plans its release here before any private work (step 2 of ``privdiff.release.artifact``):
contradictory or impossible parameters are refused in one line, σ is calibrated by the accountant for the
target ε (or ε computed for a given σ) under the release's relation, and the report is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks
from privdiff.privacy.accountants import ADD_REMOVE, REPLACE_ONE, calibrate_noise_multiplier, epsilon_for
from privdiff.privacy.mechanism import BOUNDS
from privdiff.privacy.report import PrivacyReport, make_report

MAX_RECORDS = 100_000  # <= mechanism.MAX_SUM_ROWS - 1: a neighbour's sum is still within the grid's slack


@dataclass(frozen=True)
class DPParams:
    """The privacy parameters of one release: a target ε, or a noise multiplier whose ε is reported.

    ``public_size``: a dataset size the user declares public (e.g. a published count); it makes the
    guarantee add-remove. Without it the release divides by the real N and its guarantee is replace-one.
    """

    epsilon: float | None
    delta: float
    sample_rate: float = 1.0
    clip_norm: float = 1.0
    bound: str = "clip"
    accountant: str | None = None
    noise_multiplier: float | None = None
    public_size: int | None = None


def check_budget(epsilon: float | None, delta: float, dataset_size: int) -> None:
    """Refuse impossible budgets: ε (when given) must be positive and δ below 1/N."""
    if dataset_size < 1:
        raise PrivdiffError("the dataset is empty")
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise PrivdiffError(f"epsilon {epsilon} must be a positive finite number")
    if not 0 < delta < 1 / dataset_size:
        raise PrivdiffError(
            f"delta {delta} must be in (0, 1/N) = (0, {1 / dataset_size:.3g}) for N={dataset_size} images"
        )


def check_params(params: DPParams, dataset_size: int, n_public_by_convention: bool = False) -> None:
    """Refuse contradictory or impossible parameters before any work (one line naming the value)."""
    check_budget(params.epsilon, params.delta, dataset_size)
    if dataset_size > MAX_RECORDS:
        raise PrivdiffError(f"{dataset_size} records are over the {MAX_RECORDS} one release serves (the noise's "
                            "grid accounts for float64 rounding in sums of at most that many rows)")
    checks.sample_rate(params.sample_rate)
    checks.positive("clip_norm", params.clip_norm)
    if params.noise_multiplier is not None:
        checks.positive("noise_multiplier", params.noise_multiplier)
    if params.bound not in BOUNDS:
        raise PrivdiffError(f"bound {params.bound!r} is not one of {', '.join(BOUNDS)}")
    if params.epsilon is not None and params.noise_multiplier is not None:
        raise PrivdiffError(f"give a target epsilon ({params.epsilon}) or a noise multiplier "
                            f"({params.noise_multiplier}), not both")
    if params.epsilon is None and params.noise_multiplier is None:
        raise PrivdiffError("give a target epsilon or a noise multiplier")
    if params.public_size is not None:
        checks.count("public_size", params.public_size)
        if not params.delta < 1 / params.public_size:  # the same rule as for N: δ ≥ 1/n allows naming one image
            raise PrivdiffError(f"delta {params.delta} must be below 1/public_size = {1 / params.public_size:.3g} "
                                f"for public_size={params.public_size}")
    elif not n_public_by_convention and params.accountant not in (None, "pld"):
        raise PrivdiffError(f"accountant {params.accountant!r} supports only the add-remove relation: use the pld "
                            "accountant for this replace-one release, or declare a public_size")


def plan_release(
    mechanism: str,
    params: DPParams,
    dataset_size: int,
    steps: int,
    *,
    center: str,
    dataset_label: str | None = None,
    private: bool = True,
    n_public_by_convention: bool = False,
) -> PrivacyReport:
    """Check the parameters, fix σ and ε for ``steps`` compositions and write the release's report.

    σ is calibrated for the target ε, or, when ``params.noise_multiplier`` is given, ε is computed, under
    the release's relation: add-remove with a declared ``public_size``; otherwise replace-one, or
    add-remove with N public when ``n_public_by_convention`` (DP-SGD's convention).
    """
    check_params(params, dataset_size, n_public_by_convention)
    if params.public_size is not None:
        relation, public_size, accounted = "add-remove", params.public_size, ADD_REMOVE
    elif n_public_by_convention:
        relation, public_size, accounted = "add-remove (N public)", dataset_size, ADD_REMOVE
    else:
        relation, public_size, accounted = REPLACE_ONE, dataset_size, REPLACE_ONE
    if params.noise_multiplier is not None:
        sigma = params.noise_multiplier
        accountant, epsilon = epsilon_for(
            sigma, params.sample_rate, steps, params.delta, accountant=params.accountant, relation=accounted
        )
    else:
        epsilon = params.epsilon
        accountant, sigma = calibrate_noise_multiplier(
            epsilon, params.delta, params.sample_rate, steps, accountant=params.accountant, relation=accounted
        )
    return make_report(
        mechanism=mechanism, epsilon=epsilon, delta=params.delta, noise_multiplier=sigma,
        sample_rate=params.sample_rate, clip_norm=params.clip_norm, bound=params.bound, center=center,
        steps=steps, accountant=accountant, relation=relation, public_size=public_size,
        dataset_label=dataset_label, private=private,
    )
