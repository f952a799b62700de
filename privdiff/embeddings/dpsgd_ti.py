"""The DP-SGD baseline of DPAgg-TI: one embedding over all images, per-sample clipped noisy gradients.

Opacus computes the per-sample gradients; the trainable vectors live in a tiny module whose per-sample
gradient is simply the gradient of its broadcast output. They are computed in microbatches of a fixed public size
padded with a public dummy (``privdiff.privacy.dpsgd.sample_gradients``), so an example's gradient is the same, bit
for bit, whichever other examples the Poisson batch holds. Clipping and noise are privdiff's own
(``privdiff.privacy.dpsgd.PrivdiffDPOptimizer``), the same noise as every other DP path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from torch import nn

from privdiff.embeddings.dpagg import DPAggResult, encode_each
from privdiff.embeddings.files import Embedding
from privdiff.embeddings.templates import TEMPLATES
from privdiff.embeddings.textual_inversion import (
    PLACEHOLDER,
    Progress,
    TIConfig,
    diffusion_loss,
    example_draws,
    image_generator,
    initial_vectors,
)
from privdiff.errors import PrivdiffError
from privdiff.io.batching import padded
from privdiff.models.protocol import SDBackend
from privdiff.privacy.distributed import World
from privdiff.privacy.dpsgd import PrivdiffDPOptimizer, microbatch_size, sample_gradients
from privdiff.privacy.mechanism import poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.release.dp_params import DPParams, plan_release

MECHANISM = "DP-SGD textual inversion (opacus): per-sample clipped gradients with Gaussian noise"
# torch warns on every backward through opacus' hooks, as the hooked module's input (the latents) needs no grad.
_HOOK_WARNING = "Full backward hook is firing"


class SharedVectors(nn.Module):
    """The placeholder vectors of every encoder side by side, broadcast over a batch."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.clone())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [B, n_vectors, total_dim]."""
        return self.weight.unsqueeze(0).expand(batch.shape[0], -1, -1)


