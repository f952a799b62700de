"""Release requests and what a front shows of them: the shared options, output names, the ledger request,
prompts and report text. Every GUI front (ComfyUI nodes, A1111 tab) builds a :class:`Release` from its widgets."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from privdiff.embeddings.dpagg import EMBEDDING_SUFFIXES
from privdiff.errors import PrivdiffError
from privdiff.io.images import PrivateDataset, image_file_digest, list_images
from privdiff.privacy.report import PrivacyReport
from privdiff.release.artifact import LedgerRequest, open_ledger, released_report
from privdiff.release.dp_params import DPParams

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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


def embedding_target(folder: Path, name: str, overwrite: bool, kind: str = "embedding",
                     suffixes: tuple[str, ...] = EMBEDDING_SUFFIXES) -> Path:
    """``folder/name.safetensors``, refusing odd names and (unless ``overwrite``) existing files of the name with
    any of the ``suffixes`` the host loads for this ``kind`` of file."""
    if not NAME.match(name) or ".." in name:
        raise PrivdiffError(f"{kind} name {name!r} must be letters, digits, '_', '-' or '.' (no folders)")
    for suffix in suffixes:
        other = folder / f"{name}{suffix}"
        if other.exists() and not (overwrite and suffix == ".safetensors"):
            raise PrivdiffError(f"{other} already exists; pick another name or enable overwrite")
    return folder / f"{name}.safetensors"


def target_path(folder: Path, name: str, kind: str = "target") -> Path:
    """A style target (or other ``kind`` of) file: an absolute path, or a name (with or without .safetensors)
    in ``folder``."""
    text = name.strip()
    path = Path(text).expanduser()
    if not path.is_absolute():
        if not NAME.match(text) or ".." in text:
            raise PrivdiffError(f"{kind} name {text!r} must be letters, digits, '_', '-' or '.' (no folders), or an "
                                "absolute path")
        path = folder / text
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


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
    if report.world_size > 1:
        lines.append(f"trained across {report.world_size} processes (torchrun ranks)")
    return "\n".join(lines + [f"note: {n}" for n in report.notes])


def ledger_request(release: Release, digests: list[str], default_ledger: Path | None,
                   request: dict) -> LedgerRequest | None:
    """The ledger request charging the images of ``digests`` (those of the bytes released), or None without a
    ledger; ``request`` keys "the same request" together with the digests."""
    path = ledger_path(release, default_ledger)
    if path is None:
        return None
    budget = release.budget_epsilon or None
    return open_ledger(path, digests, budget_epsilon=budget, budget_delta=release.delta if budget else None,
                       change_budget=release.change_budget, force=release.force_budget, request=request)


REPEATED = ("note: the same request was released before; returned without training or charging the budget "
            "again (set new_release for a new one)")
"""The line a front adds to the report of an identical earlier release it returns."""


def earlier_release(ledger: LedgerRequest | None, release: Release, target: Path) -> PrivacyReport | None:
    """The report of an identical earlier request whose file is still at ``target``, unless a new release is
    asked."""
    if ledger is None or release.new_release:
        return None
    earlier = ledger.ledger.find(ledger.request)
    if earlier is None or not target.is_file():
        return None
    report = released_report(target)
    return report if report is not None and report.release_id == earlier["release_id"] else None


def ledger_path(release: Release, default_ledger: Path | None) -> Path | None:
    return Path(release.ledger_path.strip()).expanduser() if release.ledger_path.strip() else default_ledger


def pixels_request(dataset: PrivateDataset) -> dict[str, object]:
    """What a dataset adds to a request key beyond its file digests: the resolution and a digest of the very
    pixels the release trains on (LOCAL ONLY, like the file digests)."""
    pixels = dataset.images.detach().cpu().contiguous()
    return {"resolution": list(pixels.shape[-2:]), "pixels": hashlib.sha256(pixels.numpy()).hexdigest()}


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

