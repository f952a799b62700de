"""The one subsampled Gaussian mechanism (docs/privacy.md): bound, Poisson-sample, sum, add noise.

Every DP feature (DPAgg-TI, DP guidance targets, the aggregate command) goes through ``gaussian_aggregate``,
and every noise draw, DP-SGD's included, through ``noisy_sum``; the accounting is
``accountants.epsilon_for(sigma, q, steps, delta)``. All randomness the guarantee relies on comes from a
``SecureRandom`` (ChaCha20 keyed with 256 bits): Poisson sampling compares 64-bit words with q exactly.

Noise on a grid (``noisy_sum``). Floating-point Gaussian noise leaks through its low bits (Mironov 2012), so
the noisy sum is computed on a fixed grid gamma = 2**(floor(log2 C) - b), a power of two depending only on the
public C and sigma (b = 30, fewer for sigma > 2**10 so that the noise stays below 2**42 grid steps):

1. ``total`` (float64) is snapped to the nearest multiple of gamma, coordinate-wise, as an int64 count of steps;
2. the grid noise Z ~ N_Z(0, s^2 I), s = sigma C' / gamma, is the exact discrete Gaussian (CKS 2020),
   with C' = C + 2 gamma sqrt(d);
3. the result gamma (snapped + Z) is returned in float64: exact multiples of gamma whose every bit is a
   function of the exact integer snapped + Z, so nothing finer than the grid is released.

What the grid proves: neighbouring sums of rows of norm <= C
differ by at most C. ``total`` is summed in float64 by ``pairwise_sum`` (a binary tree of depth L = ceil(log2 m)
over m rows): for the correctly rounded products w_b x_b and additions, each coordinate errs by at most
gamma_{L+1} sum_b |w_b x_b| <= gamma_{L+1} m C, gamma_n = n u / (1 - n u), u = 2**-53 (Higham 2002, Accuracy and
Stability of Numerical Algorithms, (3.4) and (4.6)). Since gamma = 2**(floor(log2 C) - b) > 2**-31 C, this is
below gamma/2 while (L + 1) m u <= 2**-32, i.e. for m <= MAX_SUM_ROWS = 116,000 rows (at most 0.87 gamma/2 at the
100,000 records a release accepts, ``privdiff.release.dp_params.MAX_RECORDS``). Snapping moves each coordinate by
at most gamma/2, so neighbouring snapped sums differ by an integer vector D of L2 norm at most
(C + 2 gamma sqrt(d)) / gamma = C' / gamma. Z is the discrete Gaussian with noise multiplier exactly sigma on that
sensitivity. For an integer shift
its Renyi divergences of every order are at most the continuous Gaussian's (CKS 2020): the unsampled release's
RDP and zCDP are proven; docs/privacy.md ("Discrete noise, continuous accounting") says what that covers of the
accountants' subsampled (eps, delta) and what is argued rather than proven.
The slack 2 gamma sqrt(d) adds a relative 2**-29 sqrt(d) to the noise (2**-22 for d = 16384).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from privdiff.errors import PrivdiffError
from privdiff.privacy import checks
from privdiff.privacy.device_noise import DeviceNoise
from privdiff.privacy.randomness import NoiseAhead, SecureRandom

log = logging.getLogger("privdiff")

BOUNDS = ("clip", "normalize")
GRID_BITS = 30  # gamma = 2**(floor(log2 C) - GRID_BITS) for sigma <= 2**10
_GRID_NOISE_BITS = 40  # coarser grids for larger sigma keep the grid noise s below about 2**42
_NORM_CHUNK = 1024  # clipped_sum's norms: columns per chunk, small enough for a 2**-20 error bound in float32
_SUM_BLOCK = 8192  # clipped_sum's float64 sums: columns converted at a time
MAX_SUM_ROWS = 116_000  # the largest m with (ceil(log2 m) + 1) m 2**-53 <= 2**-32: pairwise_sum's error < gamma/2
_MAX_STEPS = 2**62  # snapped sums are clamped to +-2**62 steps (1-Lipschitz: the sensitivity is kept)


def _check_noise_source(rng: object) -> SecureRandom | NoiseAhead | DeviceNoise:
    return rng if isinstance(rng, NoiseAhead | DeviceNoise) else _check_rng(rng)


def _check_rng(rng: object) -> SecureRandom:
    if not isinstance(rng, SecureRandom):
        raise PrivdiffError(f"rng must be a SecureRandom, got {type(rng).__name__}")
    return rng


def bound_vectors(vectors: Tensor, clip_norm: float, bound: str = "clip") -> Tensor:
    """Bound each row (first dim; L2 norm over all other dims) to norm ``clip_norm``, in float64.

    ``"clip"`` scales rows with a larger norm down to ``clip_norm``; ``"normalize"`` scales every row to
    ``clip_norm``. Rows holding NaN/inf (and all-zero rows for ``"normalize"``) become the zero vector, with one
    warning giving their count (never which rows). Returns a new float64 tensor of the input's shape whose
    row norms, as computed in float64, never exceed ``clip_norm``.
    """
    c = checks.positive("clip_norm", clip_norm)
    if bound not in BOUNDS:
        raise PrivdiffError(f"bound={bound!r} is not one of {', '.join(BOUNDS)}")
    _check_vectors(vectors)
    rows = vectors.shape[0]
    flat = vectors.reshape(rows, math.prod(vectors.shape[1:])).to(torch.float64)
    bad = ~torch.isfinite(flat).all(dim=1)
    flat = torch.where(bad[:, None], 0.0, flat)
    norms = flat.norm(dim=1)
    out = flat * _row_scales(norms, bad, c, bound)[:, None]
    for _ in range(64):  # rounding can leave a norm a few ulps above C: shrink those rows by ~4 ulps
        over = out.norm(dim=1) > c
        if not bool(over.any()):
            break
        out[over] *= 1 - 2.0**-50
    return out.reshape(vectors.shape)


def clipped_sum(parts: Sequence[Tensor], clip_norm: float) -> list[Tensor]:
    """Sum of rows clipped to L2 norm ``clip_norm``, where row b is the concatenation of ``parts[k][b]``.

    For per-sample gradients kept per parameter ([B, *shape] each), without concatenating them. Each row is
    scaled by min(1, C / N) (1 - 2**-50), where N >= the row's exact norm is a rigorous bound from
    ``_row_norm_bounds``, so every scaled row's exact norm is <= C; the scaled rows are summed in float64 (one
    sum per part, shapes ``parts[k].shape[1:]``, by ``pairwise_sum_``), with the rounding ``noisy_sum`` allows
    (at most ``MAX_SUM_ROWS`` rows). Rows holding NaN/inf count as zero, with one warning giving their count.
    """
    c = checks.positive("clip_norm", clip_norm)
    if not parts:
        raise PrivdiffError("clipped_sum needs at least one part")
    for part in parts:
        _check_vectors(part)
    rows = parts[0].shape[0]
    if any(part.shape[0] != rows for part in parts):
        raise PrivdiffError(f"parts disagree on the number of rows: {[part.shape[0] for part in parts]}")
    _check_rows(rows)
    flats = [part.reshape(rows, math.prod(part.shape[1:])) for part in parts]
    norms, bad = _row_norm_bounds(flats)
    scales = _row_scales(norms, bad, c, "clip") * (1 - 2.0**-50)
    if bool(bad.any()):  # 0 * NaN is NaN: leave those rows out rather than scale them by 0
        flats, scales = [f[~bad] for f in flats], scales[~bad]
    return [_weighted_rows(f, scales).view(part.shape[1:]) for f, part in zip(flats, parts, strict=True)]


def _row_norm_bounds(flats: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Float64 upper bounds on the exact L2 norms of the rows of the concatenated ``flats``, and which rows hold
    NaN/inf.

    Squares are summed per chunk of 1024 columns (each part's last, partial chunks together, zero-padded) in the
    parts' own precision (float32 and wider) by pairwise addition (``_halving_sums_``: about 11 roundoffs for 1024
    terms, 2**-20 in float32, plus 2 * 1024 * 2**-149 from underflow), and the chunks' sums added in float64
    (relative error below 2**-20 for d < 2**40 coordinates): S <= (1 + 2**-11) sum_chunks s_chunk + d 2**-148.
    Every step is elementwise, so a row's bound does not depend on the other rows or their number (a reduction
    kernel may pick its order by shape). Rows whose float32 sums overflow are recomputed in float64.
    """
    rows = flats[0].shape[0]
    squares = torch.zeros(rows, dtype=torch.float64, device=flats[0].device)
    tails = []
    for f in flats:
        f = f if f.dtype in (torch.float32, torch.float64) else f.float()
        whole = f.shape[1] - f.shape[1] % _NORM_CHUNK
        if whole:
            squares += _chunk_square_sums(f[:, :whole])
        tails.append(f[:, whole:])
    tail = torch.cat(tails, dim=1)  # every part's last, partial chunk together, zero-padded to whole chunks
    squares += _chunk_square_sums(torch.cat([tail, tail.new_zeros(rows, -tail.shape[1] % _NORM_CHUNK)], dim=1))
    d = sum(f.shape[1] for f in flats)
    bounds = (squares * (1 + 2.0**-11) + d * 2.0**-148).sqrt() * (1 + 2.0**-50)
    bad = torch.zeros(rows, dtype=torch.bool, device=bounds.device)
    for i in torch.nonzero(~torch.isfinite(bounds)).flatten().tolist():  # NaN/inf, or a float32 overflow
        row = torch.cat([f[i].to(torch.float64) for f in flats])
        bad[i] = not bool(torch.isfinite(row).all())
        bounds[i] = _square_sums(row).sqrt() * (1 + 2.0**-40) if not bad[i] else 1.0
    return bounds, bad


