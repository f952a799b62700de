"""What the fronts (ComfyUI nodes, A1111 tab) do, as plain functions: inputs → library calls → outputs.

No host imports, so CI tests them without ComfyUI or A1111.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from privdiff.backends.protocol import SDBackend
from privdiff.embeddings.dpagg import (
    EMBEDDING_SUFFIXES,
    DPParams,
    aggregate_embedding_files,
    center_label,
    check_params,
    expected_snr,
    per_image_files,
    plan_files_release,
)
from privdiff.embeddings.files import Embedding, load_embedding
from privdiff.embeddings.textual_inversion import PLACEHOLDER, Progress, TIConfig, initial_vectors
from privdiff.errors import PrivdiffError
from privdiff.guidance.encoders import ImageEncoder
from privdiff.guidance.target import load_target, make_target, plan_target, save_target, target_params
from privdiff.images import PrivateDataset, image_file_digest, list_images, read_private_files
from privdiff.output_plan import plan_output
from privdiff.privacy.ledger import image_digests
from privdiff.privacy.report import PrivacyReport
from privdiff.release import LedgerRequest, carries_release, open_ledger, release_artifact, release_embedding
from privdiff.training import METHODS, PLANS
from privdiff.wavelet.training import TrainConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Release:
    """The node options shared by every DP release: privacy, output and ledger."""

    name: str
    epsilon: float
    delta: float
    sample_rate: float
    clip_norm: float
    bound: str
    prompt_template: str
    overwrite: bool = False
    ledger_path: str = ""
    budget_epsilon: float = 0.0
    change_budget: bool = False
    force_budget: bool = False
    new_release: bool = False
    public_size: int = 0
    dataset_label: str = ""
    reproducible_seed: int = -1
    noise_multiplier: float = 0.0
    prompt_syntax: str = "embedding:{}"
    """How the host's prompts name an embedding: ComfyUI's ``embedding:name``, A1111's bare ``{}``."""

    def params(self) -> DPParams:
        """The mechanism's parameters; 0 means "not set" for epsilon, noise_multiplier and public_size."""
        if bool(self.epsilon) == bool(self.noise_multiplier):
            raise PrivdiffError(f"set exactly one of epsilon ({self.epsilon}) and noise_multiplier "
                                f"({self.noise_multiplier}); the other must be 0")
        return DPParams(epsilon=self.epsilon or None, delta=self.delta, sample_rate=self.sample_rate,
                        clip_norm=self.clip_norm, bound=self.bound, noise_multiplier=self.noise_multiplier or None,
                        public_size=self.public_size or None)

    def request(self, **extra: object) -> dict[str, object]:
        """What makes two runs the same request, for recognising a repeated one (the seed included)."""
        fields = {k: v for k, v in self.__dict__.items()
                  if k not in ("overwrite", "ledger_path", "budget_epsilon", "change_budget", "force_budget",
                               "new_release", "prompt_syntax")}
        return {**fields, **extra}

    def seed(self) -> int | None:
        """None (secure randomness) unless the user fixed a seed, which marks the release not private."""
        return None if self.reproducible_seed < 0 else self.reproducible_seed

    def label(self) -> str | None:
        return self.dataset_label.strip() or None


def embedding_target(folder: Path, name: str, overwrite: bool) -> Path:
    """``folder/name.safetensors``, refusing odd names and (unless ``overwrite``) existing files."""
    if not _NAME.match(name) or ".." in name:
        raise PrivdiffError(f"embedding name {name!r} must be letters, digits, '_', '-' or '.' (no folders)")
    for suffix in EMBEDDING_SUFFIXES:
        other = folder / f"{name}{suffix}"
        if other.exists() and not (overwrite and suffix == ".safetensors"):
            raise PrivdiffError(f"{other} already exists; pick another name or enable overwrite")
    return folder / f"{name}.safetensors"


def prompt_for(template: str, name: str, syntax: str = "embedding:{}") -> str:
    """The prompt that uses the new embedding: ``template`` with ``{}`` → the name in the host's ``syntax``."""
    if template.count("{}") != 1:
        raise PrivdiffError(f"prompt template {template!r} must contain {{}} exactly once")
    return template.format(syntax.format(name))


def report_text(report: PrivacyReport) -> str:
    """A human-readable privacy report."""
    lines = [
        "PRIVATE release" if report.private else "NOT PRIVATE (reproducible seed)",
        f"mechanism: {report.mechanism}",
        f"guarantee: (epsilon={report.epsilon:.4g}, delta={report.delta:.3g})-DP, {report.accountant} accountant",
        f"noise multiplier {report.noise_multiplier:.4g}, sample rate {report.sample_rate:.4g}, "
        f"clip norm {report.clip_norm:.4g} ({report.bound}, centre: {report.center}), steps {report.steps}",
        f"neighbouring relation: {report.relation}, public size {report.public_size}",
        f"release {report.release_id}, privdiff {report.library_version}, {report.created}",
    ]
    if report.dataset_label:
        lines.append(f"dataset: {report.dataset_label}")
    return "\n".join(lines + [f"note: {n}" for n in report.notes])


