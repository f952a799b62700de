"""The audit of a spectral prior's DP-SGD fine-tune (``privdiff wavelet finetune``) with canary images.

One run of the release's own fine-tune (``privdiff.wavelet.training.finetune``: Poisson sampling, float64
clipping, CSPRNG noise, the accountant's σ) on the private images' tokens plus the included canaries' tokens, in
memory: no checkpoint, no output file, no ledger. N is public by DP-SGD's convention (add-remove), so the run's N
is the private images plus the included canaries; δ is checked against N + M, the most the run can hold.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from privdiff.audit.canaries import canary_images, draw_inclusion
from privdiff.audit.dpsgd import bound_of_losses
from privdiff.audit.plan import audit_streams, check_audit, check_delta
from privdiff.audit.result import AuditResult
from privdiff.io.images import PrivateFiles
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams
from privdiff.wavelet.prior import SpectralPrior
from privdiff.wavelet.training import TrainConfig, finetune, plan_finetune
from privdiff.wavelet.workflow import check_finetune, load_public_prior, private_tokens

KIND = "wavelet-finetune"
CHUNK = 64
"""Canaries whose losses the attack computes together."""


def audit_wavelet_finetune(
    prior_file: str | Path, images: PrivateFiles, params: DPParams, config: TrainConfig, canaries: int, *,
    confidence: float = 0.95, seed: int | None = None, dataset_label: str | None = None,
    progress: Progress | None = None, device: str = "cpu",
) -> AuditResult:
    """The empirical lower bound on the ε of fine-tuning ``prior_file`` on ``images`` with ``params`` and ``config``,
    from one run with ``canaries`` canary images (each in with probability 1/2). Writes nothing."""
    check_audit(canaries, confidence)
    public = load_public_prior(prior_file)
    check_delta(params.delta, len(images), canaries)
    check_finetune(public, images, params, len(images) + canaries)
    rng, run_seed = audit_streams(seed)
    marks = public.tokenizer.encode(canary_images(canaries, public.tokenizer.size, rng))
    included = draw_inclusion(canaries, rng)
    tokens = torch.cat([private_tokens(public, images), marks[torch.from_numpy(included)]])
    report = plan_finetune(params, len(tokens), config, seed=run_seed, dataset_label=dataset_label)
    start = copy.deepcopy(public.prior)
    tuned = finetune(public.prior.to(device), tokens, params, config, report, seed=run_seed, progress=progress)
    return bound_of_losses(KIND, report, canary_losses(start, marks), canary_losses(tuned, marks), included,
                           confidence)


@torch.no_grad()
def canary_losses(prior: SpectralPrior, tokens: torch.Tensor) -> torch.Tensor:
    """Each canary's training loss (negative log-likelihood of its tokens) under ``prior``, ``CHUNK`` at a time."""
    prior.eval()
    device = next(prior.parameters()).device
    return torch.cat([prior.loss(tokens[i:i + CHUNK].to(device)).cpu() for i in range(0, len(tokens), CHUNK)])
