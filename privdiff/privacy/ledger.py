"""Privacy budget ledger: a local JSON file the data owner keeps and never ships (docs/privacy.md).

The ledger charges **each image** (identified by the SHA-256 of its file's bytes) for every release it could
have taken part in, so a folder that shares images with earlier releases inherits their spend. A budget
(epsilon, delta) bounds what any single image may spend; an image's spend is the accountant's composition
of all its releases at the budget's delta.

A release goes through three steps, each under an exclusive file lock (so concurrent runs never exceed
the budget nor lose an entry)::

    reservation = ledger.reserve(digests, report)   # before any private computation; refuses over budget
    ...                                            # train / aggregate, write the artifact
    reservation.commit()                           # or reservation.cancel() when the run failed cleanly

A process killed in between leaves its reservation in the ledger, counted (conservative), until the user
clears it explicitly (``privdiff ledger clear``). The image digests stay in the ledger: they tell
neighbouring datasets apart and must never be released.

One cohesive thing, kept whole over 400 lines: the ledger file, its lock and its reserve/commit/cancel
steps, which only make their guarantee together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import PRIVATE, atomic_write_text
from privdiff.io.untrusted import config_float, config_int, parse_json, read_bytes
from privdiff.privacy import checks
from privdiff.privacy.accountants import (
    ADD_REMOVE,
    MAX_STEPS,
    MIN_SAMPLE_RATE,
    NOISE_MULTIPLIERS,
    REPLACE_ONE,
    Event,
    composed_epsilon,
)
from privdiff.privacy.report import PrivacyReport

LEDGER_FORMAT = "privdiff-budget-ledger"
LEDGER_VERSION = 2
RESERVED, COMMITTED = "reserved", "committed"
LOCK_TIMEOUT_S = 120.0
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
MAX_LEDGER_BYTES = 64 << 20  # ~1.7 million (image, release) charges; a larger file is refused unread
_DEPTH = 4  # ledger -> releases -> entry -> (a value): anything deeper is not a ledger
_TEXT = 4096  # characters of a text field (a path, a label, a time)
_ENTRY_TEXT = ("dataset_label", "created", "reserved", "committed", "request", "output")  # text or null


def image_digests(files: Sequence[str | os.PathLike]) -> list[str]:
    """SHA-256 of each file's bytes. Two identical files are refused: that image would count twice.

    LOCAL ONLY: a deterministic hash tells neighbouring datasets apart, so it must never be released.
    """
    if not files:
        raise PrivdiffError("cannot charge a release without image files")
    seen: dict[str, Path] = {}
    for file in map(Path, files):
        digest = _file_digest(file)
        if digest in seen:
            raise PrivdiffError(f"{file} is identical to {seen[digest]}: remove one (a duplicated image counts "
                                "twice in every release)")
        seen[digest] = file
    return list(seen)


def request_key(digests: Sequence[str], parameters: dict[str, object]) -> str:
    """A local key for "the same request": the same images (in any order) and the same parameters."""
    text = json.dumps({"images": sorted(digests), "parameters": parameters}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Spend:
    """The largest spend of any image of a request: epsilon at the budget's delta, under ``relation``."""

    epsilon: float
    delta: float
    accountant: str
    relation: str
    releases: int


