"""What the ComfyUI nodes do, as plain functions (no ComfyUI imports), so CI can test them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from privdiff.backends.protocol import SDBackend
from privdiff.embeddings.dpagg import EMBEDDING_SUFFIXES, DPParams, aggregate_embedding_files, per_image_files
from privdiff.embeddings.files import load_embedding
from privdiff.embeddings.release import LedgerEntry, Output, open_ledger, release_embedding
from privdiff.embeddings.textual_inversion import Progress, TIConfig
from privdiff.errors import PrivdiffError
from privdiff.images import PrivateDataset
from privdiff.privacy.report import PrivacyReport
from privdiff.training import METHODS

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
    force_budget: bool = False
    dataset_label: str = ""
    reproducible_seed: int = -1
    noise_multiplier: float = 0.0

    def params(self) -> DPParams:
        """The mechanism's parameters (a noise multiplier of 0 means: calibrate for epsilon)."""
        sigma = self.noise_multiplier or None
        return DPParams(epsilon=None if sigma else self.epsilon, delta=self.delta, sample_rate=self.sample_rate,
                        clip_norm=self.clip_norm, bound=self.bound, noise_multiplier=sigma)

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


def prompt_for(template: str, name: str) -> str:
    """The prompt that uses the new embedding: ``template`` with ``{}`` → ``embedding:name``."""
    if template.count("{}") != 1:
        raise PrivdiffError(f"prompt template {template!r} must contain {{}} exactly once")
    return template.format(f"embedding:{name}")


def report_text(report: PrivacyReport) -> str:
    """A human-readable privacy report."""
    lines = [
        "PRIVATE release" if report.private else "NOT PRIVATE (reproducible seed)",
        f"mechanism: {report.mechanism}",
        f"guarantee: (epsilon={report.epsilon:.4g}, delta={report.delta:.3g})-DP, {report.accountant} accountant",
        f"noise multiplier {report.noise_multiplier:.4g}, sample rate {report.sample_rate:.4g}, "
        f"clip norm {report.clip_norm:.4g}, steps {report.steps}, N={report.dataset_size}",
        f"release {report.release_id}, privdiff {report.library_version}, {report.created}",
    ]
    if report.dataset_label:
        lines.append(f"dataset: {report.dataset_label}")
    return "\n".join(lines + [f"note: {n}" for n in report.notes])


def _ledger(release: Release, files: list[Path]) -> LedgerEntry | None:
    if not release.ledger_path.strip():
        return None
    budget = release.budget_epsilon or None
    return open_ledger(Path(release.ledger_path).expanduser(), files, budget_epsilon=budget,
                       budget_delta=release.delta if budget else None, force=release.force_budget)


def _outputs(release: Release, report: PrivacyReport) -> tuple[str, str, str]:
    return prompt_for(release.prompt_template, release.name), report_text(report), release.name


def train_embedding(
    backend: SDBackend,
    dataset: PrivateDataset,
    method: str,
    config: TIConfig,
    release: Release,
    embeddings_dir: Path,
    progress: Progress | None = None,
) -> tuple[str, str, str]:
    """DP Textual Inversion node: (prompt, report text, embedding name); writes the embedding file."""
    if method not in METHODS:
        raise PrivdiffError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    prompt_for(release.prompt_template, release.name)  # fail before training on a bad template
    target = embedding_target(embeddings_dir, release.name, release.overwrite)
    params = release.params()
    if method == "dpsgd" and release.sample_rate >= 1.0:
        params = DPParams(**{**params.__dict__, "sample_rate": min(1.0, config.batch_size / len(dataset))})
    _, result = release_embedding(
        lambda check: METHODS[method](
            backend, dataset.images, params, config, seed=release.seed(), dataset_label=release.label(),
            progress=progress, before_training=check,
        ),
        Output(target, token=release.name, force=release.overwrite),
        _ledger(release, dataset.files),
    )
    return _outputs(release, result.report)


def aggregate_files(
    folder: str, one_image_per_file: bool, center: str, release: Release, embeddings_dir: Path
) -> tuple[str, str, str]:
    """DP Aggregate Embeddings node: (prompt, report text, embedding name)."""
    files = per_image_files(folder, one_image_per_file)
    target = embedding_target(embeddings_dir, release.name, release.overwrite)
    public_center = load_embedding(center) if center.strip() else None
    _, result = release_embedding(
        lambda check: aggregate_embedding_files(
            files, release.params(), center=public_center, seed=release.seed(),
            dataset_label=release.label(), before_training=check,
        ),
        Output(target, token=release.name, force=release.overwrite),
        _ledger(release, files),
    )
    return _outputs(release, result.report)


def read_report(path: Path) -> str:
    """The Privacy Report node: the report carried by an embedding file, as text and JSON."""
    report = PrivacyReport.from_metadata(load_embedding(path).metadata)
    if report is None:
        return f"{path.name} carries no privdiff privacy report: nothing is known about its privacy."
    return report_text(report) + "\n\n" + json.dumps(json.loads(report.to_json()), indent=2)
