"""What the worker can rebuild from its own view: the measure behind the threat model's claims.

The worker sees, per step, the public factor f, the plaintext remainder with its positions (sparse packing),
the plain offsets (unless encrypted) and ciphertexts it cannot read. Its best simple estimate of the state:
start from zero (or, knowing the public schedule, from the first offset scaled back to the noise prediction,
which at the first step is close to the initial noise), overwrite what it sees in plaintext, and push the
estimate through each update (state' = f state + offset). An offset it does not see counts as 0. ``psnr``
compares the estimate with the true result.
"""

from __future__ import annotations

import math

import numpy as np

from privdiff.he.protocol import Request


def reconstruct(view: list[Request], size: int, first_coefficient: float | None = None,
                initial: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The worker's estimate (float64, ``size`` values) of the state after the last update it saw, and which
    elements it knows exactly (seen in plaintext at some step, or from ``initial``, with every later offset in
    plaintext too).

    With ``first_coefficient`` c (public: the first step's offset is c x the prediction, and at the first step
    the noise prediction is close to the initial noise), the estimate starts from the first offset / c. With
    ``initial`` (a worker who knows the seed recomputes the initial state), it starts from that state exactly.
    """
    estimate, exact = np.zeros(size), np.zeros(size, dtype=bool)
    if initial is not None:
        estimate, exact = np.asarray(initial, dtype=np.float64).ravel().copy(), np.ones(size, dtype=bool)
    for i, request in enumerate(view):
        encrypted = _encrypted_positions(request, size)
        offset = np.zeros(size)
        if len(request.offsets):
            offset[encrypted] = request.offsets * request.factor
        offset[~encrypted] = request.plain_offsets
        every_offset = len(request.offsets) + len(request.plain_offsets) == size
        if i == 0 and initial is None and first_coefficient and every_offset:
            estimate = offset / first_coefficient
        estimate[~encrypted] = request.plain  # seen in the clear this step
        exact |= ~encrypted
        if not len(request.offsets):
            exact &= ~encrypted  # an encrypted offset hides where those elements go
        estimate = request.factor * estimate + offset
    return estimate, exact


def _encrypted_positions(request: Request, size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    if len(request.indices):
        mask[request.indices] = True
    elif not len(request.plain):  # dense packing: every element, in order
        mask[:] = True
    return mask


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of ``estimate`` against ``truth``, peak = truth's range."""
    truth = np.asarray(truth, dtype=np.float64).ravel()
    mse = float(np.mean((np.asarray(estimate, dtype=np.float64).ravel() - truth) ** 2))
    peak = float(truth.max() - truth.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)

