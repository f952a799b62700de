"""The privacy report every DP artifact carries (docs/privacy.md).

It holds the mechanism's public parameters and the accountant's epsilon, never anything else computed
from the private data (no dataset hash, no file names, no realized counts). It names the neighbouring
relation the epsilon holds for: ``add-remove`` (one image added or removed; the dataset size is then not
released: the divisor is a size the user declared public) or ``replace-one`` (one image replaced by
another; the dataset size N is public under that relation and appears as ``public_size``). Embedding
files keep the report in their safetensors metadata under ``REPORT_KEY``; other artifacts get a
``<artifact>.privacy.json`` sidecar.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import atomic_write_text
from privdiff.io.untrusted import parse_json
from privdiff.privacy import checks

REPORT_KEY = "privdiff.privacy_report"
SIDECAR_SUFFIX = ".privacy.json"
RELATION_NOTES = {
    "add-remove": "add-remove: the guarantee holds between datasets that differ by one image added or "
                  "removed; public_size is a size the user declared public, not the dataset's size",
    "replace-one": "replace-one: the guarantee holds between datasets of the same size N that differ in "
                   "one image; N is public under this relation and is public_size",
    "add-remove (N public)": "add-remove with N treated as public, the DP-SGD convention (as in opacus): "
                             "public_size is the dataset's size, used for the expected batch size",
}
NOT_PRIVATE_NOTE = (
    "NOT PRIVATE: a reproducible seed was used, so the noise can be recomputed and removed; "
    "epsilon only describes the mechanism's parameters"
)


@dataclass
class PrivacyReport:
    """Parameters and guarantee of one DP release (the subsampled Gaussian mechanism)."""

    mechanism: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    clip_norm: float
    bound: str
    center: str
    steps: int
    accountant: str
    relation: str
    public_size: int
    library_version: str
    release_id: str
    dataset_label: str | None
    private: bool
    notes: list[str]
    created: str
    world_size: int = 1
    """How many processes (torch.distributed ranks) trained the release; rank 0 alone sampled, noised and wrote."""

    def to_json(self) -> str:
        """Indented JSON with the fields in declaration order."""
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> PrivacyReport:
        """Parse and type-check a report; unknown keys (from newer versions) are ignored."""
        if not isinstance(text, str | bytes):
            raise PrivdiffError(f"privacy report must be JSON text, got {type(text).__name__}")
        data = parse_json(text, "privacy report")  # bounded size and depth, NaN refused
        if not isinstance(data, dict):
            raise PrivdiffError(f"privacy report must be a JSON object, got {type(data).__name__}")
        values = {}
        if "public_size" not in data and "dataset_size" in data:  # a privdiff 0.1 report
            data = {**data, "public_size": data["dataset_size"], "relation": "add-remove (N public)",
                    "bound": "clip", "center": "unknown (report from privdiff 0.1)"}
        for field in dataclasses.fields(cls):
            if field.name not in data and field.default is not dataclasses.MISSING:  # a report from before the field
                continue
            if field.name not in data:
                raise PrivdiffError(f"privacy report has no {field.name!r} field")
            values[field.name] = _typed(field.name, field.type, data[field.name])
        _in_range(values)
        return cls(**values)

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata entry: ``{REPORT_KEY: compact JSON}``."""
        return {REPORT_KEY: json.dumps(dataclasses.asdict(self), separators=(",", ":"), allow_nan=False)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> PrivacyReport | None:
        """The report in a safetensors metadata header, or None when there is none."""
        if not metadata or REPORT_KEY not in metadata:
            return None
        return cls.from_json(metadata[REPORT_KEY])

    def write_sidecar(self, artifact_path: str | os.PathLike, force: bool = False) -> Path:
        """Write ``<artifact_path>.privacy.json`` atomically; an existing one is refused unless ``force``."""
        return atomic_write_text(sidecar_path(artifact_path), self.to_json() + "\n", force=force)


def sidecar_path(artifact_path: str | os.PathLike) -> Path:
    """Where the JSON sidecar of ``artifact_path`` lives."""
    path = Path(artifact_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def make_report(
    *,
    mechanism: str,
    epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    clip_norm: float,
    steps: int,
    accountant: str,
    relation: str,
    public_size: int,
    bound: str = "clip",
    center: str = "zero",
    dataset_label: str | None = None,
    private: bool = True,
    notes: Sequence[str] = (),
) -> PrivacyReport:
    """A checked report with this library's version, a random release id and the UTC time.

    A note explains the neighbouring relation, and a NOT PRIVATE note is added when ``private`` is false.
    """
    from privdiff import __version__

    if not isinstance(mechanism, str) or not mechanism:
        raise PrivdiffError(f"mechanism must be a non-empty string, got {mechanism!r}")
    if not isinstance(accountant, str) or not accountant:
        raise PrivdiffError(f"accountant must be a non-empty string, got {accountant!r}")
    if relation not in RELATION_NOTES:
        raise PrivdiffError(f"relation must be one of {', '.join(RELATION_NOTES)}, got {relation!r}")
    if dataset_label is not None and not isinstance(dataset_label, str):
        raise PrivdiffError(f"dataset_label must be a string or None, got {dataset_label!r}")
    all_notes = [RELATION_NOTES[relation], *([] if private else [NOT_PRIVATE_NOTE]), *map(str, notes)]
    return PrivacyReport(
        mechanism=mechanism,
        epsilon=checks.positive("epsilon", epsilon),
        delta=checks.open_unit("delta", delta),
        noise_multiplier=checks.positive("noise_multiplier", noise_multiplier),
        sample_rate=checks.sample_rate(sample_rate),
        clip_norm=checks.positive("clip_norm", clip_norm),
        bound=str(bound),
        center=str(center),
        steps=checks.count("steps", steps),
        accountant=accountant,
        relation=relation,
        public_size=checks.count("public_size", public_size),
        library_version=__version__,
        release_id=uuid.uuid4().hex,
        dataset_label=dataset_label,
        private=bool(private),
        notes=all_notes,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _in_range(values: dict) -> None:
    """The numbers of a parsed report in the ranges ``make_report`` gives them (one line naming the field)."""
    for name, check in (("epsilon", checks.positive), ("delta", checks.open_unit),
                        ("noise_multiplier", checks.positive), ("clip_norm", checks.positive),
                        ("steps", checks.count), ("public_size", checks.count), ("world_size", checks.count)):
        if name in values:
            check(f"privacy report field {name!r}", values[name])
    checks.sample_rate(values["sample_rate"], "privacy report field 'sample_rate'")


def _typed(name: str, annotation: str, value: object) -> object:
    """``value`` checked against a field annotation of PrivacyReport (kept as strings by __future__)."""
    ok = {
        "str": isinstance(value, str),
        "str | None": value is None or isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[annotation]
    if not ok:
        raise PrivdiffError(f"privacy report field {name!r} must be {annotation}, got {value!r}")
    return float(value) if annotation == "float" else value
