"""Privacy reports: contents, JSON / safetensors metadata round trips, sidecars."""

import dataclasses
import json
import re
from datetime import UTC, datetime

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import privdiff
from privdiff.errors import PrivdiffError
from privdiff.privacy.report import (
    NOT_PRIVATE_NOTE,
    RELATION_NOTES,
    REPORT_KEY,
    PrivacyReport,
    make_report,
    sidecar_path,
)

FIELDS = {
    "mechanism", "epsilon", "delta", "noise_multiplier", "sample_rate", "clip_norm", "bound", "center", "steps",
    "accountant", "relation", "public_size", "library_version", "release_id", "dataset_label", "private", "notes",
    "created", "world_size",
}


def report(**overrides) -> PrivacyReport:
    args = {
        "mechanism": "dpagg-ti", "epsilon": 1.828, "delta": 1e-5, "noise_multiplier": 1.0,
        "sample_rate": 0.01, "clip_norm": 0.5, "steps": 1000, "accountant": "pld", "relation": "replace-one",
        "public_size": 400, "bound": "normalize", "center": "init word 'style'",
    } | overrides
    return make_report(**args)


def test_make_report_fills_public_fields_only():
    r = report(dataset_label="my cats")
    assert {f.name for f in dataclasses.fields(r)} == FIELDS  # nothing else, e.g. no dataset hash or paths
    assert set(json.loads(r.to_json())) == FIELDS
    assert r.library_version == privdiff.__version__
    assert re.fullmatch(r"[0-9a-f]{32}", r.release_id)
    assert r.release_id != report().release_id
    created = datetime.fromisoformat(r.created)
    assert created.utcoffset() == UTC.utcoffset(None)
    assert r.private and r.notes == [RELATION_NOTES["replace-one"]]
    assert r.relation == "replace-one" and r.bound == "normalize" and r.center == "init word 'style'"
    assert "N is public under this relation" in RELATION_NOTES["replace-one"]
    assert "not the dataset's size" in report(relation="add-remove").notes[0]
    assert "DP-SGD convention" in report(relation="add-remove (N public)").notes[0]


def test_a_privdiff_0_1_report_still_reads():
    old = json.loads(report().to_json())
    for key in ("relation", "public_size", "bound", "center"):
        del old[key]
    old["dataset_size"] = 12
    parsed = PrivacyReport.from_json(json.dumps(old))
    assert parsed.public_size == 12 and parsed.relation == "add-remove (N public)" and "0.1" in parsed.center


def test_reproducible_seed_is_marked_not_private():
    r = report(private=False, notes=["seed 7"])
    assert not r.private
    assert r.notes == [RELATION_NOTES["replace-one"], NOT_PRIVATE_NOTE, "seed 7"]


def test_json_round_trip():
    r = report(dataset_label=None)
    assert PrivacyReport.from_json(r.to_json()) == r


def test_metadata_round_trip_through_safetensors(tmp_path):
    r = report(dataset_label="ünïcode label")
    md = r.to_metadata()
    assert list(md) == [REPORT_KEY] == ["privdiff.privacy_report"]
    assert isinstance(md[REPORT_KEY], str)
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path), metadata=md)
    with safe_open(str(path), framework="pt") as f:
        assert PrivacyReport.from_metadata(f.metadata()) == r
    assert PrivacyReport.from_metadata({"format": "pt"}) is None
    assert PrivacyReport.from_metadata(None) is None


def test_sidecar_is_atomic_and_refuses_overwrite(tmp_path):
    r = report()
    artifact = tmp_path / "target.safetensors"
    written = r.write_sidecar(artifact)
    assert written == sidecar_path(artifact) == tmp_path / "target.safetensors.privacy.json"
    assert PrivacyReport.from_json(written.read_text(encoding="utf-8")) == r
    with pytest.raises(PrivdiffError, match="already exists"):
        report().write_sidecar(artifact)
    other = report()
    other.write_sidecar(artifact, force=True)
    assert PrivacyReport.from_json(written.read_text(encoding="utf-8")) == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.safetensors.privacy.json"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "privacy report is not valid JSON"),
        ("[1, 2]", "privacy report must be a JSON object, got list"),
        ('{"mechanism": "x"}', "privacy report has no 'epsilon' field"),
    ],
)
def test_from_json_errors(text, fragment):
    with pytest.raises(PrivdiffError) as info:
        PrivacyReport.from_json(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("epsilon", "1.0"), ("steps", 1.5), ("private", 1), ("notes", [1]), ("dataset_label", 3)]
)
def test_from_json_checks_types(field, value):
    data = json.loads(report().to_json()) | {field: value}
    with pytest.raises(PrivdiffError, match=f"privacy report field '{field}' must be"):
        PrivacyReport.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"epsilon": float("nan")}, "epsilon must be a finite number, got nan"),
        ({"delta": 0.0}, "delta must be in (0, 1), got 0.0"),
        ({"sample_rate": 2.0}, "sample_rate must be in (0, 1], got 2.0"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"public_size": 0}, "public_size must be an integer >= 1, got 0"),
        ({"relation": "swap"}, "relation must be one of add-remove, replace-one"),
        ({"mechanism": ""}, "mechanism must be a non-empty string"),
        ({"dataset_label": 5}, "dataset_label must be a string or None, got 5"),
    ],
)
def test_make_report_bad_values(overrides, fragment):
    with pytest.raises(PrivdiffError) as info:
        report(**overrides)
    assert fragment in str(info.value)


def test_version_of_a_plain_checkout_comes_from_pyproject(monkeypatch):
    import importlib.metadata
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+: the library itself parses without it

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(privdiff, "version", not_installed)
    pyproject = tomllib.loads((Path(privdiff.__file__).parents[1] / "pyproject.toml").read_text())
    assert privdiff._version() == pyproject["project"]["version"] != "0.0.0+local"


def test_a_report_from_before_world_size_reads_as_one_process():
    old = json.loads(report().to_json())
    del old["world_size"]
    assert PrivacyReport.from_json(json.dumps(old)).world_size == 1
    with pytest.raises(PrivdiffError, match="world_size"):
        PrivacyReport.from_json(json.dumps({**old, "world_size": 0}))
