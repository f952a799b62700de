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
    image_generator,
    initial_vectors,
    train_embeddings,
)
from privdiff.errors import PrivdiffError
from privdiff.io.batching import padded
from privdiff.models.protocol import SDBackend
from privdiff.models.training import encode_each
from privdiff.privacy.mechanism import bounded_sum, noisy_mean, poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.release.dp_params import DPParams, check_params, plan_release

log = logging.getLogger("privdiff")

MECHANISM = "DPAgg-TI: subsampled Gaussian mean of per-image textual-inversion embeddings"


@dataclass
class DPAggResult:
    """The released embedding, its report, and DPAgg's best-case signal-to-noise ratio."""

    embedding: Embedding
    report: PrivacyReport
    expected_snr: float | None


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
    partial = offsets_sum(per_image, center, clip_norm, bound)
    return noisy_embedding([partial], center, divisor=divisor, clip_norm=clip_norm,
                           noise_multiplier=noise_multiplier, rng=rng)


def offsets_sum(per_image: dict[str, torch.Tensor], center: dict[str, torch.Tensor], clip_norm: float,
                bound: str) -> torch.Tensor:
    """The float64 sum of the per-image offsets from ``center``, each (all encoders together) bounded to C."""
    keys = sorted(center)
    flat = torch.cat([(per_image[k] - center[k]).flatten(1) for k in keys], dim=1)
    return bounded_sum(flat, clip_norm, bound)


def noisy_embedding(
    partials: list[torch.Tensor], center: dict[str, torch.Tensor], *, divisor: float, clip_norm: float,
    noise_multiplier: float, rng: SecureRandom,
) -> dict[str, torch.Tensor]:
    """``center`` plus the noisy mean of the offsets whose bounded sums (one per rank) are ``partials``."""
    return around(center, noisy_mean(partials, clip_norm, noise_multiplier, divisor, rng))


def around(center: dict[str, torch.Tensor], mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """``center`` plus the flat float64 ``mean`` offset, split back into its encoders (float32)."""
    keys = sorted(center)
    parts = mean.to(torch.float32).split([center[k].numel() for k in keys])
    return {k: center[k] + part.view_as(center[k]) for k, part in zip(keys, parts, strict=True)}


def embedding_dim(init: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in init.values())


def public_progress(progress: Progress | None, public_total: int) -> Progress | None:
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


def draw_sample(n: int, sample_rate: float, rng: SecureRandom) -> tuple[list[int], bytes]:
    """The release's first draws from its CSPRNG: the Poisson sample of ``n`` images and the key of the
    per-image training streams (``image_generator``)."""
    return poisson_sample(n, sample_rate, rng).tolist(), rng.random_bytes(32)


def train_sampled(
    backend: SDBackend, images: torch.Tensor, indices: list[int], key: bytes, init: dict[str, torch.Tensor],
    config: TIConfig, progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """One embedding per row of ``images`` (the sampled images, dataset records ``indices``), each encoded and
    trained with its record's own stream: the same embedding whichever process trains it, in whatever order."""
    if not indices:
        return {k: torch.empty(0, *v.shape) for k, v in init.items()}
    streams = [image_generator(key, i) for i in indices]  # training randomness, not relied on by the guarantee
    latents = encode_each(backend, images, streams)
    return train_embeddings(backend, latents, init, config, streams, progress)


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
    snr = expected_snr(report.public_size, params.sample_rate, sigma, embedding_dim(init))
    rng = SecureRandom(seed)
    sampled, key = draw_sample(n, params.sample_rate, rng)
    public_total = max(1, math.ceil(params.sample_rate * report.public_size / config.batch_size)) * config.steps
    per_image = train_sampled(backend, images[sampled], sampled, key, init, config,
                              public_progress(progress, public_total))
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


def shapes_of(embedding: Embedding) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in embedding.vectors.items()}


def check_shapes(files: list[Path], embeddings: list[Embedding], shapes: dict, first: str) -> None:
    for path, emb in zip(files, embeddings, strict=True):
        if shapes_of(emb) != shapes:
            raise PrivdiffError(f"{path} has tensors {shapes_of(emb)}, expected {shapes} like {first}")


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
    return aggregate_loaded(load_per_image_files(files, params), params, center=center, center_name=center_name,
                            seed=seed, dataset_label=dataset_label, report=report)


def load_per_image_files(files: list[Path], params: DPParams) -> list[Embedding]:
    """The embeddings of ``files`` for one aggregate, all of one shape (checked with ``params`` before reading)."""
    if not files:
        raise PrivdiffError("no embedding files to aggregate")
    check_params(params, len(files))
    embeddings = [load_embedding(f) for f in files]
    check_shapes(files, embeddings, shapes_of(embeddings[0]), files[0].name)
    return embeddings


def aggregate_loaded(
    embeddings: list[Embedding],
    params: DPParams,
    *,
    center: Embedding | None = None,
    center_name: str | None = None,
    seed: int | None = None,
    dataset_label: str | None = None,
    report: PrivacyReport | None = None,
) -> DPAggResult:
    """The release of ``aggregate_embedding_files`` from per-image embeddings already loaded (all of one shape)."""
    if not embeddings:
        raise PrivdiffError("no embedding files to aggregate")
    check_params(params, len(embeddings))
    shapes = shapes_of(embeddings[0])
    if center is not None and shapes_of(center) != shapes:
        raise PrivdiffError(f"center {center_name or ''} is a {center.family} embedding with tensors "
                            f"{shapes_of(center)}, but the files are {embeddings[0].family} with {shapes}")
    if report is None:
        label = center_label(center_name) if center_name else ("a public embedding" if center is not None else "zero")
        report = plan_files_release(params, len(embeddings), label, seed=seed, dataset_label=dataset_label)
    origin = center.vectors if center else {k: torch.zeros(s) for k, s in shapes.items()}
    snr = expected_snr(report.public_size, params.sample_rate, report.noise_multiplier, embedding_dim(origin))
    rng = SecureRandom(seed)
    sampled = poisson_sample(len(embeddings), params.sample_rate, rng).tolist()
    per_image = {k: torch.stack([embeddings[i].vectors[k] for i in sampled]) if sampled
                 else torch.empty(0, *shapes[k]) for k in shapes}
    released = aggregate_embeddings(
        per_image, origin, divisor=params.sample_rate * report.public_size, clip_norm=params.clip_norm,
        noise_multiplier=report.noise_multiplier, rng=rng, bound=params.bound,
    )
    embedding = Embedding(vectors=released, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)
