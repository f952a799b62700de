"""A DP-LoRA release: private images to latents, DP-SGD on the adapters, the LoRA file written after the charge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privdiff.errors import PrivdiffError
from privdiff.lora.adapters import LoRALinear, detach
from privdiff.lora.files import save_lora
from privdiff.lora.training import LoRAConfig, plan_dp_lora, run_dp_lora
from privdiff.models.protocol import SDBackend
from privdiff.privacy.ledger import Reservation
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.artifact import LedgerRequest, carries_release, release_artifact
from privdiff.release.dp_params import DPParams, check_params
from privdiff.release.output_plan import plan_output


@dataclass(frozen=True)
class LoRAResult:
    """The trained adapters, the model family and the release's report."""

    adapters: dict[str, LoRALinear]
    family: str
    report: PrivacyReport
    expected_snr: None = None  # DP-SGD has no best-case SNR to print


def plan_lora_file(out: str | Path, force: bool) -> Path:
    """The LoRA output, checked before any work: it ends in .safetensors, is not a folder or special file, exists
    only with ``force``, and its folder takes a new file."""
    path = Path(out).expanduser()
    if path.suffix != ".safetensors":
        raise PrivdiffError(f"output {path} must end in .safetensors")
    return plan_output(path, "safetensors", force=force).path


Trainer = Callable[[PrivacyReport], tuple[SDBackend, LoRAResult]]
"""Trains the adapters under a planned report (after the charge); returns the model that holds them and the result."""


def local_trainer(load_backend: Callable[[], SDBackend], load_images: Callable[[int], torch.Tensor],
                  params: DPParams, config: LoRAConfig, *, resolution: int | None = None, seed: int | None = None,
                  progress: Progress | None = None) -> Trainer:
    """Training in this process: ``load_images(side)`` gives the private images [n, 3, side, side] in 0..1
    (``side``: ``resolution``, else the model's)."""

    def train(report: PrivacyReport) -> tuple[SDBackend, LoRAResult]:
        backend = load_backend()
        images = load_images(backend.resolution if resolution is None else resolution)
        adapters, released = run_dp_lora(backend, images, params, config, seed=seed, progress=progress,
                                         report=report)
        return backend, LoRAResult(adapters, backend.family, released)

    return train


def plan_lora(params: DPParams, count: int, config: LoRAConfig, *, seed: int | None = None,
              dataset_label: str | None = None) -> PrivacyReport:
    """Everything checked that can be without the model, and the release's report (σ from the accountant)."""
    check_params(params, count, n_public_by_convention=True)
    return plan_dp_lora(params, count, config, seed=seed, dataset_label=dataset_label)


def release_lora(train: Trainer, report: PrivacyReport, out: str | Path, *, ledger: LedgerRequest | None = None,
                 force: bool = False) -> tuple[Path, LoRAResult, Reservation | None]:
    """Charge the ledger for ``report`` (from :func:`plan_lora`), train, and write the LoRA file.

    The model loads in ``train``, after the charge. The adapters come off the model's UNet at the end, written or
    not, so a model loaded in a host samples as before.
    """
    path = plan_lora_file(out, force)
    trained: list[tuple[SDBackend, LoRAResult]] = []

    def produce() -> LoRAResult:
        trained.append(train(report))
        return trained[-1][1]

    try:
        return release_artifact(produce, report, path,
                                lambda result: save_lora(path, result.adapters, result.family, result.report, force),
                                carries_release, ledger)
    finally:
        for backend, result in trained:
            detach(backend.denoiser, result.adapters)