def _ledger(release: Release, digests: list[str], default_ledger: Path | None, request: dict) -> LedgerRequest | None:
    """The ledger request charging the images of ``digests`` (those of the bytes released), or None without a
    ledger; ``request`` keys "the same request" together with the digests."""
    path = _ledger_path(release, default_ledger)
    if path is None:
        return None
    budget = release.budget_epsilon or None
    return open_ledger(path, digests, budget_epsilon=budget, budget_delta=release.delta if budget else None,
                       change_budget=release.change_budget, force=release.force_budget, request=request)


def _ledger_path(release: Release, default_ledger: Path | None) -> Path | None:
    return Path(release.ledger_path.strip()).expanduser() if release.ledger_path.strip() else default_ledger


def pixels_request(dataset: PrivateDataset) -> dict[str, object]:
    """What a dataset adds to a request key beyond its file digests: the resolution and a digest of the very
    pixels the release trains on (LOCAL ONLY, like the file digests)."""
    pixels = dataset.images.detach().cpu().contiguous()
    return {"resolution": list(pixels.shape[-2:]), "pixels": hashlib.sha256(pixels.numpy()).hexdigest()}


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
    if ledger is None or release.new_release:
        return None
    earlier = ledger.ledger.find(ledger.request)
    if earlier is None or not target.is_file():
        return None
    report = PrivacyReport.from_metadata(load_embedding(target).metadata)
    if report is None or report.release_id != earlier["release_id"]:
        return None
    text = report_text(report) + "\nnote: the same request was released before; returned without training " \
                                 "or charging the budget again (set new_release for a new one)"
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
    ledger = _ledger(release, dataset.digests, default_ledger,
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
    ledger_wanted = _ledger_path(release, default_ledger) is not None
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
    ledger = _ledger(release, image_digests(sources), default_ledger, request) if sources else None
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
def target_path(folder: Path, name: str, kind: str = "target") -> Path:
    """A style target (or other ``kind`` of) file: an absolute path, or a name (with or without .safetensors)
    in ``folder``."""
    text = name.strip()
    path = Path(text).expanduser()
    if not path.is_absolute():
        if not _NAME.match(text) or ".." in text:
            raise PrivdiffError(f"{kind} name {text!r} must be letters, digits, '_', '-' or '.' (no folders), or an "
                                "absolute path")
        path = folder / text
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def make_style_target(
    encoder: ImageEncoder,
    dataset: PrivateDataset,
    release: Release,
    targets_dir: Path,
    progress: Progress | None = None,
    default_ledger: Path | None = None,
) -> tuple[str, str]:
    """DP Style Target node: (report text, target name); writes ``targets_dir/<name>.safetensors``.

    Like the embedding nodes, an identical earlier request is returned without charging again unless
    ``new_release`` is set.
    """
    params = target_params(release.epsilon or None, release.delta, release.sample_rate,
                           public_size=release.public_size or None)
    check_params(params, len(dataset))
    path = target_path(targets_dir, release.name)
    ledger = _ledger(release, dataset.digests, default_ledger,
                     release.request(kind="style target", encoder=encoder.identity, **pixels_request(dataset)))
    if ledger is not None and not release.new_release and path.is_file():
        earlier = ledger.ledger.find(ledger.request)
        if earlier is not None and carries_release(path, earlier["release_id"]):
            report = load_target(path).report
            return (_target_text(report, encoder.identity) + "\nnote: the same request was released before; "
                    "returned without charging the budget again (set new_release for a new one)"), release.name
    if path.exists() and not release.overwrite:
        raise PrivdiffError(f"{path} already exists; pick another name or enable overwrite")
    report = plan_target(params, len(dataset), encoder.identity, seed=release.seed(), dataset_label=release.label())
    expected_snr(report.public_size, params.sample_rate, report.noise_multiplier, encoder.dim)  # warns before work
    release_artifact(
        lambda: make_target(encoder, dataset.images, params, seed=release.seed(), report=report, progress=progress),
        report, path, lambda target: save_target(target, path, force=release.overwrite), carries_release, ledger)
    return _target_text(report, encoder.identity), release.name


def _target_text(report: PrivacyReport, encoder: str) -> str:
    return report_text(report) + f"\nimage encoder: {encoder}\nthe guarantee covers the target; sampling " \
                                 "with it is post-processing and spends no budget"


def folder_state(folder: Path) -> str:
    """A digest of a folder's image files (names and content digests): changes whenever what they hold changes,
    even by an edit that keeps a file's size and modification time."""
    digest = hashlib.sha256(str(folder).encode())
    try:
        for path in list_images(folder, warn=False):
            digest.update(f"{path.name}\0{image_file_digest(path)}\n".encode())
    except PrivdiffError as exc:
        digest.update(str(exc).encode())  # the node itself reports a missing folder or an unreadable file
    return digest.hexdigest()


def read_report(path: Path) -> str:
    """The Privacy Report node and tab: the report an embedding, DP style target or spectral prior file carries, as
    text and JSON; each kind is read by its own checked loader."""
    kind = _artifact_kind(path)
    if kind == "target":
        target = load_target(path)
        report, text = target.report, _target_text(target.report, target.encoder)
    elif kind == "prior":
        from privdiff.wavelet.prior import load_prior

        report = load_prior(path).report
        text = "" if report is None else _prior_text(report)
    else:
        report = PrivacyReport.from_metadata(load_embedding(path).metadata)
        text = "" if report is None else report_text(report)
    if report is None:
        return f"{path.name} carries no privdiff privacy report: nothing is known about its privacy."
    return text + "\n\n" + json.dumps(json.loads(report.to_json()), indent=2)


def _artifact_kind(path: Path) -> str:
    """"target", "prior" or "embedding" from a regular .safetensors file's header; anything else is "embedding",
    whose loader refuses what it cannot read in one line."""
    from safetensors import SafetensorError, safe_open

    from privdiff.guidance.target import ENCODER_KEY
    from privdiff.wavelet.prior import KIND

    if path.suffix != ".safetensors" or not path.is_file():
        return "embedding"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return "embedding"
    return "prior" if metadata.get("privdiff_kind") == KIND else "target" if ENCODER_KEY in metadata else "embedding"


def finetune_spectral(
    prior_file: str | Path,
    images: str | Path,
    release: Release,
    config: TrainConfig,
    priors_dir: Path,
    checkpoint_dir: Path,
    progress: Progress | None = None,
    default_ledger: Path | None = None,
    device: str = "cpu",
    checkpoint_every: int = 50,
) -> tuple[str, Path]:
    """DP Spectral Fine-tune: (report text, DP prior path ``priors_dir/<name>.safetensors``).

    Like the other releases, an identical earlier request whose file is still there is returned without
    training or charging again, unless ``new_release`` is set. Running the same request again after an
    interruption resumes it from ``checkpoint_dir`` (a private folder) without a second charge.
    """
    from privdiff.untrusted_tensors import file_digest
    from privdiff.wavelet.workflow import finetune_prior

    if release.public_size:
        raise PrivdiffError("public_size does not apply to DP-SGD fine-tuning: it treats N as public (add-remove)")
    path = target_path(priors_dir, release.name, kind="prior")
    if Path(prior_file).expanduser().resolve() == path.resolve():
        raise PrivdiffError(f"the DP prior {path.name} would overwrite the public prior it starts from; pick "
                            "another name")
    private = read_private_files(images)  # read once: the ledger charges the very bytes decoded
    params = DPParams(epsilon=release.epsilon or None, delta=release.delta, sample_rate=release.sample_rate,
                      clip_norm=release.clip_norm, bound=release.bound,
                      noise_multiplier=release.noise_multiplier or None)
    prior_digest = file_digest(prior_file, "prior")  # a FIFO or folder is refused, never read
    ledger = _ledger(release, private.digests, default_ledger,
                     release.request(kind="spectral prior", prior=prior_digest, config=config.__dict__))
    if ledger is not None and not release.new_release and path.is_file():
        earlier = ledger.ledger.find(ledger.request)
        if earlier is not None and carries_release(path, earlier["release_id"]):
            report = PrivacyReport.from_metadata(_metadata(path))
            return (_prior_text(report) + "\nnote: the same request was released before; returned without training "
                    "or charging the budget again (set new_release for a new one)"), path
    if path.exists() and not release.overwrite:
        raise PrivdiffError(f"{path} already exists; pick another name or enable overwrite")
    out, report, resumed = finetune_prior(
        prior_file, private, path, params, config, ledger=ledger, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, seed=release.seed(), dataset_label=release.label(), progress=progress,
        force=release.overwrite, device=device)
    text = _prior_text(report)
    if resumed:
        text += "\nnote: resumed an interrupted fine-tune of the same request (charged once)"
    return text, out


def _prior_text(report: PrivacyReport) -> str:
    return report_text(report) + "\nthe guarantee covers this prior; its samples and their upsampling are " \
                                 "post-processing (and the pre-training images must really be public)"


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
