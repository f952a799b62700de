"""DP style targets: the noisy mean of the private images' unit CLIP image embeddings, and its file.

One release of the project's subsampled Gaussian mechanism (``gaussian_aggregate``): Poisson-sample
the images (rate q), embed each with the image encoder, normalise each embedding to unit norm (the
bound, C = 1), sum, add noise of std σ, divide by the public expected count q·n. Renormalising the
released vector to unit length is post-processing. The file holds that unit vector and the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import atomic_write
from privdiff.io.batching import padded
from privdiff.io.images import PrivateFiles
from privdiff.io.untrusted import regular_file
from privdiff.models.image_encoders import ImageEncoder
from privdiff.privacy.distributed import Share, World, aggregate_across_ranks
from privdiff.privacy.mechanism import bounded_sum, gaussian_aggregate, poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams, plan_release

MECHANISM = "DP style target: subsampled Gaussian mean of unit CLIP image embeddings"
TENSOR = "target"
ENCODER_KEY = "privdiff_image_encoder"
MAX_TARGET_BYTES = 1 << 22  # a target is one float32 vector (CLIP widths are 512 to 1280) and its header
MAX_ENCODER_NAME = 200


@dataclass(frozen=True)
class StyleTarget:
    """A released unit vector in an image encoder's embedding space, with its report."""

    vector: torch.Tensor
    """float32 [D], unit norm."""
    encoder: str
    """The identity of the encoder it was made with (``ImageEncoder.identity``)."""
    report: PrivacyReport


def plan_target(params: DPParams, dataset_size: int, encoder: str, *, seed: int | None = None,
                dataset_label: str | None = None) -> PrivacyReport:
    """The report of a target release (no model needed). The bound is always unit normalisation (C = 1)."""
    if params.clip_norm != 1.0 or params.bound != "normalize":
        raise PrivdiffError("a style target normalises every embedding to unit norm: clip_norm must be 1 and bound "
                            f"'normalize' (got {params.clip_norm}, {params.bound!r})")
    center = f"none: unit-normalised image embeddings of {encoder}"
    return plan_release(MECHANISM, params, dataset_size, 1, center=center, dataset_label=dataset_label,
                        private=seed is None)


def target_params(epsilon: float | None, delta: float, sample_rate: float = 1.0, **extra) -> DPParams:
    """DPParams for a target: unit normalisation is the bound."""
    return DPParams(epsilon=epsilon, delta=delta, sample_rate=sample_rate, clip_norm=1.0, bound="normalize", **extra)