class BudgetLedger:
    """The per-image releases and the (epsilon, delta) budget kept in the JSON file ``path``."""

    def __init__(self, path: str | os.PathLike, accountant: str | None = None) -> None:
        self.path = Path(path).expanduser().resolve()  # a symlinked ledger is one ledger, locked where it lives
        self.accountant = accountant

    def reserve(
        self,
        digests: Sequence[str],
        report: PrivacyReport,
        *,
        budget: tuple[float, float] | None = None,
        change_budget: bool = False,
        force: bool = False,
        request: str | None = None,
        output: str | None = None,
    ) -> Reservation:
        """Charge ``report``'s release to each image in ``digests``, refusing it over the budget.

        ``budget`` sets the ledger's budget when it has none; a different stored budget is only replaced
        with ``change_budget``. Without a budget the ledger only records. ``force`` releases past the budget
        (the entry is marked forced). Nothing is written when the request is refused.
        """
        digests = [_check_digest(d) for d in digests]
        if not digests:
            raise PrivdiffError("cannot charge a release without images")
        new_budget = _check_budget(budget) if budget is not None else None
        with self._locked():
            created = not self.path.exists()
            data = self._load()
            previous, prior = data["budget"], set(data["releases"])
            if new_budget is not None and previous is not None and new_budget != previous and not change_budget:
                raise PrivdiffError(
                    f"ledger {self.path} already has the budget epsilon={previous['epsilon']:g}, "
                    f"delta={previous['delta']:g}; pass change_budget (--change-budget) to replace it")
            if new_budget is not None:
                data["budget"] = new_budget
            if data["budget"] is not None and data["budget"]["delta"] >= 1 / len(digests):
                raise PrivdiffError(f"budget delta {data['budget']['delta']:g} must be below 1/N = "
                                    f"{1 / len(digests):.3g} for N={len(digests)} images")
            if report.release_id in data["releases"]:
                raise PrivdiffError(f"release {report.release_id} is already in {self.path}")
            entry = _release_entry(report, request, output)
            data["releases"][report.release_id] = entry
            for digest in digests:
                data["images"].setdefault(digest, []).append(report.release_id)
            spend = self._worst_spend(data, digests)
            if spend is not None and spend.epsilon > data["budget"]["epsilon"]:
                if not force:
                    raise PrivdiffError(self._refusal(data, spend))
                entry["forced"] = True
            self._save(data)
        return Reservation(self, report.release_id, previous, new_budget, created, spend, prior)

    def commit(self, release_id: str) -> None:
        """Mark a reserved release as written."""
        with self._locked():
            data = self._load()
            entry = data["releases"].get(release_id)
            if entry is None:
                raise PrivdiffError(f"release {release_id} is not in ledger {self.path}")
            entry["status"] = COMMITTED
            entry["committed"] = _now()
            self._save(data)

    def cancel(self, release_id: str, restore_budget: dict | None = None, set_budget: dict | None = None,
               created: bool = False, prior: set[str] | None = None) -> None:
        """Remove a reserved (never committed) release; used for clean failures and by ``clear``.

        A budget this reservation set is restored to ``restore_budget`` unless a release made since relies
        on it (every remaining release is one of ``prior``), and a ledger the reservation created is removed
        again when nothing else is in it.
        """
        with self._locked():
            data = self._load()
            entry = data["releases"].get(release_id)
            if entry is None:
                raise PrivdiffError(f"release {release_id} is not in ledger {self.path}")
            if entry["status"] != RESERVED:
                raise PrivdiffError(f"release {release_id} in {self.path} was committed: its file was released, "
                                    "so its spend stays")
            del data["releases"][release_id]
            for digest in list(data["images"]):
                ids = [r for r in data["images"][digest] if r != release_id]
                if ids:
                    data["images"][digest] = ids
                else:
                    del data["images"][digest]
            undisturbed = prior is not None and set(data["releases"]) <= prior
            if set_budget is not None and data["budget"] == set_budget and undisturbed:
                data["budget"] = restore_budget
            if created and not data["releases"]:
                self.path.unlink(missing_ok=True)
            else:
                self._save(data)

    def resume(self, release_id: str) -> Reservation:
        """The reservation of an interrupted release that is being continued (it was charged once already)."""
        entry = self.release(release_id)
        if entry is None:
            raise PrivdiffError(f"ledger {self.path} holds no reservation {release_id} to resume (was it cleared?); "
                                "remove the checkpoint to start a new release")
        if entry["status"] != RESERVED:
            raise PrivdiffError(f"release {release_id} in {self.path} is already {entry['status']}; nothing to resume")
        return Reservation(self, release_id, None, None, False, None, None)

    def clear(self, release_id: str) -> None:
        """Remove a reservation left by a run that was killed (the user vouches nothing was released)."""
        self.cancel(release_id)

    def release(self, release_id: str) -> dict | None:
        """The ledger entry of ``release_id``, or None."""
        with self._locked():
            return self._load()["releases"].get(release_id)

    def find(self, request: str) -> dict | None:
        """The latest committed release made for the request key ``request``, or None."""
        with self._locked():
            releases = self._load()["releases"]
        found = [dict(r, release_id=i) for i, r in releases.items()
                 if r.get("request") == request and r["status"] == COMMITTED]
        return found[-1] if found else None

    def spent(self, digests: Sequence[str]) -> Spend | None:
        """The largest spend of any of ``digests`` (reserved releases count), or None without a budget."""
        digests = [_check_digest(d) for d in digests]
        with self._locked():
            data = self._load()
        return self._worst_spend(data, digests)

    def summary(self) -> dict:
        """Budget, releases (with status) and the largest spend of any image: what ``privdiff ledger show`` prints."""
        with self._locked():
            data = self._load()
        worst = self._worst_spend(data, list(data["images"]))
        return {
            "ledger": str(self.path),
            "budget": data["budget"],
            "images": len(data["images"]),
            "largest_image_spend": worst and {"epsilon": worst.epsilon, "delta": worst.delta,
                                              "accountant": worst.accountant, "relation": worst.relation},
            "releases": [dict(r, release_id=i) for i, r in data["releases"].items()],
        }

    def _worst_spend(self, data: dict, digests: Sequence[str]) -> Spend | None:
        budget = data["budget"]
        if budget is None:
            return None
        groups = {frozenset(data["images"].get(d, [])) for d in digests}
        maximal = [g for g in groups if not any(g < other for other in groups)]  # a subset never spends more
        worst: Spend | None = None
        for ids in maximal:
            spend = self._compose([data["releases"][i] for i in ids], budget["delta"])
            if worst is None or spend.epsilon > worst.epsilon:
                worst = spend
        return worst

    def _compose(self, releases: list[dict], delta: float) -> Spend:
        # A replace-one bound covers every subsampled Gaussian release; add/remove only when all are add/remove.
        relation = ADD_REMOVE if all(r["relation"] == ADD_REMOVE for r in releases) else REPLACE_ONE
        accountant = self.accountant if relation == ADD_REMOVE else "pld"
        events: list[Event] = [(_round_down(r["noise_multiplier"]), min(1.0, _round_up(r["sample_rate"])), r["steps"])
                               for r in releases]
        name, eps = composed_epsilon(events, delta, accountant, relation=relation)
        return Spend(eps, delta, name, relation, len(releases))

    def _refusal(self, data: dict, spend: Spend) -> str:
        budget = data["budget"]
        return (f"release refused: an image of this dataset would reach epsilon={spend.epsilon:.4g} over "
                f"{spend.releases} release(s) > budget epsilon={budget['epsilon']:g} at delta={budget['delta']:g} "
                f"({spend.accountant} accountant, {spend.relation}; ledger {self.path}); override explicitly with "
                "force_budget (--force-budget)")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.path.parent.is_dir():
            raise PrivdiffError(f"ledger folder {self.path.parent} does not exist")
        try:
            with _exclusive(self.path):
                yield
        except Timeout:
            raise PrivdiffError(f"ledger {self.path} is locked by another run for over {LOCK_TIMEOUT_S:g} s") from None
        except PermissionError as exc:
            raise PrivdiffError(f"cannot lock ledger {self.path}: {exc.strerror or exc}") from None

    def _load(self) -> dict:
        if not self.path.exists():
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "budget": None, "releases": {}, "images": {}}
        text = read_bytes(self.path, "budget ledger", MAX_LEDGER_BYTES)  # refuses a FIFO or folder unopened
        try:
            data = parse_json(text, "its text", MAX_LEDGER_BYTES, _DEPTH)
            _validate(data)
        except PrivdiffError as exc:
            raise PrivdiffError(f"budget ledger {self.path} is corrupt ({exc})") from None
        return data

    def _save(self, data: dict) -> None:
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, allow_nan=False) + "\n", force=True,
                              mode=PRIVATE)  # it holds image digests: the owner's eyes only
        except OSError as exc:
            raise PrivdiffError(f"cannot write budget ledger {self.path}: {exc.strerror or exc}") from exc


