"""The DP Textual Inversion and DP Aggregate Embeddings front logic: inputs -> release -> (prompt, report, name)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from privdiff.app.release_options import (
    REPEATED,
    Release,
    earlier_release,
    embedding_target,
    ledger_path,
    ledger_request,
    pixels_request,
    prompt_for,
    report_text,
)
from privdiff.embeddings.dpagg import aggregate_embedding_files, center_label, per_image_files, plan_files_release
from privdiff.embeddings.files import Embedding, load_embedding
from privdiff.embeddings.methods import METHODS, PLANS
from privdiff.embeddings.release import release_embedding
from privdiff.embeddings.textual_inversion import PLACEHOLDER, TIConfig, initial_vectors
from privdiff.errors import PrivdiffError
from privdiff.io.images import PrivateDataset, list_images
from privdiff.models.protocol import SDBackend
from privdiff.privacy.ledger import image_digests
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.artifact import LedgerRequest
from privdiff.release.dp_params import DPParams, check_params
from privdiff.release.output_plan import plan_output


def _vectors_digest(embedding: Embedding | None) -> str:
    """A digest of an embedding's vectors (its content, not its file name), or "" for none."""
    if embedding is None:
        return ""
    digest = hashlib.sha256()
    for name, tensor in sorted(embedding.vectors.items()):
        digest.update(f"{name}{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().to(torch.float32).contiguous().numpy())
    return digest.hexdigest()


@torch.no_grad()
def model_identity(backend: SDBackend, config: TIConfig) -> str:
    """A public fingerprint of the model for request keys: the init word's token vectors and the UNet's
    prediction on a fixed public input (a gray 64 px image's latents, the init word's prompt), rounded to
    4 significant digits so that kernel nondeterminism does not change it."""
    vectors = initial_vectors(backend, config)
    gray = torch.full((1, 3, 64, 64), 0.5, device=backend.device, dtype=backend.dtype)
    latents = backend.encode_images(gray, torch.Generator(device=backend.device).manual_seed(0))
    cond = backend.encode_prompts([f"a painting of {PLACEHOLDER}"], PLACEHOLDER,
                                  {k: v.to(backend.device, backend.dtype)[None] for k, v in vectors.items()})
    t = torch.full((1,), len(backend.alphas_cumprod) // 2, device=backend.device, dtype=torch.long)
    prediction = backend.predict_noise(latents, t, cond).float().cpu()
    digest = hashlib.sha256()
    for name, tensor in [*sorted(vectors.items()), ("unet", prediction)]:
        digest.update(name.encode())
        digest.update(" ".join(f"{x:.4g}" for x in tensor.flatten().tolist()).encode())
    return digest.hexdigest()


def _earlier_release(ledger: LedgerRequest | None, release: Release, target: Path) -> tuple[str, str, str] | None:
    """The outputs of an identical earlier request whose file is still there, unless a new release is asked."""
    report = earlier_release(ledger, release, target)
    if report is None:
        return None
    text = report_text(report) + "\n" + REPEATED
    return prompt_for(release.prompt_template, release.name, release.prompt_syntax), text, release.name


def _outputs(release: Release, report: PrivacyReport) -> tuple[str, str, str]:
    return prompt_for(release.prompt_template, release.name, release.prompt_syntax), report_text(report), release.name


def train_embedding(
    backend: SDBackend,
    dataset: PrivateDataset,
    method: str,
    config: TIConfig,
    release: Release,
    embeddings_dir: Path,
    progress: Progress | None = None,
    default_ledger: Path | None = None,
) -> tuple[str, str, str]:
    """DP Textual Inversion node: (prompt, report text, embedding name); writes the embedding file.

    With a ledger (``ledger_path``, else ``default_ledger``) an identical earlier request is returned
    without training or charging again, unless ``new_release`` is set.
    """
    if method not in METHODS:
        raise PrivdiffError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    prompt_for(release.prompt_template, release.name)  # fail before training on a bad template
    params = release.params()
    if method == "dpsgd" and release.sample_rate >= 1.0:
        params = DPParams(**{**params.__dict__, "sample_rate": min(1.0, config.batch_size / len(dataset))})
    check_params(params, len(dataset), n_public_by_convention=method == "dpsgd")
    target = embeddings_dir / f"{release.name}.safetensors"
    ledger = ledger_request(release, dataset.digests, default_ledger,
                     release.request(method=method, config=config.__dict__, model=model_identity(backend, config),
                                     **pixels_request(dataset)))
    if (earlier := _earlier_release(ledger, release, target)) is not None:
        return earlier
    output = plan_output(embedding_target(embeddings_dir, release.name, release.overwrite), "safetensors",
                         release.name, release.overwrite)
    report = PLANS[method](params, len(dataset), config, seed=release.seed(), dataset_label=release.label())
    _, result, _ = release_embedding(
        lambda: METHODS[method](backend, dataset.images, params, config, seed=release.seed(),
                                dataset_label=release.label(), progress=progress, report=report),
        report, output, ledger,
    )
    return _outputs(release, result.report)


def aggregate_files(
    folder: str, one_image_per_file: bool, center: str, release: Release, embeddings_dir: Path,
    images_folder: str = "", default_ledger: Path | None = None,
) -> tuple[str, str, str]:
    """DP Aggregate Embeddings node: (prompt, report text, embedding name).

    A ledger charges the images the files were trained on, so ``images_folder`` must name them.
    """
    if not one_image_per_file:
        raise PrivdiffError("the guarantee needs each file to come from exactly one image: confirm it by "
                            "enabling one_image_per_file")
    files = per_image_files(folder)
    params = release.params()
    check_params(params, len(files))
    public_center = load_embedding(center) if center.strip() else None
    ledger_wanted = ledger_path(release, default_ledger) is not None
    sources: list[Path] = []
    if images_folder.strip():
        sources = list_images(images_folder)
    elif ledger_wanted:
        raise PrivdiffError("the ledger charges the images the embeddings were trained on: set images_folder "
                            "to their folder")
    if sources and len(sources) != len(files):
        raise PrivdiffError(f"images_folder holds {len(sources)} images but folder holds {len(files)} embedding "
                            "files; they must correspond one to one")
    target = embeddings_dir / f"{release.name}.safetensors"
    request = release.request(center=center, center_vectors=_vectors_digest(public_center),
                              embeddings=sorted(image_digests(files)))
    ledger = ledger_request(release, image_digests(sources), default_ledger, request) if sources else None
    if (earlier := _earlier_release(ledger, release, target)) is not None:
        return earlier
    output = plan_output(embedding_target(embeddings_dir, release.name, release.overwrite), "safetensors",
                         release.name, release.overwrite)
    report = plan_files_release(params, len(files), center_label(center.strip() or None), seed=release.seed(),
                                dataset_label=release.label())
    _, result, _ = release_embedding(
        lambda: aggregate_embedding_files(files, params, center=public_center, seed=release.seed(), report=report),
        report, output, ledger,
    )
    return _outputs(release, result.report)
