"""The DP-SGD baseline of DPAgg-TI: one embedding over all images, per-sample clipped noisy gradients.

Opacus computes the per-sample gradients; the trainable vectors live in a tiny module whose per-sample
gradient is simply the gradient of its broadcast output. They are computed in microbatches of a fixed public size
padded with a public dummy (``privdiff.privacy.dpsgd.sample_gradients``), so an example's gradient is the same, bit
for bit, whichever other examples the Poisson batch holds. Clipping and noise are privdiff's own
(``privdiff.privacy.dpsgd.PrivdiffDPOptimizer``), the same noise as every other DP path.
"""

from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from torch import nn

from privdiff.embeddings.dpagg import DPAggResult, encode_in_batches
from privdiff.embeddings.files import Embedding
from privdiff.embeddings.templates import TEMPLATES
from privdiff.embeddings.textual_inversion import (
    PLACEHOLDER,
    Progress,
    TIConfig,
    diffusion_loss,
    initial_vectors,
    training_generator,
)
from privdiff.errors import PrivdiffError
from privdiff.io.batching import padded
from privdiff.models.protocol import SDBackend
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
    init = initial_vectors(backend, config)
    keys = sorted(init)
    widths = [init[k].shape[-1] for k in keys]
    device = backend.device
    rng = SecureRandom(seed)
    latents = encode_in_batches(backend, images, config.batch_size, training_generator(rng)).to(device)
    generator = training_generator(rng)  # templates, timesteps, diffusion noise: not relied on by the guarantee
    shared = SharedVectors(torch.cat([init[k] for k in keys], dim=-1)).to(device)
    module = GradSampleModule(shared, loss_reduction="sum")  # wraps `shared`; it does not forward .weight
    expected = max(1, round(params.sample_rate * report.public_size))
    optimizer = PrivdiffDPOptimizer(
        torch.optim.Adam(module.parameters(), lr=config.lr), rng=rng,
        noise_multiplier=report.noise_multiplier, max_grad_norm=params.clip_norm, expected_batch_size=expected,
    )
    size = min(config.batch_size, microbatch_size(expected))  # public; config.batch_size bounds the memory
    templates = TEMPLATES[config.templates]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
            for step in range(config.steps):
                optimizer.zero_grad(set_to_none=True)
                batch = poisson_sample(n, params.sample_rate, rng)
                x0 = latents[batch]
                prompts = [templates[int(i)].format(PLACEHOLDER)
                           for i in torch.randint(len(templates), (len(batch),), generator=generator)]
                t = torch.randint(len(backend.alphas_cumprod), (len(batch),), generator=generator)
                noise = torch.randn(x0.shape, generator=generator)
                per_sample_gradients(backend, module, widths, keys, size, x0, t, noise, prompts)
                optimizer.step()
                if progress is not None:
                    progress(step + 1, config.steps)
    finally:
        optimizer.close()

    trained = shared.weight.detach().cpu().split(widths, dim=-1)
    vectors = dict(zip(keys, trained, strict=True))
    embedding = Embedding(vectors=vectors, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=None)