def _chunk_square_sums(f: Tensor) -> Tensor:
    """Float64 [rows]: the sums of squares of ``f``'s rows (columns a multiple of 1024), per 1024-column chunk by
    ``_square_sums`` and over the chunks by ``pairwise_sum_``, a block of columns at a time (one buffer)."""
    rows, n = f.shape
    out = torch.zeros(rows, dtype=torch.float64, device=f.device)
    buffer = torch.empty(rows * min(n, _SUM_BLOCK), dtype=f.dtype, device=f.device)
    for j in range(0, n, _SUM_BLOCK):
        block = f[:, j:min(j + _SUM_BLOCK, n)].unflatten(1, (-1, _NORM_CHUNK))
        squares = torch.mul(block, block, out=buffer[:block.numel()].view(block.shape))
        out += pairwise_sum_(_halving_sums_(squares).to(torch.float64).T.contiguous())
    return out


def _square_sums(columns: Tensor) -> Tensor:
    """The sums of squares over the last dim, by pairwise addition of elementwise squares (a binary tree whose shape
    depends on the last dim's length alone), so each result depends on its own entries only, on any device."""
    return _halving_sums_(columns.square())


def _halving_sums_(terms: Tensor) -> Tensor:
    """The sums over the last dim of ``terms`` (overwritten) by pairwise addition, as ``pairwise_sum_`` does."""
    n = terms.shape[-1]
    while n > 1:
        half = n // 2
        terms[..., :half] += terms[..., half:2 * half]
        if n % 2:
            terms[..., half] = terms[..., 2 * half]
        n -= half
    return terms[..., 0].clone()


