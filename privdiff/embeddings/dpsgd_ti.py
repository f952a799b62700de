"""The DP-SGD baseline of DPAgg-TI: one embedding over all images, per-sample clipped noisy gradients.

Opacus does the per-sample clipping and noising (``DPOptimizer``); the trainable vectors live in a
tiny module whose per-sample gradient is simply the gradient of its broadcast output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from torch import nn

from privdiff.backends.protocol import SDBackend
from privdiff.embeddings.dpagg import DPAggResult, DPParams, encode_in_batches, plan_release
from privdiff.embeddings.files import Embedding
from privdiff.embeddings.templates import TEMPLATES
from privdiff.embeddings.textual_inversion import (
    PLACEHOLDER,
    Progress,
    TIConfig,
    diffusion_loss,
    initial_vectors,
)
from privdiff.privacy.mechanism import poisson_sample, secure_generator
from privdiff.privacy.report import PrivacyReport

MECHANISM = "DP-SGD textual inversion (opacus): per-sample clipped gradients with Gaussian noise"


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


def run_dpsgd_ti(
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
    """Train one embedding on all ``images`` with DP-SGD for ``config.steps`` Poisson-sampled steps."""
    n = len(images)
    config = config or TIConfig()
    report = plan_release(
        MECHANISM, params, n, config.steps, dataset_label=dataset_label, private=seed is None
    )
    if before_training is not None:
        before_training(report)
    init = initial_vectors(backend, config)
    keys = sorted(init)
    widths = [init[k].shape[-1] for k in keys]
    device = backend.device
    generator = secure_generator(seed)
    latents = encode_in_batches(backend, images, config.batch_size, generator).to(device)
    shared = SharedVectors(torch.cat([init[k] for k in keys], dim=-1)).to(device)
    module = GradSampleModule(shared)  # wraps `shared`; it does not forward attributes such as .weight
    noise_generator = secure_generator(int(torch.randint(2**62, (), generator=generator)), device=device)
    optimizer = DPOptimizer(
        torch.optim.Adam(module.parameters(), lr=config.lr),
        noise_multiplier=report.noise_multiplier, max_grad_norm=params.clip_norm,
        expected_batch_size=max(1, round(params.sample_rate * n)), generator=noise_generator,
    )
    templates = TEMPLATES[config.templates]
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        batch = poisson_sample(n, params.sample_rate, generator)
        if len(batch) == 0:
            shared.weight.grad_sample = torch.zeros(0, *shared.weight.shape, device=device)
        else:
            x0 = latents[batch]
            rows = module(x0).split(widths, dim=-1)
            vectors = {k: r.to(backend.dtype) for k, r in zip(keys, rows, strict=True)}
            prompts = [templates[int(i)].format(PLACEHOLDER)
                       for i in torch.randint(len(templates), (len(batch),), generator=generator)]
            t = torch.randint(len(backend.alphas_cumprod), (len(batch),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            diffusion_loss(backend, x0, t, noise, prompts, vectors).mean().backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, config.steps)

    trained = shared.weight.detach().cpu().split(widths, dim=-1)
    vectors = dict(zip(keys, trained, strict=True))
    embedding = Embedding(vectors=vectors, token=None, metadata=report.to_metadata())
    return DPAggResult(embedding=embedding, report=report, expected_snr=None)
