"""The spectral method's steps as the fronts (CLI, ComfyUI, A1111) run them: folders and files in, files out.

1. ``train_tokenizer``: codebooks from a public folder.
2. ``pretrain_prior``: the prior on the same (or another) public folder; the file holds its tokenizer.
   An interrupted pre-training continues from its checkpoint when run again.
3. ``finetune_prior``: the DP release. Checked and charged before any private image is decoded; state is
   checkpointed to a private folder (never next to the output), and running the same request again after
   an interruption resumes it: same report, remaining steps only, no second charge.
4. ``sample_prior``: coarse images from any prior (post-processing of a DP prior: no budget).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import private_folder
from privdiff.io.images import PrivateFiles, check_image, list_images, load_image_folder, read_private_files
from privdiff.io.untrusted_tensors import file_digest
from privdiff.privacy.distributed import Share, World, shares
from privdiff.privacy.ledger import image_digests
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.artifact import LedgerRequest, carries_release, release_artifact
from privdiff.release.dp_params import DPParams, check_params
from privdiff.release.output_plan import plan_output
from privdiff.wavelet.prior import LoadedPrior, PriorConfig, SpectralPrior, check_memory, load_prior, save_prior
from privdiff.wavelet.tokenizer import SpectralTokenizer, check_fit_memory, fit_tokenizer
from privdiff.wavelet.training import (
    Checkpoint,
    TrainConfig,
    carries_checkpoint,
    checkpoint_report,
    finetune,
    plan_finetune,
    pretrain,
)
from privdiff.wavelet.transform import levels_for


def default_checkpoint_dir() -> Path:
    """``$XDG_CACHE_HOME/privdiff/checkpoints`` (default ``~/.cache``): private, away from any output."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "privdiff" / "checkpoints"