def _weighted_rows(flat: Tensor, weights: Tensor) -> Tensor:
    """sum_b weights[b] flat[b] in float64 by ``pairwise_sum``, converting ``flat`` a block of columns at a time
    (no full copy)."""
    rows, n = flat.shape
    out = torch.empty(n, dtype=torch.float64, device=flat.device)
    block = torch.empty(rows, min(n, _SUM_BLOCK), dtype=torch.float64, device=flat.device)
    for j in range(0, n, _SUM_BLOCK):
        width = min(_SUM_BLOCK, n - j)
        columns = block[:, :width]
        columns.copy_(flat[:, j:j + width])
        columns.mul_(weights[:, None])
        out[j:j + width] = pairwise_sum_(columns)
    return out


def pairwise_sum_(rows: Tensor) -> Tensor:
    """The sum over the first dim of ``rows`` (float64, overwritten), by pairwise addition: a binary tree of depth
    ceil(log2 m), so each coordinate errs by at most gamma_{ceil(log2 m)} times the sum of its |terms|.

    Every step is an elementwise, correctly rounded addition whose order depends on m alone (unlike BLAS or
    torch reductions, whose order is theirs to choose). Returns a new tensor of shape ``rows.shape[1:]``.
    """
    if rows.dtype != torch.float64:
        raise PrivdiffError(f"pairwise_sum_ needs float64 rows, got {rows.dtype}")
    m = rows.shape[0]
    if m == 0:
        return torch.zeros(rows.shape[1:], dtype=torch.float64, device=rows.device)
    while m > 1:
        half = m // 2
        rows[:half] += rows[half:2 * half]
        if m % 2:
            rows[half] = rows[2 * half]
        m -= half
    return rows[0].clone()


