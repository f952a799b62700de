"""DPAgg-TI, DP-SGD TI and the aggregate of per-image files across the ranks torchrun starts (docs/privacy.md,
"Across ranks"): the same releases as ``run_dpagg_ti``, ``run_dpsgd_ti`` and ``aggregate_embedding_files`` in one
process, over ``privdiff.privacy.distributed``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privdiff.embeddings.dpagg import (
    DPAggResult,
    around,
    check_shapes,
    embedding_dim,
    expected_snr,
    offsets_sum,
    public_progress,
    shapes_of,
    train_sampled,
)
from privdiff.embeddings.dpsgd_ti import DPSGDSettings, train_dpsgd_ti
from privdiff.embeddings.files import Embedding, load_embedding
from privdiff.embeddings.textual_inversion import Progress, TIConfig, initial_vectors
from privdiff.errors import PrivdiffError
from privdiff.io.images import PrivateFiles
from privdiff.models.protocol import SDBackend
from privdiff.privacy.distributed import Share, World, aggregate_across_ranks, shares
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.release.dp_params import DPParams, check_params


@dataclass(frozen=True)
class _RankSettings:
    """What every rank needs of a DPAgg-TI release besides its slice."""

    config: TIConfig
    resolution: int | None
    clip_norm: float
    bound: str


def run_dpagg_ti_ranks(
    world: World,
    load_backend: Callable[[], SDBackend],
    *,
    private: PrivateFiles | None = None,
    resolution: int | None = None,
    params: DPParams | None = None,
    config: TIConfig | None = None,
    seed: int | None = None,
    report: PrivacyReport | None = None,
    progress: Progress | None = None,
) -> DPAggResult | None:
    """DPAgg-TI across the ranks of ``world`` (``aggregate_across_ranks``); rank 0 passes the files, parameters and
    report, the others only ``load_backend``. The release equals ``run_dpagg_ti``'s in one process (same seed: the
    same sample, streams and noise), to the rounding of the float64 sum.

    Each rank gets its slice's file bytes as rank 0 read and charged them, loads the model, decodes its whole
    slice (so a damaged file fails the release whether or not it was sampled, as in one process), trains its
    sampled images and sends rank 0 the float64 sum of their bounded offsets only. Returns the result on rank 0.
    """
    leader = {}
    if world.leader:
        public_total = max(1, math.ceil(params.sample_rate * report.public_size / (world.size * config.batch_size)))
        progress = public_progress(progress, public_total * config.steps)
        leader = {"records": private.subset, "n": len(private), "sample_rate": params.sample_rate, "seed": seed,
                  "settings": _RankSettings(config, resolution, params.clip_norm, params.bound),
                  "clip_norm": params.clip_norm, "noise_multiplier": report.noise_multiplier,
                  "divisor": params.sample_rate * report.public_size}

    def prepare(share: Share) -> tuple[SDBackend, dict[str, torch.Tensor], torch.Tensor]:
        backend = load_backend()
        init = initial_vectors(backend, share.settings.config)  # checks the config against the model
        resolution = share.settings.resolution or backend.resolution
        images = share.records.load(resolution).images  # every file of the slice
        return backend, init, images[[i - share.rows.start for i in share.sampled]]

    def partial(state: tuple, share: Share) -> torch.Tensor:
        backend, init, images = state
        per_image = train_sampled(backend, images, share.sampled, share.key, init, share.settings.config,
                                  progress if world.leader else None)
        return offsets_sum(per_image, init, share.settings.clip_norm, share.settings.bound)

    done = aggregate_across_ranks(world, prepare, partial, training_key=True, **leader)
    if done is None:
        return None
    mean, (_, init, _) = done
    snr = expected_snr(report.public_size, params.sample_rate, report.noise_multiplier, embedding_dim(init))
    embedding = Embedding(vectors=around(init, mean), token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)


def run_dpsgd_ti_ranks(
    world: World,
    load_backend: Callable[[], SDBackend],
    *,
    private: PrivateFiles | None = None,
    resolution: int | None = None,
    params: DPParams | None = None,
    config: TIConfig | None = None,
    seed: int | None = None,
    report: PrivacyReport | None = None,
    progress: Progress | None = None,
) -> DPAggResult | None:
    """DP-SGD TI across the ranks of ``world`` (``train_dpsgd_ti``): rank 0 passes the files, parameters and report
    and draws every step's Poisson batch and noise; each rank gets its public slice's bytes as charged, decodes it
    whole and computes its examples' clipped gradients. The same release as ``run_dpsgd_ti`` in one process with
    the same seed, to the rounding of the float64 sums. Returns the result on rank 0, None elsewhere."""
    plans, rng = None, None
    if world.leader:
        rng = SecureRandom(seed)
        settings = DPSGDSettings(config, params.sample_rate, params.clip_norm, report.noise_multiplier,
                                 report.public_size, rng.random_bytes(32))
        plans = [Share(private.subset(rows), rows, [], settings.key, (settings, resolution, len(private)))
                 for rows in shares(len(private), world.size)]
    share: Share = world.scatter(plans)
    settings, resolution, n = share.settings
    state: dict[str, object] = {}

    def prepare() -> None:
        backend = load_backend()
        initial_vectors(backend, settings.config)  # checks the config against the model
        state["backend"] = backend
        state["images"] = share.records.load(resolution or backend.resolution).images  # every file of the slice

    world.collect(prepare)
    vectors = train_dpsgd_ti(world, state["backend"], state["images"], share.rows, n, settings, rng,
                             progress if world.leader else None)
    if not world.leader:
        return None
    embedding = Embedding(vectors=vectors, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=None)


def aggregate_embedding_files_ranks(
    world: World,
    files: list[Path] | None = None,
    params: DPParams | None = None,
    *,
    center: Embedding | None = None,
    seed: int | None = None,
    report: PrivacyReport | None = None,
) -> DPAggResult | None:
    """``aggregate_embedding_files`` across the ranks of ``world`` (``aggregate_across_ranks``): rank 0 passes the
    files (on storage every rank reads), parameters, centre and report, the others nothing. Rank 0 reads the first
    file for the shapes; every rank loads its whole slice (each file checked as in one process), and sends the
    float64 sum of its sampled files' bounded offsets. The same release as one process with the same seed, to the
    rounding of the float64 sum. Returns the result on rank 0, None elsewhere."""
    leader = {}
    if world.leader:
        if not files:
            raise PrivdiffError("no embedding files to aggregate")
        check_params(params, len(files))
        shapes = shapes_of(load_embedding(files[0]))
        if center is not None and shapes_of(center) != shapes:
            raise PrivdiffError(f"center is a {center.family} embedding with tensors {shapes_of(center)}, but the "
                                f"files have {shapes}")
        origin = center.vectors if center else {k: torch.zeros(v) for k, v in shapes.items()}
        leader = {"records": lambda rows: files[rows.start:rows.stop], "n": len(files),
                  "sample_rate": params.sample_rate, "seed": seed,
                  "settings": (shapes, files[0].name, origin, params.clip_norm, params.bound),
                  "clip_norm": params.clip_norm, "noise_multiplier": report.noise_multiplier,
                  "divisor": params.sample_rate * report.public_size}

    def prepare(share: Share) -> list[Embedding]:
        shapes, first = share.settings[:2]
        embeddings = [load_embedding(f) for f in share.records]
        check_shapes(share.records, embeddings, shapes, first)
        return embeddings

    def partial(embeddings: list[Embedding], share: Share) -> torch.Tensor:
        shapes, _, origin, clip_norm, bound = share.settings
        rows = [i - share.rows.start for i in share.sampled]
        per_image = {k: torch.stack([embeddings[i].vectors[k] for i in rows]) if rows else torch.empty(0, *shapes[k])
                     for k in shapes}
        return offsets_sum(per_image, origin, clip_norm, bound)

    done = aggregate_across_ranks(world, prepare, partial, **leader)
    if done is None:
        return None
    origin = leader["settings"][2]
    snr = expected_snr(report.public_size, params.sample_rate, report.noise_multiplier, embedding_dim(origin))
    embedding = Embedding(vectors=around(origin, done[0]), token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=snr)