def plan_folder(folder: str | Path, what: str) -> Path:
    """``folder`` checked before any work but not created: a writable folder, or one that can be created in the
    nearest folder above it that exists (``what`` names it in the one-line error)."""
    folder = Path(folder).expanduser()
    existing = next(p for p in (folder, *folder.absolute().parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise PrivdiffError(f"{what} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrivdiffError(f"{what} {folder} cannot be {'written' if existing == folder else 'created'}: "
                            f"{existing} is not writable")
    return folder


def checkpoint_folder(checkpoint_dir: str | Path | None = None) -> Path:
    """The checkpoint folder: ``checkpoint_dir``, else the default; created 0700 when missing (the default is
    made 0700 even when it exists). Checkpoint files are 0600 in either. Called once the inputs are read."""
    if checkpoint_dir:
        return private_folder(Path(checkpoint_dir).expanduser())
    return private_folder(default_checkpoint_dir(), tighten=True)


def load_folder(folder: str | Path, size: int, files: list[Path] | None = None) -> torch.Tensor:
    """A public folder's images [N,3,size,size] in 0..1; images smaller than ``size`` are refused, naming the
    file. ``files``: an earlier ``list_images(folder)``."""
    files = list_images(folder) if files is None else files
    _check_sizes(files, [check_image(path) for path in files], size)
    return load_image_folder(folder, size, files=files)[1]


def _check_sizes(files: list[Path], sizes: list[tuple[int, int]], size: int) -> None:
    """Refuse an image (of ``files``, declaring ``sizes``) smaller than the working resolution ``size``."""
    for path, (width, height) in zip(files, sizes, strict=True):
        if min(width, height) < size:
            raise PrivdiffError(f"{path} is {width}x{height}, smaller than the working resolution {size}")


def plan_file(out: str | Path, force: bool) -> Path:
    """A tokenizer's or prior's output, checked before any work (and again just before the write): it ends in
    .safetensors, is not a folder or special file, exists only with ``force``, and its folder takes a new file."""
    path = Path(out).expanduser()
    if path.suffix != ".safetensors":
        raise PrivdiffError(f"output {path} must end in .safetensors")
    return plan_output(path, "safetensors", force=force).path


def train_tokenizer(images: str | Path, out: str | Path, *, size: int = 32, base: int = 4,
                    codebook_size: int = 256, seed: int = 0, force: bool = False) -> SpectralTokenizer:
    """Fit a tokenizer on a **public** folder and write it."""
    path = plan_file(out, force)
    levels_for(size, base)
    files = list_images(images)
    check_fit_memory(len(files), size, base, codebook_size)
    tokenizer = fit_tokenizer(load_folder(images, size, files), size, base, codebook_size, seed=seed)
    tokenizer.save(plan_file(path, force), force=force)
    return tokenizer


def pretrain_prior(tokenizer: SpectralTokenizer, images: str | Path, out: str | Path, config: TrainConfig, *,
                   dim: int = 128, layers: int = 4, heads: int = 4, seed: int = 0, progress: Progress | None = None,
                   force: bool = False, device: str = "cpu", checkpoint_dir: str | Path | None = None,
                   checkpoint_every: int = 100) -> list[float]:
    """Pre-train a prior on a **public** folder; returns the training losses. Running the same request again
    after an interruption continues from its checkpoint in ``checkpoint_dir``."""
    path = plan_file(out, force)
    shape = PriorConfig.for_tokenizer(tokenizer, dim=dim, layers=layers, heads=heads)
    check_memory(shape, "pre-training", batch=config.batch_size, training=True, batch_name="images per batch")
    plan_folder(checkpoint_dir or default_checkpoint_dir(), "checkpoint folder")
    files = list_images(images)
    request = {"tokenizer": tokenizer.identity, "images": sorted(image_digests(files)), "config": asdict(config),
               "shape": [dim, layers, heads], "seed": seed, "out": str(path.resolve())}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:32]
    tokens = tokenizer.encode(load_folder(images, tokenizer.size, files))
    checkpoint = checkpoint_folder(checkpoint_dir) / f"pretrain-{key}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init of a public model
        prior = SpectralPrior(shape).to(device)
    losses = pretrain(prior, tokens, config, seed=seed, progress=progress, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every)
    save_prior(prior.cpu(), tokenizer, plan_file(path, force), force=force)
    checkpoint.unlink(missing_ok=True)
    return losses


def finetune_prior(
    prior_file: str | Path,
    images: PrivateFiles | str | Path,
    out: str | Path,
    params: DPParams,
    config: TrainConfig,
    *,
    ledger: LedgerRequest | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    seed: int | None = None,
    dataset_label: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
    device: str = "cpu",
    world: World | None = None,
) -> tuple[Path, PrivacyReport, bool]:
    """Release a DP fine-tune of a public prior on private images: (path, report, resumed). ``images`` is
    ``read_private_files(folder)`` or a folder to read so; ``ledger`` must charge ``images.digests``, the digests
    of the very bytes this release decodes. Across the ranks of ``world`` (rank 0 calls this, the others
    :func:`finetune_ranks`), each rank gets its slice of the images' bytes and trains on it."""
    world = world or World()
    path = plan_file(out, force)
    planned = plan_folder(checkpoint_dir or default_checkpoint_dir(), "checkpoint folder")
    if planned.resolve() == path.parent.resolve():
        raise PrivdiffError(f"the checkpoint folder {planned} is the output's folder; keep private state elsewhere")
    if not isinstance(images, PrivateFiles):
        images = read_private_files(images)
    public = load_public_prior(prior_file)
    if ledger is not None and sorted(ledger.digests) != sorted(images.digests):
        raise PrivdiffError("the ledger charges other images than the fine-tune reads: open it with the digests of "
                            "the images passed (PrivateFiles.digests)")
    check_finetune(public, images, params, len(images))
    request = {"prior": file_digest(prior_file, "prior"), "params": asdict(params),
               "config": asdict(config), "images": sorted(images.digests), "out": str(path.resolve()),
               "seed": seed}
    key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:32]
    checkpoint = Checkpoint(planned / f"wavelet-{key}.safetensors", checkpoint_every)
    resume = checkpoint.path.is_file()
    report = checkpoint_report(checkpoint) if resume else replace(
        plan_finetune(params, len(images), config, seed=seed, dataset_label=dataset_label), world_size=world.size)

    def produce() -> LoadedPrior:
        if world.size > 1:
            plans = [Share(images.subset(rows), rows, [], b"", (str(prior_file), params, config, report))
                     for rows in shares(len(images), world.size)]
            prior = finetune_ranks(world, plans, device=device, seed=seed, checkpoint=checkpoint,
                                   checkpoint_dir=checkpoint_dir, progress=progress)
            return LoadedPrior(prior.cpu(), public.tokenizer, report)
        tokens = private_tokens(public, images)
        checkpoint_folder(checkpoint_dir)  # created once every image decoded
        prior = finetune(public.prior.to(device), tokens, params, config, report, seed=seed, checkpoint=checkpoint,
                         progress=progress)
        return LoadedPrior(prior.cpu(), public.tokenizer, report)

    def write(result: LoadedPrior) -> Path:
        try:
            return save_prior(result.prior, result.tokenizer, plan_file(path, force), report=report, force=force)
        except PrivdiffError as exc:  # the last step's checkpoint holds the finished release
            raise PrivdiffError(f"{exc}; the finished fine-tune stays in its private checkpoint "
                                f"{checkpoint.path}: fix that and run the same request again to write it (no "
                                "second charge)") from None

    def carries(target: Path, release_id: str) -> bool:
        return carries_release(target, release_id) or carries_checkpoint(checkpoint, release_id)

    release_artifact(produce, report, path, write, carries, ledger, resume=resume)
    checkpoint.path.unlink(missing_ok=True)  # released: the private intermediate is not kept
    return path, report, resume