def _row_scales(norms: Tensor, bad: Tensor, c: float, bound: str) -> Tensor:
    """Per-row factors bounding rows of float64 ``norms`` to ``c``; rows flagged ``bad`` (and rows whose norm is
    not finite, or zero under "normalize") get 0, with one warning giving their count (never which rows)."""
    bad = bad | ~torch.isfinite(norms)  # finite entries whose norm overflows float64
    if bound == "normalize":
        bad |= norms == 0
    scale = c / torch.where(bad, 1.0, norms)
    if bound == "clip":
        scale = scale.clamp(max=1.0)  # a zero row gives inf, clamped to 1
    replaced = int(bad.sum())
    if replaced:
        what = "were all zero or held NaN/inf" if bound == "normalize" else "held NaN/inf"
        log.warning("%d of %d vectors %s and were replaced by the zero vector", replaced, len(norms), what)
    return torch.where(bad, 0.0, scale)


def poisson_sample(n: int, sample_rate: float, rng: SecureRandom) -> Tensor:
    """Indices (long, CPU, increasing) of a Poisson sample: each of ``n`` records kept with probability q."""
    n = checks.count("n", n, minimum=0)
    q = checks.sample_rate(sample_rate)
    keep = _check_rng(rng).bernoulli(n, q)
    return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))


def noise_grid(clip_norm: float, noise_multiplier: float) -> float:
    """The grid gamma of ``noisy_sum``: a power of two set by the public C and sigma only."""
    c = checks.positive("clip_norm", clip_norm)
    sigma = checks.positive("noise_multiplier", noise_multiplier)
    bits = min(GRID_BITS, max(0, _GRID_NOISE_BITS - max(0, math.ceil(math.log2(sigma)))))
    return math.ldexp(1.0, math.frexp(c)[1] - 1 - bits)


def noisy_sum(total: Tensor, clip_norm: float, noise_multiplier: float,
              rng: SecureRandom | NoiseAhead | DeviceNoise) -> Tensor:
    """``total`` plus discrete Gaussian noise of std about sigma * C, on the grid ``noise_grid(C, sigma)``.

    ``total`` must be a float64-computed sum of rows of norm <= ``clip_norm`` (its L2 sensitivity). Returns
    float64 exact multiples of the grid, of ``total``'s shape and device. See the module docstring for the
    design and what the accountant's (eps, delta) for noise multiplier sigma rests on.
    """
    c = checks.positive("clip_norm", clip_norm)
    sigma = checks.positive("noise_multiplier", noise_multiplier)
    rng = _check_noise_source(rng)
    if not isinstance(total, Tensor) or not total.is_floating_point():
        raise PrivdiffError("total must be a floating-point torch tensor")
    if not bool(torch.isfinite(total).all()):
        raise PrivdiffError("total contains NaN or inf")
    gamma = noise_grid(c, sigma)
    d = total.numel()
    # C' / gamma = C / gamma + 2 sqrt(d), rounded up so the noise is never below sigma * C'.
    grid_sigma = sigma * (c / gamma + 2 * math.sqrt(d)) * (1 + 2.0**-40)
    steps = torch.round(total.to(torch.float64) / gamma).clamp(-_MAX_STEPS, _MAX_STEPS).to(torch.int64)
    drawn = rng.discrete_gaussian(d, grid_sigma)
    noise = (drawn if isinstance(drawn, Tensor) else torch.from_numpy(drawn)).to(steps.device).view(steps.shape)
    return (steps + noise).to(torch.float64) * gamma


