"""Privacy budget ledger: a local JSON file the data owner keeps and never ships (DESIGN.md §3).

A dataset is identified by ``dataset_fingerprint`` of its files' contents; the fingerprint stays in the
ledger and never goes into a report or artifact. Every release recorded for a dataset is composed with
``accountants.composed_epsilon`` at the budget's delta. The protocol around a release is::

    ledger.check(fp, report)    # before the work: refuses a release that would exceed the budget
    ...                         # train / aggregate, write the artifact
    ledger.record(fp, report)   # after the artifact is written

Writes are atomic; the ledger is meant for one process at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from privdiff.atomic import atomic_write_text
from privdiff.errors import PrivdiffError
from privdiff.privacy import checks
from privdiff.privacy.accountants import Event, composed_epsilon
from privdiff.privacy.report import PrivacyReport

LEDGER_FORMAT = "privdiff-budget-ledger"
LEDGER_VERSION = 1
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def dataset_fingerprint(files: Sequence[str | os.PathLike]) -> str:
    """sha256 over the sorted sha256 digests of the files' contents (order and names do not matter).

    LOCAL ONLY: a deterministic hash tells neighbouring datasets apart, so it must never be released.
    """
    if not files:
        raise PrivdiffError("cannot fingerprint a dataset without files")
    digests = sorted(_file_digest(Path(f)) for f in files)
    return hashlib.sha256(("privdiff-dataset-v1\n" + "\n".join(digests)).encode()).hexdigest()


class BudgetLedger:
    """The releases and total (epsilon, delta) budget of each dataset, in the JSON file ``path``."""

    def __init__(self, path: str | os.PathLike, accountant: str | None = None) -> None:
        self.path = Path(path)
        self.accountant = accountant

    def set_budget(self, fingerprint: str, epsilon: float, delta: float) -> None:
        """Set (or change) the total budget of a dataset."""
        budget = {"epsilon": checks.positive("epsilon", epsilon), "delta": checks.open_unit("delta", delta)}
        data = self._load()
        entry = data["datasets"].setdefault(_check_fingerprint(fingerprint), {"budget": None, "releases": []})
        entry["budget"] = budget
        self._save(data)

    def budget(self, fingerprint: str) -> tuple[float, float] | None:
        """The (epsilon, delta) budget of a dataset, or None when none was set."""
        entry = self._load()["datasets"].get(_check_fingerprint(fingerprint))
        budget = entry and entry["budget"]
        return (budget["epsilon"], budget["delta"]) if budget else None

    def spent(self, fingerprint: str) -> tuple[str, float]:
        """(accountant, epsilon) of all releases recorded for the dataset, at the budget's delta."""
        entry = self._entry(self._load(), fingerprint)
        return composed_epsilon(_events(entry), entry["budget"]["delta"], self.accountant)

    def check(self, fingerprint: str, report: PrivacyReport, force: bool = False) -> tuple[str, float]:
        """(accountant, epsilon) after adding ``report``'s release; refused over budget unless ``force``."""
        entry = self._entry(self._load(), fingerprint)
        name, total = self._compose(entry, report)
        if total > entry["budget"]["epsilon"] and not force:
            raise PrivdiffError(self._refusal(entry, report, name, total))
        return name, total

    def record(self, fingerprint: str, report: PrivacyReport) -> tuple[str, float]:
        """Add a written release to the ledger; (accountant, epsilon) of all releases including it.

        A release past the budget (made with ``force``) is marked ``"forced": true``.
        """
        data = self._load()
        entry = self._entry(data, fingerprint)
        if any(r["release_id"] == report.release_id for r in entry["releases"]):
            raise PrivdiffError(f"release {report.release_id} is already recorded in {self.path}")
        name, total = self._compose(entry, report)
        entry["releases"].append({
            "release_id": report.release_id,
            "mechanism": report.mechanism,
            "noise_multiplier": report.noise_multiplier,
            "sample_rate": report.sample_rate,
            "steps": report.steps,
            "clip_norm": report.clip_norm,
            "epsilon": report.epsilon,
            "delta": report.delta,
            "accountant": report.accountant,
            "private": report.private,
            "dataset_label": report.dataset_label,
            "created": report.created,
            "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "forced": total > entry["budget"]["epsilon"],
            "total_epsilon": total,
            "total_accountant": name,
        })
        self._save(data)
        return name, total

    def _compose(self, entry: dict, report: PrivacyReport) -> tuple[str, float]:
        new = (report.noise_multiplier, report.sample_rate, report.steps)
        return composed_epsilon([*_events(entry), new], entry["budget"]["delta"], self.accountant)

    def _refusal(self, entry: dict, report: PrivacyReport, name: str, total: float) -> str:
        budget, n = entry["budget"], len(entry["releases"])
        label = f" ({report.dataset_label})" if report.dataset_label else ""
        return (f"release refused: with {n} earlier release(s) of this dataset{label} the total is "
                f"epsilon={total:.4g} > budget epsilon={budget['epsilon']:g} at delta={budget['delta']:g} "
                f"({name} accountant, ledger {self.path}); override explicitly with force")

    def _entry(self, data: dict, fingerprint: str) -> dict:
        entry = data["datasets"].get(_check_fingerprint(fingerprint))
        if not entry or not entry["budget"]:
            raise PrivdiffError(f"no privacy budget set for this dataset in {self.path}; set one first")
        return entry

    def _load(self) -> dict:
        if not self.path.exists():
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "datasets": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PrivdiffError(f"cannot read budget ledger {self.path}: {exc.strerror or exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PrivdiffError(f"budget ledger {self.path} is corrupt (not JSON: {exc})") from exc
        try:
            _validate(data)
        except KeyError as exc:
            raise PrivdiffError(f"budget ledger {self.path} is corrupt (missing key {exc})") from exc
        except (PrivdiffError, TypeError, AttributeError) as exc:
            raise PrivdiffError(f"budget ledger {self.path} is corrupt ({exc})") from exc
        return data

    def _save(self, data: dict) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=2, allow_nan=False) + "\n", force=True)


def _validate(data: object) -> None:
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise PrivdiffError(f"not a {LEDGER_FORMAT} file")
    if data.get("version") != LEDGER_VERSION:
        raise PrivdiffError(f"unsupported version {data.get('version')!r}")
    if not isinstance(data["datasets"], dict):
        raise PrivdiffError("'datasets' is not an object")
    for fingerprint, entry in data["datasets"].items():
        _check_fingerprint(fingerprint)
        if entry["budget"] is not None:
            checks.positive("budget epsilon", entry["budget"]["epsilon"])
            checks.open_unit("budget delta", entry["budget"]["delta"])
        if not isinstance(entry["releases"], list):
            raise PrivdiffError("'releases' is not a list")
        for release in entry["releases"]:
            if not isinstance(release.get("release_id"), str):
                raise PrivdiffError("a release has no release_id")
            checks.positive("noise_multiplier", release["noise_multiplier"])
            checks.sample_rate(release["sample_rate"])
            checks.count("steps", release["steps"])


def _events(entry: dict) -> list[Event]:
    return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in entry["releases"]]


def _check_fingerprint(fingerprint: object) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise PrivdiffError(f"dataset fingerprint must be 64 lowercase hex digits, got {fingerprint!r}")
    return fingerprint


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise PrivdiffError(f"cannot read dataset file {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()
