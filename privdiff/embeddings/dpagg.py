"""DPAgg-TI (arXiv 2411.14639): per-image textual inversion, clipped and averaged with Gaussian noise.

One release of the subsampled Gaussian mechanism (DESIGN.md §3): Poisson-sample the images with
rate q, train one embedding per sampled image, bound each offset from the public initialisation
to norm C, sum, add N(0, σ²C²I) and divide by the public expected count q·N.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privdiff.backends.protocol import SDBackend
from privdiff.embeddings.files import Embedding, load_embedding
from privdiff.embeddings.textual_inversion import Progress, TIConfig, initial_vectors, train_embeddings
from privdiff.errors import PrivdiffError
from privdiff.privacy.accountants import calibrate_noise_multiplier, epsilon_for
from privdiff.privacy.mechanism import BOUNDS, gaussian_aggregate, poisson_sample, secure_generator
from privdiff.privacy.report import PrivacyReport, make_report

log = logging.getLogger("privdiff")

MECHANISM = "DPAgg-TI: subsampled Gaussian mean of per-image textual-inversion embeddings"


@dataclass(frozen=True)
class DPParams:
    """The privacy parameters of one release: a target ε, or a noise multiplier whose ε is reported."""

    epsilon: float | None
    delta: float
    sample_rate: float = 1.0
    clip_norm: float = 1.0
    bound: str = "clip"
    accountant: str | None = None
    noise_multiplier: float | None = None


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


def plan_release(
    mechanism: str,
    params: DPParams,
    dataset_size: int,
    steps: int,
    *,
    dataset_label: str | None = None,
    private: bool = True,
) -> PrivacyReport:
    """Check the budget, fix σ and ε for ``steps`` compositions and write the release's report.

    σ is calibrated for the target ε, or, when ``params.noise_multiplier`` is given, ε is computed.
    """
    check_budget(params.epsilon, params.delta, dataset_size)
    if params.bound not in BOUNDS:
        raise PrivdiffError(f"bound {params.bound!r} is not one of {', '.join(BOUNDS)}")
    if params.noise_multiplier is not None:
        sigma = params.noise_multiplier
        accountant, epsilon = epsilon_for(
            sigma, params.sample_rate, steps, params.delta, accountant=params.accountant
        )
    elif params.epsilon is not None:
        epsilon = params.epsilon
        accountant, sigma = calibrate_noise_multiplier(
            epsilon, params.delta, params.sample_rate, steps, accountant=params.accountant
        )
    else:
        raise PrivdiffError("give a target epsilon or a noise multiplier")
    return make_report(
        mechanism=mechanism, epsilon=epsilon, delta=params.delta, noise_multiplier=sigma,
        sample_rate=params.sample_rate, clip_norm=params.clip_norm, steps=steps, accountant=accountant,
        dataset_size=dataset_size, dataset_label=dataset_label, private=private,
    )


def expected_snr(dataset_size: int, sample_rate: float, noise_multiplier: float, dim: int) -> float:
    """Best-case signal-to-noise ratio of the release, with a warning when it is below 1.

    Per-image offsets all aligned at norm C give a mean of norm C; the noise added to the mean has
    norm about σC√d/(qN). Real offsets disagree, so the true ratio is lower.
    """
    snr = sample_rate * dataset_size / (noise_multiplier * math.sqrt(dim))
    if snr < 1:
        log.warning(
            "only %d images for noise multiplier %.3g over %d dimensions: the best-case signal-to-noise "
            "ratio of the release is %.2f, so it will be mostly noise; add images or raise epsilon",
            dataset_size, noise_multiplier, dim, snr,
        )
    return snr


def aggregate_embeddings(
    per_image: dict[str, torch.Tensor],
    center: dict[str, torch.Tensor],
    *,
    dataset_size: int,
    sample_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    bound: str = "clip",
) -> dict[str, torch.Tensor]:
    """The noisy mean of per-image embeddings {enc: [m, n, dim]} around a public ``center``.

    The offsets of all encoders form one vector per image, so the bound C holds for the whole
    embedding (clip_l and clip_g together for SDXL).
    """
    keys = sorted(center)
    flat = torch.cat([(per_image[k] - center[k]).flatten(1) for k in keys], dim=1)
    mean = gaussian_aggregate(
        flat, clip_norm, noise_multiplier, sample_rate * dataset_size, generator, bound=bound
    )
    parts = mean.split([center[k].numel() for k in keys])
    return {k: center[k] + part.view_as(center[k]) for k, part in zip(keys, parts, strict=True)}


def _embedding_dim(init: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in init.values())


def run_dpagg_ti(
    backend: SDBackend,
    images: torch.Tensor,
    params: DPParams,
    config: TIConfig | None = None,
    *,
    seed: int | None = None,
    dataset_label: str | None = None,
    progress: Progress | None = None,
    before_training: Callable[[PrivacyReport], None] | None = None,
) -> DPAggResult:
    """Release one DP embedding from private ``images`` [N, 3, H, W] in 0..1.

    ``seed`` makes the run reproducible and marks the release as not private.
    ``before_training`` sees the release's report before any work (e.g. a budget check).
    """
    n = len(images)
    config = config or TIConfig()
    report = plan_release(MECHANISM, params, n, 1, dataset_label=dataset_label, private=seed is None)
    sigma = report.noise_multiplier
    if before_training is not None:
        before_training(report)
    init = initial_vectors(backend, config)
    snr = expected_snr(n, params.sample_rate, sigma, _embedding_dim(init))
    generator = secure_generator(seed)
    sampled = poisson_sample(n, params.sample_rate, generator)
    # Training streams are derived from the (secure or reproducible) release generator.
    streams = [secure_generator(int(torch.randint(2**62, (), generator=generator))) for _ in sampled]
    if len(sampled):
        latents = encode_in_batches(backend, images[sampled], config.batch_size, generator)
        per_image = train_embeddings(backend, latents, init, config, streams, progress)
    else:
        per_image = {k: torch.empty(0, *v.shape) for k, v in init.items()}
    released = aggregate_embeddings(
        per_image, init, dataset_size=n, sample_rate=params.sample_rate, clip_norm=params.clip_norm,
        noise_multiplier=sigma, generator=generator, bound=params.bound,
    )
    embedding = Embedding(vectors=released, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)


@torch.no_grad()
def encode_in_batches(
    backend: SDBackend, images: torch.Tensor, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """VAE latents of ``images`` computed ``batch_size`` at a time, on the CPU."""
    latents = [
        backend.encode_images(images[i:i + batch_size].to(backend.device, backend.dtype), generator)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat([z.float().cpu() for z in latents])


FILES_MECHANISM = "subsampled Gaussian mean of per-image embedding files (one image per file)"


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def per_image_files(folder: str | Path, one_image_per_file: bool) -> list[Path]:
    """The embedding files of ``folder`` for aggregation; the user must confirm one image per file."""
    if not one_image_per_file:
        raise PrivdiffError("the guarantee needs each file to come from exactly one image: "
                            "confirm with --one-image-per-file (one_image_per_file)")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PrivdiffError(f"embedding folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix in EMBEDDING_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise PrivdiffError(f"embedding folder {root} holds no .safetensors, .pt or .bin files")
    return files


def aggregate_embedding_files(
    files: list[Path],
    params: DPParams,
    *,
    center: Embedding | None = None,
    seed: int | None = None,
    dataset_label: str | None = None,
    before_training: Callable[[PrivacyReport], None] | None = None,
) -> DPAggResult:
    """Aggregate per-image embedding files trained elsewhere, each from exactly one image.

    Offsets are taken from the public ``center`` (e.g. the init word's vectors) or from zero.
    """
    embeddings = [load_embedding(f) for f in files]
    if not embeddings:
        raise PrivdiffError("no embedding files to aggregate")
    reference = center or embeddings[0]
    shapes = {k: tuple(v.shape) for k, v in reference.vectors.items()}
    for path, emb in zip(files, embeddings, strict=True):
        got = {k: tuple(v.shape) for k, v in emb.vectors.items()}
        if got != shapes:
            raise PrivdiffError(f"{path} has tensors {got}, expected {shapes} like the others")
    report = plan_release(FILES_MECHANISM, params, len(files), 1, dataset_label=dataset_label,
                          private=seed is None)
    if before_training is not None:
        before_training(report)
    origin = center.vectors if center else {k: torch.zeros(s) for k, s in shapes.items()}
    snr = expected_snr(len(files), params.sample_rate, report.noise_multiplier, _embedding_dim(origin))
    generator = secure_generator(seed)
    sampled = poisson_sample(len(files), params.sample_rate, generator).tolist()
    per_image = {k: torch.stack([embeddings[i].vectors[k] for i in sampled]) if sampled
                 else torch.empty(0, *shapes[k]) for k in shapes}
    released = aggregate_embeddings(
        per_image, origin, dataset_size=len(files), sample_rate=params.sample_rate,
        clip_norm=params.clip_norm, noise_multiplier=report.noise_multiplier, generator=generator,
        bound=params.bound,
    )
    embedding = Embedding(vectors=released, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)