@dataclass
class Reservation:
    """A release charged in the ledger before the work; commit it once written, cancel it on a clean failure."""

    ledger: BudgetLedger
    release_id: str
    previous_budget: dict | None
    set_budget: dict | None
    created_ledger: bool
    spend: Spend | None
    prior: set[str] | None

    def commit(self) -> None:
        self.ledger.commit(self.release_id)

    def cancel(self) -> None:
        self.ledger.cancel(self.release_id, restore_budget=self.previous_budget, set_budget=self.set_budget,
                           created=self.created_ledger, prior=self.prior)


def _release_entry(report: PrivacyReport, request: str | None, output: str | None) -> dict:
    return {
        "status": RESERVED,
        "mechanism": report.mechanism,
        "relation": REPLACE_ONE if report.relation == REPLACE_ONE else ADD_REMOVE,  # what the accountant composes
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
        "reserved": _now(),
        "forced": False,
        "request": request,
        "output": output,
    }


@contextmanager
def _exclusive(ledger: Path) -> Iterator[None]:
    """An exclusive lock for ``ledger``: flock on its folder where POSIX has it (no lock file to leave
    behind), else a ``<ledger>.lock`` file."""
    if fcntl is None:
        with FileLock(str(ledger) + ".lock", timeout=LOCK_TIMEOUT_S):
            yield
        return
    fd = os.open(ledger.parent, os.O_RDONLY)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Timeout(str(ledger)) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _round_down(value: float, digits: int = 3) -> float:
    """``value`` rounded down to ``digits`` significant digits: less noise in the composition, a larger epsilon."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.floor(value * scale) / scale


def _round_up(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits: a higher sampling rate, a larger epsilon."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def _check_budget(budget: tuple[float, float]) -> dict:
    epsilon, delta = (config_float(value, f"budget {name}", 0, math.inf)
                      for name, value in zip(("epsilon", "delta"), budget, strict=True))
    return {"epsilon": checks.positive("budget epsilon", epsilon), "delta": checks.open_unit("budget delta", delta)}


def _validate(data: object) -> None:
    """Every field of a loaded ledger, typed and in range; one line naming the first bad field."""
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise PrivdiffError(f"not a {LEDGER_FORMAT} file")
    if data.get("version") != LEDGER_VERSION:
        raise PrivdiffError(f"version {data.get('version')!r:.60} is not {LEDGER_VERSION}: ledgers of privdiff 0.1 "
                            "charged whole datasets, not images; start a new ledger")
    budget, releases, images = (_field(data, key, "the ledger") for key in ("budget", "releases", "images"))
    if budget is not None:
        if not isinstance(budget, dict) or set(budget) != {"epsilon", "delta"}:
            raise PrivdiffError("budget must be null or an object of epsilon and delta")
        _check_budget((budget["epsilon"], budget["delta"]))
    if not isinstance(releases, dict) or not isinstance(images, dict):
        raise PrivdiffError("'releases' and 'images' must be objects")
    for release_id, release in releases.items():
        _check_release(release_id, release)
    for digest, ids in images.items():
        _check_digest(digest)
        if not isinstance(ids, list) or any(not isinstance(i, str) or i not in releases for i in ids):
            raise PrivdiffError(f"image {digest[:12]}… lists an unknown release")


def _check_release(release_id: str, release: object) -> None:
    """A release entry as ``_release_entry`` writes it (``committed`` once committed); unknown fields are kept."""
    where = f"release {release_id[:40]!r}"
    if not release_id or len(release_id) > 64 or not release_id.isprintable():
        raise PrivdiffError(f"{where}: a release id must be 1 to 64 printable characters")
    if not isinstance(release, dict):
        raise PrivdiffError(f"{where} is not an object")
    for key, allowed in (("status", (RESERVED, COMMITTED)), ("relation", (ADD_REMOVE, REPLACE_ONE))):
        if _field(release, key, where) not in allowed:
            raise PrivdiffError(f"{where}: unknown {key} {release[key]!r:.60}")
    config_float(_field(release, "noise_multiplier", where), f"{where}: noise_multiplier", *NOISE_MULTIPLIERS)
    config_float(_field(release, "sample_rate", where), f"{where}: sample_rate", MIN_SAMPLE_RATE, 1)
    config_int(_field(release, "steps", where), f"{where}: steps", 1, MAX_STEPS)
    for key in ("clip_norm", "epsilon"):
        checks.positive(f"{where}: {key}", config_float(_field(release, key, where), f"{where}: {key}", 0, math.inf))
    checks.open_unit(f"{where}: delta", config_float(_field(release, "delta", where), f"{where}: delta", 0, 1))
    for key in ("mechanism", "accountant"):
        if not isinstance(_field(release, key, where), str) or not 0 < len(release[key]) <= 200:
            raise PrivdiffError(f"{where}: {key} must be text of 1 to 200 characters, got {release[key]!r:.60}")
    for key in ("private", "forced"):
        if not isinstance(_field(release, key, where), bool):
            raise PrivdiffError(f"{where}: {key} must be true or false, got {release[key]!r:.60}")
    for key in _ENTRY_TEXT:
        value = release.get(key) if key == "committed" else _field(release, key, where)
        if value is not None and (not isinstance(value, str) or len(value) > _TEXT or "\0" in value):
            raise PrivdiffError(f"{where}: {key} must be null or text of at most {_TEXT} characters without NUL, "
                                f"got {value!r:.60}")


def _field(obj: dict, key: str, where: str) -> object:
    if key not in obj:
        raise PrivdiffError(f"{where} has no {key!r}")
    return obj[key]


def _check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise PrivdiffError(f"image digest must be 64 lowercase hex digits, got {digest!r}")
    return digest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise PrivdiffError(f"cannot read image file {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()
