"""The GUI fronts' audits (privdiff/app/audit.py, used by the ComfyUI audit nodes and the A1111 Audit sub-tab): the
release's own checks, one run with canaries, a bound that catches a broken mechanism, and nothing written or charged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.app.audit import audit_aggregate_files, audit_embedding, audit_spectral, audit_style_target, audit_text
from privdiff.app.release_options import Release
from privdiff.audit.result import AuditResult
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding, save_embedding
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import PrivateDataset
from privdiff.privacy.randomness import SecureRandom
from privdiff.wavelet.training import TrainConfig

_spec = importlib.util.spec_from_file_location("privdiff_app_audit_standins",
                                               Path(__file__).with_name("audit_standins.py"))
standins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standins)

EPSILON = 1.0
CANARIES = 64
SUMMARY = "; not a release: nothing written, no ledger charged"


def release(tmp_path: Path, **overrides) -> Release:
    """Release options whose output and ledger fields an audit must ignore (a ledger path, a budget, overwrite)."""
    options = dict(name="audited", epsilon=EPSILON, delta=1e-5, sample_rate=1.0, clip_norm=1.0, bound="clip",
                   prompt_template="{}", overwrite=True, ledger_path=str(tmp_path / "ledger.json"),
                   budget_epsilon=2.0, new_release=True)
    return Release(**{**options, **overrides})


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="privdiff")  # the low signal-to-noise warnings of small runs


@pytest.fixture
def no_noise(monkeypatch):
    """The test double of a broken mechanism: every noise draw of the release is zero."""
    monkeypatch.setattr(SecureRandom, "discrete_gaussian", lambda self, size, sigma: np.zeros(size, dtype=np.int64))


def _dataset(count: int = 4, size: int = standins.SIZE) -> PrivateDataset:
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    return PrivateDataset(files=[Path(f"img{i}.png") for i in range(count)], images=images,
                          digests=[f"{i:064x}" for i in range(count)])


def _bound(text: str) -> dict:
    line, body = text.split("\n\n", 1)
    assert line.startswith("audited lower bound ") and line.endswith(SUMMARY) and "\n" not in line, line
    return json.loads(body)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_audit_text_is_one_line_then_the_json():
    result = AuditResult(kind="aggregate", attack="projection", claimed_epsilon=1.0, delta=1e-5,
                         relation="add-remove", noise_multiplier=3.7, sample_rate=1.0, steps=1,
                         epsilon_lower_bound=0.0, canaries=64, included=30, guesses=1, correct=0, k_plus=1,
                         k_minus=0, confidence=0.95, candidates=10)
    text = audit_text(result)
    assert text.splitlines()[0] == ("audited lower bound 0.00 <= claimed epsilon 1.00 at 95% (M=64, 0 of 1 guesses "
                                    "correct); not a release: nothing written, no ledger charged")
    assert json.loads(text.split("\n\n", 1)[1])["kind"] == "aggregate"
    leaky = audit_text(AuditResult(**{**result.__dict__, "epsilon_lower_bound": 2.5, "correct": 26,
                                      "guesses": 26}))
    assert "audited lower bound 2.50 > (LEAKS MORE THAN CLAIMED) claimed epsilon 1.00" in leaky


def test_aggregate_files_audit_stays_below_the_claim_and_catches_the_noise_removed(tmp_path, monkeypatch):
    folder = tmp_path / "per_image"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_embedding(Embedding({"clip_l": 0.02 * torch.randn(1, 768, generator=g)}), folder / f"img{i}.safetensors")
    before = _files(tmp_path)
    with pytest.raises(PrivdiffError, match="one_image_per_file"):
        audit_aggregate_files(str(folder), False, "", release(tmp_path), CANARIES, 0.95)
    real = _bound(audit_aggregate_files(str(folder), True, "", release(tmp_path), CANARIES, 0.95))
    assert real["kind"] == "aggregate" and real["claimed_epsilon"] == EPSILON
    assert real["epsilon_lower_bound"] <= EPSILON and real["canaries"] == CANARIES
    monkeypatch.setattr(SecureRandom, "discrete_gaussian", lambda self, size, sigma: np.zeros(size, dtype=np.int64))
    broken = _bound(audit_aggregate_files(str(folder), True, "", release(tmp_path), CANARIES, 0.95))
    assert broken["epsilon_lower_bound"] > EPSILON, broken
    assert _files(tmp_path) == before  # no embedding, no ledger


def test_textual_inversion_audit_catches_dpagg_with_its_noise_removed(tmp_path, no_noise):
    config = TIConfig(steps=3, batch_size=16)
    text = audit_embedding(standins.DenoiserBackend(), _dataset(), "dpagg", config,
                           release(tmp_path, clip_norm=0.05), CANARIES, 0.95, progress=lambda done, total: None)
    result = _bound(text)
    assert result["kind"] == "ti-aggregate" and result["epsilon_lower_bound"] > EPSILON, result
    assert _files(tmp_path) == []


def test_textual_inversion_audit_runs_both_methods_on_the_tiny_model(sd1_backend, tmp_path):
    calls = []
    config = TIConfig(steps=1, batch_size=8)
    dpagg = _bound(audit_embedding(sd1_backend, _dataset(), "dpagg", config, release(tmp_path), 8, 0.9,
                                   progress=lambda done, total: calls.append((done, total))))
    assert dpagg["kind"] == "ti-aggregate" and dpagg["confidence"] == 0.9 and calls
    dpsgd = _bound(audit_embedding(sd1_backend, _dataset(), "dpsgd", config, release(tmp_path), 8, 0.95))
    assert dpsgd["kind"] == "dpsgd-ti" and dpsgd["epsilon_lower_bound"] <= dpsgd["claimed_epsilon"]
    assert _files(tmp_path) == []


def test_style_target_audit_resizes_the_dataset_and_stays_below_the_claim(tmp_path):
    result = _bound(audit_style_target(standins.RandomFeatureEncoder(), _dataset(size=48), release(tmp_path),
                                       CANARIES, 0.95))
    assert result["kind"] == "guidance-target" and result["epsilon_lower_bound"] <= EPSILON
    assert _files(tmp_path) == []


def test_spectral_audit_writes_nothing(public_prior, tmp_path):
    images = write_style_images(tmp_path / "private", count=6, size=32)
    before = _files(tmp_path)
    options = release(tmp_path, sample_rate=0.5, epsilon=4.0, delta=1e-3)
    result = _bound(audit_spectral(public_prior, images, options, TrainConfig(steps=2, lr=1e-3), 8, 0.95))
    assert result["kind"] == "wavelet-finetune" and result["epsilon_lower_bound"] <= result["claimed_epsilon"]
    assert _files(tmp_path) == before
    with pytest.raises(PrivdiffError, match="public_size does not apply"):
        audit_spectral(public_prior, images, release(tmp_path, public_size=10), TrainConfig(steps=1), 8, 0.95)


@pytest.mark.parametrize(("overrides", "canaries", "confidence", "needle"), [
    ({}, 1, 0.95, "canaries"),
    ({}, 8, 1.5, "confidence"),
    ({"delta": 0.1}, 8, 0.95, "delta"),
    ({"sample_rate": 0.0}, 8, 0.95, "sample_rate"),
    ({"noise_multiplier": 2.0}, 8, 0.95, "set exactly one of epsilon"),
])
def test_bad_input_is_refused_in_one_line_before_any_run(tmp_path, monkeypatch, overrides, canaries, confidence,
                                                         needle):
    import privdiff.audit.aggregates as audits

    monkeypatch.setattr(audits, "run_dpagg_ti", lambda *a, **k: pytest.fail("a bad input reached the run"))
    with pytest.raises(PrivdiffError) as refused:
        audit_embedding(standins.DenoiserBackend(), _dataset(), "dpagg", TIConfig(steps=1),
                        release(tmp_path, **overrides), canaries, confidence)
    assert needle in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(PrivdiffError, match="unknown method"):
        audit_embedding(standins.DenoiserBackend(), _dataset(), "magic", TIConfig(steps=1), release(tmp_path), 8,
                        0.95)
    assert _files(tmp_path) == []
