"""The DP LoRA front logic shared by the ComfyUI node and the A1111 sub-tab: inputs -> release -> (name, report)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from privdiff.app.embeddings import model_identity
from privdiff.app.release_options import (
    REPEATED,
    Release,
    earlier_release,
    embedding_target,
    ledger_request,
    pixels_request,
    report_text,
)
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import PrivateDataset
from privdiff.lora.release import local_trainer, plan_lora, release_lora
from privdiff.lora.training import LoRAConfig
from privdiff.models.protocol import SDBackend
from privdiff.progress import Progress

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
"""The LoRA files ComfyUI and A1111 list: a new file must not share its name with one of these."""


def train_lora(
    backend: SDBackend,
    dataset: PrivateDataset,
    config: LoRAConfig,
    release: Release,
    loras_dir: Path,
    progress: Progress | None = None,
    default_ledger: Path | None = None,
) -> tuple[str, str]:
    """Train and release a DP-LoRA on ``backend``'s model into ``loras_dir``/<name>.safetensors; returns (name,
    report text). The adapters come off the model afterwards.

    A sample rate of 1 means batch_size/N (as for DP-SGD TI). With a ledger (``ledger_path``, else
    ``default_ledger``) an identical earlier request is returned without training or charging again, unless
    ``new_release`` is set.
    """
    if release.public_size:
        raise PrivdiffError(f"public_size={release.public_size} does not apply to DP-LoRA: DP-SGD treats N as "
                            "public (set it to 0)")
    params = release.params()
    if release.sample_rate >= 1.0:
        params = replace(params, sample_rate=min(1.0, config.batch_size / len(dataset)))
    report = plan_lora(params, len(dataset), config, seed=release.seed(), dataset_label=release.label())
    target = loras_dir / f"{release.name}.safetensors"
    ledger = ledger_request(release, dataset.digests, default_ledger,
                            release.request(method="dp-lora", config=config.__dict__,
                                            model=model_identity(backend, TIConfig()), **pixels_request(dataset)))
    if (earlier := earlier_release(ledger, release, target)) is not None:
        return release.name, report_text(earlier) + "\n" + REPEATED
    target = embedding_target(loras_dir, release.name, release.overwrite, "LoRA", LORA_SUFFIXES)
    train = local_trainer(lambda: backend, lambda side: dataset.images, params, config,
                          resolution=dataset.images.shape[-1], seed=release.seed(), progress=progress)
    _, result, _ = release_lora(train, report, target, ledger=ledger, force=release.overwrite)
    return release.name, report_text(result.report)
