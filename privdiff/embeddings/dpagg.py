"""DPAgg-TI (arXiv 2411.14639): per-image textual inversion, clipped and averaged with Gaussian noise.

One release of the subsampled Gaussian mechanism (docs/privacy.md): Poisson-sample the images with
rate q, train one embedding per sampled image, bound each offset from the public initialisation
to norm C, sum, add Gaussian noise of std σC and divide by a public expected count q·n. With a size n
the user declares public the guarantee is add-remove; otherwise n is the dataset's size N and the
guarantee (calibrated accordingly) is replace-one, under which N is public.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from privdiff.embeddings.files import Embedding, load_embedding
from privdiff.embeddings.textual_inversion import (
    Progress,
    TIConfig,
    initial_vectors,
    train_embeddings,
    training_generator,
)
from privdiff.errors import PrivdiffError
from privdiff.io.batching import padded
from privdiff.models.protocol import SDBackend
from privdiff.privacy import checks
from privdiff.privacy.accountants import ADD_REMOVE, REPLACE_ONE, calibrate_noise_multiplier, epsilon_for
from privdiff.privacy.mechanism import BOUNDS, gaussian_aggregate, poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport, make_report

log = logging.getLogger("privdiff")

MAX_RECORDS = 100_000  # <= mechanism.MAX_SUM_ROWS - 1: a neighbour's sum is still within the grid's slack
MECHANISM = "DPAgg-TI: subsampled Gaussian mean of per-image textual-inversion embeddings"


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


@dataclass
class DPAggResult:
    """The released embedding, its report, and DPAgg's best-case signal-to-noise ratio."""

    embedding: Embedding
    report: PrivacyReport
    expected_snr: float | None


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


def expected_snr(dataset_size: int, sample_rate: float, noise_multiplier: float, dim: int) -> float:
    """Best-case signal-to-noise ratio of the release, from public values only, with a warning when below 1.

    Per-image offsets all aligned at norm C give a mean of norm C; the noise added to the mean has std
    σC/(qn) per coordinate, norm about σC√d/(qn), for the public size n. Real offsets disagree, so the
    true ratio is lower.
    """
    snr = sample_rate * dataset_size / (noise_multiplier * math.sqrt(dim))
    if snr < 1:
        log.warning(
            "the release will be mostly noise: the best-case signal-to-noise ratio of the release is %.2f (noise "
            "std sigma*C/(q*n) = %.3g*C per coordinate over %d dimensions, for sigma %.3g, q %.3g and n %d, "
            "against a mean of norm at most C); add images, raise the sample rate or epsilon",
            snr, noise_multiplier / (sample_rate * dataset_size), dim, noise_multiplier, sample_rate, dataset_size,
        )
    return snr


def aggregate_embeddings(
    per_image: dict[str, torch.Tensor],
    center: dict[str, torch.Tensor],
    *,
    divisor: float,
    clip_norm: float,
    noise_multiplier: float,
    rng: SecureRandom,
    bound: str = "clip",
) -> dict[str, torch.Tensor]:
    """The noisy mean of per-image embeddings {enc: [m, n, dim]} around a public ``center``.

    The offsets of all encoders form one vector per image, so the bound C holds for the whole
    embedding (clip_l and clip_g together for SDXL). ``divisor`` is the public expected count q·n.
    """
    keys = sorted(center)
    flat = torch.cat([(per_image[k] - center[k]).flatten(1) for k in keys], dim=1)
    mean = gaussian_aggregate(flat, clip_norm, noise_multiplier, divisor, rng, bound=bound)
    parts = mean.split([center[k].numel() for k in keys])
    return {k: center[k] + part.view_as(center[k]) for k, part in zip(keys, parts, strict=True)}


def _embedding_dim(init: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in init.values())