@register_grad_sampler(SharedVectors)
def _shared_vectors_grad_sample(
    layer: SharedVectors, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    # Row b of the output is the weight itself for example b: its gradient is that example's.
    return {layer.weight: backprops}


def per_sample_gradients(
    backend: SDBackend, module: GradSampleModule, widths: list[int], keys: list[str], size: int,
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prompts: list[str],
) -> None:
    """Set the shared vectors' ``grad_sample`` [B, n_vectors, total_dim] to each example's loss gradient.

    Example b is latent ``x0[b]`` at timestep ``t[b]`` with ``noise[b]`` and ``prompts[b]``; ``module`` wraps the
    ``SharedVectors`` (loss reduction "sum"). The examples run ``size`` at a time, the last microbatch padded with
    the public dummy (zero latent, timestep 0, zero noise, the bare placeholder as prompt), whose rows are dropped.
    """

    def backward(start: int, stop: int) -> None:
        latents = padded(x0[start:stop], size)
        rows = module(latents).split(widths, dim=-1)
        vectors = {k: r.to(backend.dtype) for k, r in zip(keys, rows, strict=True)}
        texts = prompts[start:stop] + [PLACEHOLDER] * (size - (stop - start))
        diffusion_loss(backend, latents, padded(t[start:stop], size), padded(noise[start:stop], size), texts,
                       vectors).sum().backward()

    sample_gradients([module._module.weight], len(x0), size, backward)


def plan_dpsgd_ti(
    params: DPParams, dataset_size: int, config: TIConfig, *, seed: int | None = None,
    dataset_label: str | None = None,
) -> PrivacyReport:
    """The report of a DP-SGD release (no model needed): ``config.steps`` compositions, N public by convention.

    Only ``bound="clip"``: gradients cannot be normalized meaningfully, so ``"normalize"`` is refused.
    """
    if params.bound == "normalize":
        raise PrivdiffError("bound 'normalize' is not available for dpsgd: DP-SGD clips per-sample gradients; "
                            "use bound 'clip'")
    center = f"none: per-sample gradients are clipped (training starts from init word {config.init_word!r})"
    return plan_release(MECHANISM, params, dataset_size, config.steps, center=center, dataset_label=dataset_label,
                        private=seed is None, n_public_by_convention=True)


def run_dpsgd_ti(
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
    """Train one embedding on all ``images`` with DP-SGD for ``config.steps`` Poisson-sampled steps.

    ``seed`` makes the run reproducible and marks the release as not private. ``report``: the release's
    report from ``plan_dpsgd_ti`` when it was planned (and charged) before the model loaded.
    """
    n = len(images)
    config = config or TIConfig()
    report = report or plan_dpsgd_ti(params, n, config, seed=seed, dataset_label=dataset_label)
    rng = SecureRandom(seed)
    settings = DPSGDSettings(config, params.sample_rate, params.clip_norm, report.noise_multiplier,
                             report.public_size, rng.random_bytes(32))
    vectors = train_dpsgd_ti(World(), backend, images, range(n), n, settings, rng, progress)
    embedding = Embedding(vectors=vectors, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=None)


@dataclass(frozen=True)
class DPSGDSettings:
    """What every rank needs of a DP-SGD TI release: the config, the public parameters and the key of the
    per-example training streams (drawn from the release's CSPRNG)."""

    config: TIConfig
    sample_rate: float
    clip_norm: float
    noise_multiplier: float
    public_size: int
    key: bytes


def train_dpsgd_ti(
    world: World, backend: SDBackend, images: torch.Tensor, rows: range, n: int, settings: DPSGDSettings,
    rng: SecureRandom | None, progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """DP-SGD TI over the ranks of ``world``; this rank holds ``images``, records ``rows`` of the ``n``.

    Rank 0 (``rng``: the release's CSPRNG; None elsewhere) draws each step's Poisson batch over all n records and
    tells every rank; each rank computes its batch examples' per-sample gradients, clips and sums them, and
    ``PrivdiffDPOptimizer.step_across`` adds the noise once on rank 0. Each record's VAE sample and each step's
    template, timestep and noise come from streams keyed by the record (``image_generator``), so the embedding is
    the one process's, to the rounding of the float64 sums. Returns the trained vectors {encoder: [n_vectors, dim]}.
    """
    config = settings.config
    init = initial_vectors(backend, config)
    keys = sorted(init)
    widths = [init[k].shape[-1] for k in keys]
    device = backend.device
    latents = encode_each(backend, images, [image_generator(settings.key, i) for i in rows]).to(device)
    shared = SharedVectors(torch.cat([init[k] for k in keys], dim=-1)).to(device)
    module = GradSampleModule(shared, loss_reduction="sum")  # wraps `shared`; it does not forward .weight
    expected = max(1, round(settings.sample_rate * settings.public_size))
    optimizer = PrivdiffDPOptimizer(
        torch.optim.Adam(module.parameters(), lr=config.lr), rng=rng,
        noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.clip_norm, expected_batch_size=expected,
    )
    size = min(config.batch_size, microbatch_size(expected))  # public; config.batch_size bounds the memory
    templates = TEMPLATES[config.templates]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
            for step in range(config.steps):
                optimizer.zero_grad(set_to_none=True)
                batch = world.broadcast(poisson_sample(n, settings.sample_rate, rng).tolist() if world.leader
                                        else None)
                mine = [i for i in batch if i in rows]

                def compute(step: int = step, mine: list[int] = mine) -> None:
                    x0 = latents[[i - rows.start for i in mine]]
                    streams = [image_generator(settings.key, (step + 1) * n + i) for i in mine]
                    draws = [example_draws(backend, x, g, len(templates)) for x, g in zip(x0, streams, strict=True)]
                    prompts = [templates[d[0]].format(PLACEHOLDER) for d in draws]
                    t = torch.stack([d[1] for d in draws]) if draws else torch.empty(0, dtype=torch.long)
                    noise = torch.stack([d[2] for d in draws]) if draws else torch.empty(0, *x0.shape[1:])
                    per_sample_gradients(backend, module, widths, keys, size, x0, t, noise, prompts)

                optimizer.step_across(world, compute)
                if progress is not None:
                    progress(step + 1, config.steps)
    finally:
        optimizer.close()
    world.finishing()
    trained = shared.weight.detach().cpu().split(widths, dim=-1)
    return dict(zip(keys, trained, strict=True))