def gaussian_aggregate(
    vectors: Tensor,
    clip_norm: float,
    noise_multiplier: float,
    divisor: float,
    rng: SecureRandom,
    bound: str = "clip",
) -> Tensor:
    """DP mean of the rows of ``vectors``: bound each to ``clip_norm`` and sum (float64, ``pairwise_sum_``),
    ``noisy_sum`` (noise std sigma * C), divide by the public ``divisor`` (e.g. q * N).

    ``vectors`` [m, ...] are the sampled rows (m may be 0, at most ``MAX_SUM_ROWS``); the result has shape
    ``vectors.shape[1:]``, the input's dtype and device. A bounded row's float64-computed norm is <= C, so its exact
    norm is <= C (1 + (d/2 + 2) u) (Higham (3.4)): the excess over C is covered by the 0.13 gamma/2 per coordinate
    that the sum's error leaves of the grid's slack, for any d below 10**11.
    """
    checks.positive("noise_multiplier", noise_multiplier)
    checks.positive("divisor", divisor)
    _check_rng(rng)
    total = bounded_sum(vectors, clip_norm, bound)
    return noisy_mean([total], clip_norm, noise_multiplier, divisor, rng).to(vectors.dtype)


def bounded_sum(vectors: Tensor, clip_norm: float, bound: str = "clip") -> Tensor:
    """The float64 sum of the rows of ``vectors`` [m, ...] bounded to ``clip_norm`` (``bound_vectors``), by
    ``pairwise_sum_``: shape ``vectors.shape[1:]``. One rank's part of a distributed sum (``noisy_mean``)."""
    _check_rows(vectors.shape[0] if isinstance(vectors, Tensor) and vectors.dim() else 0)
    bounded = bound_vectors(vectors, clip_norm, bound)
    return pairwise_sum_(bounded.reshape(len(bounded), math.prod(vectors.shape[1:]))).view(vectors.shape[1:])


def noisy_mean(
    partials: Sequence[Tensor], clip_norm: float, noise_multiplier: float, divisor: float, rng: SecureRandom,
) -> Tensor:
    """``noisy_sum`` of the float64 ``partials`` (``bounded_sum`` of each rank's rows) added by ``pairwise_sum_``,
    divided by the public ``divisor``; float64.

    Each rank's rows are summed by a tree of depth ceil(log2 m_r), their sums by one of depth ceil(log2 W): the
    whole is a summation tree of depth D = max_r ceil(log2 m_r) + ceil(log2 W), so each coordinate errs by at most
    gamma_{D+1} m C. With the ranks' public slices of the dataset (``privdiff.privacy.distributed.shares``: m_r <=
    ceil(n/W)), D <= ceil(log2 n) + 2, and (D + 1) m u <= 0.91 * 2**-32 for every n <= 100,000 records (checked for
    every n and W <= 1024 by the tests): the error stays below gamma/2, and the 0.09 gamma/2 it leaves still covers a
    bounded row's excess norm for d below 10**11 (docs/privacy.md, "Across ranks"). One process is W = 1.
    """
    sigma = checks.positive("noise_multiplier", noise_multiplier)
    count = checks.positive("divisor", divisor)
    _check_rng(rng)
    if not partials:
        raise PrivdiffError("noisy_mean needs at least one partial sum")
    total = pairwise_sum_(torch.stack([p.to(torch.float64) for p in partials]))
    return noisy_sum(total, clip_norm, sigma, rng) / count


def _check_rows(rows: int) -> None:
    # Callers cap the records of a release (``privdiff.release.dp_params.MAX_RECORDS``) before sampling; this keeps
    # the sum's proof.
    if rows > MAX_SUM_ROWS:
        raise PrivdiffError(f"{rows} rows are over the {MAX_SUM_ROWS} whose float64 sum the noise's grid covers")


def _check_vectors(vectors: Tensor) -> None:
    if not isinstance(vectors, Tensor):
        raise PrivdiffError(f"vectors must be a torch tensor, got {type(vectors).__name__}")
    if vectors.dim() < 1:
        raise PrivdiffError("vectors must have a leading row dimension, got a 0-d tensor")
    if not vectors.is_floating_point():
        raise PrivdiffError(f"vectors must be floating point, got dtype {vectors.dtype}")