def load_public_prior(prior_file: str | Path) -> LoadedPrior:
    """The public prior a fine-tune starts from; a DP fine-tune is refused."""
    public = load_prior(prior_file)
    if public.report is not None:
        raise PrivdiffError(f"{prior_file} is already a DP fine-tune; start from the public prior")
    return public


def check_finetune(public: LoadedPrior, images: PrivateFiles, params: DPParams, records: int) -> None:
    """Refuse, before any image is decoded, a fine-tune of ``public`` on ``images`` (``records`` examples in all)
    whose parameters, image sizes or expected batch do not fit."""
    check_params(params, records, n_public_by_convention=True)
    _check_sizes(images.files, images.sizes, public.tokenizer.size)
    batch = max(1, round(params.sample_rate * records))
    check_memory(public.prior.config, "DP fine-tuning", batch=batch, training=True, per_sample=True,
                 batch_name="images per expected batch (sample rate x images)")


def private_tokens(public: LoadedPrior, images: PrivateFiles) -> torch.Tensor:
    """The token sequences [N, L] of the private images, decoded from the bytes read at the tokenizer's size."""
    return public.tokenizer.encode(images.load(public.tokenizer.size).images)


def finetune_ranks(
    world: World, plans: list[Share] | None = None, *, device: str = "cpu", seed: int | None = None,
    checkpoint: Checkpoint | None = None, checkpoint_dir: str | Path | None = None, progress: Progress | None = None,
) -> SpectralPrior | None:
    """A rank's part of a fine-tune across ranks (rank 0 passes ``plans``, its checkpoint and progress): load the
    public prior, tokenize this rank's whole slice, then ``finetune`` together. The fine-tuned prior on rank 0."""
    share: Share = world.scatter(plans)
    prior_file, params, config, report = share.settings
    state: dict[str, object] = {}

    def prepare() -> None:
        public = load_prior(prior_file)
        state["prior"] = public.prior.to(device)
        state["tokens"] = private_tokens(public, share.records)
        if world.leader:
            checkpoint_folder(checkpoint_dir)  # created once every image decoded

    world.collect(prepare)
    prior = finetune(state["prior"], state["tokens"], params, config, report, seed=seed, checkpoint=checkpoint,
                     progress=progress, world=world, rows=share.rows)
    return prior if world.leader else None


def sample_prior(prior_file: str | Path, num_images: int, *, seed: int = 0, temperature: float = 1.0,
                 progress: Progress | None = None, device: str = "cpu") -> tuple[torch.Tensor, LoadedPrior]:
    """Coarse images [n,3,size,size] in 0..1 from a prior file (the same seed gives the same images)."""
    loaded = load_prior(prior_file)
    return draw(loaded, num_images, seed=seed, temperature=temperature, progress=progress, device=device), loaded


def draw(loaded: LoadedPrior, num_images: int, *, seed: int = 0, temperature: float = 1.0,
         progress: Progress | None = None, device: str = "cpu") -> torch.Tensor:
    """Coarse images [n,3,size,size] in 0..1 from a loaded prior; refused first when they would not fit in memory."""
    if num_images < 1:
        raise PrivdiffError(f"number of images {num_images} must be at least 1")
    check_memory(loaded.prior.config, f"sampling {num_images} images", batch=num_images)
    generator = torch.Generator().manual_seed(seed)
    tokens = loaded.prior.to(device).sample(num_images, generator, temperature, progress)
    return loaded.tokenizer.decode(tokens.cpu())
