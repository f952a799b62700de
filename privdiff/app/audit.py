"""The GUI fronts' audits: each release front function's inputs plus canaries and confidence -> the audit's text.

An audit runs the release's own checks, then one run of the release's mechanism with canaries
(``privdiff.audit``). It is not a release: it writes no file and never opens a ledger, so a :class:`Release`'s
output and ledger fields (name, overwrite, ledger_path, budget, new_release) are ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from privdiff.app.release_options import Release
from privdiff.audit.plan import audit_params, check_audit
from privdiff.audit.result import AuditResult
from privdiff.embeddings.methods import METHODS
from privdiff.embeddings.textual_inversion import TIConfig, check_config
from privdiff.errors import PrivdiffError
from privdiff.io.images import PrivateDataset, check_memory
from privdiff.models.image_encoders import ImageEncoder
from privdiff.models.protocol import SDBackend
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams, check_params
from privdiff.wavelet.training import TrainConfig


def audit_text(result: AuditResult) -> str:
    """One line a person reads (the bound against the claim, the counts, that nothing was released), then the
    result's JSON."""
    relation = "<=" if result.epsilon_lower_bound <= result.claimed_epsilon else "> (LEAKS MORE THAN CLAIMED)"
    line = (f"audited lower bound {result.epsilon_lower_bound:.2f} {relation} claimed epsilon "
            f"{result.claimed_epsilon:.2f} at {result.confidence * 100:g}% (M={result.canaries}, {result.correct} of "
            f"{result.guesses} guesses correct); not a release: nothing written, no ledger charged")
    return line + "\n\n" + result.to_json()


def audit_embedding(
    backend: SDBackend, dataset: PrivateDataset, method: str, config: TIConfig, release: Release, canaries: int,
    confidence: float, progress: Progress | None = None,
) -> str:
    """Audit DP Textual Inversion (``train_embedding``'s inputs): DPAgg-TI or its DP-SGD baseline, with
    ``canaries`` mosaic images at the dataset's resolution."""
    from privdiff.audit.aggregates import audit_dpagg_ti
    from privdiff.audit.dpsgd_ti import audit_dpsgd_ti
    from privdiff.embeddings.dpsgd_ti import plan_dpsgd_ti

    if method not in METHODS:
        raise PrivdiffError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_audit(canaries, confidence)
    params = release.params()
    if method == "dpsgd" and release.sample_rate >= 1.0:  # the release's own default: batch size / N
        params = dataclasses.replace(params, sample_rate=min(1.0, config.batch_size / len(dataset)))
    check_params(params, len(dataset), n_public_by_convention=method == "dpsgd")
    audited = audit_params(params, len(dataset), canaries)
    if method == "dpsgd":
        plan_dpsgd_ti(audited, len(dataset) + canaries // 2, config)  # every check before the run
    check_config(backend, config)
    check_memory(len(dataset) + canaries, dataset.images.shape[-1])
    if method == "dpagg":
        result = audit_dpagg_ti(backend, dataset.images, params, config, canaries, confidence, seed=release.seed(),
                                progress=progress, attack_progress=progress)
    else:
        result = audit_dpsgd_ti(backend, dataset.images, params, config, canaries, confidence=confidence,
                                seed=release.seed(), dataset_label=release.label(), progress=progress)
    return audit_text(result)


def audit_aggregate_files(folder: str, one_image_per_file: bool, center: str, release: Release, canaries: int,
                          confidence: float) -> str:
    """Audit DP Aggregate Embeddings (``aggregate_files``' inputs) with ``canaries`` per-image canary embeddings."""
    from privdiff.audit.aggregates import audit_aggregate
    from privdiff.embeddings.dpagg import load_per_image_files, per_image_files
    from privdiff.embeddings.files import load_embedding

    if not one_image_per_file:
        raise PrivdiffError("the guarantee needs each file to come from exactly one image: confirm it by "
                            "enabling one_image_per_file")
    check_audit(canaries, confidence)
    files = per_image_files(folder)
    params = release.params()
    check_params(params, len(files))
    audit_params(params, len(files), canaries)
    public_center = load_embedding(center) if center.strip() else None
    result = audit_aggregate(load_per_image_files(files, params), params, canaries, confidence,
                             center=public_center, seed=release.seed())
    return audit_text(result)


def audit_style_target(encoder: ImageEncoder, dataset: PrivateDataset, release: Release, canaries: int,
                       confidence: float, progress: Progress | None = None) -> str:
    """Audit DP Style Target (``make_style_target``'s inputs) with ``canaries`` mosaic images. Images at another
    size than the encoder's are resized to it first (as the encoder's own preprocessing does for square images)."""
    from privdiff.audit.aggregates import audit_style_target as audit_target
    from privdiff.guidance.target import target_params

    check_audit(canaries, confidence)
    params = target_params(release.epsilon or None, release.delta, release.sample_rate,
                           public_size=release.public_size or None)
    check_params(params, len(dataset))
    audit_params(params, len(dataset), canaries)
    check_memory(len(dataset) + canaries, encoder.size)
    result = audit_target(encoder, _at_size(dataset.images, encoder.size), params, canaries, confidence,
                          seed=release.seed(), progress=progress)
    return audit_text(result)


def audit_spectral(
    prior_file: str | Path, images: str | Path, release: Release, config: TrainConfig, canaries: int,
    confidence: float, progress: Progress | None = None, device: str = "cpu",
) -> str:
    """Audit DP Spectral Fine-tune (``finetune_spectral``'s inputs) with ``canaries`` mosaic images."""
    from privdiff.audit.wavelet_finetune import audit_wavelet_finetune
    from privdiff.io.images import read_private_files
    from privdiff.wavelet.workflow import load_public_prior

    if release.public_size:
        raise PrivdiffError("public_size does not apply to DP-SGD fine-tuning: it treats N as public (add-remove)")
    check_audit(canaries, confidence)
    load_public_prior(prior_file)  # a wrong prior fails before the private images are read
    private = read_private_files(images)
    params = DPParams(epsilon=release.epsilon or None, delta=release.delta, sample_rate=release.sample_rate,
                      clip_norm=release.clip_norm, bound=release.bound,
                      noise_multiplier=release.noise_multiplier or None)
    result = audit_wavelet_finetune(prior_file, private, params, config, canaries, confidence=confidence,
                                    seed=release.seed(), dataset_label=release.label(), progress=progress,
                                    device=device)
    return audit_text(result)


def _at_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` [N,3,H,W] at ``size`` x ``size`` (bicubic, clamped to 0..1); unchanged when already there."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=size < images.shape[-1]).clamp(0, 1)
