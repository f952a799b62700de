"""The audit of DPAgg-TI's DP-SGD baseline (``privdiff ti-aggregate --method dpsgd``) with canary images.

One run of the release's own ``run_dpsgd_ti`` (Poisson sampling, float64 clipping, ``PrivdiffDPOptimizer``'s CSPRNG
noise, the accountant's σ) on the private images plus the included canaries, in memory. The run is planned
add-remove with the public size P + M/2 (P: the declared --public-size, else the private images' N).

The attacker sees the released vectors only. A canary's loss is random (template, timestep, diffusion noise), so
the score averages ``probes`` draws, the same draws before and after (a paired difference), from a torch generator
keyed by the audit's CSPRNG: the run's own draws stay inside the run.
"""

from __future__ import annotations

import torch

from privdiff.audit.canaries import canary_images, draw_inclusion
from privdiff.audit.dpsgd import bound_of_losses
from privdiff.audit.plan import audit_params, audit_streams, check_audit
from privdiff.audit.result import AuditResult
from privdiff.embeddings.dpagg import encode_each
from privdiff.embeddings.dpsgd_ti import plan_dpsgd_ti, run_dpsgd_ti
from privdiff.embeddings.templates import TEMPLATES
from privdiff.embeddings.textual_inversion import (
    PLACEHOLDER,
    TIConfig,
    diffusion_loss,
    example_draws,
    initial_vectors,
    training_generator,
)
from privdiff.errors import PrivdiffError
from privdiff.models.protocol import SDBackend
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams

KIND = "dpsgd-ti"
PROBES = 4
"""Draws (template, timestep, noise) each canary's loss is averaged over."""
CHUNK = 16
"""Canaries whose losses run through the model together."""


def audit_dpsgd_ti(
    backend: SDBackend, images: torch.Tensor, params: DPParams, config: TIConfig, canaries: int, *,
    confidence: float = 0.95, seed: int | None = None, dataset_label: str | None = None,
    progress: Progress | None = None, probes: int = PROBES,
) -> AuditResult:
    """The empirical lower bound on the ε of ``run_dpsgd_ti`` on ``images`` [N,3,H,H] with ``params`` and
    ``config``, from one run with ``canaries`` canary images at the images' resolution. Writes nothing."""
    check_audit(canaries, confidence)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise PrivdiffError(f"probes {probes!r} must be a positive integer")
    params = audit_params(params, len(images), canaries)
    rng, run_seed = audit_streams(seed)
    report = plan_dpsgd_ti(params, len(images) + canaries // 2, config, seed=run_seed, dataset_label=dataset_label)
    init = initial_vectors(backend, config)
    marks = canary_images(canaries, images.shape[-1], rng)
    included = draw_inclusion(canaries, rng)
    result = run_dpsgd_ti(backend, torch.cat([images, marks[torch.from_numpy(included)]]), params, config,
                          seed=run_seed, progress=progress, report=report)
    generator_seed = training_generator(rng).initial_seed()
    before = canary_losses(backend, marks, init, config, probes, generator_seed)
    after = canary_losses(backend, marks, result.embedding.vectors, config, probes, generator_seed)
    return bound_of_losses(KIND, report, before, after, included, confidence)


@torch.no_grad()
def canary_losses(backend: SDBackend, images: torch.Tensor, vectors: dict[str, torch.Tensor], config: TIConfig,
                  probes: int, seed: int) -> torch.Tensor:
    """Each canary's diffusion loss with the placeholder's ``vectors``, averaged over ``probes`` draws; the same
    ``seed`` gives the same latents and draws, so two calls differ only by the vectors."""
    generator = torch.Generator().manual_seed(seed)
    templates = TEMPLATES[config.templates]
    latents = encode_each(backend, images, [generator] * len(images))
    total = torch.zeros(len(images), dtype=torch.float64)
    for _ in range(probes):
        draws = [example_draws(backend, x, generator, len(templates)) for x in latents]
        for s in range(0, len(images), CHUNK):
            chunk = draws[s:s + CHUNK]
            prompts = [templates[d[0]].format(PLACEHOLDER) for d in chunk]
            rows = {k: v.to(backend.device, backend.dtype).unsqueeze(0).expand(len(chunk), -1, -1)
                    for k, v in vectors.items()}
            loss = diffusion_loss(backend, latents[s:s + CHUNK].to(backend.device), torch.stack([d[1] for d in chunk]),
                                  torch.stack([d[2] for d in chunk]), prompts, rows)
            total[s:s + CHUNK] += loss.double().cpu()
    return total / probes