@torch.no_grad()
def embed_in_batches(encoder: ImageEncoder, images: torch.Tensor, batch_size: int = 16,
                     progress: Progress | None = None) -> torch.Tensor:
    """Embeddings [N, D] (float64, CPU) of images [N,3,H,W] in 0..1, ``batch_size`` at a time (the last batch
    padded with dummies, ``privdiff.io.batching``)."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        out.append(encoder.embed(padded(batch, batch_size))[:len(batch)].double().cpu())
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    return torch.cat(out) if out else torch.empty(0, encoder.dim, dtype=torch.float64)


def make_target(
    encoder: ImageEncoder,
    images: torch.Tensor,
    params: DPParams,
    *,
    seed: int | None = None,
    dataset_label: str | None = None,
    report: PrivacyReport | None = None,
    progress: Progress | None = None,
) -> StyleTarget:
    """Release a DP style target from private ``images`` [N,3,H,W] in 0..1.

    ``seed`` makes the run reproducible and marks it not private; ``report`` is the plan made (and charged)
    before the encoder loaded. Progress counts the sampled images embedded.
    """
    report = report or plan_target(params, len(images), encoder.identity, seed=seed, dataset_label=dataset_label)
    mean = noisy_mean(encoder, images, params.sample_rate, report, SecureRandom(seed), progress)
    return StyleTarget(vector=unit(mean).float(), encoder=encoder.identity, report=report)


def noisy_mean(encoder: ImageEncoder, images: torch.Tensor, sample_rate: float, report: PrivacyReport,
               rng: SecureRandom, progress: Progress | None = None) -> torch.Tensor:
    """The mechanism's output before renormalising: Σ unit(E(x_i)) over the sampled images, plus noise of std
    σ, divided by q·n (float64 [D])."""
    sampled = poisson_sample(len(images), sample_rate, rng)
    embeddings = embed_in_batches(encoder, images[sampled], progress=progress) if len(sampled) else \
        torch.empty(0, encoder.dim, dtype=torch.float64)
    return gaussian_aggregate(embeddings, 1.0, report.noise_multiplier, sample_rate * report.public_size, rng,
                              bound="normalize")


def make_target_ranks(
    world: World,
    load_encoder: Callable[[], ImageEncoder],
    *,
    encoder: ImageEncoder | None = None,
    private: PrivateFiles | None = None,
    params: DPParams | None = None,
    seed: int | None = None,
    report: PrivacyReport | None = None,
    progress: Progress | None = None,
) -> StyleTarget | None:
    """``make_target`` across the ranks of ``world`` (``aggregate_across_ranks``): rank 0 passes its ``encoder``,
    the files (read once: each rank gets its slice's bytes as charged), parameters and report; every rank loads
    the encoder (refused if its identity is not rank 0's), decodes its whole slice, embeds its sampled images and
    sends the float64 sum of their unit embeddings. The same release as one process with the same seed, to the
    rounding of the float64 sum. Returns the target on rank 0, None elsewhere."""
    leader = {}
    if world.leader:
        leader = {"records": private.subset, "n": len(private), "sample_rate": params.sample_rate, "seed": seed,
                  "settings": encoder.identity, "clip_norm": 1.0, "noise_multiplier": report.noise_multiplier,
                  "divisor": params.sample_rate * report.public_size}

    def prepare(share: Share) -> tuple[ImageEncoder, torch.Tensor]:
        mine = encoder if world.leader else load_encoder()
        if mine.identity != share.settings:
            raise PrivdiffError(f"image encoder '{mine.identity}' is not rank 0's '{share.settings}'")
        images = share.records.load(mine.size).images
        return mine, images[[i - share.rows.start for i in share.sampled]]

    def partial(state: tuple[ImageEncoder, torch.Tensor], share: Share) -> torch.Tensor:
        mine, images = state
        embeddings = embed_in_batches(mine, images, progress=progress if world.leader else None) if len(images) \
            else torch.empty(0, mine.dim, dtype=torch.float64)
        return bounded_sum(embeddings, 1.0, "normalize")

    done = aggregate_across_ranks(world, prepare, partial, **leader)
    if done is None:
        return None
    return StyleTarget(vector=unit(done[0]).float(), encoder=encoder.identity, report=report)


def check_encoder(target: StyleTarget, encoder: ImageEncoder, target_name: object = "the target",
                  encoder_name: object = "the image encoder") -> None:
    """Refuse sampling toward ``target`` with an encoder other than the one it was made with, naming both."""
    if target.encoder != encoder.identity:
        raise PrivdiffError(f"{target_name} was made with image encoder '{target.encoder}', but {encoder_name} is "
                            f"'{encoder.identity}': use the encoder the target was made with")
    if target.vector.numel() != encoder.dim:
        raise PrivdiffError(f"{target_name} is {target.vector.numel()}-d but {encoder_name} embeds {encoder.dim}-d")


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector`` scaled to unit norm (post-processing of the release); a zero vector is refused."""
    norm = float(vector.norm())
    if not (norm > 0 and math.isfinite(norm)):
        raise PrivdiffError(f"the target vector has norm {norm} and cannot be normalised")
    return vector / norm


def save_target(target: StyleTarget, path: str | Path, force: bool = False) -> Path:
    """Write ``target`` as .safetensors ({"target": [D]}, the report and encoder in the header), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PrivdiffError(f"target file {path} must end in .safetensors")
    metadata = {**target.report.to_metadata(), ENCODER_KEY: target.encoder}

    def write(tmp: Path) -> None:
        save_file({TENSOR: target.vector.detach().float().contiguous().cpu()}, str(tmp), metadata=metadata)

    return atomic_write(path, write, force=force)


def load_target(path: str | Path) -> StyleTarget:
    """Read a target file; refuses a file that is not regular or is over MAX_TARGET_BYTES (before reading), is no
    target, carries no valid report or encoder name, or holds a non-finite vector."""
    path = regular_file(Path(path), "target file")
    if path.stat().st_size > MAX_TARGET_BYTES:
        raise PrivdiffError(f"target file {path} has {path.stat().st_size} bytes, more than a target's "
                            f"{MAX_TARGET_BYTES}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
            vector = f.get_tensor(TENSOR).float() if keys == {TENSOR} else None
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise PrivdiffError(f"cannot read target file {path}: {str(exc)[:200]}") from exc
    if vector is None:
        raise PrivdiffError(f"{path} is not a privdiff style target (tensors {sorted(keys)[:8]})")
    if vector.dim() != 1 or not torch.isfinite(vector).all() or not torch.isfinite(vector.norm()):
        raise PrivdiffError(f"target file {path} holds a non-finite or misshapen vector")
    encoder = metadata.get(ENCODER_KEY)
    try:
        report = PrivacyReport.from_metadata(metadata)
    except PrivdiffError as exc:
        raise PrivdiffError(f"target file {path}: {exc}") from None
    if report is None or encoder is None:
        raise PrivdiffError(f"target file {path} carries no privacy report or encoder")
    if not encoder.isprintable() or len(encoder) > MAX_ENCODER_NAME:
        raise PrivdiffError(f"target file {path} names its image encoder with control characters or over "
                            f"{MAX_ENCODER_NAME} characters")
    if not float(vector.norm()) > 0:
        raise PrivdiffError(f"target file {path} holds a zero vector")
    return StyleTarget(vector=unit(vector), encoder=encoder, report=report)
