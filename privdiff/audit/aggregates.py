"""Audits of the aggregate releases: embedding files (``aggregate``), DPAgg-TI (``ti-aggregate``) and style targets
(``guidance-target``).

Each audit runs the release's own function once, on the user's records plus the included canaries, and scores every
canary by projecting what was released on that canary's own contribution as the auditor can compute it. The run is
planned add-remove over the canaries: its public size is the user's (declared P, else N) plus M // 2, the expected
number of canaries included, so the release divides by q (P + M // 2) as a release of that many records would.
Canaries and everything computed from them stay in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from privdiff.audit.canaries import canary_images, canary_offsets, draw_inclusion, projection_scores
from privdiff.audit.plan import audit_params, audit_streams, check_audit
from privdiff.audit.result import AuditResult, audit_result
from privdiff.embeddings.dpagg import aggregate_loaded, around, embedding_dim, run_dpagg_ti, shapes_of, train_sampled
from privdiff.embeddings.files import Embedding
from privdiff.embeddings.textual_inversion import TIConfig, initial_vectors
from privdiff.errors import PrivdiffError
from privdiff.guidance.target import embed_in_batches, make_target
from privdiff.models.image_encoders import ImageEncoder
from privdiff.models.protocol import SDBackend
from privdiff.privacy.mechanism import bound_vectors
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams

AGGREGATE_ATTACK = "projection of the released offset on each canary's own offset (norm C, random direction)"
DPAGG_TI_ATTACK = ("projection of the released offset on each canary's own textual-inversion offset, trained by the "
                   "auditor alone with a fresh key (the release's is unknown to it) and bounded as the release bounds")
TARGET_ATTACK = "projection of the released target on each canary's unit image embedding"


def flat(vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """An embedding's vectors {encoder: [..., n, dim]} as one vector per row, encoders in sorted order (float64)."""
    return torch.cat([vectors[k].to(torch.float64).flatten(vectors[k].dim() - 2) for k in sorted(vectors)], dim=-1)


def audit_aggregate(
    embeddings: list[Embedding], params: DPParams, canaries: int, confidence: float = 0.95, *,
    center: Embedding | None = None, seed: int | None = None,
) -> AuditResult:
    """Audit ``aggregate_embedding_files`` on loaded per-image ``embeddings``: the canaries are per-image embeddings
    at the public centre (zero without one) plus an offset of norm C in a random direction."""
    if not embeddings:
        raise PrivdiffError("no embedding files to aggregate")
    check_audit(canaries, confidence)
    audited = audit_params(params, len(embeddings), canaries)
    origin = center.vectors if center is not None else {k: torch.zeros(s) for k, s in shapes_of(embeddings[0]).items()}
    rng, run_seed = audit_streams(seed)
    offsets = canary_offsets(canaries, embedding_dim(origin), params.clip_norm, rng)
    included = draw_inclusion(canaries, rng)
    records = embeddings + [Embedding(around(origin, offsets[i].double())) for i in np.flatnonzero(included)]
    result = aggregate_loaded(records, audited, center=center, seed=run_seed)
    scores = projection_scores(flat(result.embedding.vectors) - flat(origin), offsets)
    return audit_result("aggregate", AGGREGATE_ATTACK, result.report, scores, included, confidence)


def audit_dpagg_ti(
    backend: SDBackend, images: torch.Tensor, params: DPParams, config: TIConfig, canaries: int,
    confidence: float = 0.95, *, seed: int | None = None, progress: Progress | None = None,
    attack_progress: Progress | None = None,
) -> AuditResult:
    """Audit ``run_dpagg_ti`` on private ``images`` [N, 3, R, R] plus canary mosaics at R pixels. The attacker trains
    every canary's embedding itself (``train_sampled``, its own key), bounds its offset from the public
    initialisation like the release, and projects the released offset on it."""
    check_audit(canaries, confidence)
    audited = audit_params(params, len(images), canaries)
    rng, run_seed = audit_streams(seed)
    pictures = canary_images(canaries, images.shape[-1], rng)
    included = draw_inclusion(canaries, rng)
    records = torch.cat([images, pictures[torch.from_numpy(included)]])
    result = run_dpagg_ti(backend, records, audited, config, seed=run_seed, progress=progress)
    init = initial_vectors(backend, config)
    own = train_sampled(backend, pictures, list(range(canaries)), rng.random_bytes(32), init, config,
                        attack_progress)
    offsets = bound_vectors(flat(own) - flat(init), params.clip_norm, params.bound)
    scores = projection_scores(flat(result.embedding.vectors) - flat(init), offsets)
    return audit_result("ti-aggregate", DPAGG_TI_ATTACK, result.report, scores, included, confidence)


def audit_style_target(
    encoder: ImageEncoder, images: torch.Tensor, params: DPParams, canaries: int, confidence: float = 0.95, *,
    seed: int | None = None, progress: Progress | None = None,
) -> AuditResult:
    """Audit ``make_target`` on private ``images`` [N, 3, S, S] (S the encoder's size) plus canary mosaics."""
    check_audit(canaries, confidence)
    audited = audit_params(params, len(images), canaries)
    rng, run_seed = audit_streams(seed)
    pictures = canary_images(canaries, encoder.size, rng)
    included = draw_inclusion(canaries, rng)
    records = torch.cat([images, pictures[torch.from_numpy(included)]])
    target = make_target(encoder, records, audited, seed=run_seed, progress=progress)
    embeddings = bound_vectors(embed_in_batches(encoder, pictures), 1.0, "normalize")
    scores = projection_scores(target.vector, embeddings)
    return audit_result("guidance-target", TARGET_ATTACK, target.report, scores, included, confidence)