def _public_progress(progress: Progress | None, public_total: int) -> Progress | None:
    """Progress rescaled to a public total: the bar shows neither N nor the sample size, only the pace."""
    if progress is None:
        return None
    return lambda done, total: progress(min(public_total, done * public_total // total), public_total)


def plan_dpagg_ti(
    params: DPParams, dataset_size: int, config: TIConfig, *, seed: int | None = None,
    dataset_label: str | None = None,
) -> PrivacyReport:
    """The report of a DPAgg-TI release (no model needed): one subsampled Gaussian release."""
    center = f"init word {config.init_word!r} ({config.n_vectors} vector(s)) of the model's token embeddings"
    return plan_release(MECHANISM, params, dataset_size, 1, center=center, dataset_label=dataset_label,
                        private=seed is None)


def run_dpagg_ti(
    backend: SDBackend,
    images: torch.Tensor,
    params: DPParams,
    config: TIConfig | None = None,
    *,
    seed: int | None = None,
    dataset_label: str | None = None,
    progress: Progress | None = None,
    report: PrivacyReport | None = None,
) -> DPAggResult:
    """Release one DP embedding from private ``images`` [N, 3, H, W] in 0..1.

    ``seed`` makes the run reproducible and marks the release as not private. ``report``: the release's
    report from ``plan_dpagg_ti`` when it was planned (and charged) before the model loaded. Progress runs
    to a public total, ceil(q·n / batch_size)·steps for the public size n, at the pace of the real work.
    """
    n = len(images)
    config = config or TIConfig()
    init = initial_vectors(backend, config)
    report = report or plan_dpagg_ti(params, n, config, seed=seed, dataset_label=dataset_label)
    sigma = report.noise_multiplier
    snr = expected_snr(report.public_size, params.sample_rate, sigma, _embedding_dim(init))
    rng = SecureRandom(seed)
    sampled = poisson_sample(n, params.sample_rate, rng)
    public_total = max(1, math.ceil(params.sample_rate * report.public_size / config.batch_size)) * config.steps
    if len(sampled):
        latents = encode_in_batches(backend, images[sampled], config.batch_size, training_generator(rng))
        streams = [training_generator(rng) for _ in sampled]  # training randomness, not relied on by the guarantee
        per_image = train_embeddings(backend, latents, init, config, streams, _public_progress(progress, public_total))
    else:
        per_image = {k: torch.empty(0, *v.shape) for k, v in init.items()}
    if progress is not None:
        progress(public_total, public_total)
    released = aggregate_embeddings(
        per_image, init, divisor=params.sample_rate * report.public_size, clip_norm=params.clip_norm,
        noise_multiplier=sigma, rng=rng, bound=params.bound,
    )
    embedding = Embedding(vectors=released, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)


@torch.no_grad()
def encode_in_batches(
    backend: SDBackend, images: torch.Tensor, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """VAE latents of ``images`` computed ``batch_size`` at a time (the last batch padded with dummies,
    ``privdiff.io.batching``), on the CPU."""
    latents = [
        backend.encode_images(padded(images[i:i + batch_size], batch_size).to(backend.device, backend.dtype),
                              generator)[:len(images[i:i + batch_size])]
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat([z.float().cpu() for z in latents])


FILES_MECHANISM = "subsampled Gaussian mean of per-image embedding files (one image per file)"


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def per_image_files(folder: str | Path) -> list[Path]:
    """The embedding files of ``folder`` for aggregation (the caller has confirmed one image per file)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PrivdiffError(f"embedding folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix in EMBEDDING_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise PrivdiffError(f"embedding folder {root} holds no .safetensors, .pt or .bin files")
    return files


def center_label(center_file: str | None) -> str:
    """How a report names the public centre of an aggregate: its file's name, or zero."""
    return f"public embedding file {Path(center_file).name}" if center_file else "zero"


def plan_files_release(
    params: DPParams, dataset_size: int, center: str, *, seed: int | None = None, dataset_label: str | None = None,
) -> PrivacyReport:
    """The report of an aggregate of per-image files; ``center`` describes the public centre (``center_label``)."""
    return plan_release(FILES_MECHANISM, params, dataset_size, 1, center=center, dataset_label=dataset_label,
                        private=seed is None)


def _shapes(embedding: Embedding) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in embedding.vectors.items()}


def aggregate_embedding_files(
    files: list[Path],
    params: DPParams,
    *,
    center: Embedding | None = None,
    center_name: str | None = None,
    seed: int | None = None,
    dataset_label: str | None = None,
    report: PrivacyReport | None = None,
) -> DPAggResult:
    """Aggregate per-image embedding files trained elsewhere, each from exactly one image.

    Offsets are taken from the public ``center`` (e.g. the init word's vectors; ``center_name`` names it
    in the report) or from zero. ``report``: from ``plan_files_release`` when planned before.
    """
    if not files:
        raise PrivdiffError("no embedding files to aggregate")
    check_params(params, len(files))
    embeddings = [load_embedding(f) for f in files]
    shapes = _shapes(embeddings[0])
    for path, emb in zip(files, embeddings, strict=True):
        if _shapes(emb) != shapes:
            raise PrivdiffError(f"{path} has tensors {_shapes(emb)}, expected {shapes} like {files[0].name}")
    if center is not None and _shapes(center) != shapes:
        raise PrivdiffError(f"center {center_name or ''} is a {center.family} embedding with tensors "
                            f"{_shapes(center)}, but the files are {embeddings[0].family} with {shapes}")
    if report is None:
        label = center_label(center_name) if center_name else ("a public embedding" if center is not None else "zero")
        report = plan_files_release(params, len(files), label, seed=seed, dataset_label=dataset_label)
    origin = center.vectors if center else {k: torch.zeros(s) for k, s in shapes.items()}
    snr = expected_snr(report.public_size, params.sample_rate, report.noise_multiplier, _embedding_dim(origin))
    rng = SecureRandom(seed)
    sampled = poisson_sample(len(files), params.sample_rate, rng).tolist()
    per_image = {k: torch.stack([embeddings[i].vectors[k] for i in sampled]) if sampled
                 else torch.empty(0, *shapes[k]) for k in shapes}
    released = aggregate_embeddings(
        per_image, origin, divisor=params.sample_rate * report.public_size, clip_norm=params.clip_norm,
        noise_multiplier=report.noise_multiplier, rng=rng, bound=params.bound,
    )
    embedding = Embedding(vectors=released, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)
